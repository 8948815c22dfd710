"""The pipeline flow: DVC's stage graph, each stage a Prefect task that DVC itself reproduces.

The DAG is read from dvc.yaml (DVC's own graph), never written here: a stage added to dvc.yaml is orchestrated with
no change to this file. Every stage whose upstream is done is submitted at once, up to `orchestration.max_workers`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from prefect import flow, task
from prefect.futures import as_completed
from prefect.logging import get_run_logger
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from brainmri.config import Orchestration, load_params
from brainmri.core.errors import BrainMRIError

log = logging.getLogger("brainmri")
LOCK_WAIT_SECONDS = 1800  # how long a stage waits for another DVC process (a user's `dvc repro`) before giving up
BUSY = 75  # flows.repro_one's exit code when another process holds the workspace's files


class StageFailed(BrainMRIError):
    """A stage's command failed; `retryable` is False for bad data or params (exit code 2: the same again)."""

    def __init__(self, stage: str, code: int, tail: str):
        self.stage, self.code, self.retryable = stage, code, code != 2
        super().__init__(f"{stage} failed (exit code {code}): {tail.strip() or 'no error output'}")


class WorkspaceBusy(BrainMRIError):
    """Another DVC process kept the workspace's files for longer than we wait."""


class PipelineFailed(BrainMRIError):
    """One or more stages failed; the message names them, why, and what did not run because of them."""


def retry_on_io_error(task, task_run, state) -> bool:
    """Prefect retry condition: retry crashes and I/O failures, never bad data or params (they fail the same way again)."""
    try:
        state.result()
    except StageFailed as exc:
        return exc.retryable
    except BrainMRIError:
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False


@contextmanager
def open_repo(root, token: str | None = None):
    """DVC's Repo at `root`, with the working directory there (DVC resolves some paths against it); with `token`,
    its lock is the flow run's private one (the flow already holds the workspace lock, see workspace_lock)."""
    from dvc.lock import make_lock
    from dvc.repo import Repo

    here = os.getcwd()
    os.chdir(root)
    try:
        with Repo(".") as repo:
            if token:
                repo.lock = make_lock(os.path.join(repo.tmp_dir, f"flow-{token}.lock"), tmp_dir=repo.tmp_dir, wait=True)
            yield repo
    finally:
        os.chdir(here)


def stage_graph(root: Path) -> dict[str, set[str]]:
    """Every stage with a command and the stages it depends on, from DVC's own graph of dvc.yaml."""
    with open_repo(root) as repo:
        graph = repo.index.graph  # edges run from a stage to the stages it depends on
        return {s.addressing: {u.addressing for u in graph.successors(s) if u.cmd} for s in graph.nodes if s.cmd}


def stage_command(root: Path, stage: str) -> str:
    """The command dvc.yaml gives `stage` (interpolated by DVC)."""
    with open_repo(root) as repo:
        return repo.stage.collect(f"dvc.yaml:{stage}")[0].cmd


def topological(graph: dict[str, set[str]]) -> list[str]:
    import graphlib

    return list(graphlib.TopologicalSorter(graph).static_order())


def _stage_env(verbose: bool) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this environment's `brainmri`
    if not verbose:
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up chatter
        env.setdefault("PYTHONWARNINGS", "ignore")  # library deprecation warnings; our own errors still surface
    return env


def stage_process(root: str, stage: str, token: str, lock: str) -> list[str]:
    """The command line of the process that reproduces one stage; `lock` is the timing lock's folder (brainmri/core/timing_lock.py)."""
    return [sys.executable, "-m", "flows.repro_one", root, stage, "--token", token, "--quiet", lock]


