"""The ensemble chosen on cross-validation: the members' out-of-fold predictions over train+val (cv_predictions.csv,
as train writes it), each member's calibration map, the greedy selection's weights, and the cross-fitted comparison
with the best single member. Never test."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from brainmri.config import Params
from brainmri.learn import calibration
from brainmri.stats.ensemble_selection import EnsembleError, greedy_weights
from brainmri.stats.metrics import _auc, paired_auc_differences

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


@dataclass(frozen=True)
class Selection:
    """The ensemble chosen on the members' out-of-fold predictions, and how it compares with the best single member."""

    members: list[str]
    y: np.ndarray  # the out-of-fold images' labels (1: positive class)
    probs: np.ndarray  # each member's calibrated out-of-fold probabilities, one column each
    weights: np.ndarray  # the shipped ensemble's, chosen on every train+val image's out-of-fold prediction
    single_auc: list[float]  # each member's pooled out-of-fold AUC
    ensemble_cv: np.ndarray  # the cross-fitted ensemble's out-of-fold probabilities
    single_cv: np.ndarray  # the cross-fitted best single member's
    per_fold: list  # what each fold's cross-fitting chose
    difference: dict  # the paired AUC difference, ensemble minus best single member, cross-fitted

    @property
    def best(self) -> int:
        return int(np.nanargmax(self.single_auc))

    @property
    def chosen(self) -> list[int]:
        return [i for i in range(len(self.members)) if self.weights[i] > 0]

    @property
    def kept(self) -> bool:
        return bool(self.difference["ci_low"] > 0)

    def description(self) -> str:
        return " + ".join(f"{self.weights[i]:.2f} x {self.members[i]}" for i in self.chosen)

    def mixed(self, on: dict[int, np.ndarray]) -> np.ndarray:
        """The chosen members' weighted mean of probabilities `on` (member index -> probabilities)."""
        return sum(self.weights[i] * on[i] for i in self.chosen)


def select_members(p: Params, members: list[str]) -> Selection:
    """Members and weights chosen on the members' out-of-fold CV predictions (ensemble.max_steps rounds), and the
    cross-fitted paired AUC difference against the best single member (train.bootstrap duplicate-group resamples)."""
    rows, raw = read_oof(p, members)
    y, groups, folds = (rows["label"] == p.ingest.positive_class).to_numpy(int), rows["group"].to_numpy(), rows["fold"].to_numpy()
    steps, method = p.ensemble.max_steps, p.train.calibration
    probs = calibrated(raw, y, method)  # each member's map fitted on all out-of-fold predictions, as train fitted it
    weights = greedy_weights(y, probs, steps)  # the shipped ensemble: chosen on every train+val image's OOF prediction
    single_auc = [_auc(y, probs[:, j]) for j in range(len(members))]
    ens_cf, single_cf, choices = cross_fitted(y, raw, folds, steps, method)
    d = paired_auc_differences(y, {"ensemble": ens_cf, "single": single_cf}, "single", groups, p.train.bootstrap, p.seed)["ensemble"]
    return Selection(members, y, probs, weights, single_auc, ens_cf, single_cf, choices, d)
