"""train stage: one model = one backbone, with or without the augmented copies, selected on the validation split."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.config import Backbone, Params, candidates
from brainmri.core.files import atomic_dir, jsonable, write_csv, write_json
from brainmri.core.progress import log, summary
from brainmri.intake.parts import Part, make_part, split_part
from brainmri.intake.preprocess import load_batch
from brainmri.learn import calibration, features
from brainmri.learn.headfit import HeadJob, HeadResult, fit_heads
from brainmri.stats.metrics import point, youden_threshold


def data_parts(p: Params, augment: bool) -> tuple[Part, Part, Part]:
    """(train originals, their augmented copies or nothing, val) in a fixed order."""
    aug = pd.read_csv(p.path("augment_manifest"), keep_default_na=False) if augment else pd.DataFrame(columns=["image", "label"])
    aug_part = make_part(p, aug.sort_values("image", kind="stable"), p.path("augment_images"))
    return split_part(p, "train"), aug_part, split_part(p, "val")


def class_weights(y: np.ndarray, mode: str) -> dict[int, float] | None:
    if mode == "none":
        return None
    counts = np.bincount(y, minlength=2)
    return {c: float(len(y) / (2 * counts[c])) if counts[c] else 1.0 for c in (0, 1)}


def seed_everything(seed: int) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def fit(model, x, y, val, lr: float, epochs: int, patience: int, batch: int, cw, label: str) -> tuple[pd.DataFrame, int]:
    """Keras fit for `epochs` epochs and keep the last; with `patience`, stop early on validation loss and keep its best epoch.

    For networks trained on images (the reference CNN, fine-tuning); heads on cached features train in brainmri.learn.headfit."""
    import keras

    class EpochLog(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            log.log(
                logging.DEBUG if label.startswith("cv ") else logging.INFO,  # CV folds: their per-fold summary is enough
                "%s epoch %d/%d: loss %.4f, val_loss %.4f, val_accuracy %.3f",
                label,
                epoch + 1,
                epochs,
                logs["loss"],
                logs["val_loss"],
                logs["val_accuracy"],
            )

    model.compile(optimizer=keras.optimizers.Adam(lr), loss="binary_crossentropy", metrics=["accuracy"])
    stop = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)] if patience else []
    h = model.fit(
        x, y, validation_data=val, epochs=epochs, batch_size=batch, class_weight=cw, shuffle=True, verbose=0, callbacks=[*stop, EpochLog()]
    )
    hist = pd.DataFrame(h.history)
    hist.insert(0, "epoch", np.arange(1, len(hist) + 1))
    best = stop[0].best_epoch + 1 if stop else len(hist)
    hist["selected"] = hist["epoch"] == best
    return hist, best


def predict(model, x, batch: int = 64) -> np.ndarray:
    """Probabilities in batches, called directly: model.predict traces a new function per model (a warning per CV fold)."""
    out = [np.asarray(model(x[i : i + batch], training=False)).reshape(-1) for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _fold_seed(seed: int, k: int) -> int:
    """Fold k's initial-weights seed in the CV run seeded `seed`: distinct for every (run, fold) pair."""
    return int(np.random.SeedSequence([seed, k, 7]).generate_state(1)[0] % 2**31)


def out_of_fold(folds: list[Fold], feats: np.ndarray, n: int) -> np.ndarray:
    """Each image's probability from the fold head that did not see it (NaN for an image in no fold's held-out part)."""
    oof = np.full(n, np.nan)
    for fold in folds:
        oof[fold.test] = predict(fold.job.head, feats[fold.test])
    return oof


@dataclass
class Fold:
    k: int
    test: np.ndarray  # indices into the images it predicts out of fold
    train: np.ndarray  # indices into the images the baseline fits on (the head's training part and inner validation)
    job: HeadJob  # the fold's head and its data


def setting(p: Params, name: str) -> Backbone:
    """Model `name`'s backbone at its grid's first point: the settings themselves when params give single values."""
    spec = p.backbones[p.models[name].backbone]
    return spec.at(spec.grid()[0])