@task(name="reproduce_stage", task_run_name="{stage}", retry_condition_fn=retry_on_io_error)
def reproduce_stage(root: str, stage: str, token: str, lock: str, verbose: bool = False) -> dict:
    """Bring one DVC stage up to date through DVC (run, restore from the run-cache, or nothing); its log goes to Prefect."""
    run_log = get_run_logger()
    start, said, started_at = time.monotonic(), False, time.time()
    cmd = stage_process(root, stage, token, lock)
    while True:
        lines: list[str] = []
        with subprocess.Popen(
            cmd, cwd=root, env=_stage_env(verbose), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        ) as proc:
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if not line.startswith("{"):
                    run_log.info("%s", line.rstrip())  # the stage's whole log, in the Prefect UI
                    if verbose:
                        sys.stderr.write(line)
        record = next((json.loads(x) for x in reversed(lines) if x.startswith("{")), None)
        if proc.returncode == BUSY:
            if time.monotonic() - start > LOCK_WAIT_SECONDS:
                raise WorkspaceBusy(f"{stage}: the workspace stayed busy for {LOCK_WAIT_SECONDS} s: {'; '.join(record['busy'])}")
            if not said:
                run_log.info("%s: waiting, another DVC process holds files here: %s", stage, "; ".join(record["busy"]))
                said = True
            time.sleep(2)
            continue
        if proc.returncode != 0 or record is None:
            code = record.get("code", proc.returncode) if record else proc.returncode
            tail = "\n".join(x for x in lines[-12:] if not x.startswith("{"))
            raise StageFailed(stage, code, tail[-2000:])
        record.update(seconds=round(time.monotonic() - start, 2), started_at=started_at, finished_at=time.time())
        return record


@task(name="publish_report")
def publish_report(params_path: str) -> list[str]:
    """The report's tables as Markdown artifacts of the flow run (they read well in a remote UI: no file links)."""
    from prefect.artifacts import create_markdown_artifact

    from brainmri.report.tables import TABLES

    folder = load_params(params_path).path("report")
    ids = []
    for key, file in TABLES.items():
        if (folder / file).is_file():
            text = (
                folder / file
            ).read_text() + f"\n\nFull report: `{folder.name}/report.html` in the workspace (DVC output `{folder.name}`)."
            ids.append(create_markdown_artifact(key=f"{key}-table", markdown=text, description=f"{key} table"))
    return [str(i) for i in ids]


