import json

import pytest

from brainmri.bench.peaks import matmul_peak, model_flops
from brainmri.intake.parts import split_part

RUNTIMES = {"keras_compiled", "onnxruntime_fp32", "onnxruntime_int8", "openvino_fp32", "openvino_int8", "openvino_bf16"}


def test_benchmark_file_has_every_runtime_batch_and_ratio(small_run):
    p, *_ = small_run
    from brainmri.deploy.runtimes import bf16_capable

    b = json.loads(p.model_file("benchmark", "vgg16-aug", "benchmark").read_text())
    checked = [rt for rt in RUNTIMES if rt != "openvino_bf16" or bf16_capable()]  # bf16 only where the CPU has it
    fid = b["fidelity_on_val"]  # checked first; only what passes is timed, beside the two references
    expected = [rt for rt in checked if rt in ("keras_compiled", "onnxruntime_fp32") or fid[rt]["admissible"]]
    assert {(r["runtime"], r["batch"]) for r in b["rows"]} == {(rt, bs) for rt in expected for bs in (1, 2)}
    for r in b["rows"]:
        assert 0 < r["p25_ms"] <= r["p50_ms"] <= r["p75_ms"] and r["p50_ms"] <= r["p95_ms"] and r["images_per_s"] > 0
        assert r["iqr_ms"] == pytest.approx(r["p75_ms"] - r["p25_ms"], abs=2e-3)
        assert r["peak_kind"] == ("int8" if r["runtime"].endswith("int8") else "fp32")
    assert b["settings"]["order"].startswith("interleaved")
    for bs in ("batch_1", "batch_2"):
        rank = b["ranking"][bs]
        assert sorted(rank["fastest_first"]) == sorted(expected) and rank["rankable"] == (not rank["not_told_apart"])
    assert b["spread_too_wide"] == (not all(v["rankable"] for v in b["ranking"].values()))
    assert b["int8_gemm_peak_gops"] > 0 and b["numpy_matmul_peak_gflops"] > 0
    assert set(b["ratios"]) == {"batch_1", "batch_2"}
    assert b["machine"]["threads"] == 2 and b["machine"]["cores"] >= 1 and b["machine"]["onnxruntime"]
    assert b["flops_per_image"] > 0 and b["matmul_peak_gflops"] > 0
    # every ONNX runtime checked against ONNX Runtime fp32 on the val images; OpenVINO fp32 runs the same arithmetic
    assert set(fid) == {rt for rt in checked if not rt.startswith("keras")}
    assert fid["openvino_fp32"]["max_abs_prob_diff"] <= 1e-4 and fid["openvino_fp32"]["admissible"]
    for bs, rt in b["fastest_admissible"].items():
        at = {r["runtime"]: r["p50_ms"] for r in b["rows"] if f"batch_{r['batch']}" == bs}
        assert fid[rt]["admissible"] and at[rt] == min(at[k] for k in at if k in fid and fid[k]["admissible"])


def test_an_architecture_is_timed_once_and_every_model_checked_on_its_own_val(small_run):
    """vgg16-noaug and vgg16-aug run the same graphs with other weights: the second reuses the first's timings (run
    alone, minutes before, on this machine) and says so; smallcnn-aug's graphs differ, so it is timed itself."""
    p, *_ = small_run
    b = {n: json.loads(p.model_file("benchmark", n, "benchmark").read_text()) for n in p.models}
    first, second, other = b["vgg16-noaug"], b["vgg16-aug"], b["smallcnn-aug"]
    assert first["timed"]["by"] == "vgg16-noaug" and not first["timed"]["reused"]
    timed = {n: {r["runtime"] for r in out["rows"]} for n, out in b.items()}
    passed = {n: {rt for rt, v in out["fidelity_on_val"].items() if v["admissible"]} for n, out in b.items()}
    assert all(passed[n] <= timed[n] for n in b)  # every runtime that passed its val check is timed
    if passed["vgg16-aug"] == passed["vgg16-noaug"]:  # the same runtimes to time: the sibling's timings serve
        assert second["timed"] == {**first["timed"], "reused": True} and second["rows"] == first["rows"]
    else:  # an int8 file that passed its val check for one sibling and not the other (it varies with the CPU)
        assert second["timed"]["by"] == "vgg16-aug" and not second["timed"]["reused"], (passed, timed)
    assert other["timed"]["by"] == "smallcnn-aug" and not other["timed"]["reused"] and other["timed"]["key"] != first["timed"]["key"]
    for name, out in b.items():  # each model's own probabilities checked, whoever timed its graphs
        checked = {v["n_val"] for v in out["fidelity_on_val"].values()}
        assert checked == {len(split_part(p, "val").paths)}, name


