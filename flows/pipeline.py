"""The pipeline flow: DVC's stage graph, each stage a Prefect task that DVC itself reproduces.

The DAG is read from dvc.yaml through DVC (flows/workspace.py), never written here; the scheduler
(flows/scheduler.py) submits every stage whose upstream is done; each stage is one `dvc repro --single-item`
process (flows/stage_process.py).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from prefect import flow, task
from prefect.logging import get_run_logger
from prefect.states import Failed

from brainmri.config import Orchestration, load_params
from brainmri.core import machine
from brainmri.core.errors import BrainMRIError
from flows import stage_process, workspace
from flows.prefect_setup import start_server_beside, task_runner
from flows.scheduler import failure_summary, schedule, stage_threads
from flows.stage_process import StageFailed

log = logging.getLogger("brainmri")


class PipelineFailed(BrainMRIError):
    """One or more stages failed; the message names them, why, and what did not run because of them. Its text is a
    few lines (flows/scheduler.py's failure_summary), each made one line and capped there."""

    def __str__(self) -> str:
        return Exception.__str__(self)


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


@task(name="read_workspace", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_on_io_error)
def read_workspace(root: str) -> dict:
    """DVC's stage graph, `dvc status` and default remote (flows/workspace.py)."""
    return workspace.read(root)


@task(name="reproduce_stage", task_run_name="{stage}", retry_condition_fn=retry_on_io_error)
def reproduce_stage(root: str, stage: str, pull: bool, reasons: list[str], verbose: bool = False, threads: int = 0) -> dict:
    """Bring one DVC stage up to date through DVC (run, restore from the run-cache, or nothing), in `threads` threads
    (0: every core); its log to Prefect."""
    run_log = get_run_logger()

    def show(line: str) -> None:
        run_log.info("%s", line)  # the stage's whole log, in the Prefect UI
        if verbose:
            print(line, file=sys.stderr)

    return {**stage_process.reproduce(root, stage, pull, verbose, show, threads), "reasons": reasons, "threads": threads}


@task(name="publish_report", retries=2, retry_delay_seconds=5)
def publish_report(params_path: str) -> list[str]:
    """The report's tables as Markdown artifacts of the flow run (they read well in a remote UI: no file links)."""
    from prefect.artifacts import create_markdown_artifact

    from brainmri.report.tables import TABLES

    folder = load_params(params_path).path("report")
    note = f"\n\nFull report: `{folder.name}/report.html` in the workspace (DVC output `{folder.name}`)."
    tables = {key: folder / file for key, file in TABLES.items() if (folder / file).is_file()}
    ids = [create_markdown_artifact(key=f"{k}-table", markdown=t.read_text() + note, description=f"{k} table") for k, t in tables.items()]
    return [str(i) for i in ids]


@task(name="promote_model")
def promote_model(params_path: str, stages: dict) -> dict:
    """Record the run (dvc exp save, pushed when remotes exist); serve the retrained model only if it is not worse."""
    from prefect.context import get_run_context

    from flows.promote import promote

    ctx = get_run_context()
    name = f"run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{str(ctx.task_run.flow_run_id)[:8]}"
    return promote(load_params(params_path), name, stages)


def families(p, graph: dict) -> dict[str, str]:
    """Each model stage's backbone: the frozen features and base graph it shares with the backbone's other models."""
    items = {stage: stage.split("@", 1)[1] for stage in graph if "@" in stage}
    return {stage: p.models[item].backbone for stage, item in items.items() if item in p.models}


@flow(name="brainmri-stages")
def reproduce_stages(root: str, dvc_state: dict, o: Orchestration, verbose: bool = False, family: dict | None = None):
    """Bring every stage up to date in DAG order, branches in parallel; a failure summary if any stage failed."""
    reproduce = reproduce_stage.with_options(retries=o.retries, retry_delay_seconds=o.retry_delay)
    reasons = dvc_state["reasons"]

    cores = machine.usable_cores()

    def submit(stage: str):
        threads = stage_threads(stage, o, cores)
        return reproduce.submit(root, stage, dvc_state["pull"], reasons.get(stage, []), verbose, threads)

    graph = {stage: set(ups) for stage, ups in dvc_state["graph"].items()}
    progress = schedule(graph, set(dvc_state["current"]), o, submit, family)
    if progress.failed:
        summary = failure_summary(progress)
        return Failed(message=summary, data=PipelineFailed(summary))
    return progress.done


@flow(name="brainmri-pipeline")
def pipeline(params_path: str = "params.yaml", verbose: bool = False, promote: bool = False, prepared: dict | None = None) -> dict:
    """Every stage `dvc repro` would run, by DVC; the report's tables as artifacts; then, if asked, the promotion.
    `prepared`: the workspace as `run` read it from DVC while Prefect's server started (read here when not given)."""
    params_path = str(Path(params_path).resolve())
    p = load_params(params_path)
    root = str(Path(p.root).resolve())
    dvc_state = prepared or read_workspace(root)
    on_runner = reproduce_stages.with_options(task_runner=task_runner(p.orchestration))
    stages = on_runner(root, dvc_state, p.orchestration, verbose, families(p, dvc_state["graph"]), return_state=True)
    if stages.is_failed():
        return Failed(message=stages.message)
    publish_report(params_path)
    if promote:
        promote_model(params_path, stages.result())
    return stages.result()


def run(params_path: str, verbose: bool = False, promote: bool = False) -> dict:
    """The flow from the command line: its result, or PipelineFailed with one summary (no traceback).

    Prefect's temporary server (when no PREFECT_API_URL is set) takes about 5 s to start, in a process of its own,
    and DVC's graph and `dvc status` a few seconds in this one: `run` does both at once, then starts the flow. The
    flow, run any other way (a deployment, a test), reads DVC's side itself."""
    p = load_params(params_path)  # bad params: one sentence here, before Prefect starts (and logs a traceback)
    server = start_server_beside()
    prepared = workspace.read(str(Path(p.root).resolve()))
    if server is not None:
        log.info("Prefect: a temporary server for this run at %s (PREFECT_API_URL names a lasting one)", server.result())
    state = pipeline(params_path, verbose, promote, prepared, return_state=True)
    if state.is_failed():
        raise PipelineFailed(state.message or "the pipeline failed")
    return state.result()
