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
from brainmri.core.errors import ConfigError
from brainmri.deploy.onnxrt import probabilities, session
from brainmri.deploy.predict import load, predict
from brainmri.export.compose import compose
from brainmri.intake.parts import split_part
from brainmri.learn.ensemble_cv import cross_fitted, read_oof
from brainmri.stats.ensemble_selection import EnsembleError, greedy_weights
from tasks.ensemble import ensemble


def left_half_onnx(path, size: int = 32, opset: int = 13, right: bool = False):
    """probability = mean brightness of the image's left (or right) half / 255: a model that a mirror changes."""
    start, end = (size // 2, size) if right else (0, size // 2)
    consts = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("s", start), ("e", end), ("ax", 2))]
    consts += [helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 255]), helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3])]
    mean = (
        helper.make_node("ReduceMean", ["left", "axes"], ["mean"], keepdims=1)  # axes became an input in opset 18
        if opset >= 18
        else helper.make_node("ReduceMean", ["left"], ["mean"], axes=[1, 2, 3], keepdims=1)
    )
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["image", "s", "e", "ax"], ["left"]),
            mean,
            helper.make_node("Flatten", ["mean"], ["flat"]),
            helper.make_node("Mul", ["flat", "scale"], ["probability"]),
        ],
        "left",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        consts,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    onnx.save(proto, path)
    return path


@pytest.mark.parametrize("opset", [13, 18])
def test_the_composed_graph_is_the_weighted_mean_and_tta_averages_the_mirror(tmp_path, opset):
    left = left_half_onnx(tmp_path / "left.onnx", opset=opset)
    right = left_half_onnx(tmp_path / "right.onnx", opset=opset, right=True)
    x = np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    x[:, :, :16] *= 0.2  # a dark left half: the mirror changes what each member sees
    p_left, p_right = (probabilities(session(f), x) for f in (left, right))
    p_left_mirror = probabilities(session(left), x[:, :, ::-1].copy())  # the mirror's left half is the right half
    np.testing.assert_allclose(p_left_mirror, p_right, atol=1e-6)
    for tta, want in ((False, 0.3 * p_left + 0.7 * p_right), (True, (p_left + p_right) / 2)):
        model = compose([onnx.load(left), onnx.load(right)], [0.3, 0.7], tta)
        onnx.save(model, tmp_path / "ens.onnx")
        np.testing.assert_allclose(probabilities(session(tmp_path / "ens.onnx"), x), want, atol=1e-6)
    assert np.abs(p_left_mirror - p_left).min() > 0.1  # so the TTA case above tells mirrored from not


def test_the_composed_output_stays_a_probability_and_unlike_members_are_refused(tmp_path):
    mean = tiny_onnx(tmp_path / "mean.onnx")  # opset 13; outputs 1.0 on a white image
    white = np.full((2, 32, 32, 3), 255, np.float32)
    onnx.save(compose([onnx.load(mean), onnx.load(mean)], [0.6, 0.6], False), tmp_path / "ens.onnx")  # weights above 1
    assert probabilities(session(tmp_path / "ens.onnx"), white).max() == 1.0  # clipped: predict refuses anything above 1
    with pytest.raises(EnsembleError, match="different opsets"):
        compose([onnx.load(mean), onnx.load(left_half_onnx(tmp_path / "l18.onnx", opset=18))], [0.5, 0.5], False)
    renamed = onnx.load(mean)
    onnx.compose.add_prefix(renamed, "x_", inplace=True)
    with pytest.raises(EnsembleError, match="one input named 'image'"):
        compose([onnx.load(mean), renamed], [0.5, 0.5], False)


