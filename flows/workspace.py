"""DVC's view of a workspace, through DVC's public Python API: the stage graph, `dvc status`, the default remote.

The DAG is DVC's own graph of dvc.yaml, never written here: a stage added to dvc.yaml is orchestrated as it is.
"""

from __future__ import annotations

import graphlib
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

from flows.stage_process import LOCK_WAIT_SECONDS, WorkspaceBusy

log = logging.getLogger("brainmri")


@contextmanager
def open_repo(root: str | Path):
    """DVC's Repo at `root`, with the working directory there (DVC resolves some paths against it)."""
    from dvc.repo import Repo

    here = os.getcwd()
    os.chdir(root)
    try:
        with Repo(".") as repo:
            yield repo
    finally:
        os.chdir(here)


def graph_of(repo) -> dict[str, set[str]]:
    """Every stage with a command and the stages it depends on."""
    graph = repo.index.graph  # edges run from a stage to the stages it depends on
    return {s.addressing: {u.addressing for u in graph.successors(s) if u.cmd} for s in graph.nodes if s.cmd}


def stage_graph(root: str | Path) -> dict[str, set[str]]:
    """DVC's stage graph of the workspace at `root`."""
    with open_repo(root) as repo:
        return graph_of(repo)


def stage_command(root: str | Path, stage: str) -> str:
    """The command dvc.yaml gives `stage` (interpolated by DVC)."""
    with open_repo(root) as repo:
        return repo.stage.collect(f"dvc.yaml:{stage}")[0].cmd


def topological(graph: dict[str, set[str]]) -> list[str]:
    return list(graphlib.TopologicalSorter(graph).static_order())


def with_downstream(graph: dict[str, set[str]], stages) -> set[str]:
    """`stages` and every stage they feed, directly or not."""
    feeds: dict[str, set[str]] = {s: set() for s in graph}
    for stage, ups in graph.items():
        for u in ups:
            feeds[u].add(stage)
    found, todo = set(stages), list(stages)
    while todo:
        for d in feeds[todo.pop()] - found:
            found.add(d)
            todo.append(d)
    return found


def dvc_status(repo) -> dict[str, list]:
    """`dvc status` of every stage; waits while another DVC process (a user's `dvc repro`) holds DVC's lock."""
    from dvc.lock import LockError

    start, said = time.monotonic(), False
    while True:
        try:
            return repo.status()
        except LockError:
            if time.monotonic() - start > LOCK_WAIT_SECONDS:
                raise WorkspaceBusy(f"the DVC workspace {repo.root_dir} stayed locked for {LOCK_WAIT_SECONDS} s") from None
            if not said:
                log.info("waiting for another DVC process in %s", repo.root_dir)
                said = True
            time.sleep(2)


def reason(entry) -> str:
    """One entry of `dvc status` for a stage as a line, e.g. changed deps: {"params.yaml": {"seed": "modified"}}."""
    if isinstance(entry, dict):
        return "; ".join(f"{kind}: {json.dumps(detail)}" for kind, detail in entry.items())
    return str(entry)


def read(root: str | Path) -> dict:
    """What the flow needs from DVC before it starts: the stage graph; the stages up to date that nothing stale feeds
    (they need no process); `dvc status`'s reasons for the others; and whether to pull (a default remote is set)."""
    with open_repo(root) as repo:
        graph = graph_of(repo)
        stale = {name: entries for name, entries in dvc_status(repo).items() if name in graph}
        pull = bool(repo.config["core"].get("remote"))
    return {
        "graph": {k: sorted(v) for k, v in graph.items()},
        "current": sorted(set(graph) - with_downstream(graph, stale)),
        "reasons": {name: [reason(e) for e in entries] for name, entries in stale.items()},
        "pull": pull,
    }