def cv_folds(
    p: Params, name: str, feats, y, groups, aug_feats: dict[int, np.ndarray], fold_seed: int | None = None, bb: Backbone | None = None
) -> list[Fold]:
    """Grouped, stratified k-fold on cached features, each fold's head built and its data laid out, not yet trained.

    In each fold the head is fitted as in the pipeline: on the fold's training part (plus its augmented copies)
    less an inner grouped validation split holding a fifth of that part, which early stopping (when `patience`
    is set) reads and the fit never sees, as val in the pipeline.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    from brainmri.learn.models import build_head

    bb = bb or setting(p, name)
    seed = p.seed if fold_seed is None else fold_seed
    splitter = StratifiedGroupKFold(n_splits=p.train.cv_folds, shuffle=True, random_state=seed)
    folds = []
    for k, (tr, te) in enumerate(splitter.split(feats, y, groups)):
        inner = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed + k)
        fit_i, val_i = next(inner.split(feats[tr], y[tr], groups[tr]))
        fit_idx, val_idx = tr[fit_i], tr[val_i]
        with_aug = [i for i in fit_idx if i in aug_feats]  # augmented copies of the images it fits on, only
        x_fit = np.concatenate([feats[fit_idx], *(aug_feats[i] for i in with_aug)])
        y_fit = np.concatenate([y[fit_idx], *(np.full(len(aug_feats[i]), y[i]) for i in with_aug)])
        head = build_head(feats.shape[1], bb, p.seed, adapt_on=x_fit, init_seed=_fold_seed(seed, k))
        stream = int(np.random.SeedSequence([seed, k + 1]).generate_state(1)[0])  # its own shuffle/dropout stream
        job = HeadJob(head, x_fit, y_fit, feats[val_idx], y[val_idx], class_weights(y_fit, p.train.class_weight), stream)
        folds.append(Fold(k, te, tr, job))
    return folds


def cv_report(p: Params, name: str, feats, y, folds: list[Fold], results: list[HeadResult], bb: Backbone | None = None) -> dict:
    """Each fold's trained head and a logistic-regression baseline on the same folds, summarised.

    The result's "predictions" hold each image's out-of-fold probability from the head and from the baseline.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    bb = bb or setting(p, name)
    rows, oof = [], {"model": np.full(len(y), np.nan), "baseline": np.full(len(y), np.nan)}
    for fold, res in zip(folds, results, strict=True):
        k, tr, te = fold.k, fold.train, fold.test
        oof["model"][te] = predict(fold.job.head, feats[te])
        m = point(y[te], oof["model"][te], 0.5)
        balanced = None if p.train.class_weight == "none" else "balanced"
        lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, class_weight=balanced)).fit(feats[tr], y[tr])
        oof["baseline"][te] = lr.predict_proba(feats[te])[:, 1]
        b = point(y[te], oof["baseline"][te], 0.5)
        rows.append(
            {
                "fold": k,
                "n_test": int(len(te)),
                "selected_epoch": res.best,
                **{f"model_{m_}": m[m_] for m_ in ("auc", "accuracy", "bce")},
                **{f"baseline_{m_}": b[m_] for m_ in ("auc", "accuracy", "bce")},
            }
        )
        log.info("cv %s fold %d/%d: AUC %.3f (logistic-regression baseline %.3f)", name, k + 1, p.train.cv_folds, m["auc"], b["auc"])
    frame = pd.DataFrame(rows)
    pooled = {who: point(y, oof[who], 0.5) for who in ("model", "baseline")}

    def stats(who: str, metric: str) -> dict:
        col = frame[f"{who}_{metric}"]
        return {
            "mean_of_folds": round(float(col.mean()), 4),  # each fold's figure on its own held-out part, averaged
            "sd_of_folds": round(float(col.std(ddof=1)), 4),
            "pooled_out_of_fold": round(pooled[who][metric], 4),  # one figure over every image's out-of-fold prediction
        }

    return {
        "folds": p.train.cv_folds,
        "selection": (
            f"early stopping (patience {bb.patience}) on an inner grouped validation split of each fold's training part"
            if bb.patience
            else f"{bb.epochs} epochs, no early stopping; an inner grouped validation split of each fold's training part held out"
        ),
        "n_images": int(len(y)),
        "model": {m_: stats("model", m_) for m_ in ("auc", "accuracy", "bce")},
        "baseline_logreg": {m_: stats("baseline", m_) for m_ in ("auc", "accuracy", "bce")},
        "per_fold": frame.round(4).to_dict(orient="records"),
        "predictions": oof,
    }