def test_selection_keeps_informative_members_and_the_cross_fitted_difference_is_honest():
    rng = np.random.default_rng(1)
    n = 600
    y = rng.integers(0, 2, n)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    a, b = sig(y + rng.normal(0, 1, n)), sig(y + rng.normal(0, 1, n))  # two informative members, independent errors
    noise = rng.uniform(0.01, 0.99, n)
    w = greedy_weights(y, np.column_stack([a, b, noise]), 10)
    assert w[2] == 0 and w[0] > 0 and w[1] > 0 and w.sum() == pytest.approx(1.0)
    assert any(np.allclose(w * k, np.round(w * k)) for k in range(1, 11))  # counts of the best round k, k <= 10
    folds = np.arange(n) % 5
    ens, single, choices = cross_fitted(y, np.column_stack([a, b, noise]), folds, 10, "platt")
    assert len(choices) == 5 and all(c["weights"][2] == 0 for c in choices)
    from brainmri.stats.metrics import paired_auc_differences

    d = paired_auc_differences(y, {"e": ens, "s": single}, "s", None, 300, 0)["e"]
    assert d["ci_low"] > 0  # averaging two independent errors beats either, beyond chance at n=600
    same = cross_fitted(y, np.column_stack([a, a]), folds, 10, "platt")  # two copies of one model: nothing to gain
    np.testing.assert_allclose(same[0], same[1])


def test_bad_cv_predictions_are_one_sentence_naming_the_file(tmp_path):
    p = load_params(make_project(tmp_path) / "params.yaml")
    good = pd.DataFrame(
        {"image": ["a", "b", "c", "d"], "group": ["a", "b", "c", "d"], "label": ["yes", "no", "yes", "no"], "fold": [0, 0, 1, 1]}
    ).assign(probability=[0.9, 0.2, 0.7, 0.4], calibrated=[0.8, 0.3, 0.6, 0.4])
    members = ["vgg16-noaug", "vgg16-aug"]
    for m in members:
        p.model_file("models", m, "cv_predictions").parent.mkdir(parents=True, exist_ok=True)
        good.to_csv(p.model_file("models", m, "cv_predictions"), index=False)
    rows, raw = read_oof(p, members)
    assert raw.shape == (4, 2) and list(rows["fold"]) == [0, 0, 1, 1]
    target = p.model_file("models", "vgg16-aug", "cv_predictions")
    for bad, msg in (
        (good.assign(calibrated=[0.8, None, 0.6, 0.4]), "column calibrated holds values that are not probabilities"),
        (good.assign(probability=[0.9, 1.5, 0.7, 0.4]), "column probability holds values that are not probabilities"),
        (good.assign(fold=[0, -1, 1, 1]), "column fold must hold non-negative integers"),
        (good.assign(label=["yes", "maybe", "yes", "no"]), r"unknown label\(s\) \['maybe'\]"),
        (good.assign(image=["a", "b", "c", "x"]), "other images or folds than vgg16-noaug's"),
        (good.drop(columns="fold"), r"lacks column\(s\) fold"),
        (good.iloc[:0], "no CV predictions"),
    ):
        bad.to_csv(target, index=False)
        with pytest.raises(EnsembleError, match=msg):
            read_oof(p, members)
    target.write_bytes(b"")
    with pytest.raises(EnsembleError, match="cannot read vgg16-aug's CV predictions"):
        read_oof(p, members)
    target.unlink()
    with pytest.raises(EnsembleError, match="cannot read vgg16-aug's CV predictions"):
        read_oof(p, members)
    one_class = good.assign(label="yes")
    for m in members:
        one_class.to_csv(p.model_file("models", m, "cv_predictions"), index=False)
    with pytest.raises(EnsembleError, match="one class only"):
        read_oof(p, members)


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
    lat = e["latency"]  # timed like benchmark@MODEL's ONNX rows, both runtimes, both batch sizes
    assert {(r["runtime"], r["batch"]) for r in lat["rows"]} == {
        (rt, bs) for rt in ("onnxruntime_fp32", "openvino_fp32") for bs in (1, p.benchmark.batch_size)
    }
    assert all(0 < r["p25_ms"] <= r["p50_ms"] <= r["p75_ms"] for r in lat["rows"])
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
    q = load_params(
        p.root / "params.yaml",
        {
            "paths": {
                "export": str(tmp_path / "out" / "export"),
                "ensemble": str(tmp_path / "out" / "ens"),
                "data_root": str(tmp_path / "out"),
            }
        },
    )
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
