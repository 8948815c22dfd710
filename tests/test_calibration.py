"""Calibration: the map is fitted on held-out predictions, folded into the output layer, and changes no label."""

import numpy as np
import pytest
from scipy.special import expit

from brainmri.learn import calibration


def overconfident(n=4000, temperature=3.0, seed=0):
    """Labels drawn from true probabilities, and a model whose logits are `temperature` times too large."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    y = (rng.random(n) < expit(z)).astype(int)
    return y, expit(temperature * z)


def test_temperature_recovers_the_overconfidence_and_lowers_ece():
    y, prob = overconfident()
    a, c = calibration.fit(prob, y, "temperature")
    assert 1 / a == pytest.approx(3.0, rel=0.1) and c == 0.0
    after = calibration.apply(prob, a, c)
    assert calibration.ece(y, after) < 0.03 < 0.1 < calibration.ece(y, prob)
    order = np.argsort(prob)
    assert np.all(np.diff(after[order]) >= 0)  # monotone: ranking, AUC and every thresholded label are kept


def test_platt_fits_a_shift_too_and_none_is_the_identity():
    y, prob = overconfident()
    shifted = expit(calibration.logit(prob) + 2.0)  # too confident and biased towards tumour
    a, c = calibration.fit(shifted, y, "platt")
    assert a == pytest.approx(1 / 3, rel=0.1) and c == pytest.approx(-2 / 3, abs=0.15)
    assert calibration.fit(shifted, y, "none") == (1.0, 0.0)
    assert calibration.fit(shifted, np.ones_like(y), "platt") == (1.0, 0.0)  # one class: nothing to fit


def test_ece_uses_equal_mass_bins_and_the_reliability_table_sums_to_n():
    y = np.array([0, 0, 1, 1] * 5)
    prob = np.linspace(0.05, 0.95, 20)
    table = calibration.reliability(y, prob)
    assert len(table) == 10 and table["n"].sum() == 20 and set(table["n"]) == {2}
    manual = np.mean([abs(y[i : i + 2].mean() - prob[i : i + 2].mean()) for i in range(0, 20, 2)])
    assert calibration.ece(y, prob) == pytest.approx(manual)


def test_folding_into_the_output_layer_gives_the_mapped_probabilities():
    import keras

    from brainmri.learn.models import build_head

    class Spec:
        dense, dropout, l2 = 8, 0.0, 0.0

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(1).normal(size=(64, 5)).astype("float32") * 3
    head = build_head(5, Spec, seed=0, adapt_on=x)
    before = np.asarray(head(x)).reshape(-1)
    calibration.fold_into(head, 0.4, -0.3)
    after = np.asarray(head(x)).reshape(-1)
    assert np.allclose(after, calibration.apply(before, 0.4, -0.3), atol=1e-5)


def test_platt_targets_keep_the_slope_finite_on_separable_predictions():
    prob = np.random.default_rng(0).uniform(0.05, 0.95, 200)
    a, c = calibration.fit(prob, (prob > 0.5).astype(int), "platt")  # a plain logistic fit's slope would run away
    assert 1 < a < 20 and abs(c) < 1


def test_a_fixed_threshold_mapped_with_the_outputs_keeps_every_label():
    prob = np.linspace(0.001, 0.999, 999)
    for a, c in ((0.4, -0.7), (2.5, 1.1)):
        assert np.array_equal(prob >= 0.5, calibration.apply(prob, a, c) >= calibration.apply(0.5, a, c))
