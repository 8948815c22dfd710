"""Running one stage command: alone in its workspace (a lock per stage), and stoppable within a second by Ctrl-C or
SIGTERM even inside a long TensorFlow or ONNX Runtime call, leaving no temporary file behind."""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from brainmri.core.errors import BrainMRIError
from brainmri.core.files import remove_temporaries

INTERRUPTED = 130  # the shell's code for a command stopped by SIGINT


class StageBusy(BrainMRIError):
    """The same stage already runs in this workspace."""


@contextlib.contextmanager
def stage_lock(folder: Path, stage: str):
    """Hold `folder`/`stage`.lock exclusively for the block; a second run of the same stage is refused at once, by name:
    two `brainmri ingest` at once wrote into each other's outputs. Released by the kernel when the process ends."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{stage}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise StageBusy(f"`brainmri {stage.replace('@', ' ')}` already runs in this workspace ({holder}); wait for it to end") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)


def run_interruptible(fn: Callable[[], object]) -> object:
    """`fn()` in a worker thread while this (main) thread waits, so a signal is handled at once even when the work sits
    inside one long native call (a compiled training loop ran 30 s without returning to Python). On Ctrl-C or SIGTERM
    the temporary files being written are removed, child processes killed, and the process ends (exit 130) without
    waiting for the native call: the outputs already in place are untouched."""
    if threading.current_thread() is not threading.main_thread():
        return fn()  # signals only reach the main thread: called from elsewhere (a test's thread), nothing to gain
    box: dict = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001  (handed to the main thread, which raises it)
            box["error"] = exc

    worker = threading.Thread(target=work, name="brainmri-stage", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        stop_now()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def stop_now(code: int = INTERRUPTED) -> None:
    """Remove temporaries, kill child processes, say so in one line, and end the process at once."""
    for child in multiprocessing.active_children():
        child.kill()
    for child in multiprocessing.active_children():
        child.join(1)  # gone before its files are removed: a worker writing into this process's scratch folder
    remove_temporaries()
    print("brainmri: interrupted; temporary files removed, outputs already in place left untouched", file=sys.stderr, flush=True)
    os._exit(code)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM is handled as Ctrl-C (KeyboardInterrupt): a stage killed politely cleans up as one
    interrupted by hand. The previous handler comes back after (main() runs many times in one test process)."""

    def handler(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