def train_heads(p: Params, name: str, jobs: list[HeadJob], settings: list[Backbone] | None = None) -> list[HeadResult]:
    """Train heads of model `name` in compiled runs, each at its own grid point's learning rate and epochs (by default
    the grid's first); log each one's end."""
    settings = settings or [setting(p, name)] * len(jobs)
    lrs, epochs = [s.learning_rate for s in settings], [s.epochs for s in settings]
    results = fit_heads(jobs, lrs, epochs, settings[0].patience, p.train.batch_size)
    for r in results:
        last = r.history.iloc[-1]
        log.debug(
            "head of %s: %d epochs, loss %.4f, val_loss %.4f, selected epoch %d",
            name,
            len(r.history),
            last["loss"],
            last["val_loss"],
            r.best,
        )
    return results


def cross_validate(p: Params, name: str, feats, y, groups, aug_feats: dict[int, np.ndarray], fold_seed: int | None = None) -> dict:
    """Grouped, stratified k-fold CV of model `name`'s head on cached features, every fold trained in one compiled run."""
    folds = cv_folds(p, name, feats, y, groups, aug_feats, fold_seed)
    return cv_report(p, name, feats, y, folds, train_heads(p, name, [f.job for f in folds]))


def train(p: Params, name: str) -> dict:
    """Run the stage for model `name`: write the model, its history and train.json; return train.json."""
    from brainmri.learn.models import build_network, save_model

    p.model(name)  # an unknown name stops here, before any work
    start = time.monotonic()
    spec = p.models[name]
    grid = p.backbones[spec.backbone].grid()
    bb = setting(p, name)  # the grid's first point; the chosen one once selection has run
    seed_everything(p.seed)
    layers = list(dict.fromkeys(g["feature_layer"] for g in grid))  # every candidate layer, pooled in one pass
    net = build_network(p, spec.backbone, p.seed, layers=layers)  # fails here, before any work, if weights cannot be had
    rule, selection = candidates(p.train.threshold)[0], None  # with no cross-validation to choose by, the first rule
    log.info("train %s: %s, weights: %s", name, bb.application, net.weights.describe())
    tr, aug, va = data_parts(p, spec.augment)
    y_fit = np.concatenate([tr.y, aug.y])
    cw = class_weights(y_fit, p.train.class_weight)
    fit_args = {"batch": p.train.batch_size, "cw": cw, "patience": bb.patience}
    cv = oof = None
    if net.end_to_end:
        x_val = load_batch(va.paths, bb.input_size)
        history, best = fit(
            net.full,
            load_batch(tr.paths + aug.paths, bb.input_size),
            y_fit,
            (x_val, va.y),
            bb.learning_rate,
            bb.epochs,
            label=f"train {name}",
            **fit_args,
        )
        x_tr = load_batch(tr.paths, bb.input_size)

        def scores():
            return predict(net.full, x_tr), predict(net.full, x_val)
    else:
        f_tr = features.extract(p, spec.backbone, net.extractor, tr.paths, f"{spec.backbone} train")
        f_aug = features.extract(p, spec.backbone, net.extractor, aug.paths, f"{spec.backbone} augmented")
        f_val = features.extract(p, spec.backbone, net.extractor, va.paths, f"{spec.backbone} val")
        split_tr, split_val = net.split(f_tr), net.split(f_val)  # each candidate layer's features
        history, best, cv, oof, bb, rule, selection = head_and_cv(p, name, net, tr, aug, va, f_tr, f_aug, f_val)
        f_tr, f_val = split_tr[bb.feature_layer], split_val[bb.feature_layer]  # the chosen layer's
        history["phase"] = "head"
        if bb.fine_tune_layers and bb.fine_tune_epochs:
            history = pd.concat([history, fine_tune(net, tr, aug, va, bb, y_fit, fit_args, name, len(history))])
            x_tr, x_va = load_batch(tr.paths, bb.input_size), load_batch(va.paths, bb.input_size)

            def scores():
                return predict(net.full, x_tr), predict(net.full, x_va)
        else:

            def scores():
                return predict(net.head, f_tr), predict(net.head, f_val)

    held_out, fitted_on = (oof, "out-of-fold CV predictions over train+val") if oof is not None else ((va.y, scores()[1]), "val")
    cal = calibrate(p, net.full, held_out, fitted_on)
    per_image = cv.pop("_per_image") if cv else pd.DataFrame(columns=["image", "group", "label", "fold"])
    if oof is not None:  # what the ensemble stage chooses members on: each image's out-of-fold probability, raw and calibrated
        per_image = per_image.assign(probability=np.round(oof[1], 6), calibrated=np.round(calibration.apply(oof[1], cal["a"], cal["c"]), 6))
    else:
        per_image = per_image.assign(probability=[], calibrated=[])
    p_train, p_val = scores()  # the saved model's own outputs, calibration folded in: the threshold is set on these
    if rule == "youden":
        threshold = youden_threshold(va.y, p_val)
    else:  # a fixed threshold is on the raw outputs' scale: mapped with them, it gives the labels it gave before
        threshold = float(calibration.apply(float(rule), cal["a"], cal["c"]))
    out = {
        "model": name,
        "backbone": spec.backbone,
        "application": bb.application,
        "augment": spec.augment,
        "weights": {
            "kind": net.weights.kind,
            "path": net.weights.path,
            "sha256": net.weights.sha256,
            "origin": net.weights.origin,
            "description": net.weights.describe(),
        },
        "n_train": len(tr.paths),
        "n_augmented": len(aug.paths),
        "n_val": len(va.paths),
        "class_weight": cw,
        "epochs_run": int(len(history)),
        "selected_epoch": int(best),
        "threshold": round(threshold, 6),
        "threshold_rule": rule,
        "threshold_rule_chosen_by": (
            "pooled out-of-fold balanced accuracy over train+val (selection.threshold_rules)"
            if selection and "threshold_rules" in selection
            else "train.threshold's first rule: this model has no cross-validation to choose by"
            if len(candidates(p.train.threshold)) > 1
            else "params (one rule)"
        ),
        "settings": {k: getattr(bb, k) for k in ("feature_layer", "learning_rate", "dropout", "epochs")},
        "selection": selection or {"protocol": "single values in params: nothing chosen by measurement"},
        "train": _summary(tr.y, p_train, threshold),
        "val": _summary(va.y, p_val, threshold),
        "calibration": cal,
        "cv": cv,  # of the heads before calibration (AUC does not change under a monotone map; BCE does)
    }  # no timings here: evaluate and export depend on this file, and it must only change when the model does
    out = jsonable(out)
    folder = p.model_file("models", name, "model").parent
    with atomic_dir(folder) as tmp:
        save_model(net.full, tmp / p.paths.files.model)
        write_csv(tmp / p.paths.files.history, history)
        write_json(tmp / p.paths.files.train_metrics, out)
        write_csv(tmp / p.paths.files.cv_predictions, per_image)
        log_live(tmp / p.paths.files.live, history, out)
    summary(
        f"train {name}",
        f"selected epoch {best} of {len(history)}; val accuracy {out['val']['accuracy']:.3f}, "
        f"val AUC {out['val']['auc']:.3f}; threshold {threshold:.3f}"
        + (
            f"; CV AUC mean of folds {cv['model']['auc']['mean_of_folds']:.3f} +/- {cv['model']['auc']['sd_of_folds']:.3f}, "
            f"pooled out of fold {cv['model']['auc']['pooled_out_of_fold']:.3f}"
            if cv
            else ""
        )
        + f"; {time.monotonic() - start:.0f} s",
    )
    return out


