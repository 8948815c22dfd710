"""One DVC stage brought up to date by DVC itself, in a process of its own: the flow's unit of work.

    python -m flows.repro_one ROOT STAGE --token TOKEN

This is `dvc repro --single-item STAGE` through DVC's API, so run-cache restore, `--pull`, and DVC's per-stage
read/write locks come from DVC. The flow process holds DVC's workspace lock for its whole run, as one `dvc repro`
does, so a user's `dvc --wait-for-lock repro` waits for it instead of colliding with a stage it runs (DVC fails a
repro that meets another process's stage). The flow's own stage processes therefore take, in its place, a lock of
DVC's own kind on a file private to the flow run; DVC releases that one while a stage's command runs, exactly as it
does the workspace lock, so two branches' commands overlap while dvc.lock and the cache are written one at a time.
The last line on stdout is a JSON record of what happened (ran, restored from the run-cache, or up to date).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from pathlib import Path

from brainmri.core import timing_lock

BUSY = 75  # exit code: another process holds files of this workspace; the flow waits and tries again
FAILED = 1  # exit code: the stage's command failed; the JSON record carries its own exit code


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def foreign_holders(tmp_dir: str, token: str) -> list[str]:
    """Processes outside this flow run that hold DVC read/write locks in the workspace (DVC's rwlock file)."""
    path = Path(tmp_dir) / "rwlock"
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return []
    infos = [i for mode in ("read", "write") for v in data.get(mode, {}).values() for i in (v if isinstance(v, list) else [v])]
    return sorted({f"pid {i['pid']}: {i['cmd']}" for i in infos if token not in i.get("cmd", "") and alive(int(i["pid"]))})


class Outcome(logging.Handler):
    """Reads DVC's own log records: which stage ran, was restored from the run-cache, or was up to date, and why."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.ran = self.restored = False
        self.reasons: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Running stage"):
            self.ran = True
        elif "is cached - skipping run" in msg:
            self.restored = True
        elif "changed because" in msg or msg.endswith(" changed."):
            self.reasons.append(msg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.repro_one")
    ap.add_argument("root")
    ap.add_argument("stage")
    ap.add_argument("--token", required=True, help="the flow run's id: names its private lock, marks its processes in DVC's rwlock")
    ap.add_argument(
        "--quiet", default="", help="the timing lock's folder (paths.timing_cache, core/timing_lock.py), held shared around DVC's work"
    )
    args = ap.parse_args(argv)
    with timing_lock.shared(args.quiet) if args.quiet else contextlib.nullcontext():  # before DVC's imports: they are work too
        return _reproduce(args)


def read_lock_for_update(rt_parse):
    """DVC's parser for the file it is about to rewrite, made fast for a dvc.lock with no comments.

    Before writing a stage's entry DVC re-reads all of dvc.lock with ruamel.yaml's round-trip parser, which keeps
    comments and layout and is pure Python: on the demo's 47-stage, 210 KB dvc.lock it took 1.9 s of the 4-5 s of
    DVC's work per stage (profiled), and the flow's stage processes write dvc.lock one at a time. dvc.lock is
    generated, so it has no comments to keep: read that way, by the same library's C-accelerated safe parser
    (0.3 s), DVC's own dumper writes the same bytes (tests/test_pipeline.py checks this on a real lock file). A
    lock file with a comment or an anchor (a '#' or '&' anywhere), or one the safe parser refuses (a tag), goes
    through DVC's parser as before."""

    def parse(text, path):
        if os.path.basename(str(path)) == "dvc.lock" and "#" not in text and "&" not in text:
            from dvc.utils.serialize._yaml import parse_yaml

            try:
                return parse_yaml(text, path, typ="safe")
            except Exception:  # noqa: BLE001  (DVC's own parser then says what is wrong, as it always has)
                pass
        return rt_parse(text, path)

    return parse


def install_fast_lock_read() -> None:
    """Give DVC's `modify_yaml` (which looks its parser up at each call) the fast read of dvc.lock, in this process."""
    import dvc.utils.serialize._yaml as dvc_yaml

    dvc_yaml.parse_yaml_for_update = read_lock_for_update(dvc_yaml.parse_yaml_for_update)


def _reproduce(args) -> int:
    import dvc.stage.run
    from dvc.exceptions import ReproductionError
    from dvc.lock import make_lock
    from dvc.repo import Repo, lock_repo

    install_fast_lock_read()
    command = dvc.stage.run.cmd_run  # run_stage looks it up here at each call, as its own unlocked_repo wraps it

    def unheld(*a, **kw):  # the stage command holds the timing lock itself (flows/cli.py): let go of ours meanwhile
        with timing_lock.released(args.quiet) if args.quiet else contextlib.nullcontext():
            return command(*a, **kw)

    dvc.stage.run.cmd_run = unheld
    os.chdir(args.root)  # DVC resolves some paths against the working directory
    outcome = Outcome()
    dvc_log = logging.getLogger("dvc")
    for handler in dvc_log.handlers:  # DVC's own console output stays at its usual level
        handler.setLevel(max(handler.level, logging.INFO))
    dvc_log.setLevel(logging.DEBUG)  # our reader gets DVC's reasons for rerunning a stage (debug records)
    dvc_log.addHandler(outcome)
    record: dict = {"stage": args.stage, "ran": False, "restored": False}
    with Repo(".") as repo:
        repo.lock = make_lock(os.path.join(repo.tmp_dir, f"flow-{args.token}.lock"), tmp_dir=repo.tmp_dir, wait=True)
        with lock_repo(repo):
            holders = foreign_holders(repo.tmp_dir, args.token)
            if holders:
                print(json.dumps({**record, "busy": holders}))
                return BUSY
            pull = bool(repo.config["core"].get("remote"))  # `--pull` when a default remote is configured
            try:
                repo.reproduce(f"dvc.yaml:{args.stage}", single_item=True, pull=pull, run_cache=True)
            except ReproductionError as exc:
                try:  # DVC removed the stage's outputs before running it: put back what dvc.lock recorded
                    repo.checkout(targets=[f"dvc.yaml:{args.stage}"], force=True)
                except Exception as restore:  # nothing recorded yet (a first run), or the cache lacks it
                    logging.getLogger("dvc").info("outputs of %s not restored: %s", args.stage, restore)
                cause = str(exc.__cause__ or exc)
                code = re.search(r"exited with (-?\d+)", cause)  # DVC keeps the command's exit code only in its message
                print(json.dumps({**record, "failed": True, "code": int(code.group(1)) if code else 1, "error": cause}))
                return FAILED
    record.update(ran=outcome.ran, restored=outcome.restored, reasons=outcome.reasons)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
