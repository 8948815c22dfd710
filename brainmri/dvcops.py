"""DVC as the flow's source of truth: which stages are stale and why, running one, recording it in dvc.lock."""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from brainmri.errors import BrainMRIError

log = logging.getLogger("brainmri")
LOCK_WAIT_SECONDS = 1800  # how long to wait for another DVC process in the same workspace before giving up
_IN_PROCESS = threading.Lock()  # threads of one flow take turns with DVC (see open_repo)


class StageFailed(BrainMRIError):
    """A stage's command exited non-zero; `retryable` is False for bad data or params (exit code 2)."""

    def __init__(self, stage: str, code: int, tail: str):
        self.stage, self.code, self.retryable = stage, code, code != 2
        super().__init__(f"stage {stage} failed (exit code {code}): {tail.strip() or 'no error output'}")


class WorkspaceBusy(BrainMRIError):
    """Another DVC process held the workspace lock for longer than we wait."""


@contextmanager
def open_repo(root: Path):
    """A DVC Repo at `root`, used with the working directory there (some DVC paths are cwd-relative).

    One thread at a time: the working directory is the process's, and DVC's workspace lock is a file lock.
    """
    from dvc.repo import Repo

    with _IN_PROCESS:
        here = os.getcwd()
        os.chdir(root)
        try:
            repo = Repo(str(root))
            try:
                yield repo
            finally:
                repo.close()
        finally:
            os.chdir(here)


def locked(root: Path, fn, wait: float = LOCK_WAIT_SECONDS):
    """Run fn(repo) holding DVC's workspace lock, waiting while another process (a `dvc repro`) holds it."""
    from dvc.lock import LockError

    start, said = time.monotonic(), False
    while True:
        with open_repo(root) as repo:
            try:
                return fn(repo)
            except LockError:
                if time.monotonic() - start > wait:
                    raise WorkspaceBusy(
                        f"the DVC workspace {root} stayed locked for {wait:.0f} s: another `dvc repro` or flow is running "
                        "there (or one was killed: remove .dvc/tmp/lock once no dvc process is left)"
                    ) from None
        if not said:
            log.info("waiting for the DVC workspace lock in %s (another dvc process is running there)", root)
            said = True
        time.sleep(2)


def pipeline_stages(root: Path) -> list[str]:
    """Every stage of dvc.yaml with a command, upstream first (DVC's own graph)."""
    import networkx as nx

    with open_repo(root) as repo:
        order = nx.topological_sort(repo.index.graph.reverse(copy=False))
        return [s.name for s in order if s.cmd]


def _describe(entry) -> list[str]:
    if isinstance(entry, str):
        return [entry]
    out = []
    for kind, changes in entry.items():
        for path, what in changes.items():
            if isinstance(what, dict):  # params: {key: modified/new/deleted}
                out += [f"{kind[8:-1]} {path}: {key} {change}" for key, change in what.items()]
            else:
                out.append(f"{kind[8:-1]} {path} {what}")
    return out


def _target(root: Path, stage: str) -> str:
    """A DVC target that does not depend on the working directory: /abs/dvc.yaml:stage."""
    return f"{Path(root).resolve() / 'dvc.yaml'}:{stage}"


def _status(root: Path, stage: str) -> tuple[list[str], str]:
    """Why `dvc repro` would run `stage` now (empty: up to date), in DVC's words, and its command: one DVC call."""
    target = _target(root, stage)
    status, cmd = locked(root, lambda repo: (repo.status(targets=[target]), repo.stage.collect(target)[0].cmd))
    return [reason for entries in status.values() for entry in entries for reason in _describe(entry)], cmd


def stale_reasons(root: Path, stage: str) -> list[str]:
    """Why `dvc repro` would run `stage` now (empty: it is up to date), in DVC's words."""
    return _status(root, stage)[0]


def stage_command(root: Path, stage: str) -> str:
    with open_repo(root) as repo:
        return repo.stage.collect(_target(root, stage))[0].cmd


def run_command(root: Path, stage: str, cmd: str) -> float:
    """Run a stage's command as `dvc repro` would (a shell in the workspace); stderr passes through, its tail kept."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this environment's `brainmri`
    start = time.monotonic()
    tail: collections.deque[str] = collections.deque(maxlen=12)
    with subprocess.Popen(cmd, shell=True, cwd=root, env=env, stderr=subprocess.PIPE, text=True, errors="replace") as proc:
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line)
    if proc.returncode != 0:
        raise StageFailed(stage, proc.returncode, "".join(tail)[-2000:])
    return time.monotonic() - start


def commit_stage(root: Path, stage: str) -> None:
    """Record the stage's deps, params and outs in dvc.lock and its outs in the cache, as `dvc repro` does."""
    locked(root, lambda repo: repo.commit(_target(root, stage), force=True))


def _logger():
    """The Prefect run logger inside a flow (so the UI shows why a stage ran), else ours."""
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow or task run
        return log


def reproduce(root: Path, stage: str) -> dict:
    """Run `stage` if DVC says it is stale, then commit it; report whether it ran and why."""
    log = _logger()
    reasons, cmd = _status(root, stage)
    if not reasons:
        log.info("%s: up to date (dvc status: nothing changed)", stage)
        return {"stage": stage, "ran": False, "reasons": [], "seconds": 0.0}
    log.info("%s: running because %s", stage, "; ".join(reasons))
    seconds = run_command(root, stage, cmd)
    commit_stage(root, stage)
    log.info("%s: done in %.1f s, recorded in dvc.lock", stage, seconds)
    return {"stage": stage, "ran": True, "reasons": reasons, "seconds": round(seconds, 2)}
