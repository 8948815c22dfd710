"""Scenario tests: the real pipeline through `dvc repro` and through the Prefect flow, on small phantoms."""

import re
import subprocess

import pandas as pd
import pytest
import yaml
from factory import make_project, tiny_training

from brainmri.config import load_params

pytestmark = pytest.mark.slow

SMALL = {
    **tiny_training(epochs=2),
    "ingest": {"source": "data/raw/synthetic", "max_side": 96},
    "synthetic": {"n_per_class": 12, "min_size": 64, "max_size": 96},
    "augment": {"copies": 1},
}
MODELS = {
    "vgg16-noaug": {"backbone": "vgg16", "augment": False},
    "vgg16-aug": {"backbone": "vgg16", "augment": True},
}
PER_MODEL = ("train", "evaluate", "export", "benchmark")
CHAIN = ["ingest", "split", "augment", *(f"{stage}@{m}" for m in MODELS for stage in PER_MODEL), "report"]


def sh(cwd, *cmd):
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("dvcproj"), SMALL, code=True, replace={"models": MODELS})
    sh(root, "brainmri", "synthesize")
    sh(root, "dvc", "init", "--no-scm", "-q")
    return root


def test_dvc_repro_runs_once_then_nothing_then_only_what_changed(dvc_project):
    root = dvc_project
    assert sorted(ran(sh(root, "dvc", "repro"))) == sorted(CHAIN)
    assert ran(sh(root, "dvc", "repro")) == []
    assert "up to date" in sh(root, "dvc", "status")
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    outs = {o["path"] for s in lock["stages"].values() for o in s.get("outs", [])}
    assert {"data/split/split.csv", "data/ingest/report.json", "data/models/vgg16-aug/model.keras", "reports"} <= outs
    shown = sh(root, "dvc", "metrics", "show")
    assert "data/eval/vgg16-aug/metrics.json" in shown and "test.accuracy.value" in shown

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["backbones"]["vgg16"]["learning_rate"] = 0.002  # one backbone's learning rate: only its chain reruns
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    expected = [f"{stage}@{m}" for m in ("vgg16-noaug", "vgg16-aug") for stage in PER_MODEL] + ["report"]
    assert sorted(ran(sh(root, "dvc", "repro"))) == sorted(expected)

    params["augment"]["rotation"] = 5.0
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = ran(sh(root, "dvc", "repro"))
    # every train stage lists the augmented images as a dep, but a no-aug model retrains to a byte-identical
    # model file, so its evaluation is not rerun
    assert "evaluate@vgg16-noaug" not in rerun
    assert {"augment", "train@vgg16-aug", "evaluate@vgg16-aug", "export@vgg16-aug", "report"} <= set(rerun)

    assert ran(sh(root, "dvc", "repro")) == []


def test_prefect_flow_matches_dvc_outputs(dvc_project, tmp_path, prefect_harness):
    from flows.pipeline import pipeline

    root = make_project(tmp_path / "flow", SMALL, replace={"models": MODELS})
    sh(root, "brainmri", "synthesize")
    result = pipeline(str(root / "params.yaml"))
    assert result["ingest"]["n_ingested"] > 24 and result["augment"]["n_augmented"] > 0
    assert set(result["evaluate"]) == set(MODELS) and (root / "reports" / "report.html").is_file()
    p = load_params(root / "params.yaml")
    flow_split = pd.read_csv(p.path("split_manifest"))
    dvc_p = load_params(dvc_project / "params.yaml")
    assert flow_split.equals(pd.read_csv(dvc_p.path("split_manifest")))  # same stage code, same params, same split
    flow_m = pd.read_json(p.model_file("eval", "vgg16-noaug", "metrics"), typ="series")
    assert flow_m["n_test"] == pd.read_json(dvc_p.model_file("eval", "vgg16-noaug", "metrics"), typ="series")["n_test"]


def test_whole_chain_on_the_real_dataset_at_32px(tmp_path):
    """Every stage and all seven models on the 253 real images, random weights, tiny size: CI's end-to-end check."""
    from factory import SHARED_DATA

    from tasks.augment import augment
    from tasks.evaluate import evaluate
    from tasks.ingest import ingest
    from tasks.report import report
    from tasks.split import split
    from tasks.train import train

    over = {**tiny_training(epochs=3), "ingest": {"source": str(SHARED_DATA), "max_side": 96}, "augment": {"copies": 1}}
    p = load_params(make_project(tmp_path, over) / "params.yaml")
    assert ingest(p)["n_ingested"] == 253
    split(p)
    augment(p)
    for name in p.models:
        t = train(p, name)
        m = evaluate(p, name)
        assert m["n_test"] == 38 and 0.0 <= m["test"]["auc"]["value"] <= 1.0
        assert t["weights"]["kind"] == "none"
    table = report(p)["table"]
    assert len(table) == 7 and len(p.models) == 7
    assert "38 images" in (p.path("report") / "report.md").read_text()

    from brainmri.predict import predict
    from tasks.export import export

    export(p, "vgg16-aug")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "zero.jpg").write_bytes(b"")
    out = predict(p.model_file("export", "vgg16-aug", "onnx"), [str(SHARED_DATA), str(tmp_path / "bad")], tmp_path / "all.csv")
    assert len(out) == 254 and (out["error"] != "").sum() == 1 and out.loc[out["error"] == "", "probability"].notna().all()