def calibrate(p: Params, model, held_out: tuple[np.ndarray, np.ndarray], fitted_on: str) -> dict:
    """Fit train.calibration on held-out (labels, probabilities), fold it into `model`'s output layer, and describe it:
    the map, what it was fitted on, and ECE (10 equal-mass bins) and log loss there before and after, with the
    reliability table of each. The after figures are on the data the map was fitted on: one or two parameters, so
    optimistic by little; evaluate gives the test figure."""
    from sklearn.metrics import log_loss

    y, prob = held_out
    a, c = calibration.fit(prob, y, p.train.calibration)
    note = ""
    if a <= 0:  # a map that reverses the ranking is no calibration: the model is worse than chance on held-out data
        a, c, note = 1.0, 0.0, "not applied: the fitted map reversed the ranking"
    calibration.fold_into(model, a, c)
    after = calibration.apply(prob, a, c)
    out = {
        "method": p.train.calibration,
        "a": float(a),  # calibrated p = sigmoid(a * logit(p) + c); temperature T = 1 / a; unrounded, so it can be undone
        "c": float(c),
        "fitted_on": f"{fitted_on} ({len(y)} images)",
        "ece_before": round(calibration.ece(y, prob), 4),
        "ece_after": round(calibration.ece(y, after), 4),
        "bce_before": round(float(log_loss(y, np.clip(prob, 1e-7, 1 - 1e-7), labels=[0, 1])), 4),
        "bce_after": round(float(log_loss(y, np.clip(after, 1e-7, 1 - 1e-7), labels=[0, 1])), 4),
        "reliability_before": calibration.reliability(y, prob).to_dict(orient="list"),
        "reliability_after": calibration.reliability(y, after).to_dict(orient="list"),
    }
    if note:
        out["note"] = note
    log.info(
        "calibration (%s on %s): ECE %.3f -> %.3f, log loss %.3f -> %.3f",
        out["method"], out["fitted_on"], out["ece_before"], out["ece_after"], out["bce_before"], out["bce_after"],
    )  # fmt: skip
    return out


