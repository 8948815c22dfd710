"""int8 against fp32 ONNX Runtime latency on this CPU, in one run; needs onnxruntime, numpy and onnx only (and
this repository's brainmri/core/machine.py, which needs nothing, for the CPU lookup).

The int8 gain depends on the CPU's integer dot-product instructions (AVX-512 VNNI, AVX-VNNI, AMX), so it
differs from machine to machine: this prints which the CPU has next to the measured ratios, and the kernel
ceiling (one convolution, float against int8) that no whole model can beat. Example:
    python benchmarks/int8_speed.py data/export/vgg16-aug/model.onnx data/export/vgg16-aug/model.int8.onnx --threads 2
    python benchmarks/int8_speed.py twin data/export/vgg16-aug/model.int8.onnx   # without the fp32 file
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from brainmri.core.machine import INT8_FLAGS, cpu_flags, cpu_model  # noqa: E402  (the repository's, stdlib only)


def fp32_twin(int8_path: str) -> bytes:
    """A float graph of the int8 model's shape: weights dequantized, activation quantize/dequantize pairs removed.

    For machines the fp32 file cannot be copied to (it is 4x larger): the twin runs the same float operators on
    the same shapes, and dense float kernels take the same time whatever the weights' values.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(int8_path)
    graph = model.graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    quantized = {n.output[0]: n for n in graph.node if n.op_type == "QuantizeLinear"}
    producer = {out: n.op_type for n in graph.node for out in n.output}
    alias, keep, floats, relus = {}, [], [], {}
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in init:  # a weight or bias
            x, scale = init[n.input[0]].astype(np.float32), init[n.input[1]]
            zero = init[n.input[2]].astype(np.float32) if len(n.input) > 2 and n.input[2] else np.float32(0)
            if scale.ndim:  # per channel, along `axis`
                axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
                shape = [1] * x.ndim
                shape[axis] = -1
                scale, zero = scale.reshape(shape), np.reshape(zero, shape) if np.ndim(zero) else zero
            floats.append(numpy_helper.from_array(((x - zero) * scale).astype(np.float32), n.output[0]))
        elif n.op_type == "DequantizeLinear" and n.input[0] in quantized:  # an activation's pair: read its float input
            q = quantized[n.input[0]]
            alias[n.output[0]] = q.input[0]
            zero = init[q.input[2]] if len(q.input) > 2 and q.input[2] else np.uint8(0)
            clips = zero.dtype == np.uint8 and not zero.any() and producer.get(q.input[0]) not in ("MaxPool", "Relu")
            if clips:  # the quantizer dropped a Relu that this pair's range [0, max] stood for: put it back
                if q.input[0] not in relus:
                    relus[q.input[0]] = helper.make_node("Relu", [q.input[0]], [q.input[0] + "_twin_relu"])
                    keep.append(relus[q.input[0]])
                alias[n.output[0]] = q.input[0] + "_twin_relu"
        elif n.op_type != "QuantizeLinear":
            keep.append(n)

    def source(name: str) -> str:  # through chains of pairs (a requantization is a pair after a pair)
        while name in alias:
            name = alias[name]
        return name

    for n in keep:
        n.input[:] = [source(name) for name in n.input]
    for out in graph.output:
        if out.name in alias:
            keep.append(helper.make_node("Identity", [source(out.name)], [out.name]))
    used = {name for n in keep for name in n.input}
    kept_init = [t for t in [*graph.initializer, *floats] if t.name in used]  # dequantized names never clash with int8 ones
    del graph.node[:], graph.initializer[:]
    graph.node.extend(keep)
    graph.initializer.extend(kept_init)
    return model.SerializeToString()


