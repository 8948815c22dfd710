"""The flow's scheduler: each stage once its upstream is done, up to `orchestration.max_workers` at once.

A stage named in `orchestration.exclusive` (it times runtimes) runs alone: it starts once no other stage is ready and
nothing runs, and nothing starts beside it. Its command still takes the timing lock
(brainmri/core/timing_lock.py), which also keeps a user's own stage commands from working while it times.

Written here rather than with Prefect's `wait_for`: a task waiting on its upstream would hold a worker thread while
it waits, and Prefect's tag concurrency limits need a limit created on the server beforehand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from prefect.futures import PrefectFuture, as_completed

from brainmri.config import Orchestration
from brainmri.core.errors import one_line
from flows.workspace import topological

log = logging.getLogger("brainmri")


def exclusive(stage: str, o: Orchestration) -> bool:
    return stage.split("@")[0] in o.exclusive


def stage_threads(stage: str, o: Orchestration, cores: int) -> int:
    """The threads a stage may use: its share of `cores` when up to max_workers stages run at once, so that two stages
    side by side do not fight over the cores (each library's pool spins on its own); 0 (every core) for a stage that
    always runs alone (an exclusive one, or max_workers 1)."""
    if exclusive(stage, o) or o.max_workers <= 1:
        return 0
    return max(1, cores // o.max_workers)


@dataclass
class Progress:
    """Where each stage of a run stands."""

    graph: dict[str, set[str]]
    family: dict[str, str] = field(default_factory=dict)  # stage: the work it shares with others (a model stage: its backbone)
    done: dict[str, dict] = field(default_factory=dict)  # stage: what DVC did (flows/stage_process.py's record)
    failed: dict[str, str] = field(default_factory=dict)  # stage: why
    held: list[str] = field(default_factory=list)  # not run: something upstream failed
    running: dict[str, PrefectFuture] = field(default_factory=dict)

    def __post_init__(self):
        self.order = topological(self.graph)

    def finished(self) -> bool:
        return len(self.done) + len(self.failed) + len(self.held) == len(self.order)

    def waiting(self) -> list[str]:
        """Stages not started yet, in DAG order; those whose upstream failed are held back on the way."""
        out = []
        for stage in self.order:
            if stage in self.done or stage in self.failed or stage in self.held or stage in self.running:
                continue
            if any(u in self.failed or u in self.held for u in self.graph[stage]):
                self.held.append(stage)
            else:
                out.append(stage)
        return out


def to_start(progress: Progress, o: Orchestration) -> list[str]:
    """The stages to start now: upstream done, up to max_workers running, an exclusive stage alone. Other ready stages
    go first: an exclusive stage waits until none is left and nothing runs. Starting nothing while it waited for
    the running stages left a core idle (the cold run's CPU use was 170%, docs/measurements.md). With the default
    `exclusive` list (benchmark, ensemble) a timing stage's only downstream is the report, so deferring it costs no
    other stage its start; the timing stages then run one after another at the end."""
    if any(exclusive(s, o) for s in progress.running):
        return []
    ready = [s for s in progress.waiting() if progress.graph[s] <= progress.done.keys()]
    shared = [s for s in ready if not exclusive(s, o)]
    if shared:
        return _spread(shared, progress)[: max(0, o.max_workers - len(progress.running))]
    return ready[:1] if ready and not progress.running else []


def _spread(ready: list[str], progress: Progress) -> list[str]:
    """`ready` with the stages that share no work with a running (or an earlier chosen) stage first, in DAG order:
    two models of one backbone started together both compute the same frozen features (and export both convert the
    same base), which the caches would then hold once."""
    busy = {progress.family[s] for s in progress.running if s in progress.family}
    first, later = [], []
    for stage in ready:
        kin = progress.family.get(stage)
        (later if kin in busy else first).append(stage)
        if kin is not None:
            busy.add(kin)
    return first + later


def collect_one(progress: Progress) -> None:
    """Wait for the next running stage to end and record how it ended (its own error is logged in full by its task)."""
    future = next(as_completed(list(progress.running.values())))
    stage = next(s for s, f in progress.running.items() if f is future)
    del progress.running[stage]
    try:
        progress.done[stage] = r = future.result()
    except Exception as exc:
        progress.failed[stage] = str(exc)
        log.info("%s: FAILED", stage)
    else:
        what = "restored from the run-cache" if r["restored"] else "ran" if r["ran"] else "up to date"
        log.info("%s: %s (%.1f s)", stage, what, r["seconds"])


def schedule(
    graph: dict[str, set[str]], current: set[str], o: Orchestration, submit: Callable[[str], PrefectFuture], family: dict | None = None
) -> Progress:
    """Run every stage of `graph` but `current` (up to date, nothing stale upstream) through `submit(stage)`; stages of
    one `family` (a model stage's backbone) are not started side by side while another stage can be."""
    progress = Progress(graph, family or {})
    for stage in current:
        progress.done[stage] = {"stage": stage, "ran": False, "restored": False, "reasons": [], "seconds": 0.0, "checked": "dvc status"}
    if current:
        log.info("%d of %d stages up to date (dvc status)", len(current), len(graph))
    while not progress.finished():
        for stage in to_start(progress, o):
            log.info("%s: started", stage)
            progress.running[stage] = submit(stage)
        if progress.running:
            collect_one(progress)
    return progress


def failure_summary(progress: Progress) -> str:
    lines = [f"{len(progress.failed)} stage(s) failed:"] + [f"  - {one_line(msg)}" for msg in progress.failed.values()]
    if progress.held:
        lines.append(f"  held back by them: {', '.join(progress.held)}")
    lines.append("  other branches finished and are recorded in dvc.lock")
    lines.append("  next: fix the cause above, then `brainmri run` again (or `dvc repro`); finished stages will not rerun")
    return "\n".join(lines)
