"""The report's opening and its Results section: every model's metrics, and each model's test AUC against the model
best by CV."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from brainmri.config import Params
from brainmri.core.files import read_manifest
from brainmri.report.cells import ci
from brainmri.report.selection import selection_section
from brainmri.stats import multiclass
from brainmri.stats.metrics import fmt, paired_auc_differences
from brainmri.stats.multiclass_evaluation import probability_columns

ORIGINAL = (
    "The original study reported VGG19 with augmentation best at 86% test accuracy and VGG16 with augmentation lowest at 0.4984 test BCE, "
)
ORIGINAL += (
    "selecting checkpoints on training accuracy, with no validation split and 1/255 scaling; the numbers below avoid those mistakes."
)

SYNTHETIC = (
    "**SYNTHETIC DATA.** These results are on generated phantom images (`brainmri synthesize`), not patient scans: "
    "they show that the pipeline works end to end, not how well it detects tumours."
)


def _cv(c: dict | None, who: str) -> str:
    return f"{c[who]['auc']['mean_of_folds']:.3f} ± {c[who]['auc']['sd_of_folds']:.3f}" if c else "n/a"


def _seed_sd(c: dict | None) -> str:
    spread = (c or {}).get("seed_spread") or {}
    if spread.get("sd") is None:
        return "n/a"
    return f"{spread['sd']:.3f} ({len(spread['seeds'])} seeds, {spread['range'][0]:.3f}-{spread['range'][1]:.3f})"


def _classes_row(name: str, t: dict, e: dict) -> dict:
    """One N-class model's row: macro figures of the most probable class (per-class figures: its metrics.json)."""
    m = e["test"]
    return {
        "Model": name,
        "Weights": Path(t["weights"]["path"]).name if t["weights"]["kind"] == "file" else t["weights"]["kind"],
        "Train acc %": f"{100 * t['train']['accuracy']:.1f}",
        "Test acc % [95% CI]": ci(m["accuracy"]),
        "Balanced acc % [95% CI]": ci(m["balanced_accuracy"]),
        "Macro AUC [95% CI]": ci(m["auc"], pct=False),
        "Macro F1 [95% CI]": ci(m["f1"], pct=False),
        "Test log loss": fmt(m["log_loss"]["value"], ".4f"),
        "CV macro AUC, mean of folds ± sd": _cv(t["cv"], "model"),
        "CV macro AUC, pooled out of fold": fmt(t["cv"]["model"]["auc"]["pooled_out_of_fold"]) if t["cv"] else "n/a",
        "Seed sd of pooled CV AUC": _seed_sd(t["cv"]),
        "LogReg CV macro AUC, mean of folds ± sd": _cv(t["cv"], "baseline_logreg"),
    }


def _results_row(name: str, t: dict, e: dict) -> dict:
    """One model's row of the results table: t its train metrics, e its evaluation metrics."""
    m = e["test"]
    if "sensitivity" not in m:
        return _classes_row(name, t, e)
    return {
        "Model": name,
        "Weights": Path(t["weights"]["path"]).name if t["weights"]["kind"] == "file" else t["weights"]["kind"],
        "Train acc %": f"{100 * t['train']['accuracy']:.1f}",
        "Test acc % [95% CI]": ci(m["accuracy"]),
        "Test BCE": fmt(m["bce"]["value"], ".4f"),
        "AUC [95% CI]": ci(m["auc"], pct=False),
        "Sensitivity % [95% CI]": ci(m["sensitivity"]),
        "Specificity % [95% CI]": ci(m["specificity"]),
        "CV AUC, mean of folds ± sd": _cv(t["cv"], "model"),
        "CV AUC, pooled out of fold": fmt(t["cv"]["model"]["auc"]["pooled_out_of_fold"]) if t["cv"] else "n/a",
        "Seed sd of pooled CV AUC": _seed_sd(t["cv"]),
        "LogReg CV AUC, mean of folds ± sd": _cv(t["cv"], "baseline_logreg"),
    }


def results_table(p: Params) -> tuple[pd.DataFrame, dict, dict]:
    """The results table, and every model's train and evaluation metrics by name (the report's other sections read them)."""
    rows, trained, evaluated = [], {}, {}
    for name in p.models:
        t = json.loads(p.model_file("models", name, "train_metrics").read_text())
        e = json.loads(p.model_file("eval", name, "metrics").read_text())
        trained[name], evaluated[name] = t, e
        rows.append(_results_row(name, t, e))
    return pd.DataFrame(rows), trained, evaluated


def reference_model(p: Params, trained: dict) -> str:
    """The model with the best pooled out-of-fold CV AUC over train+val (215 images on the real set, against val's
    39): chosen without looking at test. Ties, and models without cross-validation, fall back on validation AUC."""

    def score(n: str) -> tuple:
        cv = (trained[n].get("cv") or {}).get("model", {}).get("auc", {}).get("pooled_out_of_fold")
        val = trained[n]["val"]["auc"]
        return (cv is not None, cv if cv is not None else -1.0, val if val is not None else -1.0)

    return max(p.models, key=score)


