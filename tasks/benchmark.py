"""benchmark stage: CPU latency of one model in Keras (a compiled call), ONNX Runtime (fp32, int8) and OpenVINO (fp32,
int8, and bf16 where the CPU has it), on the same inputs and batch sizes, with the model's FLOPs next to a
matrix-multiply peak measured in the same run. Each ONNX runtime is checked against ONNX Runtime fp32 on val first, and
only those that pass are timed (beside compiled Keras and ONNX Runtime fp32): what a user decides with.

An architecture is timed once: the aug and noaug models of a backbone, cut at the same layer, run the same graphs
with other weights. Their timings go to a memo (paths.timing_cache) keyed by both exported graphs' structure (no
weight values) and the Keras model's layers, the settings, the timing code, the runtimes' versions and the machine
since its last boot; a sibling's stage within benchmark.reuse_minutes reuses them and says so. A stage never reuses
its own: rerunning it measures again. Each model's own val check always runs."""

from __future__ import annotations

from brainmri.bench.fidelity import check_on_val
from brainmri.bench.peaks import model_flops
from brainmri.bench.results import benchmark_record
from brainmri.bench.runners import machine_record, runners, tensorflow_threads
from brainmri.bench.timing_cache import timed_or_reused, timing_key
from brainmri.config import Params
from brainmri.core.files import write_json, write_metrics
from brainmri.core.progress import log, summary


def benchmark(p: Params, name: str) -> dict:
    """Run the stage for model `name`: write benchmark.json; return it."""
    p.model(name)  # an unknown name stops here, before any work
    b = p.benchmark
    tf_threads = tensorflow_threads(b.threads)
    from brainmri.learn.models import load_model

    size = p.backbones[p.models[name].backbone].input_size
    model = load_model(p.model_file("models", name, "model"))
    runtimes = runners(p, name, model, b.threads)
    flops = model_flops(model)
    machine = machine_record(b.threads, tf_threads)

    fidelity = check_on_val(p, name, runtimes, size)
    timed = {rt: fn for rt, fn in runtimes.items() if rt in ("keras_compiled", "onnxruntime_fp32") or fidelity[rt]["admissible"]}
    key = timing_key(p, name, model, machine)
    memo = timed_or_reused(p, name, key, timed, size, flops)
    if memo["model"] != name:
        log.info(
            "benchmark %s: the same graphs were timed for %s at %s: their timings are reused", name, memo["model"], memo["measured_at"]
        )
    out = benchmark_record(p, name, size, flops, memo, key, fidelity, machine)

    write_json(p.model_file("benchmark", name, "benchmark"), out)
    write_metrics(
        p.path("benchmark") / name / p.paths.files.scores,
        {**{f"{r['runtime']}_b{r['batch']}_ms": r["p50_ms"] for r in out["rows"]}, "spread_too_wide": int(out["spread_too_wide"])},
    )
    r, gemm = out["ratios"][f"batch_{b.batch_size}"], memo["gemm"]
    summary(
        f"benchmark {name}",
        f"batch {b.batch_size}: ONNX Runtime fp32 {r['onnxruntime_fp32_speedup_over_keras_compiled']}x "
        f"compiled Keras, int8 {r['int8_speedup_over_fp32'] or 'not timed (failed its val check)'}x fp32; "
        f"{flops / 1e9:.2f} GFLOP/image; ONNX Runtime GEMM peak "
        f"{gemm['fp32']:.0f} GFLOP/s fp32, {gemm['int8']:.0f} GOP/s int8" + ("; SPREAD TOO WIDE TO RANK" if out["spread_too_wide"] else ""),
    )
    return out
