"""Three and four classes through the whole chain on phantoms: ingest, audit, split, augment, train (a hidden-layer
and a linear head in its grid), export, evaluate, benchmark, an external set, saliency, the report, and predict.
Checks the shapes, class names and metrics each stage writes for N classes (issue 31)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from factory import make_project, materialise_weights, tiny_training

from brainmri.config import load_params

CLASSES = {
    3: ["glioma", "meningioma", "notumor"],
    4: ["glioma", "meningioma", "notumor", "pituitary"],
}
MODELS = {"vgg16-aug": {"backbone": "vgg16", "augment": True}}


def _run_chain(root):
    from brainmri.intake.phantoms import class_kinds, generate
    from tasks.audit import audit
    from tasks.augment import augment
    from tasks.benchmark import benchmark
    from tasks.ensemble import ensemble
    from tasks.evaluate import evaluate
    from tasks.export import export
    from tasks.external import external
    from tasks.ingest import ingest
    from tasks.ingest_external import ingest_external
    from tasks.report import report
    from tasks.saliency import saliency
    from tasks.split import split
    from tasks.train import train

    p = load_params(root / "params.yaml")
    kinds = class_kinds(p.ingest.classes, p.ingest.positive_class)
    generate(p.resolve("data/raw/synthetic"), kinds, 14, 3, 64, 96, 0.1)
    generate(p.resolve("external_set"), kinds, 5, 99, 64, 96, 0.0)  # another seed: an independent phantom set
    for step in (ingest, audit, split, augment, ingest_external, materialise_weights):
        step(p)
    out = {"train": train(p, "vgg16-aug"), "export": export(p, "vgg16-aug")}
    out["evaluate"] = evaluate(p, "vgg16-aug")
    benchmark(p, "vgg16-aug")
    out["external"] = external(p, "vgg16-aug")
    ensemble(p)  # off (ensemble.members empty): it records "no ensemble"
    saliency(p, "vgg16-aug")
    report(p)
    return p, out


@pytest.fixture(scope="module", params=[3, 4], ids=["3 classes", "4 classes"])
def n_run(request, tmp_path_factory):
    k = request.param
    over = {**tiny_training(), "augment": {"copies": 1}, "synthetic": {"n_per_class": 14}}
    over["ingest"] = {"source": "data/raw/synthetic", "max_side": 96, "classes": CLASSES[k], "positive_class": ""}
    over["external"] = {"source": "external_set"}
    over["backbones"]["vgg16"].update(dense=[8, 0], linear_c=0.1, epochs=4)  # a hidden-layer head and a linear one: CV chooses
    root = make_project(tmp_path_factory.mktemp(f"classes{k}"), over, replace={"models": MODELS})
    p, out = _run_chain(root)
    return k, p, out


def test_train_records_every_class_and_decides_by_arg_max(n_run):
    k, p, out = n_run
    t = json.loads(p.model_file("models", "vgg16-aug", "train_metrics").read_text())
    assert t["classes"] == CLASSES[k] and t["threshold"] is None and t["threshold_rule"] == "argmax"
    points = t["selection"]["points"]
    assert {pt["dense"] for pt in points} == {8, 0}  # both heads were cross-validated on the macro AUC
    assert all(0.0 <= pt["cv_auc_pooled_out_of_fold"] <= 1.0 for pt in points)
    assert t["calibration"]["method"] == "temperature"


def test_evaluate_scores_per_class_and_macro_with_a_labelled_confusion_matrix(n_run):
    k, p, out = n_run
    m = out["evaluate"]
    assert m["classes"] == CLASSES[k] and set(m["test_per_class"]) == set(CLASSES[k])
    for key in ("auc", "accuracy", "balanced_accuracy", "f1", "log_loss", "brier"):
        cell = m["test"][key]
        assert cell["ci_low"] <= cell["value"] <= cell["ci_high"] or np.isnan(cell["ci_low"]), key
    assert m["test"]["auc"]["value"] > 1.0 / k  # phantom types differ in place and size: better than chance
    conf = json.loads(p.model_file("eval", "vgg16-aug", "confusion").read_text())
    matrix = np.array(conf["matrix"])
    assert conf["labels"] == CLASSES[k] and matrix.shape == (k, k) and matrix.sum() == m["n_test"]
    assert (matrix.sum(axis=1) == [m["n_per_class"][c] for c in CLASSES[k]]).all()  # rows: actual
    preds = pd.read_csv(p.model_file("eval", "vgg16-aug", "predictions"), keep_default_na=False)
    prob = preds[[f"prob_{c}" for c in CLASSES[k]]].to_numpy()
    assert np.allclose(prob.sum(axis=1), 1.0, atol=1e-4)
    assert (preds["predicted"] == [CLASSES[k][i] for i in prob.argmax(axis=1)]).all()


def test_export_gives_every_class_probability_and_names_them(n_run):
    import onnx

    from brainmri.deploy.onnxrt import probabilities, session

    k, p, out = n_run
    path = p.model_file("export", "vgg16-aug", "onnx")
    props = {e.key: e.value for e in onnx.load(str(path)).metadata_props}
    assert json.loads(props["classes"]) == CLASSES[k] and "threshold" not in props
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    prob = probabilities(session(path), x)
    assert prob.shape == (3, k) and np.allclose(prob.sum(axis=1), 1.0, atol=1e-4)


def test_predict_writes_a_column_per_class_and_the_most_probable_label(n_run, tmp_path):
    from flows.cli import main

    k, p, _ = n_run
    files = sorted((p.resolve("external_set") / CLASSES[k][0]).iterdir())[:3]
    csv, js = tmp_path / "out.csv", tmp_path / "out.json"
    for target in (csv, js):
        assert main(["predict", "--model", str(p.model_file("export", "vgg16-aug", "onnx")), "--out", str(target), *map(str, files)]) == 0
    rows = pd.read_csv(csv, keep_default_na=False)
    cols = [f"prob_{c}" for c in CLASSES[k]]
    assert list(rows.columns[: 1 + k]) == ["path", *cols] and len(rows) == 3
    assert (rows["label"] == [CLASSES[k][i] for i in rows[cols].to_numpy().argmax(axis=1)]).all()
    doc = json.loads(js.read_text())
    assert doc["classes"] == CLASSES[k] and len(doc["predictions"]) == 3
    assert all(set(r["probabilities"]) == set(CLASSES[k]) for r in doc["predictions"])


def test_external_and_report_speak_of_every_class(n_run):
    k, p, out = n_run
    e = out["external"]
    intake = json.loads(p.path("external_report").read_text())  # phantoms ingest's rules may quarantine or join
    assert e["n_images"] == intake["n_used"] >= 4 * k and set(e["external_per_class"]) == set(CLASSES[k])
    assert "balanced_accuracy" in e["change_from_test"]
    text = (p.path("report") / "report.md").read_text()
    assert f"{k} classes" in text and all(f"`{c}`" in text for c in CLASSES[k])
    assert "Macro AUC" in text