def paired_table(p: Params, trained: dict) -> tuple[pd.DataFrame, str]:
    """Each model's test AUC minus that of the reference model (best by pooled CV AUC), with a 95% group-bootstrap interval.

    Every model is scored on the same resamples of the same test images (whole duplicate groups drawn together),
    so the interval is that of the difference: one that excludes 0 marks a real difference, the rest are noise.
    """
    best = reference_model(p, trained)
    preds = {n: read_manifest(p.model_file("eval", n, "predictions")).set_index("source_path") for n in p.models}
    ref = preds[best].sort_index()
    for n, frame in preds.items():
        if set(frame.index) != set(ref.index):
            raise ValueError(f"{p.model_file('eval', n, 'predictions')}: not the test images {best} was scored on; rerun evaluate")
    if p.ingest.binary:
        y = (ref["actual"] == p.ingest.positive_class).to_numpy(int)
        probs = {n: preds[n].loc[ref.index, "probability"].to_numpy(float) for n in p.models}
        diffs = paired_auc_differences(y, probs, best, ref["group"].to_numpy(), p.train.bootstrap, p.seed)
    else:  # the macro one-vs-rest AUC, paired the same way
        y, cols = p.ingest.label_index(ref["actual"]), probability_columns(p.ingest.label_names)
        probs = {n: preds[n].loc[ref.index, cols].to_numpy(float) for n in p.models}
        diffs = multiclass.paired_auc_differences(y, probs, best, ref["group"].to_numpy(), p.train.bootstrap, p.seed)
    rows = []
    for n, d in diffs.items():
        verdict = "reference" if n == best else "worse" if d["ci_high"] < 0 else "better" if d["ci_low"] > 0 else "no clear difference"
        rows.append(
            {
                "Model": n,
                f"Test AUC − {best}'s [95% CI]": f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]",
                "Verdict": verdict,
            }
        )
    return pd.DataFrame(rows), best


def intro(p: Params, n_test: int, synthetic: bool) -> list:
    """The title and what every figure below is measured on; a warning first when the data are phantoms."""
    return [
        "# Brain MRI tumour classification: results",
        "",
        f"{_classes_text(p)} All metrics are on the held-out **test split of {n_test} images**, "
        f"where one image moves accuracy by {100 / max(1, n_test):.1f} points; intervals are 95% percentiles over "
        f"{p.train.bootstrap} bootstrap resamples of whole duplicate groups (a scan and its copies are drawn together). "
        "Every setting behind these numbers was fixed in params or chosen without the test split: head and feature "
        "settings and the threshold rule by cross-validation over train+val, each threshold on the validation split, "
        "the int8 settings on the validation images (table below).",
        "",
        ORIGINAL,
        "",
        *([SYNTHETIC, ""] if synthetic else []),
    ]


def _classes_text(p: Params) -> str:
    """Which classes the models tell apart, and how they decide."""
    if p.ingest.binary:
        return f"Tumour class: `{p.ingest.positive_class}`; no-tumour class: `{p.ingest.negative_class}`."
    names = ", ".join(f"`{c}`" for c in p.ingest.label_names)
    return (
        f"{len(p.ingest.label_names)} classes: {names}. Each model says the most probable class; AUC is the macro average of "
        "the one-vs-rest AUCs, and thresholds below apply to two-class models only."
    )


def _cv_note(p: Params) -> str:
    """What the results table's CV columns mean."""
    return "CV AUC: grouped, stratified " + (
        f"{p.train.cv_folds}-fold cross-validation over train+val on cached features. 'Mean of folds' averages each fold's "
        "AUC on its own held-out part (± their sd); 'pooled out of fold' is one AUC over every train+val image's "
        "out-of-fold prediction. Seed sd: the spread of the pooled figure over whole CV runs with other seeds (folds, "
        "initial weights, shuffles), the training luck to read beside the data's intervals. LogReg: a plain logistic "
        "regression on the same frozen features and folds, the bar a trained head should clear."
        if p.train.cv_folds
        else "cross-validation is off."
    )


def results_section(p: Params, table: pd.DataFrame, trained: dict, paired: pd.DataFrame, best_val: str) -> list:
    """The results table, how each setting was chosen, which differences are real, and the weights used."""
    weights_notes = sorted({f"- **{t['backbone']}**: {t['weights']['description']}" for t in trained.values()})
    return [
        "## Results",
        "",
        table,
        _cv_note(p),
        "",
        *selection_section(p, trained),
        "### Which differences are real",
        "",
        f"Each model's test AUC minus that of {best_val}, the reference model: the best by pooled out-of-fold CV AUC over "
        f"train+val (chosen without test). Each difference has a 95% interval over the same {p.train.bootstrap} "
        "group-bootstrap resamples for every model. An interval that excludes 0 is a real difference; the rest are within "
        "the luck of a small test split.",
        "",
        paired,
        "",
        "### Weights used",
        "",
        *weights_notes,
        "",
    ]
