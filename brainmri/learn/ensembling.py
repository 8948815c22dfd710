"""The ensemble's parts: members and weights chosen on out-of-fold CV predictions (greedy selection, cross-fitted
comparison), and one ONNX graph composed of the members' exported graphs. The ensemble stage (tasks/ensemble.py)
imports this only when there is an ensemble to build, so the "no ensemble" run starts fast."""

from __future__ import annotations

import numpy as np
import onnx
import pandas as pd
from onnx import TensorProto, helper, numpy_helper

from brainmri.config import Params
from brainmri.core.errors import BrainMRIError
from brainmri.deploy.onnxrt import INPUT, probabilities
from brainmri.intake.preprocess import load_batch
from brainmri.learn import calibration
from brainmri.stats.metrics import _auc

OUTPUT = "probability"  # the composed graph's output: (batch, 1) float32, as every exported model's
CHUNK = 32  # images decoded and scored at a time: memory stays bounded whatever the set's size
MIN_GAIN = 0.001  # a selection round counts only if it lifts the pooled AUC by this much: on the real set's 215 CV images one
# reordered tumour/no-tumour pair moves AUC by 1e-4, and calibration's near-zero slope on a useless member buys such ties


class EnsembleError(BrainMRIError):
    """The members' CV predictions or exported graphs cannot be combined."""


COLUMNS = ("image", "group", "label", "fold", "probability", "calibrated")  # cv_predictions.csv, as train writes it


