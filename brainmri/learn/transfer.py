"""A transfer model: a head on the frozen base's cached features, chosen by cross-validation when params give a grid,
cross-validated over train+val, and (when params ask) fine-tuned end to end afterwards."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from brainmri.config import COPIES, Backbone, Params, candidates
from brainmri.core.progress import log
from brainmri.intake.parts import Part
from brainmri.intake.preprocess import load_batch
from brainmri.learn import features
from brainmri.learn.crossval import Fold, cv_folds, cv_report, fold_of, rerun_seeds, seed_spread
from brainmri.learn.fitting import Trained, class_weights, fine_tune, first_rule, predict, train_heads
from brainmri.learn.headfit import HeadJob, HeadResult
from brainmri.learn.selection import choose_rule, select


def train_transfer(p: Params, name: str, net, tr: Part, aug: Part, va: Part, y_fit, fit_args: dict) -> Trained:
    """Features of every image (cached), the head and its CV (`head_and_cv`), then fine-tuning if params ask for it."""
    key = p.models[name].backbone
    parts = {f"{key} train": tr.paths, f"{key} augmented": aug.paths, f"{key} val": va.paths}
    f_tr, f_aug, f_val = features.extract_parts(p, key, net.extractor, parts).values()
    split_tr, split_val = net.split(f_tr), net.split(f_val)  # each candidate layer's features
    out = head_and_cv(p, name, net, tr, aug, va, f_tr, f_aug, f_val)
    bb, history = out.bb, out.history
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

    return replace(out, history=history, scores=scores)


class TrainVal:
    """The features of train, its augmented copies and val, at each candidate layer; and train+val, the images
    cross-validation runs over, with their labels and duplicate groups."""

    def __init__(self, net, tr: Part, aug: Part, va: Part, f_tr, f_aug, f_val):
        self.by_layer = {k: net.split(f) for k, f in (("train", f_tr), ("aug", f_aug), ("val", f_val))}
        self.labels = {"train": tr.y, "aug": aug.y, "val": va.y}
        self.aug = aug
        self.frame = pd.concat([tr.frame, va.frame], ignore_index=True)
        self.y, self.groups = np.concatenate([tr.y, va.y]), self.frame["group"].to_numpy()
        self.by_image = {img: i for i, img in enumerate(self.frame["image"])}

    def at(self, layer: str, with_copies: bool = True) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """train+val features at `layer`, and each image's augmented copies (by its row; none `with_copies` false)."""
        copies: dict[int, list] = {}
        if len(self.aug.paths) and with_copies:  # a noaug model's empty part has no columns
            for vec, src in zip(self.by_layer["aug"][layer], self.aug.frame["source_image"], strict=True):
                copies.setdefault(self.by_image[src], []).append(vec)
        return np.concatenate([self.by_layer["train"][layer], self.by_layer["val"][layer]]), {i: np.stack(v) for i, v in copies.items()}


