"""Keras to ONNX: the conversion with tf2onnx in a spawned worker process, and canonical tensor names, so that identical
models give identical files. The stage process never imports TensorFlow."""

from __future__ import annotations

import gc
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from brainmri.core.errors import BrainMRIError
from brainmri.deploy.onnxrt import INPUT

PROTOBUF_IMPL = "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"


class ExportError(BrainMRIError):
    """The exported model does not reproduce the Keras model."""


def to_onnx(model, size: int, opset: int) -> onnx.ModelProto:
    """Convert a Keras 3 functional model with tf2onnx, one named input with a dynamic batch dimension."""
    return _from_keras(model, (None, size, size, 3), INPUT, opset)


def _from_keras(model, shape: tuple, name: str, opset: int) -> onnx.ModelProto:
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec(shape, tf.float32, name=name),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    return canonical_names(proto)


def network_to_onnx(model, size: int, opset: int, cache: str | None) -> onnx.ModelProto:
    """The saved network's ONNX graph: with a `cache` folder, its frozen extractor's graph from there (converted once
    per backbone, cut and weights) composed with its head's, converted alone (brainmri.export.base_onnx); the whole
    network converted at once otherwise."""
    from brainmri.export import base_onnx

    parts = base_onnx.split_network(model)
    if cache is None or parts is None:
        return to_onnx(model, size, opset)
    extractor, head = parts
    base = base_onnx.cached_base(Path(cache), extractor, size, opset, to_onnx)
    head_graph = _from_keras(head, (None, int(head.input_shape[-1])), base_onnx.FEATURES, opset)
    return canonical_names(base_onnx.compose_with_head(base, head_graph, model.layers[-1].name))


def _convert_to_file(model_path: str, size: int, opset: int, out: str, images: str, probs: str, cache: str | None = None) -> None:
    """In the worker: the Keras model's ONNX conversion to `out`, then its probabilities on `images` (.npy) to `probs`.

    In that order, and 4 images a call: TensorFlow's allocator keeps what a prediction took, and the conversion then
    came on top of it. Measured on vgg19-noaug at 224 px (real set, AMD EPYC): the worker peaked at 2.68 GiB
    predicting 16 at a time first, 2.27 GiB predicting 4 at a time first, 2.08 GiB converting first."""
    # tf2onnx deep-copies the whole graph, weights included, before each of its ~24 optimizer passes, so that a pass
    # that fails can be skipped; off, the conversion takes 35% less time and a fraction of the memory, and a failing pass
    # fails the export (the parity check would catch a wrong graph either way)
    os.environ["TF2ONNX_CATCH_ERRORS"] = "FALSE"
    from brainmri.learn.models import load_model

    model = load_model(model_path)
    onnx.save(network_to_onnx(model, size, opset, cache), out)
    gc.collect()  # tf2onnx's graphs are garbage now: their memory goes back before the prediction allocates
    out = np.asarray(model.predict(np.load(images), batch_size=4, verbose=0), dtype=np.float64)
    np.save(probs, out if out.ndim == 2 and out.shape[1] > 1 else out.reshape(-1))  # (n, K) for N classes, (n,) for two


def convert(model_path: Path, size: int, opset: int, x: np.ndarray, cache: Path | None = None) -> tuple[onnx.ModelProto, np.ndarray]:
    """The ONNX model and the Keras model's probabilities on `x` ((n,) for a binary model, (n, K) for an N-class one),
    both from a spawned worker process (`cache`: the frozen bases' ONNX cache, `network_to_onnx`): this one
    never imports TensorFlow, and the GiBs tf2onnx takes go back to the OS before parity and calibration."""
    import multiprocessing
    from unittest import mock

    with tempfile.TemporaryDirectory() as folder:
        out, images, probs = Path(folder) / "model.onnx", Path(folder) / "x.npy", Path(folder) / "p.npy"
        np.save(images, x)
        args = (str(model_path), size, opset, str(out), str(images), str(probs), None if cache is None else str(cache))
        proc = multiprocessing.get_context("spawn").Process(target=_convert_to_file, args=args)
        # The worker runs protobuf's pure-Python implementation: with the default (upb), every one of tf2onnx's ~24
        # optimizer passes rewrites each weight tensor into the graph's arena, which frees nothing until the end, so
        # memory grew by the weights' size per pass. Measured on ResNet50V2 at 224 px: peak 4.31 -> 2.33 GiB, 16.9 ->
        # 19.8 s, and the converted file is byte-identical. The variable is read when the child first imports protobuf.
        with mock.patch.dict(os.environ, {PROTOBUF_IMPL: "python"}):  # the child's environment only; restored after
            proc.start()
        proc.join()
        if proc.exitcode != 0 or not out.is_file():
            raise ExportError(f"{model_path}: the conversion to ONNX failed in its worker process (exit code {proc.exitcode}); see above")
        return onnx.load(out), np.load(probs)


def canonical_names(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Rename nodes and inner tensors by position: tf2onnx numbers them from counters that differ run to run,
    and identical models should give identical files (DVC then sees nothing changed downstream)."""
    g = proto.graph
    keep = {v.name for v in [*g.input, *g.output]}
    names: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for i, node in enumerate(g.node):  # names in order of first use: the node order is stable, the rest is not
        node.name = f"{node.op_type}_{i}"
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for init in g.initializer:
        init.name = rename(init.name)
    for info in g.value_info:
        info.name = rename(info.name)
    for v in [*g.input, *g.output, *g.value_info]:  # the dynamic batch dimension, numbered by tf2onnx too
        for dim in v.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = "batch"
    order = {new: k for k, new in enumerate(names.values())}
    for field in (g.initializer, g.value_info):
        items = sorted(field, key=lambda x: order.get(x.name, -1))
        copies = [type(x)() for x in items]
        for c, x in zip(copies, items, strict=True):
            c.CopyFrom(x)
        del field[:]
        field.extend(copies)
    return proto
