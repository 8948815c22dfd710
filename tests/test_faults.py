"""Faults with real processes: SIGKILL mid-stage then rerun, unsafe models. (Two pipelines at once and tampered outputs:
tests/test_pipeline.py, in its shared workspace.)"""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from factory import make_project, materialise_weights, tiny_training

from brainmri.config import load_params
from brainmri.intake.parts import split_part
from brainmri.intake.phantoms import generate
from brainmri.intake.preprocess import load_batch
from brainmri.learn.models import load_model
from tasks.augment import augment
from tasks.ingest import ingest
from tasks.split import split

pytestmark = pytest.mark.slow

ONE = {"vgg16-aug": {"backbone": "vgg16", "augment": True}}
CNN = {"smallcnn-aug": {"backbone": "smallcnn", "augment": True}}


def project(root, models=ONE, **over):
    params = {
        **tiny_training(size=64, epochs=3),
        "ingest": {"source": "data/raw/ph"},
        "augment": {"copies": 3},
        "train": {"feature_batch_size": 2, "cv_folds": 0, "bootstrap": 50},
        **over,
    }
    make_project(root, params, code=True, replace={"models": models})
    p = load_params(root / "params.yaml")
    generate(p.resolve("data/raw/ph"), {"yes": True, "no": False}, 20, 4, 64, 96, 0.0)
    for stage in (ingest, split, augment, materialise_weights):  # in this process: the faults below are in train and export
        stage(p)
    return p


def copy_project(p, root):
    """A second workspace with the same inputs (every path in params.yaml is relative to its folder)."""
    shutil.copytree(p.root, root)
    return load_params(root / "params.yaml")


def cache_files(p):
    return list(p.path("feature_cache").rglob("*.npy"))


def test_sigkill_during_feature_extraction_then_rerun_gives_the_same_model(tmp_path):
    killed = project(tmp_path / "killed")
    clean = copy_project(killed, tmp_path / "clean")
    proc = subprocess.Popen(["brainmri", "train", "vgg16-aug"], cwd=killed.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while len(cache_files(killed)) < 10 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(cache_files(killed))
    assert 10 <= done_before < 40 + 2 * 28  # some features were cached, not all
    assert not killed.model_file("models", "vgg16-aug", "model").exists()  # no half-written model
    assert not [f for f in cache_files(killed) if f.name.startswith(".")]  # no half-written cache entry under a real name

    rerun = subprocess.run(["brainmri", "train", "vgg16-aug"], cwd=killed.root, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    computed = [int(n) for n in re.findall(r"computing (\d+) of \d+ images", rerun.stderr)]
    assert sum(computed) == len(cache_files(killed)) - done_before  # only what was missing is computed again
    subprocess.run(["brainmri", "-q", "train", "vgg16-aug"], cwd=clean.root, check=True, timeout=600)
    a = json.loads(killed.model_file("models", "vgg16-aug", "train_metrics").read_text())
    b = json.loads(clean.model_file("models", "vgg16-aug", "train_metrics").read_text())
    # features computed in other batch compositions differ in the last float bits, so compare with a tolerance
    assert a["selected_epoch"] == b["selected_epoch"] and a["epochs_run"] == b["epochs_run"]
    for part in ("train", "val"):
        for k in ("accuracy", "auc", "bce"):
            assert a[part][k] == pytest.approx(b[part][k], abs=2e-3), (part, k)
    va = split_part(killed, "val")
    x = load_batch(va.paths, 64)
    pa = load_model(killed.model_file("models", "vgg16-aug", "model")).predict(x, verbose=0)
    pb = load_model(clean.model_file("models", "vgg16-aug", "model")).predict(x, verbose=0)
    assert np.allclose(pa, pb, atol=1e-3)


def kill_when(root, args, pattern: str, timeout: float = 300) -> str:
    """Start `brainmri ARGS`, SIGKILL it as soon as a stderr line matches `pattern`; return what it printed."""
    proc = subprocess.Popen(["brainmri", *args], cwd=root, stderr=subprocess.PIPE, text=True)
    seen, deadline = [], time.monotonic() + timeout
    for line in proc.stderr:
        seen.append(line)
        if re.search(pattern, line) or time.monotonic() > deadline:
            break
    assert proc.poll() is None, f"{args} ended before it could be killed:\n{''.join(seen)}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return "".join(seen)


@pytest.mark.long
def test_sigkill_during_training_epochs_and_during_export_then_rerun_gives_the_same_outputs(tmp_path):
    over = {**tiny_training(size=64, epochs=3), "ingest": {"source": "data/raw/ph"}}
    over["backbones"]["smallcnn"].update(epochs=6, patience=6)
    killed = project(tmp_path / "killed", CNN, **over)
    clean = copy_project(killed, tmp_path / "clean")
    model = killed.model_file("models", "smallcnn-aug", "model")

    kill_when(killed.root, ["train", "smallcnn-aug"], r"epoch 2/6")  # killed between epochs
    assert not model.exists() and not list(model.parent.parent.glob(".*"))  # nothing half-written, no temp folder
    for p in (killed, clean):
        subprocess.run(["brainmri", "-q", "train", "smallcnn-aug"], cwd=p.root, check=True, timeout=600)
    assert model.read_bytes() == clean.model_file("models", "smallcnn-aug", "model").read_bytes()  # the same model

    onnx = killed.model_file("export", "smallcnn-aug", "onnx")
    kill_when(killed.root, ["export", "smallcnn-aug"], r"quantizing to int8")  # fp32 written in the temp folder
    assert not onnx.exists()  # nothing under the real name; SIGKILL leaves the temporary folder beside it...
    assert [d.suffix for d in onnx.parent.parent.glob(".smallcnn-aug.*")] == [".tmp"]
    for p in (killed, clean):
        subprocess.run(["brainmri", "-q", "export", "smallcnn-aug"], cwd=p.root, check=True, timeout=600)
    assert not list(onnx.parent.parent.glob(".*"))  # ...and the rerun removes it
    assert onnx.read_bytes() == clean.model_file("export", "smallcnn-aug", "onnx").read_bytes()
    a, b = (json.loads(p.model_file("export", "smallcnn-aug", "export_metrics").read_text()) for p in (killed, clean))
    assert a["parity"] == b["parity"] and a["int8"] == b["int8"]


def test_keras_files_load_in_safe_mode_only(tmp_path):
    import keras

    from brainmri.learn.models import load_model

    inp = keras.Input((4,))
    out = keras.layers.Lambda(lambda x: x * 2)(inp)  # arbitrary Python code inside a model file
    keras.Model(inp, out).save(tmp_path / "evil.keras")
    with pytest.raises(ValueError, match="(?i)lambda|unsafe|safe_mode"):
        load_model(tmp_path / "evil.keras")
