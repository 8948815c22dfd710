import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from brainmri.report.plots import confusion_figure
from brainmri.stats.metrics import (
    POINT_METRICS,
    confusion,
    group_resamples,
    paired_auc_differences,
    point,
    with_intervals,
    youden_threshold,
)


def test_confusion_rows_are_actual_and_columns_predicted():
    y = np.array([0, 0, 0, 1, 1])  # 3 actual negatives, 2 actual positives
    pred = np.array([1, 0, 0, 1, 1])  # one false positive
    m = confusion(y, pred)
    assert m.tolist() == [[2, 1], [0, 2]]  # row 'actual no': 2 right, 1 called tumour
    fig = confusion_figure(m, ("no", "yes"), "t")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "Predicted" and ax.get_ylabel() == "Actual"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["no", "yes"]
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert cells[(0, 1)] == "1" and cells[(1, 0)] == "0"  # (actual no, predicted yes) = 1 false positive


def test_point_metrics_by_hand():
    y = np.array([1, 1, 1, 0, 0])
    prob = np.array([0.9, 0.8, 0.3, 0.6, 0.1])
    m = point(y, prob, 0.5)
    assert m["accuracy"] == pytest.approx(3 / 5) and m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2) and m["precision"] == pytest.approx(2 / 3)
    assert m["auc"] == pytest.approx(5 / 6) and m["brier"] == pytest.approx(np.mean((prob - y) ** 2))


def test_the_bootstrap_fast_path_equals_scikit_learn_on_ties_one_class_and_extremes():
    """The resamples use numpy-only metrics (`_fast_point`, `_auc`); they must be what `point` (scikit-learn) gives."""
    from sklearn.metrics import roc_auc_score

    from brainmri.stats.metrics import _auc, _fast_point

    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 60))
        y = (rng.random(n) < rng.uniform(0.05, 0.95)).astype(int)
        prob = np.round(rng.random(n), int(rng.integers(1, 4)))  # 1-3 decimals: many ties
        if trial % 7 == 0:
            prob[: n // 2] = rng.choice([0.0, 1.0, 1e-9, 1 - 1e-9], n // 2)  # at and beyond the clipping bounds
        t = float(rng.choice([0.5, 0.3, float(prob[0])]))
        fast, ref = _fast_point(y, prob, t), point(y, prob, t)
        for k in POINT_METRICS:
            assert (np.isnan(fast[k]) and np.isnan(ref[k])) or fast[k] == pytest.approx(ref[k], abs=1e-12), (trial, k)
        if len(np.unique(y)) == 2:
            assert _auc(y, prob) == pytest.approx(roc_auc_score(y, prob), abs=1e-12)


def test_youden_threshold_separates_validation_classes():
    y = np.array([0, 0, 0, 1, 1, 1])
    prob = np.array([0.1, 0.2, 0.7, 0.75, 0.8, 0.9])
    t = youden_threshold(y, prob)
    assert t == pytest.approx(0.725)  # midway between the last negative (0.7) and the first positive (0.75)
    assert point(y, prob, t)["accuracy"] == 1.0


def test_intervals_contain_the_value_and_narrow_with_more_images():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    prob = np.clip(y * 0.4 + rng.uniform(0, 0.6, 40), 0, 1)
    small = with_intervals(y, prob, 0.5, 200, seed=1)
    big = with_intervals(np.tile(y, 10), np.tile(prob, 10), 0.5, 200, seed=1)
    for k in POINT_METRICS:
        assert small[k]["ci_low"] <= small[k]["value"] <= small[k]["ci_high"], k
    width = lambda d: d["accuracy"]["ci_high"] - d["accuracy"]["ci_low"]  # noqa: E731
    assert width(big) < width(small) / 2


def width(d: dict, k: str | None = "accuracy") -> float:
    d = d if k is None else d[k]
    return d["ci_high"] - d["ci_low"]


def test_group_bootstrap_draws_whole_groups_so_copies_do_not_narrow_the_interval():
    rng = np.random.default_rng(0)
    y0 = rng.integers(0, 2, 30)
    p0 = np.clip(y0 * 0.4 + rng.uniform(0, 0.6, 30), 0, 1)
    y, prob, groups = np.repeat(y0, 4), np.repeat(p0, 4), np.repeat([f"g{i:02d}" for i in range(30)], 4)  # each scan saved 4 times
    for idx in group_resamples(groups, len(y), 50, seed=3):
        counts = np.bincount(idx, minlength=len(y)).reshape(30, 4)
        assert (counts == counts[:, :1]).all() and counts.sum() == 120  # a group's images come along together
    by_group = with_intervals(y, prob, 0.5, 100, seed=1, groups=groups)
    assert by_group == with_intervals(y0, p0, 0.5, 100, seed=1)  # 4 copies of 30 scans weigh as 30 scans
    by_image = with_intervals(y, prob, 0.5, 100, seed=1)
    assert width(by_group) > 1.5 * width(by_image) and width(by_group, "auc") > 1.5 * width(by_image, "auc")


def test_paired_auc_differences_score_every_model_on_the_same_resamples():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 60)
    groups = np.arange(60) // 2
    good = np.clip(y * 0.3 + rng.uniform(0, 0.7, 60), 0, 1)  # AUC about 0.85: room either way
    probs = {"good": good, "noise": rng.uniform(0, 1, 60), "close": good + rng.normal(0, 0.03, 60)}
    d = paired_auc_differences(y, probs, "good", groups, 200, 0)
    assert d["good"] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "resamples": 200}
    assert d["noise"]["value"] == pytest.approx(roc_auc_score(y, probs["noise"]) - roc_auc_score(y, good), abs=1e-4)
    assert d["noise"]["ci_high"] < 0  # clearly worse, and the interval says so
    rev = paired_auc_differences(y, probs, "noise", groups, 200, 0)["good"]
    assert (rev["ci_low"], rev["ci_high"]) == pytest.approx((-d["noise"]["ci_high"], -d["noise"]["ci_low"]), abs=1e-4)
    own = with_intervals(y, good, 0.5, 100, 0, groups)  # nearly the same model: pairing cancels what the images share
    assert width(d["close"], None) < width(own, "auc") / 3 and d["close"]["ci_low"] < 0 < d["close"]["ci_high"]


