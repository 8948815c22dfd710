"""Stages and runs stopped and doubled (issue 32): Ctrl-C and SIGTERM stop a training stage within seconds even inside
its compiled loop, leaving no temporary file; a second run of the same stage is refused by name while the first goes
on. (predict's own interrupts: tests/test_hostile_models.py.)"""

import os
import signal
import subprocess
import time

import pytest
from factory import make_project, materialise_weights, tiny_training

from brainmri.config import load_params
from brainmri.intake.phantoms import generate
from tasks.augment import augment
from tasks.ingest import ingest
from tasks.split import split

pytestmark = pytest.mark.slow
ONE = {"vgg16-aug": {"backbone": "vgg16", "augment": True}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A project ready to train, whose head loop runs long: many epochs and grid points in one compiled call."""
    root = tmp_path_factory.mktemp("interrupts")
    over = {**tiny_training(size=48, epochs=3), "ingest": {"source": "data/raw/ph"}, "augment": {"copies": 2}}
    over["backbones"]["vgg16"].update(epochs=[3000, 4000], learning_rate=[0.001, 0.0001], patience=0)
    over["train"] = {**over["train"], "cv_folds": 3, "cv_seeds": 2}
    make_project(root, over, replace={"models": ONE})
    p = load_params(root / "params.yaml")
    generate(p.resolve("data/raw/ph"), {"yes": True, "no": False}, 16, 4, 64, 96, 0.0)
    for stage in (ingest, split, augment, materialise_weights):
        stage(p)
    return p


def temporaries(root) -> list[str]:
    return sorted(str(f.relative_to(root)) for f in root.rglob(".*.tmp*"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_training_stage_stops_within_five_seconds_and_leaves_no_temporary_file(workspace, sig):
    p = workspace
    proc = subprocess.Popen(["brainmri", "train", "vgg16-aug"], cwd=p.root, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # once the head loop runs: the features are cached, the grid's compiled call is long
        seen.append(line)
        if "heads: compiled run 1 of" in line or len(seen) > 200:
            break
    time.sleep(2)
    assert proc.poll() is None, "".join(seen)
    start = time.monotonic()
    proc.send_signal(sig)
    rest = proc.communicate(timeout=60)[1]
    took = time.monotonic() - start
    assert took < 5, f"{took:.1f} s to stop"
    assert proc.returncode == 130 and "interrupted" in rest and "Traceback" not in rest, rest
    assert temporaries(p.root) == [] and not p.model_file("models", "vgg16-aug", "model").exists()


def test_a_stage_stopped_while_its_worker_computes_features_leaves_no_worker_and_no_temporary_file(tmp_path):
    """The frozen features are computed in a worker process: Ctrl-C while it works stops both (no process writes on
    into the cache), and neither the extractor's copy nor a half-written entry is left behind."""
    over = {**tiny_training(size=192, epochs=3), "ingest": {"source": "data/raw/ph"}, "augment": {"copies": 4}}
    make_project(tmp_path, over, replace={"models": ONE})  # 192 px: long enough a forward pass to be stopped inside
    p = load_params(tmp_path / "params.yaml")
    generate(p.resolve("data/raw/ph"), {"yes": True, "no": False}, 16, 4, 64, 96, 0.0)
    for stage in (ingest, split, augment, materialise_weights):
        stage(p)
    cache = p.path("feature_cache")
    cmd = ["brainmri", "train", "vgg16-aug"]
    proc = subprocess.Popen(cmd, cwd=p.root, stderr=subprocess.PIPE, text=True, start_new_session=True)  # its own group
    deadline = time.monotonic() + 180
    while not list(cache.rglob("*.npy")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the worker has written its first entries: it is inside its batches
    assert proc.poll() is None, "the stage ended before its features were cached"
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C on a terminal: to the stage and its worker
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130 and "interrupted" in rest and "Traceback" not in rest, rest
    written = sorted(cache.rglob("*.npy"))
    time.sleep(3)
    assert sorted(cache.rglob("*.npy")) == written  # no orphaned worker fills the cache on
    assert temporaries(p.root) == [] and not list(cache.rglob(".scratch.*"))
    assert 0 < len(written) < 16 * 2 * 5  # stopped part-way: some entries, not all


def test_a_second_run_of_the_same_stage_is_refused_while_the_first_goes_on(workspace):
    """Two `brainmri ingest` at once: the second deleted the first's temporary folder. Now a second run of a stage
    stops at once, by name, while the first goes on. The first is a training inside its long grid (an ingest of a
    few phantoms could end before the second had started), then stopped."""
    p = workspace
    first = subprocess.Popen(["brainmri", "train", "vgg16-aug"], cwd=p.root, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in first.stderr:  # inside the grid's first compiled run: minutes of work, the stage's lock held
            seen.append(line)
            if "heads: compiled run 1 of" in line or len(seen) > 200:
                break
        second = subprocess.run(["brainmri", "train", "vgg16-aug"], cwd=p.root, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert "`brainmri train vgg16-aug` already runs in this workspace (pid" in second.stderr, second.stderr
        assert first.poll() is None, "".join(seen)  # the first goes on
        other = subprocess.run(["brainmri", "split"], cwd=p.root, capture_output=True, text=True, timeout=120)
        assert other.returncode == 0, other.stderr  # another stage is not held up by train's lock
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    assert first.returncode == 130 and temporaries(p.root) == []
    assert os.listdir(p.path("timing_cache").parent / "locks")  # the lock files stay; the kernel released the locks
