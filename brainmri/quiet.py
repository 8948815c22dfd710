"""Timings need the machine to themselves: a shared/exclusive lock between the stage processes of one workspace.

Every stage command holds the lock shared while it runs (`brainmri STAGE`, and the flow's per-stage process around
DVC's work); a stage that times runtimes (benchmark, ensemble: `orchestration.exclusive`) takes it exclusively
around its timed calls only. So the flow can run a benchmark stage beside the others, its imports, model loading
and validation checks included, and still no other stage process runs while it times. Before, the flow kept the
whole stage alone, and on 2 cores the benchmark stages ran one after another at the end of every run.

Written by hand because no library here offers an inter-process reader-writer lock. Two `fcntl.flock` files give
the writer preference: a timing stage first takes the turnstile, which every new shared holder passes through, so
it waits only for the stages already running, not for every stage that starts meanwhile. The kernel releases a
flock when its process dies, so a killed stage leaves no lock behind. A process that holds the lock shared and
asks for it exclusively (the benchmark stage under `brainmri benchmark`) gives up its shared hold while it waits
and takes it back after.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK, TURNSTILE = "quiet.lock", "quiet.turnstile"
# set by a process that holds the lock shared for the stage command it starts (the flow's per-stage process, around
# DVC's work): the command must not queue at the turnstile behind a timing stage that waits for its own parent
HELD = "BRAINMRI_QUIET_HELD"
_shared: dict[Path, object] = {}  # this process's shared holds, by folder: `alone` lets go of them while it times


def _open(folder: Path, name: str):
    folder.mkdir(parents=True, exist_ok=True)
    return open(folder / name, "a+b")  # noqa: SIM115  (closed by the callers; a flock lives as long as the open file)


def _take_shared(folder: Path):
    with _open(folder, TURNSTILE) as gate:
        fcntl.flock(gate, fcntl.LOCK_EX)  # waits while a timing stage is waiting or timing
        lock = _open(folder, LOCK)
        fcntl.flock(lock, fcntl.LOCK_SH)
    return lock  # closing the turnstile's file released it


@contextmanager
def shared(folder: str | Path) -> Iterator[None]:
    """Hold the lock shared: no stage times while this block runs (a stage's whole run)."""
    folder = Path(folder).resolve()
    if folder in _shared or os.environ.get(HELD) == str(folder):  # already held, by this process or its parent
        yield
        return
    _shared[folder] = _take_shared(folder)
    try:
        yield
    finally:
        _shared.pop(folder).close()


@contextmanager
def alone(folder: str | Path) -> Iterator[None]:
    """Hold the lock exclusively: wait for the stages already running to end, keep new ones from starting, then
    run the block (the timed calls) with no other stage process running."""
    folder = Path(folder).resolve()
    if os.environ.get(HELD) == str(folder):
        from brainmri.errors import ConfigError

        raise ConfigError(
            "this stage times runtimes, but the flow's process that started it holds the timing lock shared, so the "
            "timing could never start: list the stage's name in orchestration.exclusive"
        )
    mine = _shared.pop(folder, None)
    if mine is not None:
        mine.close()  # this process's own shared hold would block its exclusive one
    try:
        with _open(folder, TURNSTILE) as gate, _open(folder, LOCK) as lock:
            fcntl.flock(gate, fcntl.LOCK_EX)
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
    finally:
        if mine is not None:
            _shared[folder] = _take_shared(folder)