def log_live(folder: Path, history: pd.DataFrame, out: dict) -> None:
    """DVCLive's files for DVC: each epoch's curves (plots/metrics/*.tsv) and the model's numbers (metrics.json)."""
    from dvclive import Live

    with Live(str(folder), save_dvc_exp=False, dvcyaml=None, report=None) as live:  # dvc.yaml declares the files itself
        for _, row in history.iterrows():
            for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
                if key in row and pd.notna(row[key]):
                    live.log_metric(key, float(row[key]), plot=True)
            live.next_step()
        numbers = {
            "val_auc": out["val"]["auc"],
            "val_accuracy": out["val"]["accuracy"],
            "threshold": out["threshold"],
            "selected_epoch": out["selected_epoch"],
            **{f"cv_auc_{k}": v for k, v in ((out.get("cv") or {}).get("model") or {}).get("auc", {}).items()},
            "calibration_ece_before": out["calibration"]["ece_before"],
            "calibration_ece_after": out["calibration"]["ece_after"],
        }
        live.summary = {k: v for k, v in numbers.items() if isinstance(v, (int, float)) and v == v}  # NaN (one class) left out


def _summary(y, prob, threshold) -> dict:
    m = point(y, prob, threshold)
    return {k: round(m[k], 4) for k in ("accuracy", "bce", "auc")}


