import json

import pytest

from tasks.benchmark import matmul_peak, model_flops

RUNTIMES = {"keras_predict", "keras_compiled", "onnxruntime_fp32", "onnxruntime_int8"}


def test_benchmark_file_has_every_runtime_batch_and_ratio(small_run):
    p, *_ = small_run
    b = json.loads(p.model_file("benchmark", "vgg16-aug", "benchmark").read_text())
    assert {(r["runtime"], r["batch"]) for r in b["rows"]} == {(rt, bs) for rt in RUNTIMES for bs in (1, 2)}
    for r in b["rows"]:
        assert 0 < r["p50_ms"] <= r["p95_ms"] and r["images_per_s"] > 0
    assert set(b["ratios"]) == {"batch_1", "batch_2"}
    assert b["machine"]["threads"] == 2 and b["machine"]["cores"] >= 1 and b["machine"]["onnxruntime"]
    assert b["flops_per_image"] > 0 and b["matmul_peak_gflops"] > 0


def test_flop_count_matches_the_published_vgg16_figure():
    import keras

    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(224, 224, 3))
    assert model_flops(vgg) == pytest.approx(30.7e9, rel=0.01)  # 15.3 G multiply-adds for the conv trunk


def test_matmul_peak_is_a_plausible_rate():
    assert 1.0 < matmul_peak(threads=1, n=512, repeats=3) < 10_000.0
