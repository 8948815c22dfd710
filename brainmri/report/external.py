"""The report's 'External validation': every exported model on the external set, beside its test figures."""

from __future__ import annotations

import json

import pandas as pd

from brainmri.config import Params
from brainmri.report.cells import ci
from brainmri.stats.metrics import fmt


def _external_row(name: str, e: dict, test: dict) -> dict:
    """One model's row: e its external metrics, test its test metrics."""
    m = e["external"]
    return {
        "Model": name,
        "External AUC [95% CI]": ci(m["auc"], pct=False),
        "External acc % [95% CI]": ci(m["accuracy"]),
        "Test AUC": f"{test['auc']['value']:.3f}",
        "AUC change (external - test)": fmt(e["change_from_test"]["auc"], "+.3f"),  # n/a when a set has one class
        "Accuracy change (points)": fmt(e["change_from_test"]["accuracy"], "+.1f", 100.0),
    }


def external_section(p: Params, evaluated: dict) -> list:
    """The external set's table beside the test figures, or a plain statement that there is none."""
    intake = json.loads(p.path("external_report").read_text())
    head = ["## External validation", ""]
    if not intake["configured"]:
        return [*head, f"No external set: `external.source` ({intake['source']}) holds nothing but hidden files. Put a labelled "
                "set there (both class folders, as for ingest) and `dvc repro` scores every exported model on it.", ""]  # fmt: skip
    rows = []
    for name in p.models:
        e = json.loads((p.path("external_eval") / name / p.paths.files.metrics).read_text())
        if e.get("n_images"):
            rows.append(_external_row(name, e, evaluated[name]["test"]))
    text = [
        *head,
        f"Every exported ONNX model (what `predict` runs) on the external set ({intake['source']}): {intake['n_files']} files, "
        f"{intake['n_quarantined']} quarantined by ingest's rules, {intake['n_duplicates_of_ingested']} left out because they "
        f"duplicate an ingested image (the same detector as ingest), **{intake['n_used']} scored** "
        f"({', '.join(f'{k} {v}' for k, v in intake['per_class'].items())}; {intake['n_groups']} duplicate groups), each model "
        "at its own threshold, with 95% group-bootstrap intervals.",
        "",
    ]
    if intake["synthetic"]:
        text += ["**SYNTHETIC external set**: these numbers check the mechanics only; they are not a generalisation result.", ""]
    return [*text, pd.DataFrame(rows), ""] if rows else [*text, "No external image was left to score.", ""]