def head_and_cv(p: Params, name: str, net, tr: Part, aug: Part, va: Part, f_tr, f_aug, f_val):
    """The model's head on cached features, attached to `net`, and (unless fine-tuning follows, or `cv_folds` is 0)
    the cross-validation of the same head over train+val.

    When params give lists (a grid: backbone feature_layer, learning_rate, dropout, epochs; train.threshold), every
    grid point is cross-validated first, on train+val only, and the best pooled out-of-fold AUC chooses the settings
    (`select`); the threshold rule is chosen on the chosen point's folds. The head and the CV runs of other seeds then
    train at the chosen point. With one point, all of it trains in one compiled run.
    Returns the head's history, its selected epoch, the CV summary, (labels, out-of-fold probabilities), the chosen
    backbone settings, the chosen threshold rule and the selection record."""

    from brainmri.learn.models import build_head, cut

    key = p.models[name].backbone
    spec = p.backbones[key]
    grid, rules = spec.grid(), candidates(p.train.threshold)
    cv_on = bool(p.train.cv_folds) and not (spec.fine_tune_layers and spec.fine_tune_epochs)  # a grid implies it (config)
    by_layer = {k: net.split(f) for k, f in (("train", f_tr), ("aug", f_aug), ("val", f_val))}
    frame = pd.concat([tr.frame, va.frame], ignore_index=True)
    y_all, groups = np.concatenate([tr.y, va.y]), frame["group"].to_numpy()
    by_image = {img: i for i, img in enumerate(frame["image"])}

    def cv_data(layer: str):
        """train+val features at `layer`, and each image's augmented copies (by its row)."""
        copies: dict[int, list] = {}
        if len(aug.paths):  # a noaug model's empty part has no columns
            for vec, src in zip(by_layer["aug"][layer], aug.frame["source_image"], strict=True):
                copies.setdefault(by_image[src], []).append(vec)
        return np.concatenate([by_layer["train"][layer], by_layer["val"][layer]]), {i: np.stack(v) for i, v in copies.items()}

    chosen, folds, trained, selection = grid[0], [], [], None
    if cv_on and len(grid) > 1:
        chosen, folds, trained, selection = select(p, name, grid, cv_data, y_all, groups)
    bb = spec.at(chosen)
    if len(net.layers) > 1:
        cut(net, p, key, [bb.feature_layer], p.seed, bb)
    layer = bb.feature_layer
    f_fit, y_fit = np.concatenate([by_layer["train"][layer], by_layer["aug"][layer]]), np.concatenate([tr.y, aug.y])
    net.attach(build_head(f_fit.shape[1], bb, p.seed, adapt_on=f_fit))  # its initial weights from p.seed alone
    head = HeadJob(net.head, f_fit, y_fit, by_layer["val"][layer], va.y, class_weights(y_fit, p.train.class_weight), p.seed)
    reruns = []
    if cv_on:
        feats, aug_arrays = cv_data(layer)
        if not folds:
            folds = cv_folds(p, name, feats, y_all, groups, aug_arrays, bb=bb)
        reruns = [cv_folds(p, name, feats, y_all, groups, aug_arrays, fold_seed=s, bb=bb) for s in rerun_seeds(p)]
    jobs = [head, *(f.job for f in folds if not trained), *(f.job for run in reruns for f in run)]
    results = train_heads(p, name, jobs, [bb] * len(jobs))
    history, best = results[0].history, results[0].best
    for row in history.itertuples():
        log.info(
            "train %s epoch %d/%d: loss %.4f, val_loss %.4f, val_accuracy %.3f",
            name,
            row.epoch,
            bb.epochs,
            row.loss,
            row.val_loss,
            row.val_accuracy,
        )
    if not folds:
        return history, best, None, None, bb, rules[0], selection
    trained = trained or results[1 : 1 + len(folds)]
    cv = cv_report(p, name, feats, y_all, folds, trained, bb)
    oof = (y_all, cv.pop("predictions")["model"])  # per-image detail: calibration fits on it; train.json keeps the summary
    fold_of = np.full(len(y_all), -1)
    for fold in folds:
        fold_of[fold.test] = fold.k
    cv["_per_image"] = frame[["image", "group", "label"]].assign(fold=fold_of)  # cv_predictions.csv; popped before train.json
    cv["seed_spread"] = seed_spread(p, feats, y_all, cv, reruns)
    rule = rules[0]
    if len(rules) > 1:
        rule, selection = choose_rule(rules, folds, oof, selection or {})
    return history, best, cv, oof, bb, rule, selection


def select(p: Params, name: str, grid: list[dict], cv_data, y, groups):
    """Cross-validate every grid point on train+val (grouped, stratified, the pipeline's folds and seed) and choose
    the one with the best pooled out-of-fold AUC; ties go to the earlier point. Test images are never read.
    Returns the chosen point, its folds and their trained heads, and the record of every point's scores."""
    from sklearn.metrics import log_loss, roc_auc_score

    spec = p.backbones[p.models[name].backbone]
    points = [spec.at(g) for g in grid]
    data = {layer: cv_data(layer) for layer in dict.fromkeys(g["feature_layer"] for g in grid)}
    runs = [cv_folds(p, name, data[b.feature_layer][0], y, groups, data[b.feature_layer][1], bb=b) for b in points]
    jobs = [f.job for run in runs for f in run]
    results = iter(train_heads(p, name, jobs, [b for b, run in zip(points, runs, strict=True) for _ in run]))
    trained = [[next(results) for _ in run] for run in runs]
    scores = []
    for g, run in zip(grid, runs, strict=True):
        feats = data[g["feature_layer"]][0]
        oof = out_of_fold(run, feats, len(y))
        two = len(np.unique(y)) > 1
        auc = float(roc_auc_score(y, oof)) if two else float("nan")
        bce = float(log_loss(y, np.clip(oof, 1e-7, 1 - 1e-7), labels=[0, 1]))
        scores.append({**g, "cv_auc_pooled_out_of_fold": round(auc, 4), "cv_bce_pooled_out_of_fold": round(bce, 4)})
        log.info("select %s: %s -> pooled CV AUC %.3f, log loss %.3f", name, _describe(g), auc, bce)
    best = max(range(len(grid)), key=lambda i: (np.nan_to_num(scores[i]["cv_auc_pooled_out_of_fold"], nan=-1.0), -i))
    record = {
        "protocol": (
            f"every grid point cross-validated on train+val only ({len(y)} images; grouped, stratified "
            f"{p.train.cv_folds}-fold, seed {p.seed}; each fold's head fitted as the final one); test never read"
        ),
        "criterion": "pooled out-of-fold AUC; ties go to the earlier grid point",
        "points": scores,
        "chosen": grid[best],
    }
    log.info("select %s: chose %s (pooled CV AUC %.3f)", name, _describe(grid[best]), scores[best]["cv_auc_pooled_out_of_fold"])
    return grid[best], runs[best], trained[best], record


