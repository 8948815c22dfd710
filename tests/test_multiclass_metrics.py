"""N-class metrics: the bootstrap's fast arithmetic against scikit-learn, intervals by groups, the confusion matrix."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from brainmri.stats import multiclass


def _data(n=90, k=4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, prob.astype(np.float32)


@pytest.mark.parametrize("k", [3, 4])
def test_point_metrics_are_scikit_learns(k):
    y, prob = _data(k=k)
    overall, per = multiclass.point(y, prob)
    pred = prob.argmax(axis=1)
    assert overall["auc"] == pytest.approx(skm.roc_auc_score(y, prob, multi_class="ovr", average="macro"), abs=1e-12)
    assert overall["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    assert overall["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    assert overall["precision"] == pytest.approx(skm.precision_score(y, pred, average="macro", zero_division=0), abs=1e-12)
    assert overall["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0), abs=1e-12)
    assert overall["log_loss"] == pytest.approx(skm.log_loss(y, prob.astype(np.float64), labels=range(k)), abs=1e-6)
    assert np.allclose(per["recall"], skm.recall_score(y, pred, average=None))
    assert np.allclose(per["auc"], [skm.roc_auc_score(y == c, prob[:, c]) for c in range(k)])
    assert (multiclass.confusion(y, pred, k) == skm.confusion_matrix(y, pred, labels=range(k))).all()


def test_a_class_never_said_scores_zero_precision_not_nan():
    y = np.array([0, 1, 2, 0, 1, 2])
    prob = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1]] * 2)  # class 2 never said
    overall, per = multiclass.point(y, prob)
    assert per["precision"][2] != per["precision"][2] and per["f1"][2] == 0.0  # NaN per class, 0 in the macro mean
    assert overall["precision"] == pytest.approx(skm.precision_score(y, prob.argmax(1), average="macro", zero_division=0))


def test_intervals_resample_groups_and_name_every_class():
    y, prob = _data(n=120, k=3, seed=1)
    names = ("glioma", "meningioma", "pituitary")
    by_image = multiclass.with_intervals(y, prob, names, 300, 0)
    groups = np.arange(120) // 6  # six images per group: fewer independent draws, wider intervals
    by_group = multiclass.with_intervals(y, prob, names, 300, 0, groups=groups)
    assert set(by_group["per_class"]) == set(names)
    width = lambda r: r["overall"]["auc"]["ci_high"] - r["overall"]["auc"]["ci_low"]  # noqa: E731
    assert by_image["overall"]["auc"]["ci_low"] < by_image["overall"]["auc"]["value"] < by_image["overall"]["auc"]["ci_high"]
    assert by_group["resamples_used"] == 300 and width(by_group) > 0


def test_top_label_ece_is_zero_when_confidence_matches_accuracy_and_large_when_overconfident():
    y = np.array([0, 1, 2, 0] * 25)
    sure_right = np.eye(3)[y]
    assert multiclass.top_label_ece(y, sure_right) == pytest.approx(0.0)
    sure_wrong = np.eye(3)[(y + 1) % 3]
    assert multiclass.top_label_ece(y, sure_wrong) == pytest.approx(1.0)
    chance = multiclass.ece_if_calibrated(np.full((100, 3), 1 / 3), seed=0, draws=50)
    assert 0 < chance["mean"] <= chance["p95"] < 0.2