def task_runner(o: Orchestration):
    """The task runner params ask for: threads of this process, or a Dask cluster (prefect-dask)."""
    if o.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=o.max_workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise BrainMRIError("orchestration.task_runner is 'dask' but prefect-dask is not installed: pip install prefect-dask") from None
    if o.dask_address:
        return DaskTaskRunner(address=o.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": o.max_workers, "threads_per_worker": 1, "processes": True})


@contextmanager
def workspace_lock(root: str, token: str):
    """DVC's workspace lock, held for the whole flow run as one `dvc repro` holds it; taken only while no other DVC
    process is inside a stage (its read/write locks), so the flow never waits on a repro that waits on the flow."""
    lock = take_workspace_lock(root, token)
    try:
        yield
    finally:
        release_workspace_lock(root, token, lock)


def take_workspace_lock(root: str, token: str):
    """workspace_lock's taking half: DVC's lock object, held."""
    from dvc.lock import LockError, make_lock

    from flows.repro_one import foreign_holders

    tmp = Path(root) / ".dvc" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    lock, start, said = make_lock(str(tmp / "lock"), tmp_dir=str(tmp)), time.monotonic(), False
    while True:
        try:
            lock.lock()
        except LockError:
            holders = ["another DVC process holds the workspace lock"]
        else:
            holders = foreign_holders(str(tmp), token)
            if not holders:
                break
            lock.unlock()
        if time.monotonic() - start > LOCK_WAIT_SECONDS:
            raise WorkspaceBusy(f"the DVC workspace {root} stayed busy for {LOCK_WAIT_SECONDS} s: {'; '.join(holders)}")
        if not said:
            log.info("waiting for another DVC process in %s: %s", root, "; ".join(holders))
            said = True
        time.sleep(2)
    return lock


def release_workspace_lock(root: str, token: str, lock) -> None:
    lock.unlock()
    (Path(root) / ".dvc" / "tmp" / f"flow-{token}.lock").unlink(missing_ok=True)


# Workspace locks that `run` took before the flow started, by token; the flow's scheduling releases its own when done.
# Both run in this process: `run` calls the flow directly, and a flow's tasks run in its threads (or, with Dask, in
# other processes that never see this dict: they only run stage processes).
_HANDED: dict[str, object] = {}


def schedule(
    root: str, graph: dict[str, set[str]], o: Orchestration, verbose: bool, prepared: dict | None = None
) -> tuple[dict, dict, list[str]]:
    """Submit each stage as soon as its upstream is done, up to max_workers at once. A stage that times runtimes
    (orchestration.exclusive) runs beside the others, and no other stage process works while it times: the timing
    lock of brainmri/core/timing_lock.py, which each stage's process holds shared.

    Written here rather than with Prefect's `wait_for`: a task waiting on its upstream would hold a worker thread
    while it waits, and Prefect's tag concurrency limits need a limit created on the server beforehand.

    With `prepared` (from `prepare`, by `run`), the workspace lock is already held under its token and `dvc status`
    already read under it; the lock is released here when the stages are done, as it would be otherwise.
    """
    lock = str(load_params(Path(root) / "params.yaml").path("timing_cache").resolve())  # read once: an edit mid-run does not move it
    if prepared and prepared["token"] in _HANDED:
        token = prepared["token"]
        try:
            return _schedule(root, graph, o, verbose, token, lock, set(prepared["current"]))
        finally:
            release_workspace_lock(root, token, _HANDED.pop(token))
    token = uuid.uuid4().hex
    with workspace_lock(root, token):
        return _schedule(root, graph, o, verbose, token, lock, current(root, graph, token))


def _schedule(
    root: str, graph: dict[str, set[str]], o: Orchestration, verbose: bool, token: str, lock: str, fresh: set[str]
) -> tuple[dict, dict, list[str]]:
    opts = {"retries": o.retries, "retry_delay_seconds": o.retry_delay}
    order = topological(graph)
    done, failed, held, running = {}, {}, [], {}
    for stage in fresh:  # up to date, and nothing upstream will change: no process needed
        done[stage] = {"stage": stage, "ran": False, "restored": False, "reasons": [], "seconds": 0.0, "checked": "dvc status"}
    if done:
        log.info("%d of %d stages up to date (dvc status)", len(done), len(order))
    while len(done) + len(failed) + len(held) < len(order):
        for stage in order:
            if stage in done or stage in failed or stage in held or stage in running:
                continue
            if any(u in failed or u in held for u in graph[stage]):
                held.append(stage)
                continue
            if not graph[stage] <= done.keys() or len(running) >= o.max_workers:
                continue
            log.info("%s: started", stage)
            running[stage] = reproduce_stage.with_options(**opts).submit(root, stage, token, lock, verbose)
        if not running:
            continue
        future = next(as_completed(list(running.values())))
        stage = next(s for s, f in running.items() if f is future)
        del running[stage]
        try:
            done[stage] = r = future.result()
        except Exception as exc:  # the stage's own error, already logged in full by its task
            failed[stage] = str(exc)
            log.info("%s: FAILED", stage)
        else:
            what = "restored from the run-cache" if r["restored"] else "ran" if r["ran"] else "up to date"
            log.info("%s: %s (%.1f s)", stage, what, r["seconds"])
    return done, failed, held


def current(root: str, graph: dict[str, set[str]], token: str) -> set[str]:
    """Stages DVC finds up to date that no stale stage feeds: one `dvc status` for all of them.

    Each stale stage and everything downstream of it still goes through DVC's own reproduce (which also restores
    from the run-cache); this only spares a process per stage that would find nothing to do.
    """
    with open_repo(root, token) as repo:
        stale = {name for name in repo.status() if name in graph}  # the workspace lock is ours already
    downstream: dict[str, set[str]] = {s: set() for s in graph}
    for stage, ups in graph.items():
        for u in ups:
            downstream[u].add(stage)
    affected, todo = set(stale), list(stale)
    while todo:
        for d in downstream[todo.pop()]:
            if d not in affected:
                affected.add(d)
                todo.append(d)
    return set(graph) - affected


def failure_summary(failed: dict, held: list[str]) -> str:
    lines = [f"{len(failed)} stage(s) failed:"] + [f"  - {msg}" for msg in failed.values()]
    if held:
        lines.append(f"  held back by them: {', '.join(held)}")
    lines.append("  other branches finished and are recorded in dvc.lock")
    lines.append("  next: fix the cause above, then `brainmri run` again (or `dvc repro`); finished stages will not rerun")
    return "\n".join(lines)


@flow(name="brainmri-stages")
def run_stages(root: str, graph: dict, o: Orchestration, verbose: bool = False, prepared: dict | None = None):
    """Bring every stage up to date in DAG order, branches in parallel."""
    done, failed, held = schedule(root, {k: set(v) for k, v in graph.items()}, o, verbose, prepared)
    if failed:
        return Failed(message=failure_summary(failed, held), data=PipelineFailed(failure_summary(failed, held)))
    return done


@flow(name="brainmri-pipeline")
def pipeline(params_path: str = "params.yaml", verbose: bool = False, promote: bool = False, prepared: dict | None = None) -> dict:
    """Run the pipeline on `params_path`: every stage `dvc repro` would run, by DVC; then the report's tables as artifacts.
    `prepared`: DVC's graph and status, read by `run` while Prefect's server started (see `prepare`)."""
    p = load_params(params_path)
    root = str(Path(p.root).resolve())
    prepared = prepared if prepared and prepared.get("token") in _HANDED else None  # only `run`'s, read under the lock it holds
    graph = prepared["graph"] if prepared else {k: sorted(v) for k, v in stage_graph(Path(root)).items()}
    o = p.orchestration
    state = run_stages.with_options(task_runner=task_runner(o))(root, graph, o, verbose, prepared, return_state=True)
    if state.is_failed():
        return Failed(message=state.message)
    stages = state.result()
    publish_report(str(Path(params_path).resolve()))
    if promote:
        promote_model(str(Path(params_path).resolve()), stages)
    return stages


@task(name="promote_model")
def promote_model(params_path: str, stages: dict) -> dict:
    """Record the run (dvc exp save, pushed when remotes exist); serve the retrained model only if it is not worse."""
    from prefect.context import get_run_context

    from flows.promote import promote

    ctx = get_run_context()
    name = f"run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{str(ctx.task_run.flow_run_id)[:8]}"
    return promote(load_params(params_path), name, stages)


def run(params_path: str, verbose: bool = False, promote: bool = False) -> dict:
    """The flow from the command line: its result, or PipelineFailed with one summary (no traceback).

    Prefect's temporary server (when no PREFECT_API_URL is set) takes about 5 s to start, in a process of its own,
    and DVC's graph and `dvc status` about 3.5 s in this one: `run` does both at once (`prepare`), then starts the
    flow. The flow, run any other way (a deployment, a test), reads them itself."""
    p = load_params(params_path)  # bad params: one sentence here, before Prefect starts (and logs a traceback)
    root, token = str(Path(p.root).resolve()), uuid.uuid4().hex
    server = start_server_beside()
    _HANDED[token] = take_workspace_lock(root, token)
    try:
        prepared = prepare(root, token)
        if server is not None:
            log.info("Prefect: a temporary server for this run at %s (PREFECT_API_URL names a lasting one)", server.result())
        state = pipeline(params_path, verbose, promote, prepared, return_state=True)
    finally:
        if token in _HANDED:  # the flow never reached its stages
            release_workspace_lock(root, token, _HANDED.pop(token))
    if state.is_failed():
        raise PipelineFailed(state.message or "the pipeline failed")
    return state.result()


def prepare(root: str, token: str) -> dict:
    """DVC's stage graph and the stages `dvc status` finds up to date, read under the workspace lock `token` holds."""
    graph = stage_graph(Path(root))
    return {"token": token, "graph": {k: sorted(v) for k, v in graph.items()}, "current": sorted(current(root, graph, token))}


def start_server_beside():
    """Prefect's temporary server, started in a thread exactly as Prefect's client would start it on first use (the
    same singleton, so the flow finds it running); None when a server is configured (PREFECT_API_URL) or the
    temporary one is off. Its process starts on another core while this one reads DVC's workspace."""
    import contextvars
    from concurrent.futures import ThreadPoolExecutor

    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    def start() -> str:
        server = SubprocessASGIServer()
        server.start()  # its start-up error, if any, is Prefect's own message
        return server.api_url

    pool = ThreadPoolExecutor(1, thread_name_prefix="prefect-server")
    future = pool.submit(contextvars.copy_context().run, start)  # the caller's Prefect settings (temporary_settings) too
    pool.shutdown(wait=False)
    return future
