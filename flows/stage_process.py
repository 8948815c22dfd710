"""One DVC stage brought up to date by DVC's own command line, in a process of its own: the flow's unit of work.

    python -m dvc --wait-for-lock repro --single-item dvc.yaml:STAGE [--pull]

DVC holds its workspace lock while it checks the stage, restores it from the run-cache or records it, and lets go
of the lock while the stage's command runs (dvc/stage/run.py: `unlocked_repo(cmd_run)`); `--wait-for-lock` makes
the process wait for the lock rather than fail. So two branches' commands overlap while dvc.lock and the cache are
written one process at a time. DVC keeps read/write locks on the stage's deps and outs through the command: a stage
that another DVC process (a user's `dvc repro`) is reproducing is "busy", and the flow waits and tries again.
What happened (ran, restored from the run-cache, up to date) is read from DVC's output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from brainmri.core import machine
from brainmri.core.errors import BrainMRIError

LOCK_WAIT_SECONDS = 1800  # how long a stage waits for another DVC process (a user's `dvc repro`) before giving up
BAD_INPUT = 2  # a stage command's exit code for bad data or params (brainmri's errors): a retry fails the same way
BUSY = ("is busy, it is being blocked by", "Unable to acquire lock")  # DVC's words: another process holds the files
TAIL_LINES = 12  # of a failed stage's output, in the failure summary


class StageFailed(BrainMRIError):
    """A stage's command failed; `retryable` is False for bad data or params (the same again)."""

    def __init__(self, stage: str, code: int, tail: str):
        self.stage, self.code, self.retryable = stage, code, code != BAD_INPUT
        super().__init__(f"{stage} failed (exit code {code}): {tail.strip() or 'no error output'}")


class WorkspaceBusy(BrainMRIError):
    """Another DVC process kept the workspace's files for longer than we wait."""


def dvc(*args: str) -> list[str]:
    """DVC's command line, from this environment (the flow's own DVC), waiting for DVC's workspace lock."""
    return [sys.executable, "-m", "dvc", "--wait-for-lock", *args]


def repro_command(stage: str, pull: bool) -> list[str]:
    """The process that brings `stage` up to date; `pull`: fetch missing deps and run-cache from the default remote."""
    return dvc("repro", "--single-item", f"dvc.yaml:{stage}", *(["--pull"] if pull else []))


def stage_env(verbose: bool, threads: int = 0) -> dict:
    """The stage process's environment: this environment's `brainmri` first on PATH, start-up chatter off, and with
    `threads` (> 0) every library's thread pool held to that many threads (a thread variable the user set stays)."""
    env = {**machine.thread_env(threads), **os.environ}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")  # as DVC's Python API, which the flow used before: no usage reports
    if not verbose:
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up chatter
        env.setdefault("PYTHONWARNINGS", "ignore")  # library deprecation warnings; our own errors still surface
    return env


def run_process(cmd: list[str], root: str, env: dict, show: Callable[[str], None]) -> tuple[int, list[str]]:
    """Run `cmd` in `root`, each line of its output (stdout and stderr together) to `show`; its exit code and lines."""
    lines: list[str] = []
    with subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
        for line in proc.stdout:
            lines.append(line.rstrip())
            show(lines[-1])
    return proc.returncode, lines


def is_busy(lines: list[str]) -> bool:
    return any(mark in line for line in lines for mark in BUSY)


def outcome(stage: str, lines: list[str]) -> dict:
    """What DVC did for the stage, from its output."""
    ran = any(line.startswith(f"Running stage '{stage}'") for line in lines)
    restored = any(f"Stage '{stage}' is cached - skipping run" in line for line in lines)
    return {"stage": stage, "ran": ran, "restored": restored}


def failure(stage: str, lines: list[str]) -> StageFailed:
    """The stage's failure, with its command's exit code (DVC says it only in its message: "exited with N")."""
    code = next((int(m.group(1)) for line in reversed(lines) if (m := re.search(r"exited with (-?\d+)", line))), 1)
    return StageFailed(stage, code, "\n".join(lines[-TAIL_LINES:])[-2000:])


def restore_outputs(root: str, stage: str, env: dict, show: Callable[[str], None]) -> None:
    """DVC removed the stage's outputs before running it: put back what dvc.lock records (none on a first run)."""
    code, lines = run_process(dvc("checkout", "--force", f"dvc.yaml:{stage}"), root, env, lambda line: None)
    if code != 0:
        show(f"outputs of {stage} not restored: {' '.join(lines[-3:])}")


def reproduce(root: str, stage: str, pull: bool, verbose: bool, show: Callable[[str], None], threads: int = 0) -> dict:
    """Bring `stage` up to date through DVC, its process held to `threads` threads (0: every core); wait while another
    DVC process holds its files. Raises StageFailed."""
    start, started_at, env, said = time.monotonic(), time.time(), stage_env(verbose, threads), False
    while True:
        code, lines = run_process(repro_command(stage, pull), root, env, show)
        if code == 0:
            took = {"seconds": round(time.monotonic() - start, 2), "started_at": started_at, "finished_at": time.time()}
            return {**outcome(stage, lines), **took}
        if not is_busy(lines):
            restore_outputs(root, stage, env, show)
            raise failure(stage, lines)
        if time.monotonic() - start > LOCK_WAIT_SECONDS:
            raise WorkspaceBusy(f"{stage}: the workspace stayed busy for {LOCK_WAIT_SECONDS} s: {' '.join(lines[-3:])}")
        if not said:
            show(f"{stage}: waiting, another DVC process holds files of this stage")
            said = True
        time.sleep(2)
