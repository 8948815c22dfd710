"""Cross-validation of a head on cached features: grouped, stratified folds, out-of-fold predictions, the
logistic-regression baseline on the same folds, and the spread over whole CV runs with other seeds.

Two classes: probabilities (n,) of the positive class, and AUC, accuracy at 0.5 and binary cross-entropy. N classes:
probabilities (n, K) in label_names order, and under the same keys the macro one-vs-rest AUC, arg-max accuracy and
multi-class log loss (brainmri.learn.multiclass; notes/nclass_contract.md items 2 and 5)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from brainmri.config import Backbone, Params
from brainmri.core.progress import log
from brainmri.learn import multiclass
from brainmri.learn.fitting import class_weights, predict, setting, train_heads
from brainmri.learn.headfit import HeadJob, HeadResult, Rows, scaling, standardise
from brainmri.stats.metrics import point

METRICS = ("auc", "accuracy", "bce")
N_CLASS_METRICS = "for N classes: auc is the macro one-vs-rest AUC, accuracy the arg-max's, bce the multi-class log loss"


def figures(p: Params, y: np.ndarray, prob: np.ndarray) -> dict:
    """METRICS of probabilities `prob` of labels `y`: brainmri.stats.metrics.point at 0.5 for two classes (as
    before N classes), brainmri.learn.multiclass.point (macro one-vs-rest AUC, arg-max) for more."""
    return point(y, prob, 0.5) if p.ingest.binary else multiclass.point(y, prob)


def _empty(p: Params, n: int) -> np.ndarray:
    """NaN probabilities for `n` images: (n,) for two classes, (n, K) for K."""
    return np.full(n, np.nan) if p.ingest.binary else np.full((n, len(p.ingest.classes)), np.nan)


@dataclass
class Fold:
    k: int
    test: np.ndarray  # indices into the images it predicts out of fold
    train: np.ndarray  # indices into the images the baseline fits on (the head's training part and inner validation)
    job: HeadJob  # the fold's head and its data


def _fold_seed(seed: int, k: int) -> int:
    """Fold k's initial-weights seed in the CV run seeded `seed`: distinct for every (run, fold) pair."""
    return int(np.random.SeedSequence([seed, k, 7]).generate_state(1)[0] % 2**31)


def cv_folds(
    p: Params, name: str, feats, y, groups, aug_feats: dict[int, np.ndarray], fold_seed: int | None = None, bb: Backbone | None = None
) -> list[Fold]:
    """Grouped, stratified k-fold on cached features, each fold's head built and its data laid out, not yet trained.

    In each fold the head is fitted as in the pipeline: on the fold's training part (plus its augmented copies)
    less an inner grouped validation split holding a fifth of that part, which early stopping (when `patience`
    is set) reads and the fit never sees, as val in the pipeline. A linear head has no epochs to choose, so it fits on
    the whole training part (and its copies), as the logistic-regression baseline does.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    bb = bb or setting(p, name)
    seed = p.seed if fold_seed is None else fold_seed
    splitter = StratifiedGroupKFold(n_splits=p.train.cv_folds, shuffle=True, random_state=seed)
    folds = []
    for k, (tr, te) in enumerate(splitter.split(feats, y, groups)):
        inner = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=seed + k)
        fit_i, val_i = next(inner.split(feats[tr], y[tr], groups[tr]))
        fit_idx = tr if bb.dense == 0 else tr[fit_i]
        folds.append(Fold(k, te, tr, _fold_job(p, bb, feats, y, aug_feats, fit_idx, tr[val_i], seed, k)))
    return folds


def _fold_job(p: Params, bb: Backbone, feats, y, aug_feats, fit_idx, val_idx, seed: int, k: int) -> HeadJob:
    """Fold k's head, built on the rows it fits on (and their augmented copies), with its own random stream."""
    from brainmri.learn.models import build_head

    with_aug = [i for i in fit_idx if i in aug_feats]  # augmented copies of the images it fits on, only
    x_fit = Rows([(feats, fit_idx), *((aug_feats[i], np.arange(len(aug_feats[i]))) for i in with_aug)])  # read when it trains
    y_fit = np.concatenate([y[fit_idx], *(np.full(len(aug_feats[i]), y[i]) for i in with_aug)])
    k_classes = len(p.ingest.classes)
    head = build_head(feats.shape[1], bb, p.seed, adapt_on=np.asarray(x_fit), init_seed=_fold_seed(seed, k), n_classes=k_classes)
    stream = int(np.random.SeedSequence([seed, k + 1]).generate_state(1)[0])  # its own shuffle/dropout stream
    cw = class_weights(y_fit, p.train.class_weight, k_classes)
    return HeadJob(head, x_fit, y_fit, feats[val_idx], y[val_idx], cw, stream)


def out_of_fold(folds: list[Fold], feats: np.ndarray, n: int) -> np.ndarray:
    """Each image's probability from the fold head that did not see it (NaN for an image in no fold's held-out part):
    (n,) from two-class heads, (n, K) from K-class heads."""
    preds = [predict(fold.job.head, feats[fold.test]) for fold in folds]
    oof = np.full((n, *preds[0].shape[1:]) if preds else n, np.nan)
    for fold, pred in zip(folds, preds, strict=True):
        oof[fold.test] = pred
    return oof