def head_and_cv(p: Params, name: str, net, tr: Part, aug: Part, va: Part, f_tr, f_aug, f_val) -> Trained:
    """The model's head on cached features, attached to `net`, and (unless fine-tuning follows, or `cv_folds` is 0)
    the cross-validation of the same head over train+val.

    When params give lists (a grid: backbone feature_layer, dense, l2, linear_c, learning_rate, dropout, epochs; the
    model's augment; train.threshold), every grid point is cross-validated first, on train+val only, and the best
    pooled out-of-fold AUC chooses the settings (`select`); the threshold rule is chosen on the chosen point's folds.
    The head and the CV runs of other seeds then train at the chosen point. With one point, all of it trains in one
    compiled run."""
    spec = p.backbones[p.models[name].backbone]
    grid = p.grid(name)
    cv_on = bool(p.train.cv_folds) and not (spec.fine_tune_layers and spec.fine_tune_epochs)  # a grid implies it (config)
    data = TrainVal(net, tr, aug, va, f_tr, f_aug, f_val)
    chosen, folds, trained, selection = grid[0], [], [], None
    if cv_on and len(grid) > 1:
        chosen, folds, trained, selection = select(p, name, grid, data.at, data.y, data.groups)
    bb, copies = spec.at(chosen), chosen.get(COPIES, True)
    head = _final_head(p, name, net, bb, data, copies)
    feats, reruns = None, []
    if cv_on:
        feats, aug_arrays = data.at(bb.feature_layer, copies)
        folds = folds or cv_folds(p, name, feats, data.y, data.groups, aug_arrays, bb=bb)
        reruns = [cv_folds(p, name, feats, data.y, data.groups, aug_arrays, fold_seed=s, bb=bb) for s in rerun_seeds(p)]
    jobs = [head, *(f.job for f in folds if not trained), *(f.job for run in reruns for f in run)]
    results = train_heads(p, name, jobs, [bb] * len(jobs))
    _log_epochs(name, bb, results[0].history)
    out = Trained(results[0].history, results[0].best, bb, first_rule(p), selection, copies=copies)
    if not folds:
        return out
    return _with_cv(p, name, out, data, feats, folds, trained or results[1 : 1 + len(folds)], reruns)


def _final_head(p: Params, name: str, net, bb: Backbone, data: TrainVal, copies: bool) -> HeadJob:
    """The final head at settings `bb`, on the chosen layer's train features (and augmented ones, `copies` true),
    attached to `net`."""
    from brainmri.learn.models import build_head, cut

    if len(net.layers) > 1:
        cut(net, p, p.models[name].backbone, [bb.feature_layer], p.seed, bb)
    layer, by_layer, labels = bb.feature_layer, data.by_layer, data.labels
    parts = ("train", "aug") if copies else ("train",)
    f_fit, y_fit = np.concatenate([by_layer[k][layer] for k in parts]), np.concatenate([labels[k] for k in parts])
    # its initial weights from p.seed alone
    net.attach(build_head(f_fit.shape[1], bb, p.seed, adapt_on=f_fit, n_classes=len(p.ingest.classes)))
    cw = class_weights(y_fit, p.train.class_weight, len(p.ingest.classes))
    return HeadJob(net.head, f_fit, y_fit, by_layer["val"][layer], labels["val"], cw, p.seed)


def _log_epochs(name: str, bb: Backbone, history: pd.DataFrame) -> None:
    if bb.dense == 0:  # no epochs: one fit to convergence
        row = history.iloc[-1]
        log.info("train %s: linear head (C %g) fitted to convergence: loss %.4f, val_loss %.4f, val_accuracy %.3f", name,
                 bb.linear_c, row.loss, row.val_loss, row.val_accuracy)  # fmt: skip
        return
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


def _with_cv(p: Params, name: str, out: Trained, data: TrainVal, feats, folds: list[Fold], trained: list[HeadResult], reruns) -> Trained:
    """`out` with its cross-validation: the CV summary and seed spread, the out-of-fold predictions, each image's fold,
    and the threshold rule chosen on the folds when params list several (two classes only). N classes: oof holds (n, K)
    probabilities."""
    cv = cv_report(p, name, feats, data.y, folds, trained, out.bb)
    oof = (data.y, cv.pop("predictions")["model"])  # per-image detail: calibration fits on it; train.json keeps the summary
    fold = fold_of(folds, len(data.y))
    per_image = data.frame[["image", "group", "label"]].assign(fold=fold)  # cv_predictions.csv
    cv["seed_spread"] = seed_spread(p, feats, data.y, cv, reruns)
    rules, rule, selection = candidates(p.train.threshold), out.rule, out.selection
    if len(rules) > 1 and p.ingest.binary:  # N classes decide by arg-max: no threshold rule to choose
        rule, selection = choose_rule(rules, fold, oof, selection or {})
    return replace(out, cv=cv, oof=oof, per_image=per_image, rule=rule, selection=selection)