def _read_member(p: Params, name: str) -> pd.DataFrame:
    """One member's cv_predictions.csv, checked: every column there, probabilities finite in 0..1, folds >= 0, known
    labels, at least one row; anything else is one sentence naming the file."""
    path = p.model_file("models", name, "cv_predictions")
    try:
        f = pd.read_csv(path, keep_default_na=False, dtype=str)
    except (OSError, pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise EnsembleError(f"{path}: cannot read {name}'s CV predictions ({type(exc).__name__}); run train@{name}") from None
    missing = [c for c in COLUMNS if c not in f.columns]
    if missing:
        raise EnsembleError(f"{path}: lacks column(s) {', '.join(missing)}; run train@{name} again")
    if f.empty:
        raise EnsembleError(f"{path}: no CV predictions: {name} was trained without cross-validation")
    for col in ("probability", "calibrated"):
        v = pd.to_numeric(f[col], errors="coerce").to_numpy(float)
        if not (np.isfinite(v) & (v >= 0) & (v <= 1)).all():
            raise EnsembleError(f"{path}: column {col} holds values that are not probabilities in 0..1")
        f[col] = v
    fold = pd.to_numeric(f["fold"], errors="coerce")
    if fold.isna().any() or (fold < 0).any() or (fold != fold.round()).any():
        raise EnsembleError(f"{path}: column fold must hold non-negative integers (every image predicted out of fold)")
    f["fold"] = fold.astype(int)
    bad = sorted(set(f["label"]) - set(p.ingest.classes))
    if bad:
        raise EnsembleError(f"{path}: unknown label(s) {bad[:3]} (ingest.classes: {list(p.ingest.classes)})")
    return f


def read_oof(p: Params, members: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """The members' out-of-fold rows (image, group, label, fold) and their raw out-of-fold probabilities, one column
    each; every member must have predicted the same images in the same folds (one seed, one split: they coincide)."""
    frames = {m: _read_member(p, m) for m in members}
    first = frames[members[0]]
    for m, f in frames.items():
        if not f[["image", "fold"]].equals(first[["image", "fold"]]):
            raise EnsembleError(
                f"{m}: its CV predictions are for other images or folds than {members[0]}'s: retrain both on one split and seed"
            )
    if first["label"].nunique() < 2:
        raise EnsembleError("the CV predictions hold one class only: no AUC, so no ensemble can be chosen")
    return first[["image", "group", "label", "fold"]], np.column_stack([frames[m]["probability"].to_numpy(float) for m in members])


def calibrated(raw: np.ndarray, y: np.ndarray, method: str, rows: np.ndarray | None = None) -> np.ndarray:
    """Each member's column through its own calibration map (train.calibration), fitted on `rows` only (all by default),
    as train fits it: a map that would reverse the ranking is not applied."""
    rows = np.ones(len(y), bool) if rows is None else rows
    out = np.empty_like(raw)
    for j in range(raw.shape[1]):
        a, c = calibration.fit(raw[rows, j], y[rows], method)
        a, c = (a, c) if a > 0 else (1.0, 0.0)
        out[:, j] = calibration.apply(raw[:, j], a, c)
    return out


def greedy_weights(y: np.ndarray, probs: np.ndarray, steps: int) -> np.ndarray:
    """Ensemble selection (Caruana et al., ICML 2004): start from the best member, then add, with replacement, the member
    whose addition gives the best AUC of the average; the weights are the counts of the best-scoring round k, so
    multiples of 1/k (a later round must beat it by MIN_GAIN: near-ties go to the earlier, smaller ensemble).
    Written here because scikit-learn's Voting/Stacking classifiers refit their members, and ours are fixed,
    exported graphs."""
    counts = np.zeros(probs.shape[1])
    best_counts, best_auc = counts, -np.inf
    for _ in range(steps):
        trial = [_auc(y, (probs @ (counts + np.eye(len(counts))[j])) / (counts.sum() + 1)) for j in range(len(counts))]
        counts = counts + np.eye(len(counts))[int(np.nanargmax(trial))]  # ties go to the earlier member
        if max(trial) > best_auc + (MIN_GAIN if best_counts.sum() else 0.0):
            best_counts, best_auc = counts.copy(), max(trial)
    if not best_counts.sum():
        raise EnsembleError("no member scores an AUC on these images (one class only?): no ensemble can be chosen")
    return best_counts / best_counts.sum()


def cross_fitted(y: np.ndarray, raw: np.ndarray, folds: np.ndarray, steps: int, method: str) -> tuple[np.ndarray, np.ndarray, list]:
    """Each fold's images scored by the ensemble, and by the best single member, both chosen on the other folds only,
    with each member's calibration map refitted on the other folds too (the maps set how members weigh against each
    other). What it does not remove: each member's own settings were chosen by CV on these same folds."""
    ens, single, choices = np.zeros(len(y)), np.zeros(len(y)), []
    for k in np.unique(folds):
        rest, here = folds != k, folds == k
        probs = calibrated(raw, y, method, rest)
        w = greedy_weights(y[rest], probs[rest], steps)
        best = int(np.nanargmax([_auc(y[rest], probs[rest, j]) for j in range(probs.shape[1])]))
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
    two halves are averaged."""
    opsets = _check_members(protos)
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
    if tta:  # Concat put the originals first: (2N, 1) -> (2, N, 1) -> mean over the two views -> (N, 1)
        mean = "tta_mean"
        graph.initializer.append(numpy_helper.from_array(np.array([2, -1, 1], np.int64), "tta_shape"))
        graph.node.append(helper.make_node("Reshape", ["summed", "tta_shape"], ["tta_views"], name="tta_views"))
        if opsets.get("", 0) >= 18:  # ReduceMean's axes became an input in opset 18
            graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), "tta_axes"))
            graph.node.append(helper.make_node("ReduceMean", ["tta_views", "tta_axes"], [mean], keepdims=0, name="tta_mean"))
        else:
            graph.node.append(helper.make_node("ReduceMean", ["tta_views"], [mean], axes=[0], keepdims=0, name="tta_mean"))
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("clip_lo", 0.0), ("clip_hi", 1.0)))
    graph.node.append(helper.make_node("Clip", [mean, "clip_lo", "clip_hi"], [OUTPUT], name="clip"))
    graph.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", 1]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())])
    model.ir_version = max(proto.ir_version for proto in protos)
    onnx.checker.check_model(model)
    return model


def score(sessions: dict, paths: list, size: int, tta: bool) -> dict:
    """Each session's probabilities on image files, read CHUNK at a time and decoded once for all sessions; with `tta`
    the mean over the image and its mirror."""
    out: dict = {k: [] for k in sessions}
    for i in range(0, len(paths), CHUNK):
        x = load_batch(paths[i : i + CHUNK], size)
        mirrored = x[:, :, ::-1].copy() if tta else None
        for k, sess in sessions.items():
            prob = probabilities(sess, x)
            out[k].append((prob + probabilities(sess, mirrored)) / 2 if tta else prob)
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}
