"""The ensemble's parts: members and weights chosen on out-of-fold CV predictions (greedy selection, cross-fitted
comparison), and one ONNX graph composed of the members' exported graphs. The ensemble stage (tasks/ensemble.py)
imports this only when there is an ensemble to build, so the "no ensemble" run starts fast."""

from __future__ import annotations

import numpy as np
import onnx
import pandas as pd
from onnx import TensorProto, helper, numpy_helper

from brainmri.config import Params
from brainmri.errors import BrainMRIError
from brainmri.metrics import _auc
from brainmri.onnxrt import INPUT, probabilities
from brainmri.preprocess import load_batch

OUTPUT = "probability"  # the composed graph's output: (batch, 1) float32, as every exported model's
CHUNK = 32  # images decoded and scored at a time: memory stays bounded whatever the set's size


class EnsembleError(BrainMRIError):
    """The members' CV predictions or exported graphs cannot be combined."""


def read_oof(p: Params, members: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """The members' out-of-fold rows (image, group, label, fold) and their calibrated probabilities, one column each;
    every member must have predicted the same images in the same folds (one seed, one split: the folds coincide)."""
    frames = {m: pd.read_csv(p.model_file("models", m, "cv_predictions"), keep_default_na=False) for m in members}
    first = frames[members[0]]
    if first.empty:
        raise EnsembleError(f"{members[0]}: {p.paths.files.cv_predictions} is empty: the model has no CV predictions")
    for m, f in frames.items():
        if not f[["image", "fold"]].equals(first[["image", "fold"]]):
            raise EnsembleError(
                f"{m}: its CV predictions are for other images or folds than {members[0]}'s: retrain both on one split and seed"
            )
    return first[["image", "group", "label", "fold"]], np.column_stack([frames[m]["calibrated"].to_numpy(float) for m in members])


def greedy_weights(y: np.ndarray, probs: np.ndarray, steps: int) -> np.ndarray:
    """Ensemble selection (Caruana et al., ICML 2004): start from the best member, then add, with replacement, the member
    whose addition gives the best AUC of the average; the weights are the counts of the best-scoring round (ties go to
    the earlier, smaller ensemble). Written here because scikit-learn's Voting/Stacking classifiers refit their
    members, and ours are fixed, exported graphs."""
    counts = np.zeros(probs.shape[1])
    best_counts, best_auc = counts, -np.inf
    for _ in range(steps):
        trial = [_auc(y, (probs @ (counts + np.eye(len(counts))[j])) / (counts.sum() + 1)) for j in range(len(counts))]
        counts = counts + np.eye(len(counts))[int(np.argmax(trial))]  # argmax: ties go to the earlier member
        if max(trial) > best_auc + 1e-12:
            best_counts, best_auc = counts.copy(), max(trial)
    return best_counts / best_counts.sum()


def cross_fitted(y: np.ndarray, probs: np.ndarray, folds: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Each fold's images scored by the ensemble, and by the best single member, both chosen on the other folds only."""
    ens, single, choices = np.zeros(len(y)), np.zeros(len(y)), []
    for k in np.unique(folds):
        rest, here = folds != k, folds == k
        w = greedy_weights(y[rest], probs[rest], steps)
        best = int(np.argmax([_auc(y[rest], probs[rest, j]) for j in range(probs.shape[1])]))
        ens[here], single[here] = probs[here] @ w, probs[here, best]
        choices.append({"fold": int(k), "weights": [round(float(v), 4) for v in w], "best_single": best})
    return ens, single, choices


def _load(path) -> onnx.ModelProto:
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


def compose(protos: list[onnx.ModelProto], weights: list[float], tta: bool) -> onnx.ModelProto:
    """One graph: the members' graphs side by side on one input, their probabilities weighted and summed; with `tta`
    each member also sees the mirrored batch and the two halves are averaged."""
    graph = helper.make_graph([], "ensemble", [protos[0].graph.input[0]], [])  # the members' input: (batch, size, size, 3)
    feed, terms = _feed(graph, tta), []
    for i, (proto, w) in enumerate(zip(protos, weights, strict=True)):
        if len(proto.graph.input) != 1 or len(proto.graph.output) != 1:
            raise EnsembleError(f"member {i}: an exported model has one input and one output")
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
    summed = "summed" if tta else OUTPUT
    graph.node.append(helper.make_node("Sum", terms, [summed], name="sum"))
    opsets: dict[str, int] = {}
    for proto in protos:
        for o in proto.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    if tta:  # (2N, 1) -> (2, N, 1) -> mean over the two views -> (N, 1)
        graph.initializer.append(numpy_helper.from_array(np.array([2, -1, 1], np.int64), "tta_shape"))
        graph.node.append(helper.make_node("Reshape", [summed, "tta_shape"], ["tta_views"], name="tta_views"))
        if opsets.get("", 0) >= 18:  # ReduceMean's axes became an input in opset 18
            graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "tta_axes"))
            graph.node.append(helper.make_node("ReduceMean", ["tta_views", "tta_axes"], [OUTPUT], keepdims=0, name="tta_mean"))
        else:
            graph.node.append(helper.make_node("ReduceMean", ["tta_views"], [OUTPUT], axes=[0], keepdims=0, name="tta_mean"))
    graph.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", 1]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())])
    model.ir_version = max(proto.ir_version for proto in protos)
    onnx.checker.check_model(model)
    return model


def score(sess, paths: list, size: int, tta: bool) -> np.ndarray:
    """A session's probabilities on image files, read CHUNK at a time; with `tta` the mean over the image and its mirror."""
    out = []
    for i in range(0, len(paths), CHUNK):
        x = load_batch(paths[i : i + CHUNK], size)
        prob = probabilities(sess, x)
        out.append((prob + probabilities(sess, x[:, :, ::-1].copy())) / 2 if tta else prob)
    return np.concatenate(out) if out else np.zeros(0)
