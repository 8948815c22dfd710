"""The timing cache (paths.timing_cache): an architecture is timed once. The aug and noaug models of a backbone, cut at
the same layer, run the same graphs with other weights; their timings are kept under a key of both exported graphs'
structure (no weight values) and the Keras model's layers, the settings, the timing code, the runtimes' versions and
the machine since its last boot. A sibling's stage within benchmark.reuse_minutes reuses them; a stage never reuses its
own: rerunning it measures again."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from brainmri.bench.measure import measure
from brainmri.bench.timing import timing_batch
from brainmri.config import Params
from brainmri.core import timing_lock
from brainmri.core.files import write_json
from brainmri.intake.parts import split_part
from brainmri.intake.preprocess import load_batch

ROOT = Path(__file__).resolve().parents[2]
BENCH = tuple(sorted(f"brainmri/bench/{f.name}" for f in Path(__file__).parent.glob("*.py")))
# what times the runtimes and sets them up: the stage and this package (all of it was once the stage's own code), the
# CPU lookup, and the runtimes
CODE = ("tasks/benchmark.py", *BENCH, "brainmri/core/machine.py", "brainmri/deploy/onnxrt.py", "brainmri/deploy/runtimes.py")


def graph_digest(path) -> str:
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


def keras_digest(model) -> str:
    """sha256 of the Keras model's layers in order: class, parameter count and output shape (the Keras rows)."""

    def describe(layer) -> tuple:
        try:
            shape = str(layer.output.shape)
        except (AttributeError, ValueError):  # a layer used more than once, or never called on its own
            shape = ""
        return type(layer).__name__, layer.count_params() if layer.built else -1, shape

    return hashlib.sha256(repr([describe(x) for x in model._flatten_layers(include_self=False, recursive=True)]).encode()).hexdigest()


def boot_id() -> str:
    """Linux's id of this boot: timings from before a reboot are not reused. Elsewhere no id, so no reuse."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def timing_key(p: Params, name: str, model, machine: dict) -> str:
    """What a model's timings depend on: its graphs' structure, the input size, the settings, the timing code, the
    machine and its environment since the last boot."""
    b = p.benchmark
    parts = {
        "graphs": [graph_digest(p.model_file("export", name, f)) for f in ("onnx", "onnx_int8")],
        "keras": keras_digest(model),
        "input_size": p.backbones[p.models[name].backbone].input_size,
        "settings": [b.batch_size, b.warmup, b.warmup_next, b.repeats, b.min_repeats, b.seconds, b.threads],
        "code": [hashlib.sha256((ROOT / c).read_bytes()).hexdigest() for c in CODE],
        "machine": {**machine, "usable_cores": len(os.sched_getaffinity(0)), "boot": boot_id()},
        "environment": {
            k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "TF_ENABLE_ONEDNN_OPTS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
        },
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def reused_timings(p: Params, key: str, name: str, runtimes: set[str]) -> dict | None:
    """A sibling's memo of `key` (not `name`'s own: rerunning a stage measures again) when it was measured within
    benchmark.reuse_minutes on this boot for every one of `runtimes`, its rows cut to those; None otherwise. A sibling
    whose val check admitted a runtime more (one more int8 or bf16 row in the same interleaved rounds) still times the
    same graphs: on the real set vgg19-aug timed again for that alone, 51 s with the machine to itself."""
    path = p.path("timing_cache") / f"{key}.json"
    if not p.benchmark.reuse_minutes or not boot_id() or not path.is_file():
        return None
    try:
        memo = json.loads(path.read_text(encoding="utf-8"))
        age = (datetime.now(UTC) - datetime.fromisoformat(memo["measured_at"])).total_seconds() / 60
        whole = {r["runtime"] for r in memo["rows"]} >= runtimes and isinstance(memo["gemm"], dict) and memo["numpy_peak"] > 0
        if memo["model"] == name or not whole:
            return None
        memo["rows"] = [r for r in memo["rows"] if r["runtime"] in runtimes]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # unreadable, damaged or foreign: measure again
    return memo if 0 <= age <= p.benchmark.reuse_minutes else None


def timed_or_reused(p: Params, name: str, key: str, runtimes: dict[str, Callable], size: int, flops: int) -> dict:
    """The memo of `key`: a sibling's (reused_timings), else measured now on the first val images, with no other
    stage process working (benchmark is in orchestration.exclusive), and kept for the next sibling."""
    b = p.benchmark
    memo = reused_timings(p, key, name, set(runtimes))
    if memo is None:
        paths = split_part(p, "val").paths  # timings do not depend on which images; test stays unread until evaluate
        images = timing_batch(load_batch(paths[: b.batch_size], size), b.batch_size)
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
    return memo
