"""ensemble stage: one model that averages the calibrated probabilities of chosen transfer models.

Members and weights are chosen on the members' out-of-fold CV predictions over train+val (cv_predictions.csv), never
on test. The exported graph is the members' exported ONNX graphs composed into one (no Keras graph is converted
again), so `predict` runs it like any model. Its CV figure is cross-fitted: each fold's images are scored by an
ensemble chosen on the other folds, against the best single member chosen the same way, so the paired AUC
difference is not flattered by the choice; its threshold is set on those cross-fitted predictions. The composed
graph is checked on val; its test figures are the members' own test predictions (evaluate's files) weighted: only
evaluate opens test images. With ensemble.members empty the stage records "no ensemble"."""

from __future__ import annotations

import json
from functools import partial

from brainmri.config import Params
from brainmri.core.files import atomic_dir, write_json, write_metrics
from brainmri.core.progress import log, summary


def ensemble(p: Params) -> dict:
    """Run the stage: choose members and weights on CV, compose the graph and check it on val, score it on test (from
    the members' evaluate predictions) and the external set beside the best single member; write model.onnx,
    ensemble.json and scores.json under paths.ensemble."""
    members, folder = list(p.ensemble.members), p.path("ensemble")
    if not members:
        return _no_ensemble(p)
    # only now the libraries an ensemble needs (ONNX, ONNX Runtime, scikit-learn): "no ensemble" starts in a second
    import onnx

    from brainmri.bench.measure import composed_latency
    from brainmri.deploy.onnxrt import session
    from brainmri.deploy.scoring import score_files
    from brainmri.export.compose import composed_ensemble, parity_gap
    from brainmri.intake.external_set import external_images, external_set
    from brainmri.intake.parts import split_part
    from brainmri.intake.preprocess import load_batch
    from brainmri.learn.ensemble_cv import select_members
    from brainmri.learn.ensemble_record import ensemble_record, ensemble_scores
    from brainmri.stats.ensemble_selection import against_best_single
    from brainmri.stats.evaluation import evaluated_probabilities

    s = select_members(p, members)
    log.info("ensemble: weights %s", ", ".join(f"{members[i]} {s.weights[i]:.2f}" for i in s.chosen))
    val, test = split_part(p, "val"), split_part(p, "test")  # test: its labels and groups; its images stay unopened
    model, sessions, size, threshold = composed_ensemble(p, s)
    on_val = score_files(sessions, val.paths, size, p.ensemble.tta_flip)
    on_test = {i: evaluated_probabilities(p, members[i], test) for i in dict.fromkeys([*s.chosen, s.best])}
    intake, used = external_set(p)
    single_threshold = float(json.loads(p.model_file("models", members[s.best], "train_metrics").read_text())["threshold"])
    n_boot, seed = p.train.bootstrap, p.seed
    beside_single = partial(against_best_single, threshold=threshold, single_threshold=single_threshold, n_boot=n_boot, seed=seed)
    with atomic_dir(folder) as tmp:
        onnx.save(model, tmp / p.paths.files.onnx)
        del model
        composed = session(tmp / p.paths.files.onnx)
        p_val = score_files({0: composed}, val.paths, size, False)[0]  # the composed graph, its mirror (if any) included
        gap = parity_gap(p_val, s.mixed(on_val), p.export.parity_tolerance)
        out = ensemble_record(
            p, s, threshold, beside_single(test.y, s.mixed(on_test), on_test[s.best], test.frame["group"].to_numpy()), gap
        )
        out["threshold_check_on_val"] = beside_single(val.y, p_val, on_val[s.best], val.frame["group"].to_numpy())
        if intake["configured"] and not used.empty:
            paths, y_ext, groups_ext = external_images(p, used)
            single_ext = score_files({s.best: sessions[s.best]}, paths, size, p.ensemble.tta_flip)[s.best]
            ext = score_files({0: composed}, paths, size, False)[0]
            out["external"] = {**beside_single(y_ext, ext, single_ext, groups_ext), "synthetic": bool(intake["synthetic"])}
        out["latency"] = composed_latency(p, tmp / p.paths.files.onnx, load_batch(val.paths[: p.benchmark.batch_size], size))
        write_json(tmp / p.paths.files.ensemble, out)
        write_metrics(tmp / p.paths.files.scores, ensemble_scores(out))
    d = s.difference
    summary(
        "ensemble",
        f"{s.description()}; cross-fitted CV AUC {out['cv']['ensemble_auc']:.3f} against {out['cv']['best_single_auc']:.3f} for the "
        f"best single member, difference {d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]: "
        + ("kept" if s.kept else "not recommended"),
    )
    return out


def _no_ensemble(p: Params) -> dict:
    """The record when ensemble.members is empty: DVC has no conditional stages, so the stage runs and says so."""
    out = {"configured": False, "note": "no ensemble: ensemble.members is empty"}
    with atomic_dir(p.path("ensemble")) as tmp:
        write_json(tmp / p.paths.files.ensemble, out)
        write_metrics(tmp / p.paths.files.scores, {})
    summary("ensemble", out["note"])
    return out
