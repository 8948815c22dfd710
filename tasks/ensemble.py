"""ensemble stage: one model that averages the calibrated probabilities of chosen transfer models.

Members and weights are chosen on the members' out-of-fold CV predictions over train+val (cv_predictions.csv), never
on test. The exported graph is the members' exported ONNX graphs composed into one (no Keras graph is converted
again), so `predict` runs it like any model. Its CV figure is cross-fitted: each fold's images are scored by an
ensemble chosen on the other folds, against the best single member chosen the same way, so the paired AUC
difference is not flattered by the choice. With ensemble.members empty the stage records "no ensemble"."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pandas as pd
from onnx import TensorProto, helper, numpy_helper

from brainmri.config import Params
from brainmri.errors import BrainMRIError
from brainmri.fsutil import atomic_dir, write_json, write_metrics
from brainmri.metrics import _auc, paired_auc_differences, with_intervals, youden_threshold
from brainmri.onnxrt import INPUT, probabilities, session
from brainmri.preprocess import load_batch
from brainmri.progress import log, summary
from tasks.split import split_part

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


def _external_images(p: Params) -> tuple[list, np.ndarray, np.ndarray] | None:
    intake = json.loads(p.path("external_report").read_text())
    if not intake["configured"]:
        return None
    manifest = pd.read_csv(p.path("external_manifest"), keep_default_na=False, dtype={"used": str})
    used = manifest[manifest["used"] == "True"].reset_index(drop=True)
    if used.empty:
        return None
    y = (used["label"] == p.ingest.positive_class).to_numpy(int)
    return [p.path("external_images") / n for n in used["image"]], y, used["group"].to_numpy()


def ensemble(p: Params) -> dict:
    """Run the stage: choose members and weights on CV, compose and check the graph, score it on test (and the external
    set) beside the best single member; write model.onnx, ensemble.json and scores.json under paths.ensemble."""
    members, folder = list(p.ensemble.members), p.path("ensemble")
    if not members:
        out = {"configured": False, "note": "no ensemble: ensemble.members is empty"}
        with atomic_dir(folder) as tmp:
            write_json(tmp / p.paths.files.ensemble, out)
            write_metrics(tmp / p.paths.files.scores, {})
        summary("ensemble", out["note"])
        return out
    rows, probs = read_oof(p, members)
    y, groups, folds = (rows["label"] == p.ingest.positive_class).to_numpy(int), rows["group"].to_numpy(), rows["fold"].to_numpy()
    steps = p.ensemble.max_steps
    weights = greedy_weights(y, probs, steps)  # the shipped ensemble: chosen on every train+val image's OOF prediction
    single_auc = [_auc(y, probs[:, j]) for j in range(len(members))]
    best = int(np.argmax(single_auc))
    ens_cf, single_cf, choices = cross_fitted(y, probs, folds, steps)
    diff = paired_auc_differences(y, {"ensemble": ens_cf, "best_single": single_cf}, "best_single", groups, p.train.bootstrap, p.seed)
    d = diff["ensemble"]
    kept = bool(d["ci_low"] > 0)
    chosen = [i for i in range(len(members)) if weights[i] > 0]
    log.info("ensemble: weights %s", ", ".join(f"{members[i]} {weights[i]:.2f}" for i in chosen))

    protos = [_load(p.model_file("export", members[i], "onnx")) for i in chosen]
    metas = [{x.key: x.value for x in proto.metadata_props} for proto in protos]
    size = int(metas[0]["input_size"])
    sessions = {i: session(p.model_file("export", members[i], "onnx")) for i in dict.fromkeys([*chosen, best])}
    tta = p.ensemble.tta_flip
    val, test = split_part(p, "val"), split_part(p, "test")

    def members_on(paths: list) -> dict[int, np.ndarray]:
        return {i: score(s, paths, size, tta) for i, s in sessions.items()}

    on_val = members_on(val.paths)
    threshold = youden_threshold(val.y, sum(weights[i] * on_val[i] for i in chosen))  # on val, as every model's
    model = compose(protos, [float(weights[i]) for i in chosen], tta)
    meta = {k: metas[0][k] for k in ("input_size", "max_side", "max_pixels", "crop_to_content", "positive_class", "negative_class")}
    description = " + ".join(f"{weights[i]:.2f} x {members[i]}" for i in chosen)
    meta.update(model="ensemble", threshold=str(round(threshold, 6)), weights=f"ensemble of {description}", tta_flip=str(tta))
    helper.set_model_props(model, meta)

    on_test = members_on(test.paths)
    with atomic_dir(folder) as tmp:
        onnx.save(model, tmp / p.paths.files.onnx)
        p_test = score(session(tmp / p.paths.files.onnx), test.paths, size, False)  # the composed graph, mirror included
        gap = float(np.max(np.abs(p_test - sum(weights[i] * on_test[i] for i in chosen)))) if len(p_test) else 0.0
        if gap > p.export.parity_tolerance:
            raise EnsembleError(f"the composed graph differs from its members' weighted mean by {gap:.2e} on test; nothing was written")

        def figures(yy, p_ens, p_single, gg) -> dict:
            return {
                "ensemble": with_intervals(yy, p_ens, threshold, p.train.bootstrap, p.seed, groups=gg),
                "best_single_auc_difference": paired_auc_differences(
                    yy, {"ensemble": p_ens, "single": p_single}, "single", gg, p.train.bootstrap, p.seed
                )["ensemble"],
            }

        out = {
            "configured": True,
            "candidates": members,
            "members": {members[i]: round(float(weights[i]), 4) for i in chosen},
            "tta_flip": tta,
            "threshold": round(threshold, 6),
            "threshold_rule": "youden on val, the composed model's own outputs",
            "best_single": members[best],
            "selection": {
                "protocol": (
                    f"greedy forward selection with replacement ({steps} rounds, Caruana et al. 2004) on pooled out-of-fold "
                    f"AUC of the members' calibrated CV predictions over train+val ({len(y)} images); test never read"
                ),
                "single_cv_auc": {m: round(a, 4) for m, a in zip(members, single_auc, strict=True)},
                "in_sample_cv_auc": round(_auc(y, probs @ weights), 4),
            },
            "cv": {
                "protocol": (
                    "cross-fitted: each CV fold's images scored by an ensemble and a best single member both chosen on the "
                    f"other folds; paired AUC difference with a 95% interval over {p.train.bootstrap} duplicate-group resamples"
                ),
                "ensemble_auc": round(_auc(y, ens_cf), 4),
                "best_single_auc": round(_auc(y, single_cf), 4),
                "auc_difference": d,
                "per_fold": choices,
                "calibration_note": "members' calibration maps were fitted on all out-of-fold predictions, these folds included",
            },
            "kept": kept,
            "decision": (
                "kept: the paired CV AUC difference's 95% interval lies above 0"
                if kept
                else f"not recommended: the paired CV AUC difference {d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] "
                "does not lie above 0, so the ensemble is not better than its best member beyond chance"
            ),
            "test": {"n_images": int(len(test.y)), **figures(test.y, p_test, on_test[best], test.frame["group"].to_numpy())},
            "parity_max_abs_diff": gap,
        }
        ext = _external_images(p)
        if ext is not None:
            paths, y_ext, g_ext = ext
            sess_ens = session(tmp / p.paths.files.onnx)
            p_ext = score(sess_ens, paths, size, False)
            out["external"] = {"n_images": len(y_ext), **figures(y_ext, p_ext, score(sessions[best], paths, size, tta), g_ext)}
            out["external"]["synthetic"] = bool(json.loads(p.path("external_report").read_text())["synthetic"])
        write_json(tmp / p.paths.files.ensemble, out)
        t = out["test"]["ensemble"]
        write_metrics(
            tmp / p.paths.files.scores,
            {
                "cv_auc": out["cv"]["ensemble_auc"],
                "cv_auc_difference": d["value"],
                "cv_auc_difference_ci_low": d["ci_low"],
                "test_auc": t["auc"]["value"],
                "test_accuracy": t["accuracy"]["value"],
            },
        )
    summary(
        "ensemble",
        f"{description}; cross-fitted CV AUC {out['cv']['ensemble_auc']:.3f} against {out['cv']['best_single_auc']:.3f} for the "
        f"best single member, difference {d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]: "
        + ("kept" if kept else "not recommended"),
    )
    return out
