"""Timings need the machine to themselves: a shared/exclusive lock between the stage processes of one workspace.

Every stage command holds the lock shared while it runs (`brainmri STAGE`, flows/cli.py), imports included. A
stage that times runtimes (benchmark, ensemble: `orchestration.exclusive`) takes the lock exclusively around its
timed calls only. So the flow can run a benchmark stage beside the others, its imports, model
loading and validation checks included, and still no other stage process works while it times. Before, the flow kept
the whole stage alone, and on 2 cores the benchmark stages ran one after another at the end of every run. Processes
that are not stages (the flow's own, Prefect's server) are not covered, and the lock covers one workspace: a queued
experiment in a copy of its own, or the demo beside the main workspace, is not kept apart.

Written by hand because no library here offers an inter-process reader-writer lock. Two `fcntl.flock` files give
the timing side preference: it first takes the turnstile, which every new shared holder passes through, so it waits
only for the stages already working, not for every stage that starts meanwhile. The kernel releases a flock when its
process dies, so a killed stage leaves no lock behind. A process that holds the lock shared and asks for it
exclusively (the benchmark stage under `brainmri benchmark`) gives up its shared hold while it waits and takes it back
after. With BRAINMRI_TIMING_LOCK_LOG set to a file, each hold is appended to it as a JSON line (pid, the process's first
arguments, kind, start, end: Unix times inside the hold), which a scenario test reads. A stage taken out of
`orchestration.exclusive` times without the lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from brainmri.core.errors import ConfigError

LOCK, TURNSTILE = "timing.lock", "timing.turnstile"
LOG = "BRAINMRI_TIMING_LOCK_LOG"
_shared: dict[Path, tuple[object, float]] = {}  # this process's shared holds by folder (file, since): `alone` lets go of them


def _open(folder: Path, name: str):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return open(folder / name, "a+b")  # noqa: SIM115  (closed by the callers; a flock lives as long as the open file)
    except OSError as exc:
        raise ConfigError(f"paths.timing_cache: cannot keep the timing lock in {folder}: {exc.strerror or exc}") from exc


def _log(kind: str, start: float) -> None:
    if os.environ.get(LOG):
        who = [Path(sys.argv[0]).name, *sys.argv[1:3]]  # `brainmri STAGE [MODEL]`
        with open(os.environ[LOG], "a", encoding="utf-8") as f:
            f.write(json.dumps({"pid": os.getpid(), "argv": who, "kind": kind, "start": start, "end": time.time()}) + "\n")


def _take_shared(folder: Path) -> tuple[object, float]:
    with _open(folder, TURNSTILE) as gate:
        fcntl.flock(gate, fcntl.LOCK_EX)  # waits while a timing stage is waiting or timing
        lock = _open(folder, LOCK)
        fcntl.flock(lock, fcntl.LOCK_SH)
    return lock, time.time()  # closing the turnstile's file released it


def _let_go(hold: tuple[object, float]) -> None:
    lock, since = hold
    _log("shared", since)
    lock.close()


@contextmanager
def shared(folder: str | Path) -> Iterator[None]:
    """Hold the lock shared: no stage times while this block runs (a stage's whole run)."""
    folder = Path(folder).resolve()
    if folder in _shared:  # already held by this process
        yield
        return
    _shared[folder] = _take_shared(folder)
    try:
        yield
    finally:
        hold = _shared.pop(folder, None)
        if hold is not None:
            _let_go(hold)


@contextmanager
def released(folder: str | Path) -> Iterator[None]:
    """Let go of this process's shared hold for the block (a child process that takes its own), then take it back."""
    folder = Path(folder).resolve()
    hold = _shared.pop(folder, None)
    if hold is not None:
        _let_go(hold)
    try:
        yield
    finally:
        if hold is not None:
            _shared[folder] = _take_shared(folder)


@contextmanager
def alone(folder: str | Path) -> Iterator[None]:
    """Hold the lock exclusively: wait for the stages already working to let go, keep new ones from starting, then
    run the block (the timed calls) with no other stage process working."""
    folder = Path(folder).resolve()
    with released(folder), _open(folder, TURNSTILE) as gate, _open(folder, LOCK) as lock:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX)
        start = time.time()
        try:
            yield
        finally:
            _log("alone", start)


def timing(folder: str | Path, stage: str, exclusive: list[str]):
    """`alone(folder)` for a stage named in orchestration.exclusive (`exclusive`); nothing for one taken out of it,
    whose timings then run beside other stages."""
    return alone(folder) if stage in exclusive else nullcontext()