def test_evaluate_writes_every_field(small_run):
    p, trained, evaluated, _ = small_run
    for name in p.models:
        m = json.loads(p.model_file("eval", name, "metrics").read_text())
        assert m == evaluated[name]
        assert set(m["test"]) == set(POINT_METRICS)
        assert all({"value", "ci_low", "ci_high"} == set(v) for v in m["test"].values())
        assert m["threshold"] == trained[name]["threshold"]  # chosen on val by train, not on test
        assert m["points_per_image"] == pytest.approx(100 / m["n_test"], abs=0.01)
        preds = pd.read_csv(p.model_file("eval", name, "predictions"), keep_default_na=False)
        assert m["bootstrap_unit"] == "duplicate group" and m["n_groups"] == preds["group"].nunique()
        assert {"source_path", "group", "label", "probability", "actual", "predicted"} <= set(preds.columns)
        assert len(preds) == m["n_test"] and preds["probability"].between(0, 1).all()
        acc = (preds["predicted"] == preds["actual"]).mean()
        assert acc == pytest.approx(m["test"]["accuracy"]["value"], abs=1e-4)
        c = json.loads(p.model_file("eval", name, "confusion").read_text())
        assert c["rows"] == "actual" and c["labels"] == ["no", "yes"]
        assert np.array(c["matrix"]).sum(axis=1).tolist() == [int((preds["label"] == "no").sum()), int((preds["label"] == "yes").sum())]
        assert p.model_file("eval", name, "confusion_png").stat().st_size > 1000


def test_only_evaluate_and_the_report_open_a_test_image(small_run):
    """Test stays unread until evaluate: every stage of the small chain ran under an audit hook that records which
    stage opened which test image file (tests/conftest.py). Export's parity check, the ensemble's and Grad-CAM used to
    read test images; they choose nothing, but val serves as well."""
    from conftest import TEST_IMAGE_READS

    reads = TEST_IMAGE_READS["reads"]
    assert TEST_IMAGE_READS["test_paths"] and set(reads.get("evaluate", ())) == set(TEST_IMAGE_READS["test_paths"])
    assert set(reads) <= {"evaluate", "report"}, {stage: len(paths) for stage, paths in reads.items()}
