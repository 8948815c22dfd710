"""One ONNX graph composed of the ensemble members' exported graphs (no Keras graph is converted again), so that
`predict` runs it like any model: the members side by side on one input, their probabilities weighted and summed.
N-class members (output (batch, K)) compose alike: each class's probability is the weighted mean of the members'."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from brainmri.config import Params
from brainmri.deploy.onnxrt import INPUT, session
from brainmri.learn.ensemble_cv import Selection
from brainmri.stats.ensemble_selection import EnsembleError
from brainmri.stats.metrics import youden_threshold

OUTPUT = "probability"  # the composed graph's output: (batch, 1) float32 (N classes: (batch, K)), as its members'
METADATA = ("input_size", "max_side", "max_pixels", "crop_to_content", "positive_class", "negative_class")  # the members'
METADATA_CLASSES = ("input_size", "max_side", "max_pixels", "crop_to_content", "classes")  # N-class members': no threshold


def load_member(path) -> onnx.ModelProto:
    """A member's exported graph, checked by ONNX."""
    try:
        proto = onnx.load(path)
        onnx.checker.check_model(proto)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, OSError...: one sentence naming the file
        raise EnsembleError(f"{path}: not a loadable ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return proto


def _feed(graph: onnx.GraphProto, tta: bool) -> str:
    """Add the nodes that make the members' input: the image batch, or it followed by its left-right mirror."""
    if not tta:
        return INPUT
    graph.initializer.extend(
        numpy_helper.from_array(np.array(v, np.int64), name)
        for name, v in (("flip_starts", [-1]), ("flip_ends", [-(2**62)]), ("flip_axes", [2]), ("flip_steps", [-1]))
    )
    graph.node.extend(
        [
            helper.make_node("Slice", [INPUT, "flip_starts", "flip_ends", "flip_axes", "flip_steps"], ["mirrored"], name="tta_mirror"),
            helper.make_node("Concat", [INPUT, "mirrored"], ["tta_batch"], axis=0, name="tta_batch"),
        ]
    )
    return "tta_batch"


def _width(protos: list[onnx.ModelProto]) -> int:
    """The members' output width: 1 (binary) or K (N classes), the same for every member; EnsembleError otherwise."""
    widths = []
    for proto in protos:
        dims = proto.graph.output[0].type.tensor_type.shape.dim
        widths.append(dims[-1].dim_value if len(dims) == 2 and dims[-1].dim_value > 0 else 1)
    if len(set(widths)) != 1:
        raise EnsembleError(f"members give different numbers of probabilities per image ({widths}): they cannot be averaged")
    return widths[0]


def _check_members(protos: list[onnx.ModelProto]) -> dict[str, int]:
    """The members' shared opsets; refuse what composition cannot keep right: other input names, different opsets
    (a node means what its opset says), subgraphs (their outer-scope names would not be rewired), model-local
    functions and sparse initializers (not carried over)."""
    opsets = [{o.domain: o.version for o in proto.opset_import} for proto in protos]
    for i, proto in enumerate(protos):
        g = proto.graph
        if len(g.input) != 1 or len(g.output) != 1 or g.input[0].name != INPUT:
            raise EnsembleError(f"member {i}: an exported model has one input named {INPUT!r} and one output")
        if opsets[i].get("", 0) != opsets[0].get("", 0):
            versions = f"{opsets[0].get('', 0)} and {opsets[i].get('', 0)}"
            raise EnsembleError(f"members exported at different opsets ({versions}): export them alike")
        graphs = [a for n in g.node for a in n.attribute if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)]
        if graphs or len(proto.functions) or len(g.sparse_initializer):
            raise EnsembleError(f"member {i}: subgraphs, functions or sparse initializers cannot be composed here")
    merged: dict[str, int] = {}
    for o in opsets:
        for domain, version in o.items():
            merged[domain] = max(merged.get(domain, 0), version)
    return merged


