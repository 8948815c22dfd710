"""benchmark stage: CPU latency of one model in Keras (predict and a compiled call), ONNX Runtime (fp32, int8) and
OpenVINO (fp32, int8, and bf16 where the CPU has it), on the same inputs and batch sizes, with the model's FLOPs next
to a matrix-multiply peak measured in the same run; each ONNX runtime checked against ONNX Runtime fp32 on val.

An architecture is timed once: the aug and noaug models of a backbone, cut at the same layer, run the same graphs
with other weights. Their timings go to a memo (paths.timing_cache) keyed by both exported graphs' structure (no
weight values) and the Keras model's layers, the settings, the timing code, the runtimes' versions and the machine
since its last boot; a sibling's stage within benchmark.reuse_minutes reuses them and says so. A stage never reuses
its own: rerunning it measures again. Each model's own val check always runs."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from brainmri.config import Params
from brainmri.core import timing_lock
from brainmri.core.files import write_json, write_metrics
from brainmri.core.machine import cpu_flags, cpu_model
from brainmri.core.progress import log, summary
from brainmri.deploy.onnxrt import INPUT, session
from brainmri.intake.parts import split_part
from brainmri.intake.preprocess import load_batch


def model_flops(model) -> int:
    """Multiply-adds x 2 of the convolution and dense layers for one image (the rest is negligible)."""
    import keras

    total = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.Conv2D):
            k = layer.kernel.shape  # (kh, kw, cin, cout)
            _, h, w, _ = layer.output.shape
            total += 2 * int(np.prod(k)) * int(h) * int(w)
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * int(np.prod(layer.kernel.shape))
    return total


def matmul_peak(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a float32 n x n matrix multiply with `threads` BLAS threads, the median of `repeats`."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), np.float32), rng.random((n, n), np.float32)
    with threadpool_limits(threads):
        a @ b
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(times)) / 1e9


def ort_gemm_peaks(threads: int, n: int = 1024, repeats: int = 5) -> dict[str, float]:
    """The GEMM rates of ONNX Runtime itself (its MLAS kernels, which the ONNX rows use), with `threads` threads:
    'fp32' GFLOP/s of an n x n float32 MatMul, 'int8' GOP/s of an n x n uint8 x int8 MatMulInteger (what the
    quantized convolutions run on), each the median of `repeats` calls after one untimed call."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    graphs = {
        "fp32": (
            "MatMul",
            TensorProto.FLOAT,
            TensorProto.FLOAT,
            TensorProto.FLOAT,
            rng.random((n, n), np.float32),
            rng.random((n, n), np.float32),
        ),
        "int8": (
            "MatMulInteger",
            TensorProto.UINT8,
            TensorProto.INT8,
            TensorProto.INT32,
            rng.integers(0, 256, (n, n), dtype=np.uint8),
            rng.integers(-128, 128, (n, n), dtype=np.int8),
        ),
    }
    out = {}
    for kind, (op, ta, tb, ty, a, b) in graphs.items():
        graph = helper.make_graph(
            [helper.make_node(op, ["a", "b"], ["y"])],
            f"gemm_{kind}",
            [helper.make_tensor_value_info("a", ta, [n, n]), helper.make_tensor_value_info("b", tb, [n, n])],
            [helper.make_tensor_value_info("y", ty, [n, n])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        with tempfile.TemporaryDirectory() as folder:
            path = f"{folder}/gemm.onnx"
            onnx.save(model, path)
            sess = session(path, threads)
        feeds = {"a": a, "b": b}
        seconds = time_calls(lambda feed, sess=sess: sess.run(None, feed), feeds, 1, repeats)
        out[kind] = 2 * n**3 / float(np.median(seconds)) / 1e9
    return out


TIGHT = 0.10  # an IQR within a tenth of the median is a precise measurement: two such whose quartiles overlap are tied


def ranking(rows: list[dict], batch: int) -> dict:
    """The runtimes at one batch size, fastest first by median. Two neighbours are told apart when the slower one's
    25th percentile lies above the faster one's 75th. When their quartiles overlap but both spreads are narrow
    (IQR within TIGHT of the median), they are `tied`: measured well, equally fast. Otherwise they are
    `not_told_apart`, and the batch size is not rankable: the spread is too wide."""
    at = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["p50_ms"])
    tied, mixed = [], []
    for a, b in zip(at, at[1:], strict=False):
        if b["p25_ms"] <= a["p75_ms"]:
            narrow = all(r["p75_ms"] - r["p25_ms"] <= TIGHT * r["p50_ms"] for r in (a, b))
            (tied if narrow else mixed).append([a["runtime"], b["runtime"]])
    return {"fastest_first": [r["runtime"] for r in at], "tied": tied, "not_told_apart": mixed, "rankable": not mixed, "tie_iqr": TIGHT}


def time_calls(fn: Callable, x: np.ndarray, warmup: int, repeats: int) -> np.ndarray:
    """Seconds per call of fn(x), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn(x)
    out = np.empty(repeats)
    for i in range(repeats):
        t = time.perf_counter()
        fn(x)
        out[i] = time.perf_counter() - t
    return out


def timing_batch(images: np.ndarray, n: int) -> np.ndarray:
    """`n` images to time on: the given ones, repeated when there are fewer (a graph's cost does not depend on content)."""
    return np.concatenate([images] * -(-n // max(1, len(images))))[:n]


def interleaved(runtimes: dict[str, Callable], x: np.ndarray, b, first: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each runtime on `x`: `b.warmup` untimed calls each (`b.warmup_next` when the runtimes
    have already run at another batch size: `first` False), then rounds, each timing every runtime
    once in a rotated order, so that drifts of a shared machine hit all alike. Rounds stop at `b.repeats`, or sooner,
    once `b.min_repeats` rounds are done and `b.seconds` have passed since the first: a round of seven runtimes on
    VGG19 at batch 8 takes about 7 s on 2 cores, one at batch 1 of a small model a few milliseconds, and a fixed
    count spent minutes on the first to gain nothing on the second."""
    names = list(runtimes)
    for fn in runtimes.values():
        time_calls(fn, x, b.warmup if first else b.warmup_next, 0)
    seconds: dict[str, list[float]] = {rt: [] for rt in names}
    start = time.perf_counter()
    for i in range(b.repeats):
        if i >= b.min_repeats and time.perf_counter() - start >= b.seconds:
            break
        for rt in names[i % len(names) :] + names[: i % len(names)]:
            seconds[rt].append(time_calls(runtimes[rt], x, 0, 1)[0])
    return seconds


def round_settings(b) -> dict:
    """How `interleaved` timed the calls, for the records that carry its timings."""
    return {
        "warmup": b.warmup,
        "warmup_next": b.warmup_next,
        "repeats": b.repeats,
        "min_repeats": b.min_repeats,
        "seconds": b.seconds,
        "order": "interleaved rounds, rotated; stop at repeats, or after min_repeats once seconds have passed",
    }


def openvino_runtimes(p: Params, name: str, threads: int) -> dict[str, Callable]:
    """OpenVINO on the same exported files: fp32 and int8 always, bf16 where the CPU has bf16 instructions."""
    from brainmri.deploy.runtimes import bf16_capable, runner

    fp32, int8 = p.model_file("export", name, "onnx"), p.model_file("export", name, "onnx_int8")
    out = {"openvino_fp32": runner(fp32, "openvino", threads), "openvino_int8": runner(int8, "openvino", threads)}
    if bf16_capable():
        out["openvino_bf16"] = runner(fp32, "openvino-bf16", threads)
    return out


def _openvino_version() -> str:
    import openvino

    return openvino.__version__


def check_on_val(p: Params, name: str, runtimes: dict[str, Callable], size: int) -> dict:
    """Each ONNX runtime against ONNX Runtime fp32 on the validation images (real scans: random inputs saturate the
    sigmoid and hide differences). An fp32 runtime passes within export.parity_tolerance of every probability; a
    bf16 or int8 one when val accuracy moves by at most 1 point (labels_changed says how many flipped). Val, never test."""

    from brainmri.stats.metrics import point

    val = split_part(p, "val")
    x = load_batch(val.paths, size)
    threshold = json.loads(p.model_file("models", name, "train_metrics").read_text())["threshold"]

    def probs(fn):
        return np.concatenate([np.asarray(fn(x[i : i + 8])).reshape(-1) for i in range(0, len(x), 8)]) if len(x) else np.zeros(0)

    ref = probs(runtimes["onnxruntime_fp32"])
    base = point(val.y, ref, threshold)["accuracy"]
    out = {}
    for rt, fn in runtimes.items():
        if rt.startswith("keras"):
            continue
        prob = probs(fn)
        diff = float(np.max(np.abs(prob - ref))) if len(x) else 0.0
        change = 100 * (point(val.y, prob, threshold)["accuracy"] - base)
        exact = rt.endswith("fp32")
        out[rt] = {
            "n_val": int(len(x)),
            "max_abs_prob_diff": round(diff, 6),
            "labels_changed": int(np.sum((prob >= threshold) != (ref >= threshold))),
            "accuracy_change_points": round(change, 2),
            "rule": f"max |p - p_ort_fp32| <= {p.export.parity_tolerance:g}" if exact else "|val accuracy change| <= 1 point",
            "admissible": bool(diff <= p.export.parity_tolerance if exact else abs(change) <= 1.0),
        }
    return out


def _graph_digest(path) -> str:
    """sha256 of an ONNX model's structure: opsets and IR version; each node's operator, domain, attributes and
    wiring (export's canonical_names numbers the inner tensors by position, so equal graphs have equal names); each
    initializer's type and shape in the order the nodes first use them. Not the weight values."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    h = hashlib.sha256(repr((model.ir_version, sorted((o.domain, o.version) for o in model.opset_import))).encode())
    inits = {t.name: t for t in g.initializer}
    for node in g.node:
        attrs = sorted((a.name, onnx.helper.get_attribute_value(a)) for a in node.attribute if a.type != onnx.AttributeProto.GRAPH)
        h.update(repr((node.op_type, node.domain, list(node.input), list(node.output), attrs)).encode())
        for name in node.input:
            if name in inits:
                h.update(repr((inits[name].data_type, tuple(inits[name].dims))).encode())
    for io in (*g.input, *g.output):
        h.update(repr((io.name, io.type)).encode())
    return h.hexdigest()


def _keras_digest(model) -> str:
    """sha256 of the Keras model's layers in order: class, parameter count and output shape (the Keras rows)."""

    def describe(layer) -> tuple:
        try:
            shape = str(layer.output.shape)
        except (AttributeError, ValueError):  # a layer used more than once, or never called on its own
            shape = ""
        return type(layer).__name__, layer.count_params() if layer.built else -1, shape

    return hashlib.sha256(repr([describe(x) for x in model._flatten_layers(include_self=False, recursive=True)]).encode()).hexdigest()


def _boot_id() -> str:
    """Linux's id of this boot: timings from before a reboot are not reused. Elsewhere no id, so no reuse."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


# what times the runtimes and sets them up, and the CPU lookup (once this stage's own)
CODE = ("tasks/benchmark.py", "brainmri/core/machine.py", "brainmri/deploy/onnxrt.py", "brainmri/deploy/runtimes.py")


def timing_key(p: Params, name: str, model, machine: dict) -> str:
    """What a model's timings depend on: its graphs' structure, the input size, the settings, the timing code, the
    machine and its environment since the last boot."""
    b = p.benchmark
    here = Path(__file__).resolve().parents[1]
    parts = {
        "graphs": [_graph_digest(p.model_file("export", name, f)) for f in ("onnx", "onnx_int8")],
        "keras": _keras_digest(model),
        "input_size": p.backbones[p.models[name].backbone].input_size,
        "settings": [b.batch_size, b.warmup, b.warmup_next, b.repeats, b.min_repeats, b.seconds, b.threads],
        "code": [hashlib.sha256((here / c).read_bytes()).hexdigest() for c in CODE],
        "machine": {**machine, "usable_cores": len(os.sched_getaffinity(0)), "boot": _boot_id()},
        "environment": {
            k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "TF_ENABLE_ONEDNN_OPTS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
        },
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def reused_timings(p: Params, key: str, name: str, runtimes: set[str]) -> dict | None:
    """A sibling's memo of `key` (not `name`'s own: rerunning a stage measures again) when it was measured within
    benchmark.reuse_minutes on this boot, for the same runtimes; None otherwise."""
    path = p.path("timing_cache") / f"{key}.json"
    if not p.benchmark.reuse_minutes or not _boot_id() or not path.is_file():
        return None
    try:
        memo = json.loads(path.read_text(encoding="utf-8"))
        age = (datetime.now(UTC) - datetime.fromisoformat(memo["measured_at"])).total_seconds() / 60
        whole = {r["runtime"] for r in memo["rows"]} == runtimes and isinstance(memo["gemm"], dict) and memo["numpy_peak"] > 0
        if memo["model"] == name or not whole:
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # unreadable, damaged or foreign: measure again
    return memo if 0 <= age <= p.benchmark.reuse_minutes else None


def measure(p: Params, name: str, runtimes: dict[str, Callable], images: np.ndarray, flops: int) -> dict:
    """Time every runtime at batch 1 and benchmark.batch_size in interleaved rounds, with the GEMM peaks."""
    b = p.benchmark
    peak = matmul_peak(b.threads)
    gemm = ort_gemm_peaks(b.threads)
    rows = []
    for batch in (1, b.batch_size):
        x = np.ascontiguousarray(images[:batch])
        seconds = interleaved(runtimes, x, b, first=batch == 1)
        for rt in runtimes:
            per_image = np.array(seconds[rt]) / batch * 1000.0
            ips = 1000.0 / float(np.median(per_image))
            p25, p50, p75 = (float(v) for v in np.percentile(per_image, [25, 50, 75]))
            row_peak, unit = (gemm["int8"], "int8") if rt.endswith("int8") else (gemm["fp32"], "fp32")
            rows.append(
                {
                    "runtime": rt,
                    "batch": batch,
                    "rounds": len(per_image),  # timed calls behind these figures (benchmark.min_repeats to .repeats)
                    "p50_ms": round(p50, 3),
                    "p25_ms": round(p25, 3),
                    "p75_ms": round(p75, 3),
                    "iqr_ms": round(p75 - p25, 3),
                    "p95_ms": round(float(np.percentile(per_image, 95)), 3),
                    "mean_ms": round(float(per_image.mean()), 3),
                    "images_per_s": round(ips, 2),
                    "gflops_per_s": round(flops * ips / 1e9, 1),
                    "share_of_matmul_peak": round(flops * ips / 1e9 / row_peak, 3),  # of ONNX Runtime's own GEMM rate, in its precision
                    "peak_kind": unit,
                }
            )
            log.info("benchmark %s: %s batch %d: %.1f ms/image (IQR %.1f)", name, rt, batch, p50, p75 - p25)
    return {"rows": rows, "gemm": gemm, "numpy_peak": peak}


def benchmark(p: Params, name: str) -> dict:
    """Run the stage for model `name`: write benchmark.json; return it."""
    p.model(name)  # an unknown name stops here, before any work
    b = p.benchmark
    import tensorflow as tf

    try:  # possible only before TensorFlow starts; `brainmri benchmark` (the DVC stage) is a fresh process
        tf.config.threading.set_intra_op_parallelism_threads(b.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        log.warning("benchmark: TensorFlow was already running in this process; its thread settings are left as they are")
    tf_threads = tf.config.threading.get_intra_op_parallelism_threads() or "default (all cores)"
    import keras
    import onnxruntime

    from brainmri.learn.models import load_model

    size = p.backbones[p.models[name].backbone].input_size
    model = load_model(p.model_file("models", name, "model"))
    compiled = tf.function(lambda t: model(t, training=False), reduce_retracing=True)
    sessions = {k: session(p.model_file("export", name, f), b.threads) for k, f in (("fp32", "onnx"), ("int8", "onnx_int8"))}
    runtimes = {
        "keras_predict": lambda x: model.predict(x, batch_size=len(x), verbose=0),
        "keras_compiled": lambda x: compiled(tf.constant(x)).numpy(),
        "onnxruntime_fp32": lambda x: sessions["fp32"].run(None, {INPUT: x})[0],
        "onnxruntime_int8": lambda x: sessions["int8"].run(None, {INPUT: x})[0],
        **openvino_runtimes(p, name, b.threads),
    }
    flops = model_flops(model)
    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": b.threads,
        "tensorflow_intra_op_threads": tf_threads,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": _openvino_version(),
        "cpu_flags": cpu_flags(),  # int8 (VNNI, AMX) and bf16 instruction sets: what the int8 and bf16 rows hang on
        "numpy": np.__version__,
    }
    key = timing_key(p, name, model, machine)
    memo = reused_timings(p, key, name, set(runtimes))
    if memo is None:
        paths = split_part(p, "test").paths
        images = timing_batch(load_batch(paths[: b.batch_size], size), b.batch_size)
        # no other stage process works while the runtimes are timed (benchmark is in orchestration.exclusive)
        with timing_lock.timing(p.path("timing_cache"), "benchmark", p.orchestration.exclusive):
            memo = reused_timings(p, key, name, set(runtimes))  # a sibling may have timed the same graphs while this one waited
            if memo is None:
                start = time.time()
                memo = {
                    **measure(p, name, runtimes, images, flops),
                    "model": name,
                    "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
                }
                memo["window"] = [start, time.time()]  # Unix times: the timed calls had the machine alone
                write_json(p.path("timing_cache") / f"{key}.json", memo)
    if memo["model"] != name:
        log.info(
            "benchmark %s: the same graphs were timed for %s at %s: their timings are reused", name, memo["model"], memo["measured_at"]
        )
    timed = {"by": memo["model"], "at": memo["measured_at"], "reused": memo["model"] != name, "window": memo.get("window")}
    rows, gemm, peak = memo["rows"], memo["gemm"], memo["numpy_peak"]
    fidelity = check_on_val(p, name, runtimes, size)
    fastest = {
        f"batch_{bs}": min(
            (r for r in rows if r["batch"] == bs and fidelity.get(r["runtime"], {}).get("admissible")),
            key=lambda r: r["p50_ms"],
            default={"runtime": None},
        )["runtime"]
        for bs in (1, b.batch_size)
    }
    ranks = {f"batch_{bs}": ranking(rows, bs) for bs in (1, b.batch_size)}
    too_wide = [k for k, v in ranks.items() if not v["rankable"]]
    if too_wide:
        log.warning(
            "benchmark %s: the spread is too wide to rank %s at %s", name, ranks[too_wide[0]]["not_told_apart"], ", ".join(too_wide)
        )
    med = {(r["runtime"], r["batch"]): r["p50_ms"] for r in rows}
    ratios = {
        f"batch_{bs}": {
            "onnxruntime_fp32_speedup_over_keras_compiled": round(med["keras_compiled", bs] / med["onnxruntime_fp32", bs], 2),
            "onnxruntime_fp32_speedup_over_keras_predict": round(med["keras_predict", bs] / med["onnxruntime_fp32", bs], 2),
            "int8_speedup_over_fp32": round(med["onnxruntime_fp32", bs] / med["onnxruntime_int8", bs], 2),
        }
        for bs in (1, b.batch_size)
    }
    out = {
        "model": name,
        "input_size": size,
        "flops_per_image": flops,
        "gflop_per_image": round(flops / 1e9, 3),
        "matmul_peak_gflops": round(gemm["fp32"], 1),  # ONNX Runtime's fp32 GEMM: the '% peak' of fp32 rows
        "int8_gemm_peak_gops": round(gemm["int8"], 1),  # its uint8 x int8 GEMM: the '% peak' of int8 rows
        "numpy_matmul_peak_gflops": round(peak, 1),  # numpy's BLAS, for comparison: not what any runtime here calls
        "rows": rows,
        "ratios": ratios,
        "ranking": ranks,
        "timed": {**timed, "key": key},  # which model's stage measured these graphs, when; reused: a sibling's, same graphs
        "fidelity_on_val": fidelity,
        "fastest_admissible": fastest,  # the fastest runtime whose val check passed: what `predict --runtime` should use here
        "spread_too_wide": bool(too_wide),
        "machine": machine,
        "settings": {"batch_sizes": [1, b.batch_size], **round_settings(b)},
    }
    write_json(p.model_file("benchmark", name, "benchmark"), out)
    write_metrics(
        p.path("benchmark") / name / p.paths.files.scores,
        {**{f"{r['runtime']}_b{r['batch']}_ms": r["p50_ms"] for r in rows}, "spread_too_wide": int(bool(too_wide))},
    )
    r = ratios[f"batch_{b.batch_size}"]
    summary(
        f"benchmark {name}",
        f"batch {b.batch_size}: ONNX Runtime fp32 {r['onnxruntime_fp32_speedup_over_keras_compiled']}x "
        f"compiled Keras, int8 {r['int8_speedup_over_fp32']}x fp32; {flops / 1e9:.2f} GFLOP/image; ONNX Runtime GEMM peak "
        f"{gemm['fp32']:.0f} GFLOP/s fp32, {gemm['int8']:.0f} GOP/s int8" + ("; SPREAD TOO WIDE TO RANK" if too_wide else ""),
    )
    return out
