"""Bounds for models that stages run in their own process (export, evaluate, ensemble, benchmark: timings must not
carry a worker's overhead): each file is first vetted in a bounded worker (brainmri.deploy.sandbox: loaded, compiled,
and run once on a black image, under its memory cap and time limits), then every call in process runs under a
deadline. Past it the runtime is asked to stop (ONNX Runtime's RunOptions.terminate, OpenVINO's cancel) and the call
raises ModelLimitError; a runtime that does not stop (an ONNX Loop with an empty body never looks at the flag, a single
kernel never does) ends the process GRACE_SECONDS later with one line on stderr: stage outputs are written atomically,
so nothing is left half-written.

One polling thread watches every call: a call costs a dictionary insert and delete, not a thread or a wake-up, so the
benchmark's timings of millisecond calls are not moved.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from brainmri.deploy import sandbox

RUN_SECONDS = sandbox.RUN_SECONDS  # one call in process, as one batch in a worker
GRACE_SECONDS = 10.0  # after asking the runtime to stop, before ending the process
POLL_SECONDS = 0.25

_lock = threading.Lock()
_active: dict[int, list] = {}  # call id -> [deadline, cancel, what, cancelled]
_ids = itertools.count()
_thread: threading.Thread | None = None
_vetted: set[tuple] = set()


def _forget_thread() -> None:
    """In a forked child the watching thread is gone: the next deadline starts a new one."""
    global _lock, _thread
    _lock, _thread = threading.Lock(), None
    _active.clear()


os.register_at_fork(after_in_child=_forget_thread)


def _loop() -> None:
    while True:
        time.sleep(POLL_SECONDS)
        now = time.monotonic()
        with _lock:
            due = [entry for entry in _active.values() if now >= entry[0]]
        for entry in due:
            deadline, cancel, what, cancelled = entry
            if not cancelled:
                entry[3] = True
                with contextlib.suppress(Exception):
                    cancel()
            elif now >= deadline + GRACE_SECONDS:
                sys.stderr.write(f"brainmri: error: {what} ran past its time limit and its runtime did not stop; the process ends here\n")
                sys.stderr.flush()
                os._exit(2)


@contextlib.contextmanager
def deadline(seconds: float, cancel: Callable[[], None], what: str):
    """Run the block under a deadline: `cancel` is called once it passes; the process ends GRACE_SECONDS after that."""
    global _thread
    key = next(_ids)
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_loop, name="brainmri-model-watchdog", daemon=True)
            _thread.start()
        _active[key] = [time.monotonic() + seconds, cancel, what, False]
    try:
        yield
    finally:
        with _lock:
            entry = _active.pop(key)
    if entry[3]:
        raise sandbox.ModelLimitError(f"{what}: still running after {seconds:g} s, the time limit; stopped")


def vet(path: str | Path, runtime: str = "onnxruntime", threads: int = 0, config: dict | None = None) -> None:
    """Load (and with `config`, compile with OpenVINO) `path` in a bounded worker, and run it once on a black image
    when its input is an image batch; ModelLimitError or ModelRunError naming it when it cannot. Once per file
    version, runtime and thread count in a process."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:  # the runtime opening it says what is wrong, as it always has
        return
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, runtime, threads)
    if key in _vetted:
        return
    with sandbox.Worker(path) as worker:
        info = worker.open(threads)
        if config is not None:
            worker.compile(config)
        inputs = info["inputs"]
        if len(inputs) == 1 and inputs[0][1] == "tensor(float)" and len(inputs[0][2]) == 4:
            dims = [d if isinstance(d, int) and d > 0 else None for d in inputs[0][2][1:]]
            raw = info["meta"].get("input_size", "")
            size = int(raw) if raw.isdigit() and len(raw) < 6 else 0  # for dimensions the graph leaves open
            shape = [1] + [d if d is not None else size for d in dims]
            if all(d and d > 0 for d in shape) and shape[1] * shape[2] * shape[3] <= 4096 * 4096 * 3:
                import numpy as np

                from brainmri.deploy.metadata import width

                worker.run(np.zeros(shape, np.float32), width(info["meta"]))  # an N-class model: one value per class
    _vetted.add(key)
