"""The timing lock (brainmri/core/timing_lock.py): stage processes hold it shared, a timing stage alone, between real processes."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from brainmri.core import timing_lock
from brainmri.core.errors import ConfigError

# a process that waits for `start` to exist, then holds the lock (shared or alone) until `release` exists ('-': not at
# all), and writes when it asked for the lock, got it and let it go
HOLDER = """
import json, os, sys, time
from brainmri.core import timing_lock
folder, how, release, out, start = sys.argv[1:6]
while not os.path.exists(start):
    time.sleep(0.01)
asked = time.time()
open(out + ".asked", "w").close()
with (timing_lock.shared if how == "shared" else timing_lock.alone)(folder):
    got = time.time()
    open(out + ".got", "w").close()
    while release != "-" and not os.path.exists(release):
        time.sleep(0.01)
    left = time.time()
json.dump({"asked": asked, "got": got, "left": left}, open(out, "w"))
"""


def holder(tmp_path, name: str, how: str, release, start) -> tuple[subprocess.Popen, object]:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-c", HOLDER, str(tmp_path / "locks"), how, str(release), str(out), str(start)]
    return subprocess.Popen(cmd), out


def wait_for(ready, timeout: float = 60) -> None:
    """Until `ready` (a path that must exist, or a function) holds."""
    end = time.monotonic() + timeout
    while not (ready() if callable(ready) else ready.exists()):
        assert time.monotonic() < end, f"{ready} never came"
        time.sleep(0.01)


def taken(path, how=fcntl.LOCK_EX) -> bool:
    """Whether another open file holds a flock on `path` that keeps `how` from being taken, tried without waiting."""
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f, how | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_a_timing_waits_for_running_stages_and_stages_that_start_meanwhile_wait_for_it(tmp_path):
    go, release = tmp_path / "go", tmp_path / "release"
    running, r_out = holder(tmp_path, "running", "shared", release, go)
    go.touch()
    wait_for(tmp_path / "running.json.got")
    timing, t_out = holder(tmp_path, "timing", "alone", "-", go)
    wait_for(lambda: taken(tmp_path / "locks" / timing_lock.TURNSTILE))  # the timing process holds the turnstile: it is queued
    later, l_out = holder(tmp_path, "later", "shared", "-", go)
    wait_for(tmp_path / "later.json.asked")
    release.touch()  # only now does the running stage end
    for proc in (running, timing, later):
        assert proc.wait(timeout=120) == 0
    r, t, lt = (json.loads(p.read_text()) for p in (r_out, t_out, l_out))
    assert t["got"] >= r["left"]  # the timing began only when the running stage ended
    assert lt["asked"] < t["got"] and lt["got"] >= t["left"]  # the stage that came meanwhile waited for the timing


def test_a_stage_that_holds_it_shared_times_alone_and_gets_its_shared_hold_back(tmp_path):
    folder = tmp_path / "locks"
    with timing_lock.shared(folder):
        assert taken(folder / timing_lock.LOCK)
        with timing_lock.alone(folder):  # its own shared hold would block this forever if it were kept
            assert taken(folder / timing_lock.LOCK, fcntl.LOCK_SH)  # alone: not even a shared hold can be taken now
            with timing_lock.released(folder):  # nothing of its own to let go of while it holds the lock alone
                pass
        assert taken(folder / timing_lock.LOCK)  # shared again after the timing
        with timing_lock.released(folder):  # as the flow's process while the stage command runs
            assert not taken(folder / timing_lock.LOCK)
        assert taken(folder / timing_lock.LOCK)
    assert not taken(folder / timing_lock.LOCK)


def test_a_killed_stage_leaves_no_lock_and_an_unusable_folder_is_named(tmp_path):
    go = tmp_path / "go"
    running, _ = holder(tmp_path, "running", "shared", tmp_path / "never", go)
    go.touch()
    wait_for(tmp_path / "running.json.got")
    assert taken(tmp_path / "locks" / timing_lock.LOCK)
    os.kill(running.pid, signal.SIGKILL)
    running.wait(timeout=60)
    timing, t_out = holder(tmp_path, "timing", "alone", "-", go)
    assert timing.wait(timeout=60) == 0 and t_out.is_file()  # the kernel let go of the dead process's hold

    (tmp_path / "a file").write_text("")
    with pytest.raises(ConfigError, match="paths.timing_cache"):
        with timing_lock.shared(tmp_path / "a file" / "locks"):
            pass


def test_the_flows_scheduler_runs_an_exclusive_stage_alone_once_nothing_else_is_ready():
    """A ready timing stage (orchestration.exclusive) lets the other ready stages go first; it starts once none is
    left and the running stages have ended, and nothing starts beside it; other stages fill max_workers as usual."""
    from brainmri.config import Orchestration
    from flows.scheduler import Progress, to_start

    given = {"max_workers": 3, "retries": 0, "retry_delay": 0, "exclusive": ["benchmark"], "cron": "0 3 * * 1", "timezone": "UTC"}
    o = Orchestration(task_runner="thread", dask_address="", **given)
    graph = {
        "export@a": set(),
        "export@b": set(),
        "train@c": set(),
        "benchmark@a": {"export@a"},
        "evaluate@a": {"export@a"},
        "report": {"benchmark@a", "evaluate@a", "train@c"},
    }
    progress = Progress(graph)
    assert sorted(to_start(progress, o)) == ["export@a", "export@b", "train@c"]  # up to max_workers at once
    progress.running = dict.fromkeys(["export@a", "export@b", "train@c"])
    progress.done["export@a"] = progress.running.pop("export@a")  # benchmark@a and evaluate@a are ready
    assert to_start(progress, o) == ["evaluate@a"]  # the free worker takes the other ready stage: no core idles
    progress.running["evaluate@a"] = None
    for stage in ("export@b", "evaluate@a"):
        progress.done[stage] = progress.running.pop(stage)
        assert to_start(progress, o) == []  # only the timing stage is ready: it waits for train@c
    progress.done["train@c"] = progress.running.pop("train@c")
    assert to_start(progress, o) == ["benchmark@a"]  # alone, once nothing runs
    progress.running["benchmark@a"] = None
    assert to_start(progress, o) == []  # nothing beside it
    progress.done["benchmark@a"] = progress.running.pop("benchmark@a")
    assert to_start(progress, o) == ["report"]


def test_stages_side_by_side_share_the_cores_and_a_timing_stage_gets_them_all(monkeypatch, tmp_path):
    """With max_workers 2 each stage's process is held to half the cores, in every library's pool (a variable the user
    set stays); a timing stage, or any stage under max_workers 1, gets every core; ONNX Runtime sessions the stage opens
    without a thread count take its share."""
    from brainmri.config import Orchestration
    from brainmri.core.machine import THREAD_VARIABLES
    from brainmri.deploy.onnxrt import session
    from flows.scheduler import stage_threads
    from flows.stage_process import stage_env

    given = {"retries": 0, "retry_delay": 0, "exclusive": ["benchmark"], "cron": "0 3 * * 1", "timezone": "UTC"}
    two = Orchestration(task_runner="thread", dask_address="", max_workers=2, **given)
    one = Orchestration(task_runner="thread", dask_address="", max_workers=1, **given)
    assert [stage_threads("train@a", two, c) for c in (1, 2, 16)] == [1, 1, 8]
    assert stage_threads("benchmark@a", two, 2) == stage_threads("train@a", one, 2) == 0
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    env = stage_env(False, 1)
    assert env["BRAINMRI_THREADS"] == "1" and env["OMP_NUM_THREADS"] == "3"
    assert all(env[v] == "1" for v in THREAD_VARIABLES if v != "OMP_NUM_THREADS")
    monkeypatch.delenv("BRAINMRI_THREADS", raising=False)
    assert not {"BRAINMRI_THREADS", *THREAD_VARIABLES} - {"OMP_NUM_THREADS"} & stage_env(False, 0).keys()

    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["out"])], "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    monkeypatch.setenv("BRAINMRI_THREADS", "1")
    assert session(tmp_path / "m.onnx").get_session_options().intra_op_num_threads == 1
    assert session(tmp_path / "m.onnx", 2).get_session_options().intra_op_num_threads == 2


def test_two_models_of_one_backbone_are_not_started_side_by_side_while_another_can_be():
    """Stages that would compute the same frozen features (one backbone's models) start apart when another ready stage
    can fill the slot; with nothing else ready they still run together."""
    from brainmri.config import Orchestration, load_params
    from flows.pipeline import families
    from flows.scheduler import Progress, to_start

    given = {"retries": 0, "retry_delay": 0, "exclusive": ["benchmark"], "cron": "0 3 * * 1", "timezone": "UTC"}
    o = Orchestration(task_runner="thread", dask_address="", max_workers=2, **given)
    p = load_params("params.yaml")
    graph = {"augment": set(), **{f"train@{m}": {"augment"} for m in p.models}, "report": {f"train@{m}" for m in p.models}}
    family = families(p, graph)
    assert family["train@vgg16-aug"] == family["train@vgg16-noaug"] == "vgg16" and "report" not in family
    progress = Progress(graph, family)
    progress.done["augment"] = {}
    first = to_start(progress, o)
    assert first == ["train@resnet50v2-noaug", "train@vgg19-noaug"]  # DAG order, the second backbone's first model
    progress.running = dict.fromkeys(first)
    progress.done["train@resnet50v2-noaug"] = progress.running.pop("train@resnet50v2-noaug")
    assert to_start(progress, o) == ["train@resnet50v2-aug"]  # no model of vgg19 beside vgg19's
    alone = Progress({"train@vgg16-aug": set(), "train@vgg16-noaug": set()}, family)
    assert sorted(to_start(alone, o)) == ["train@vgg16-aug", "train@vgg16-noaug"]  # nothing else ready: side by side
