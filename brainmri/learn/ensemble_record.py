"""ensemble.json and the ensemble's scores.json: the choice on CV, the cross-fitted comparison and the decision, and
the composed graph's figures on test."""

from __future__ import annotations

from brainmri.config import Params
from brainmri.learn.ensemble_cv import Selection
from brainmri.stats.metrics import _auc


def ensemble_record(p: Params, s: Selection, threshold: float, test: dict, gap: float) -> dict:
    """ensemble.json without its external and latency parts: `test` is the figures on test (the members' evaluate
    predictions, weighted; without the mirror when ensemble.tta_flip is on), `gap` the composed graph's largest distance
    from its members' weighted mean on val."""
    members, d = s.members, s.difference
    return {
        "configured": True,
        "candidates": members,
        "members": {members[i]: round(float(s.weights[i]), 4) for i in s.chosen},
        "tta_flip": p.ensemble.tta_flip,
        "threshold": round(threshold, 6),
        "threshold_rule": "Youden's J on the cross-fitted out-of-fold predictions over train+val (threshold_check_on_val: val, held out)",
        "best_single": members[s.best],
        "selection": {
            "protocol": (
                f"greedy forward selection with replacement ({p.ensemble.max_steps} rounds, Caruana et al. 2004) on pooled "
                f"out-of-fold AUC of the members' calibrated CV predictions over train+val ({len(s.y)} images); test never read"
            ),
            "single_cv_auc": {m: round(a, 4) for m, a in zip(members, s.single_auc, strict=True)},
            "in_sample_cv_auc": round(_auc(s.y, s.probs @ s.weights), 4),
        },
        "cv": cv_record(p, s),
        "kept": s.kept,
        "decision": (
            "kept: the paired CV AUC difference's 95% interval lies above 0"
            if s.kept
            else f"not recommended: the paired CV AUC difference {d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] "
            "does not lie above 0, so the ensemble is not better than its best member beyond chance"
        ),
        "test": test,
        "parity_max_abs_diff": gap,
    }


def cv_record(p: Params, s: Selection) -> dict:
    """The cross-fitted comparison with the best single member, with its protocol and limits."""
    return {
        "protocol": (
            "cross-fitted: each CV fold's images scored by an ensemble and a best single member both chosen, and "
            "each member's calibration map refitted, on the other folds only; paired AUC difference with a 95% "
            f"interval over {p.train.bootstrap} duplicate-group resamples"
        ),
        "limits": (
            "each member's own settings were chosen by CV on these same folds (optimistic for both sides), and the "
            "interval resamples images, not the selection: it leaves out the selection's own variance"
        ),
        "ensemble_auc": round(_auc(s.y, s.ensemble_cv), 4),
        "best_single_auc": round(_auc(s.y, s.single_cv), 4),
        "auc_difference": s.difference,
        "per_fold": s.per_fold,
    }


def ensemble_scores(out: dict) -> dict:
    """scores.json: the cross-fitted CV figures and the test figures DVC compares between runs."""
    d, t = out["cv"]["auc_difference"], out["test"]["ensemble"]
    return {
        "cv_auc": out["cv"]["ensemble_auc"],
        "cv_auc_difference": d["value"],
        "cv_auc_difference_ci_low": d["ci_low"],
        "test_auc": t["auc"]["value"],
        "test_accuracy": t["accuracy"]["value"],
    }
