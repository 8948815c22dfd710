"""ensemble stage: one model that averages the calibrated probabilities of chosen transfer models.

Members and weights are chosen on the members' out-of-fold CV predictions over train+val (cv_predictions.csv), never
on test. The exported graph is the members' exported ONNX graphs composed into one (no Keras graph is converted
again), so `predict` runs it like any model. Its CV figure is cross-fitted: each fold's images are scored by an
ensemble chosen on the other folds, against the best single member chosen the same way, so the paired AUC
difference is not flattered by the choice. With ensemble.members empty the stage records "no ensemble"."""

from __future__ import annotations

import json

import numpy as np

from brainmri.config import Params
from brainmri.core.files import atomic_dir, write_json, write_metrics
from brainmri.core.progress import log, summary


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
    # only now the libraries an ensemble needs (ONNX, ONNX Runtime, scikit-learn): "no ensemble" starts in a second
    import onnx
    from onnx import helper

    from brainmri.bench.measure import composed_latency
    from brainmri.deploy.onnxrt import session
    from brainmri.intake.parts import split_part
    from brainmri.intake.preprocess import load_batch
    from brainmri.learn.ensembling import EnsembleError, _load, calibrated, compose, cross_fitted, greedy_weights, read_oof, score
    from brainmri.stats.metrics import _auc, paired_auc_differences, with_intervals, youden_threshold
    from tasks.external import external_set

    rows, raw = read_oof(p, members)
    y, groups, folds = (rows["label"] == p.ingest.positive_class).to_numpy(int), rows["group"].to_numpy(), rows["fold"].to_numpy()
    steps, method = p.ensemble.max_steps, p.train.calibration
    probs = calibrated(raw, y, method)  # each member's map fitted on all out-of-fold predictions, as train fitted it
    weights = greedy_weights(y, probs, steps)  # the shipped ensemble: chosen on every train+val image's OOF prediction
    single_auc = [_auc(y, probs[:, j]) for j in range(len(members))]
    best = int(np.nanargmax(single_auc))
    ens_cf, single_cf, choices = cross_fitted(y, raw, folds, steps, method)
    d = paired_auc_differences(y, {"ensemble": ens_cf, "single": single_cf}, "single", groups, p.train.bootstrap, p.seed)["ensemble"]
    kept = bool(d["ci_low"] > 0)
    chosen = [i for i in range(len(members)) if weights[i] > 0]
    log.info("ensemble: weights %s", ", ".join(f"{members[i]} {weights[i]:.2f}" for i in chosen))

    protos = [_load(p.model_file("export", members[i], "onnx")) for i in chosen]
    meta = {x.key: x.value for x in protos[0].metadata_props}
    size = int(meta["input_size"])
    sessions = {i: session(p.model_file("export", members[i], "onnx")) for i in dict.fromkeys([*chosen, best])}
    tta = p.ensemble.tta_flip
    val, test = split_part(p, "val"), split_part(p, "test")

    def members_on(paths: list) -> dict[int, np.ndarray]:
        return score(sessions, paths, size, tta)

    def mixed(on: dict[int, np.ndarray]) -> np.ndarray:
        return sum(weights[i] * on[i] for i in chosen)

    on_val = members_on(val.paths)
    threshold = youden_threshold(val.y, mixed(on_val))  # on val, as every model's: the members' weighted mean there
    model = compose(protos, [float(weights[i]) for i in chosen], tta)
    del protos
    keep = ("input_size", "max_side", "max_pixels", "crop_to_content", "positive_class", "negative_class")
    description = " + ".join(f"{weights[i]:.2f} x {members[i]}" for i in chosen)
    props = {k: meta[k] for k in keep} | {"model": "ensemble", "threshold": str(round(threshold, 6))}
    helper.set_model_props(model, props | {"members": description, "tta_flip": str(tta)})

    on_test = members_on(test.paths)
    intake, used = external_set(p)
    on_threshold = {best: float(json.loads(p.model_file("models", members[best], "train_metrics").read_text())["threshold"])}
    with atomic_dir(folder) as tmp:
        onnx.save(model, tmp / p.paths.files.onnx)
        del model
        composed = session(tmp / p.paths.files.onnx)
        p_test = score({0: composed}, test.paths, size, False)[0]  # the composed graph, its mirror (if any) included
        gap = float(np.max(np.abs(p_test - mixed(on_test)))) if len(p_test) else 0.0
        if gap > p.export.parity_tolerance:
            raise EnsembleError(f"the composed graph differs from its members' weighted mean by {gap:.2e} on test; nothing was written")

        def figures(yy, p_ens, p_single, gg) -> dict:
            """The ensemble and the best single member (scored the same way, mirror included) with intervals, and
            their paired AUC difference, on one labelled set."""
            return {
                "n_images": int(len(yy)),
                "ensemble": with_intervals(yy, p_ens, threshold, p.train.bootstrap, p.seed, groups=gg),
                "best_single": with_intervals(yy, p_single, on_threshold[best], p.train.bootstrap, p.seed, groups=gg),
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
            "threshold_rule": "Youden's J on val, on the members' weighted mean (the composed graph gives it to parity_max_abs_diff)",
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
                    "cross-fitted: each CV fold's images scored by an ensemble and a best single member both chosen, and "
                    "each member's calibration map refitted, on the other folds only; paired AUC difference with a 95% "
                    f"interval over {p.train.bootstrap} duplicate-group resamples"
                ),
                "limits": (
                    "each member's own settings were chosen by CV on these same folds (optimistic for both sides), and the "
                    "interval resamples images, not the selection: it leaves out the selection's own variance"
                ),
                "ensemble_auc": round(_auc(y, ens_cf), 4),
                "best_single_auc": round(_auc(y, single_cf), 4),
                "auc_difference": d,
                "per_fold": choices,
            },
            "kept": kept,
            "decision": (
                "kept: the paired CV AUC difference's 95% interval lies above 0"
                if kept
                else f"not recommended: the paired CV AUC difference {d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] "
                "does not lie above 0, so the ensemble is not better than its best member beyond chance"
            ),
            "test": figures(test.y, p_test, on_test[best], test.frame["group"].to_numpy()),
            "parity_max_abs_diff": gap,
        }
        if intake["configured"] and not used.empty:
            paths = [p.path("external_images") / n for n in used["image"]]
            y_ext = (used["label"] == p.ingest.positive_class).to_numpy(int)
            single_ext = score({best: sessions[best]}, paths, size, tta)[best]
            out["external"] = figures(y_ext, score({0: composed}, paths, size, False)[0], single_ext, used["group"].to_numpy())
            out["external"]["synthetic"] = bool(intake["synthetic"])
        out["latency"] = composed_latency(p, tmp / p.paths.files.onnx, load_batch(test.paths[: p.benchmark.batch_size], size))
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