def test_timings_are_reused_only_from_a_sibling_when_fresh_complete_and_allowed(tmp_path):
    from datetime import UTC, datetime, timedelta

    from factory import make_project

    from brainmri.bench.timing_cache import reused_timings
    from brainmri.config import load_params
    from brainmri.core.files import write_json

    p = load_params(make_project(tmp_path / "proj") / "params.yaml")
    rts = {"onnxruntime_fp32", "onnxruntime_int8"}
    memo = {"rows": [{"runtime": rt} for rt in rts], "gemm": {"fp32": 1.0}, "numpy_peak": 1.0, "model": "vgg16-noaug"}

    def reused(minutes_ago=5, allowed=60, name="vgg16-aug", runtimes=rts, **change) -> bool:
        when = (datetime.now(UTC) - timedelta(minutes=minutes_ago)).isoformat()
        write_json(p.path("timing_cache") / "k.json", {**memo, "measured_at": when, **change})
        q = p.model_copy(update={"benchmark": p.benchmark.model_copy(update={"reuse_minutes": allowed})})
        return reused_timings(q, "k", name, runtimes) is not None

    assert reused()  # a sibling's, 5 minutes old
    assert not reused(minutes_ago=90) and not reused(minutes_ago=-30)  # too old, or from the future
    assert not reused(allowed=0)  # reuse off
    assert not reused(name="vgg16-noaug")  # its own: a rerun measures again
    assert not reused(runtimes=rts | {"openvino_fp32"})  # timed without a runtime this stage has
    assert reused(runtimes={"onnxruntime_fp32"})  # timed with one this stage does not time (it failed its val check here)...
    write_json(p.path("timing_cache") / "k.json", {**memo, "measured_at": datetime.now(UTC).isoformat()})
    assert [r["runtime"] for r in reused_timings(p, "k", "vgg16-aug", {"onnxruntime_fp32"})["rows"]] == ["onnxruntime_fp32"]  # ...not shown
    assert not reused(rows=[{"p50_ms": 1.0}]) and not reused(gemm=None) and not reused(numpy_peak=None)  # damaged
    (p.path("timing_cache") / "k.json").write_text("{not json")
    assert reused_timings(p, "k", "vgg16-aug", rts) is None  # unreadable: measured again, not an error
    assert reused_timings(p, "absent", "vgg16-aug", rts) is None


def test_flop_count_matches_the_published_vgg16_figure():
    import keras

    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(224, 224, 3))
    assert model_flops(vgg) == pytest.approx(30.7e9, rel=0.01)  # 15.3 G multiply-adds for the conv trunk


def test_matmul_peak_is_a_plausible_rate():
    assert 1.0 < matmul_peak(threads=1, n=512, repeats=3) < 10_000.0


def test_ranking_tells_runtimes_apart_only_when_their_quartiles_do_not_overlap():
    from brainmri.bench.ranking import ranking

    row = lambda rt, p25, p50, p75: {"runtime": rt, "batch": 1, "p25_ms": p25, "p50_ms": p50, "p75_ms": p75}  # noqa: E731
    apart = ranking([row("a", 9, 10, 11), row("b", 19, 20, 21), row("c", 4, 5, 6)], 1)
    assert apart == {"fastest_first": ["c", "a", "b"], "tied": [], "not_told_apart": [], "rankable": True, "tie_iqr": 0.1}
    mixed = ranking([row("a", 9, 10, 14), row("b", 12, 13, 15)], 1)
    assert mixed["not_told_apart"] == [["a", "b"]] and not mixed["tied"] and not mixed["rankable"]
    # two runtimes measured tightly (IQR 4% of the median) at the same speed: a tie, not a spread too wide to rank
    tie = ranking([row("a", 9.8, 10.0, 10.2), row("b", 9.9, 10.1, 10.3), row("c", 30, 31, 32)], 1)
    assert tie == {"fastest_first": ["a", "b", "c"], "tied": [["a", "b"]], "not_told_apart": [], "rankable": True, "tie_iqr": 0.1}
    # one of the pair noisy (IQR 30% of the median): not told apart
    loose = ranking([row("a", 9.8, 10.0, 10.2), row("b", 8.0, 10.1, 11.0)], 1)
    assert loose["not_told_apart"] == [["a", "b"]] and not loose["tied"] and not loose["rankable"]


def test_onnx_runtime_gemm_peaks_are_plausible_rates():
    from brainmri.bench.peaks import ort_gemm_peaks

    peaks = ort_gemm_peaks(threads=1, n=256, repeats=3)
    assert 1.0 < peaks["fp32"] < 10_000.0 and 1.0 < peaks["int8"] < 100_000.0


def test_timed_rounds_stop_at_the_time_budget_but_never_below_min_repeats_nor_above_repeats():
    """Every runtime gets the same number of rounds; slow calls stop at min_repeats once the budget has passed, fast
    ones run every round up to repeats, and a budget of 0 gives exactly min_repeats."""
    import time
    from types import SimpleNamespace

    from brainmri.bench.timing import interleaved

    calls = {"slow": 0, "slower": 0}

    def sleeper(name, s):
        def call(x):
            calls[name] += 1
            time.sleep(s)

        return call

    settings = SimpleNamespace(warmup=1, warmup_next=2, repeats=10, min_repeats=3, seconds=0.05)
    slow = interleaved({"slow": sleeper("slow", 0.02), "slower": sleeper("slower", 0.03)}, None, settings)
    assert {k: len(v) for k, v in slow.items()} == {"slow": 3, "slower": 3}  # the budget passed in round 2
    assert calls == {"slow": 4, "slower": 4} and min(slow["slower"]) >= 0.03  # one untimed call each, then 3 timed
    interleaved({"slow": sleeper("slow", 0.02), "slower": sleeper("slower", 0.03)}, None, settings, first=False)
    assert calls == {"slow": 9, "slower": 9}  # at a later batch size: warmup_next (2) untimed calls, then 3 timed
    free = {"a": lambda x: None, "b": lambda x: None}
    fast = interleaved(free, None, SimpleNamespace(warmup=0, warmup_next=0, repeats=10, min_repeats=3, seconds=60))
    assert {k: len(v) for k, v in fast.items()} == {"a": 10, "b": 10}
    none = interleaved({"a": lambda x: None}, None, SimpleNamespace(warmup=0, warmup_next=0, repeats=10, min_repeats=4, seconds=0))
    assert len(none["a"]) == 4