def conv_pair(size: int, channels: int) -> tuple[bytes, bytes]:
    """One 3x3 convolution (a VGG16 block's shape) as float Conv and as the QLinearConv that int8 models run."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (channels, channels, 3, 3)).astype(np.float32)
    attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    shape = [1, channels, size, size]

    def model(nodes, inits, in_type, out_type):
        graph = helper.make_graph(
            nodes,
            "conv",
            [helper.make_tensor_value_info("x", in_type, shape)],
            [helper.make_tensor_value_info("y", out_type, shape)],
            inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()

    fp32 = model(
        [helper.make_node("Conv", ["x", "w"], ["y"], **attrs)], [numpy_helper.from_array(w, "w")], TensorProto.FLOAT, TensorProto.FLOAT
    )
    scale = np.abs(w).reshape(channels, -1).max(1) / 63  # per output channel, 7-bit as export.reduce_range writes them
    q = [
        numpy_helper.from_array(np.clip(np.round(w / scale[:, None, None, None]), -64, 63).astype(np.int8), "w"),
        numpy_helper.from_array(scale.astype(np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(channels, np.int8), "w_zp"),
        *(numpy_helper.from_array(np.array(v, t), n) for n, v, t in [("s", 0.05, np.float32), ("zp", 0, np.uint8)]),
    ]
    node = helper.make_node("QLinearConv", ["x", "s", "zp", "w", "w_scale", "w_zp", "s", "zp"], ["y"], **attrs)
    return fp32, model([node], q, TensorProto.UINT8, TensorProto.UINT8)


def ceiling(threads: int, reps: int) -> None:
    """The int8 speed-up of the convolution kernels alone: no whole model can gain more than its convolutions do."""
    try:
        import onnx  # noqa: F401  (only to build the two one-node models)
    except ImportError:
        print("(onnx not installed: kernel ceiling skipped)")
        return
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    for size, channels in ((56, 256), (28, 512)):
        fp32, int8 = (ort.InferenceSession(m, opts, providers=["CPUExecutionProvider"]) for m in conv_pair(size, channels))
        x = np.random.default_rng(1).uniform(0, 255, (1, channels, size, size))
        a, b = median_ms(fp32, x.astype(np.float32), reps), median_ms(int8, x.astype(np.uint8), reps)
        gflop = 2 * size * size * channels * channels * 9 / 1e9
        print(
            f"kernel ceiling, one 3x3 conv {size}x{size}x{channels}, {threads} threads: fp32 {gflop / a * 1e3:.0f} GFLOP/s, "
            f"int8 {gflop / b * 1e3:.0f} GOP/s: {a / b:.2f}x",
            flush=True,
        )


def median_ms(sess: ort.InferenceSession, x: np.ndarray, reps: int) -> float:
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fp32", help="the float32 model, or 'twin' to rebuild a float graph of the same shape from the int8 file")
    ap.add_argument("int8")
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    name, flags = cpu_model(), cpu_flags(INT8_FLAGS)
    print(f"CPU: {name}; {os.cpu_count()} cores; int8 instructions: {', '.join(flags) or 'none found'}; onnxruntime {ort.__version__}")
    print(f"{'threads':>7} {'batch':>5} {'fp32 ms/img':>11} {'int8 ms/img':>11} {'int8 speed-up':>13}")
    float_model = fp32_twin(args.int8) if args.fp32 == "twin" else args.fp32
    if args.fp32 == "twin":
        print("fp32: a float twin rebuilt from the int8 file (same operators and shapes, dequantized weights)")
    for threads in args.threads:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sessions = [ort.InferenceSession(m, opts, providers=["CPUExecutionProvider"]) for m in (float_model, args.int8)]
        size = sessions[0].get_inputs()[0].shape[1]
        for batch in args.batches:
            x = np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
            fp32, int8 = (median_ms(s, x, args.reps) / batch for s in sessions)
            print(f"{threads:>7} {batch:>5} {fp32:>11.1f} {int8:>11.1f} {fp32 / int8:>12.2f}x", flush=True)
    for threads in args.threads:
        ceiling(threads, args.reps)


if __name__ == "__main__":
    main()
