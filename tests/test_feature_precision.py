"""Frozen features in bf16 (`train.feature_precision`, issue 33): where it is allowed, what it computes, where it is
cached and recorded."""

import numpy as np
import pytest
from factory import make_project, materialise_weights, tiny_training

from brainmri.config import load_params
from brainmri.core.errors import ConfigError
from brainmri.core.machine import bf16_capable
from brainmri.intake.phantoms import generate
from brainmri.learn import features
from brainmri.learn.models import build_network, in_bf16


def _params(tmp_path, precision: str, weights: bool = False):
    p = load_params(make_project(tmp_path, {**tiny_training(), "train": {"feature_precision": precision}}) / "params.yaml")
    if weights:  # the weights stage, as before train: random weights here
        materialise_weights(p)
    return p


@pytest.mark.parametrize("capable", [True, False])
def test_auto_picks_bf16_only_where_the_cpu_has_it_and_bf16_elsewhere_is_refused_by_name(tmp_path, monkeypatch, capable):
    monkeypatch.setattr(features, "bf16_capable", lambda: capable)
    assert features.precision(_params(tmp_path / "a", "auto")) == ("bf16" if capable else "fp32")
    assert features.precision(_params(tmp_path / "f", "fp32")) == "fp32"
    p = _params(tmp_path / "b", "bf16")
    if capable:
        assert features.precision(p) == "bf16"
        return
    with pytest.raises(ConfigError, match=r"train\.feature_precision is bf16, but this CPU .* has no bf16 instructions"):
        features.precision(p)


def test_the_bf16_copy_computes_the_base_in_bf16_and_keeps_preprocessing_and_pooling_in_float32(tmp_path):
    net = build_network(_params(tmp_path, "fp32", weights=True), "vgg16", seed=1)
    copy = in_bf16(net.extractor)
    outer = {layer.name: layer.dtype_policy.name for layer in copy.layers}
    assert outer["preprocess"] == "float32" and outer["pool"] == "float32"
    inner = [layer for layer in copy.get_layer("vgg16").layers if layer.weights]
    assert inner and all(layer.dtype_policy.name == "mixed_bfloat16" for layer in inner)
    same = zip(copy.get_weights(), net.extractor.get_weights(), strict=True)
    assert all(a.dtype == np.float32 and np.array_equal(a, b) for a, b in same)  # the weights stay float32, the same


@pytest.mark.skipif(not bf16_capable(), reason="this CPU has no bf16 instructions (AVX-512 BF16 or AMX)")
def test_bf16_features_are_close_to_fp32_ones_and_cached_apart_from_them(tmp_path):
    generate(tmp_path / "raw", {"no": False, "yes": True}, n_per_class=4, seed=0, min_size=48, max_size=64, duplicate_fraction=0.0)
    paths = sorted(q for q in (tmp_path / "raw").rglob("*") if q.suffix in (".jpg", ".png"))
    p32, p16 = _params(tmp_path / "fp32", "fp32", weights=True), _params(tmp_path / "bf16", "bf16", weights=True)
    extractor = build_network(p32, "vgg16", seed=1).extractor  # one network: its random weights, both precisions
    f32, b16 = (features.extract(p, "vgg16", extractor, paths, "test") for p in (p32, p16))
    folder32, folder16 = (features.cache_folder(p, "vgg16", extractor) for p in (p32, p16))
    assert folder16.name.startswith("vgg16-bf16-") and folder16.name.split("-")[-1] != folder32.name.split("-")[-1]
    assert len(f32) == len(paths) >= 8 and b16.dtype == np.float32 and not np.array_equal(b16, f32)  # bf16 did run
    assert np.abs(b16 - f32).max() <= 0.02 * np.abs(f32).max()  # within bf16's rounding (measured: 0.6% at 32 px)
    assert np.corrcoef(b16.ravel(), f32.ravel())[0, 1] > 0.999