def fold_of(folds: list[Fold], n: int) -> np.ndarray:
    """Each image's fold, the one that holds it out (-1 for none)."""
    out = np.full(n, -1)
    for fold in folds:
        out[fold.test] = fold.k
    return out


def cv_report(p: Params, name: str, feats, y, folds: list[Fold], results: list[HeadResult], bb: Backbone | None = None) -> dict:
    """Each fold's trained head and a logistic-regression baseline on the same folds, summarised.

    The result's "predictions" hold each image's out-of-fold probability from the head and from the baseline.
    """
    bb = bb or setting(p, name)
    oof = {"model": _empty(p, len(y)), "baseline": _empty(p, len(y))}
    frame = pd.DataFrame([_fold_scores(p, name, feats, y, fold, res, oof) for fold, res in zip(folds, results, strict=True)])
    pooled = {who: figures(p, y, oof[who]) for who in ("model", "baseline")}
    extra = {} if p.ingest.binary else {"metrics": N_CLASS_METRICS, "classes": list(p.ingest.label_names)}
    return {
        **extra,
        "folds": p.train.cv_folds,
        "selection": _protocol(bb),
        "n_images": int(len(y)),
        "model": {m: _stats(frame, pooled, "model", m) for m in METRICS},
        "baseline_logreg": {m: _stats(frame, pooled, "baseline", m) for m in METRICS},
        "per_fold": frame.round(4).to_dict(orient="records"),
        "predictions": oof,
    }


def _protocol(bb: Backbone) -> str:
    """How each fold's head was fitted, in words."""
    if bb.dense == 0:
        return f"a linear head (logistic regression, C {bb.linear_c}) fitted to convergence on each fold's whole training part"
    if bb.patience:
        return f"early stopping (patience {bb.patience}) on an inner grouped validation split of each fold's training part"
    return f"{bb.epochs} epochs, no early stopping; an inner grouped validation split of each fold's training part held out"


def _fold_scores(p: Params, name: str, feats, y, fold: Fold, res: HeadResult, oof: dict) -> dict:
    """One fold's head and baseline on its held-out part: their probabilities into `oof`, their figures as a row."""
    k, tr, te = fold.k, fold.train, fold.test
    oof["model"][te] = predict(fold.job.head, feats[te])
    m = figures(p, y[te], oof["model"][te])
    oof["baseline"][te] = _baseline(p, feats[tr], y[tr], feats[te])
    b = figures(p, y[te], oof["baseline"][te])
    log.info("cv %s fold %d/%d: AUC %.3f (logistic-regression baseline %.3f)", name, k + 1, p.train.cv_folds, m["auc"], b["auc"])
    return {
        "fold": k,
        "n_test": int(len(te)),
        "selected_epoch": res.best,
        **{f"model_{m_}": m[m_] for m_ in METRICS},
        **{f"baseline_{m_}": b[m_] for m_ in METRICS},
    }


def _baseline(p: Params, x_fit, y_fit, x_test) -> np.ndarray:
    """The logistic-regression baseline's probabilities on `x_test`: scikit-learn's defaults (C = 1, L-BFGS) on
    `x_fit` standardised per feature, in float32 as a head's Normalization layer computes it (headfit.standardise),
    so that a linear head at C = 1 fitted on the same rows is this very model. P(positive) for two classes; for K, the
    multinomial regression's (n, K), a class absent from `y_fit` at probability 0."""
    from sklearn.linear_model import LogisticRegression

    stats = scaling(x_fit)
    balanced = None if p.train.class_weight == "none" else "balanced"
    lr = LogisticRegression(max_iter=5000, class_weight=balanced).fit(standardise(x_fit, *stats), y_fit)
    prob = lr.predict_proba(standardise(x_test, *stats))
    if p.ingest.binary:
        return prob[:, 1]
    out = np.zeros((len(x_test), len(p.ingest.classes)))
    out[:, lr.classes_] = prob
    return out


def _stats(frame: pd.DataFrame, pooled: dict, who: str, metric: str) -> dict:
    col = frame[f"{who}_{metric}"]
    return {
        "mean_of_folds": round(float(col.mean()), 4),  # each fold's figure on its own held-out part, averaged
        "sd_of_folds": round(float(col.std(ddof=1)), 4),
        "pooled_out_of_fold": round(pooled[who][metric], 4),  # one figure over every image's out-of-fold prediction
    }


def cross_validate(p: Params, name: str, feats, y, groups, aug_feats: dict[int, np.ndarray], fold_seed: int | None = None) -> dict:
    """Grouped, stratified k-fold CV of model `name`'s head on cached features, every fold trained in one compiled run."""
    folds = cv_folds(p, name, feats, y, groups, aug_feats, fold_seed)
    return cv_report(p, name, feats, y, folds, train_heads(p, name, [f.job for f in folds]))


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
        if not p.ingest.binary:  # the macro one-vs-rest AUC, as cv's own figure
            aucs.append(round(multiclass.macro_auc(y, oof), 4))
            continue
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
