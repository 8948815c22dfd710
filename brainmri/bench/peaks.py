"""A model's FLOPs per image and the matrix-multiply peaks its timings are set against."""

from __future__ import annotations

import tempfile
import time

import numpy as np

from brainmri.bench.timing import time_calls
from brainmri.deploy.onnxrt import session


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
    from onnx import TensorProto

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
        with tempfile.TemporaryDirectory() as folder:
            path = f"{folder}/gemm.onnx"
            onnx.save(_gemm_model(kind, op, (ta, tb, ty), n), path)
            sess = session(path, threads)
        feeds = {"a": a, "b": b}
        seconds = time_calls(lambda feed, sess=sess: sess.run(None, feed), feeds, 1, repeats)
        out[kind] = 2 * n**3 / float(np.median(seconds)) / 1e9
    return out


def _gemm_model(kind: str, op: str, types: tuple[int, int, int], n: int):
    """One `op` node y = op(a, b) on n x n inputs of element types `types` (a, b, y)."""
    from onnx import helper

    ta, tb, ty = types
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["y"])],
        f"gemm_{kind}",
        [helper.make_tensor_value_info("a", ta, [n, n]), helper.make_tensor_value_info("b", tb, [n, n])],
        [helper.make_tensor_value_info("y", ty, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