def _describe(g: dict) -> str:
    return ", ".join(f"{k} {v if v != '' else '(whole base)'}" for k, v in g.items())


def choose_rule(rules: list, folds: list[Fold], oof: tuple[np.ndarray, np.ndarray], record: dict) -> tuple:
    """The threshold rule with the best pooled out-of-fold balanced accuracy, each fold's threshold set by the rule
    on that fold's inner validation part (as val sets the final model's), then applied to the fold's held-out part.
    Ties go to the earlier rule."""
    from sklearn.metrics import balanced_accuracy_score

    y, prob = oof
    scores = []
    for rule in rules:
        labels = np.zeros(len(y), int)
        for fold in folds:
            inner = predict(fold.job.head, fold.job.x_val)
            t = youden_threshold(fold.job.y_val, inner) if rule == "youden" else float(rule)
            labels[fold.test] = prob[fold.test] >= t
        scores.append({"rule": rule, "cv_balanced_accuracy_pooled_out_of_fold": round(float(balanced_accuracy_score(y, labels)), 4)})
    best = max(range(len(rules)), key=lambda i: (scores[i]["cv_balanced_accuracy_pooled_out_of_fold"], -i))
    log.info("select threshold rule: %s", ", ".join(f"{s['rule']} {s['cv_balanced_accuracy_pooled_out_of_fold']:.3f}" for s in scores))
    return rules[best], {**record, "threshold_rules": scores, "threshold_rule": rules[best]}


def rerun_seeds(p: Params) -> list[int]:
    """The seeds of the extra cross-validation runs (train.cv_seeds - 1 of them): other fold assignments, initial
    weights, shuffles and dropout masks, on the same images."""
    return [p.seed + 1000 * r for r in range(1, p.train.cv_seeds)]


def seed_spread(p: Params, feats, y, cv: dict, reruns: list[list[Fold]]) -> dict:
    """Pooled out-of-fold AUC of each seed's whole cross-validation run (the first is `cv`'s own): how much of a
    figure is the luck of the seed, to read beside the data's bootstrap intervals."""
    from sklearn.metrics import roc_auc_score

    aucs = [cv["model"]["auc"]["pooled_out_of_fold"]]
    for run in reruns:
        oof = out_of_fold(run, feats, len(y))
        aucs.append(round(float(roc_auc_score(y, oof)), 4) if len(np.unique(y)) > 1 else float("nan"))
    return {
        "seeds": [p.seed, *rerun_seeds(p)],
        "pooled_out_of_fold_auc": aucs,
        "sd": round(float(np.std(aucs, ddof=1)), 4) if len(aucs) > 1 else None,
        "range": [min(aucs), max(aucs)],
        # the first seed's figure is the one the grid was chosen on (biased upwards when there was a grid); the
        # other seeds' runs were not chosen on, so their mean is the fairer CV estimate of the chosen settings
        "mean_of_other_seeds": round(float(np.mean(aucs[1:])), 4) if len(aucs) > 1 else None,
    }


def fine_tune(net, tr: Part, aug: Part, va: Part, bb, y_fit, fit_args, name: str, offset: int) -> pd.DataFrame:
    """Second phase: unfreeze the top `fine_tune_layers` layers of the base and train end to end at a low rate."""
    import keras

    net.base.trainable = True
    for layer in net.base.layers[: -bb.fine_tune_layers]:
        layer.trainable = False
    for layer in net.base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    x = load_batch(tr.paths + aug.paths, bb.input_size)
    val = (load_batch(va.paths, bb.input_size), va.y)
    hist, _ = fit(net.full, x, y_fit, val, bb.fine_tune_learning_rate, bb.fine_tune_epochs, label=f"fine-tune {name}", **fit_args)
    hist["epoch"] += offset
    hist["phase"] = "fine_tune"
    return hist
