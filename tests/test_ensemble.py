"""The ensemble: members and weights chosen on out-of-fold CV predictions (never test), a cross-fitted paired comparison
with the best single member, and one ONNX graph composed of the members' exported graphs that predict runs like any model."""

import json

import numpy as np
import onnx
import pandas as pd
import pytest
from factory import make_project, tiny_onnx
from onnx import TensorProto, helper

from brainmri.config import load_params
from brainmri.ensembling import EnsembleError, compose, cross_fitted, greedy_weights
from brainmri.errors import ConfigError
from brainmri.onnxrt import probabilities, session
from brainmri.predict import load, predict
from tasks.ensemble import ensemble
from tasks.split import split_part


def left_half_onnx(path, size: int = 32):
    """probability = mean brightness of the image's left half / 255: a model that a mirror changes."""
    consts = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("s", 0), ("e", size // 2), ("ax", 2))] + [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 255])
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["image", "s", "e", "ax"], ["left"]),
            helper.make_node("ReduceMean", ["left"], ["mean"], axes=[1, 2, 3], keepdims=1),
            helper.make_node("Flatten", ["mean"], ["flat"]),
            helper.make_node("Mul", ["flat", "scale"], ["probability"]),
        ],
        "left",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        consts,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    onnx.save(proto, path)
    return path


def test_the_composed_graph_is_the_weighted_mean_and_tta_averages_the_mirror(tmp_path):
    mean, left = tiny_onnx(tmp_path / "mean.onnx"), left_half_onnx(tmp_path / "left.onnx")
    x = np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    x[:, :, :16] *= 0.2  # a dark left half: the mirror changes what `left` sees
    p_mean, p_left = (probabilities(session(f), x) for f in (mean, left))
    p_left_mirror = probabilities(session(left), x[:, :, ::-1].copy())
    for tta, want in ((False, 0.3 * p_mean + 0.7 * p_left), (True, 0.3 * p_mean + 0.7 * (p_left + p_left_mirror) / 2)):
        model = compose([onnx.load(mean), onnx.load(left)], [0.3, 0.7], tta)
        onnx.save(model, tmp_path / "ens.onnx")
        got = probabilities(session(tmp_path / "ens.onnx"), x)
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(p_left_mirror - p_left).min() > 0.1  # so the TTA case above tells mirrored from not


def test_selection_keeps_informative_members_and_the_cross_fitted_difference_is_honest():
    rng = np.random.default_rng(1)
    n = 600
    y = rng.integers(0, 2, n)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    a, b = sig(y + rng.normal(0, 1, n)), sig(y + rng.normal(0, 1, n))  # two informative members, independent errors
    noise = rng.uniform(0, 1, n)
    w = greedy_weights(y, np.column_stack([a, b, noise]), 10)
    assert w[2] == 0 and w[0] > 0 and w[1] > 0 and w.sum() == pytest.approx(1.0)
    assert np.allclose(w * 10, np.round(w * 10))  # multiples of 1/10: counts of the best round
    folds = np.arange(n) % 5
    ens, single, choices = cross_fitted(y, np.column_stack([a, b, noise]), folds, 10)
    assert len(choices) == 5 and all(c["weights"][2] == 0 for c in choices)
    from brainmri.metrics import paired_auc_differences

    d = paired_auc_differences(y, {"e": ens, "s": single}, "s", None, 300, 0)["e"]
    assert d["ci_low"] > 0  # averaging two independent errors beats either, beyond chance at n=600
    same = cross_fitted(y, np.column_stack([a, a]), folds, 10)  # two copies of one model: nothing to gain
    np.testing.assert_allclose(same[0], same[1])


def test_the_ensemble_stage_on_the_small_run(small_run, tmp_path):
    p, trained, evaluated, _ = small_run
    e = json.loads((p.path("ensemble") / p.paths.files.ensemble).read_text())
    assert e["configured"] and e["candidates"] == ["vgg16-noaug", "vgg16-aug"]
    assert set(e["members"]) <= set(e["candidates"]) and sum(e["members"].values()) == pytest.approx(1.0, abs=1e-3)
    # chosen on CV predictions over train+val only: no test image is among them, in any member's file
    test = split_part(p, "test")
    for name in e["candidates"]:
        rows = pd.read_csv(p.model_file("models", name, "cv_predictions"), keep_default_na=False)
        assert not set(rows["image"]) & set(test.frame["image"]) and (rows["fold"] >= 0).all()
        assert len(rows) == trained[name]["n_train"] + trained[name]["n_val"]
    d = e["cv"]["auc_difference"]
    assert d["ci_low"] <= d["value"] <= d["ci_high"] and e["kept"] == (d["ci_low"] > 0)
    # predict runs it like any exported model, and it gives the weighted mean of what predict gives for each member
    ens = p.path("ensemble") / p.paths.files.onnx
    assert load(ens).threshold == pytest.approx(e["threshold"])
    files = [str(f) for f in test.paths]
    got = predict(ens, files, tmp_path / "ensemble.csv")
    assert (got["label"] == np.where(got["probability"] >= e["threshold"], "yes", "no")).all()
    want = sum(w * predict(p.model_file("export", m, "onnx"), files, tmp_path / f"{m}.csv")["probability"] for m, w in e["members"].items())
    np.testing.assert_allclose(got["probability"], want, atol=1e-3)  # the weights in ensemble.json are rounded to 4 places
    # a damaged member file is one sentence naming it, and nothing is written
    q = load_params(p.root / "params.yaml", {"paths": {"export": str(tmp_path / "export"), "ensemble": str(tmp_path / "ens")}})
    for m in e["candidates"]:
        (q.path("export") / m).mkdir(parents=True)
        data = p.model_file("export", m, "onnx").read_bytes()
        q.model_file("export", m, "onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(EnsembleError, match=r"model.onnx: not a loadable ONNX model"):
        ensemble(q)
    assert not q.path("ensemble").exists()
    md = (p.path("report") / "report.md").read_text()
    section = md.split("## Ensemble")[1].split("\n## ")[0]
    assert "cross-fitted" in section and e["best_single"] in section and ("Kept" in section or "Not recommended" in section)


def test_no_members_records_no_ensemble_and_bad_member_lists_are_refused(tmp_path):
    p = load_params(make_project(tmp_path / "a", {"ensemble": {"members": []}}) / "params.yaml")
    out = ensemble(p)
    assert out == json.loads((p.path("ensemble") / p.paths.files.ensemble).read_text()) and not out["configured"]
    assert not (p.path("ensemble") / p.paths.files.onnx).exists()
    root = make_project(tmp_path / "b")
    for members, msg in (
        (["vgg16-aug"], "one model is no ensemble"),
        (["vgg16-aug", "nope"], "'nope' is not a key of models"),
        (["vgg16-aug", "smallcnn-aug"], "no out-of-fold CV predictions"),
        (["vgg16-aug", "vgg16-aug"], "lists a model twice"),
    ):
        with pytest.raises(ConfigError, match=msg):
            load_params(root / "params.yaml", {"ensemble": {"members": members}})