def compose(protos: list[onnx.ModelProto], weights: list[float], tta: bool) -> onnx.ModelProto:
    """One graph: the members' graphs side by side on one input, their probabilities weighted and summed, then clipped
    to 0..1 (float32 weights need not sum to exactly 1); with `tta` each member also sees the mirrored batch and the
    two halves are averaged. N-class members ((batch, K) outputs) give a (batch, K) graph, each class weighted alike."""
    opsets = _check_members(protos)
    width = _width(protos)
    graph = helper.make_graph([], "ensemble", [protos[0].graph.input[0]], [])  # the members' input: (batch, size, size, 3)
    feed, terms = _feed(graph, tta), []
    for i, (proto, w) in enumerate(zip(protos, weights, strict=True)):
        g = onnx.compose.add_prefix_graph(proto.graph, f"m{i}_")
        own_input = g.input[0].name
        for node in g.node:
            node.input[:] = [feed if n == own_input else n for n in node.input]
        graph.node.extend(g.node)
        graph.initializer.extend(g.initializer)
        graph.value_info.extend(g.value_info)
        graph.initializer.append(numpy_helper.from_array(np.array(w, np.float32), f"w{i}"))
        graph.node.append(helper.make_node("Mul", [g.output[0].name, f"w{i}"], [f"weighted{i}"], name=f"weight{i}"))
        terms.append(f"weighted{i}")
    graph.node.append(helper.make_node("Sum", terms, ["summed"], name="sum"))
    mean = "summed"
    if tta:  # Concat put the originals first: (2N, W) -> (2, N, W) -> mean over the two views -> (N, W); W 1 or K
        mean = "tta_mean"
        graph.initializer.append(numpy_helper.from_array(np.array([2, -1, width], np.int64), "tta_shape"))
        graph.node.append(helper.make_node("Reshape", ["summed", "tta_shape"], ["tta_views"], name="tta_views"))
        if opsets.get("", 0) >= 18:  # ReduceMean's axes became an input in opset 18
            graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "tta_axes"))
            graph.node.append(helper.make_node("ReduceMean", ["tta_views", "tta_axes"], [mean], keepdims=0, name="tta_mean"))
        else:
            graph.node.append(helper.make_node("ReduceMean", ["tta_views"], [mean], axes=[0], keepdims=0, name="tta_mean"))
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("clip_lo", 0.0), ("clip_hi", 1.0)))
    graph.node.append(helper.make_node("Clip", [mean, "clip_lo", "clip_hi"], [OUTPUT], name="clip"))
    graph.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", width]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())])
    model.ir_version = max(proto.ir_version for proto in protos)
    onnx.checker.check_model(model)
    return model


def composed_ensemble(p: Params, s: Selection) -> tuple[onnx.ModelProto, dict, int, float | None]:
    """The chosen members' graphs composed into one, with its metadata; ONNX Runtime sessions of the chosen members
    and the best single one; the input size; the threshold: Youden's on the cross-fitted out-of-fold predictions over
    train+val (each fold's images scored by an ensemble chosen on the other folds), not on val's 39 images. N-class
    members: their `classes` in the metadata and no threshold (None): the label is the arg-max class."""
    members, tta = s.members, p.ensemble.tta_flip
    protos = [load_member(p.model_file("export", members[i], "onnx")) for i in s.chosen]
    meta = {x.key: x.value for x in protos[0].metadata_props}
    size = int(meta["input_size"])
    sessions = {i: session(p.model_file("export", members[i], "onnx")) for i in dict.fromkeys([*s.chosen, s.best])}
    if "classes" in meta:
        threshold, props = None, _classes_props(protos, meta)
    else:
        threshold = youden_threshold(s.y, s.ensemble_cv)
        props = {k: meta[k] for k in METADATA} | {"model": "ensemble", "threshold": str(round(threshold, 6))}
    model = compose(protos, [float(s.weights[i]) for i in s.chosen], tta)
    del protos
    helper.set_model_props(model, props | {"members": s.description(), "tta_flip": str(tta)})
    return model, sessions, size, threshold


def _classes_props(protos: list[onnx.ModelProto], meta: dict) -> dict:
    """N-class members' shared metadata; EnsembleError when their classes differ (their columns would not line up)."""
    for i, proto in enumerate(protos):
        theirs = {x.key: x.value for x in proto.metadata_props}.get("classes")
        if theirs != meta["classes"]:
            raise EnsembleError(f"member {i}: its classes {str(theirs)[:200]} are not member 0's {meta['classes'][:200]}")
    return {k: meta[k] for k in METADATA_CLASSES} | {"model": "ensemble"}


def parity_gap(p_composed: np.ndarray, p_members: np.ndarray, tolerance: float) -> float:
    """The composed graph's largest distance from its members' weighted mean; EnsembleError beyond `tolerance`."""
    gap = float(np.max(np.abs(p_composed - p_members))) if len(p_composed) else 0.0
    if gap > tolerance:
        raise EnsembleError(f"the composed graph differs from its members' weighted mean by {gap:.2e} on val; nothing was written")
    return gap
