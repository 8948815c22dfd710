"""Ensemble selection on out-of-fold predictions (Caruana et al., ICML 2004), and an ensemble's figures beside its best
single member on one labelled set."""

from __future__ import annotations

import numpy as np

from brainmri.core.errors import BrainMRIError
from brainmri.stats.metrics import _auc, paired_auc_differences, with_intervals

MIN_GAIN = 0.001  # a selection round counts only if it lifts the pooled AUC by this much: on the real set's 215 CV images one
# reordered tumour/no-tumour pair moves AUC by 1e-4, and calibration's near-zero slope on a useless member buys such ties


class EnsembleError(BrainMRIError):
    """The members' CV predictions or exported graphs cannot be combined."""


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


def against_best_single(
    y, p_ens: np.ndarray, p_single: np.ndarray, groups, threshold: float, single_threshold: float, n_boot: int, seed: int
) -> dict:
    """The ensemble and the best single member (scored the same way, mirror included) with intervals, and their paired
    AUC difference, on one labelled set."""
    return {
        "n_images": int(len(y)),
        "ensemble": with_intervals(y, p_ens, threshold, n_boot, seed, groups=groups),
        "best_single": with_intervals(y, p_single, single_threshold, n_boot, seed, groups=groups),
        "best_single_auc_difference": paired_auc_differences(y, {"ensemble": p_ens, "single": p_single}, "single", groups, n_boot, seed)[
            "ensemble"
        ],
    }
