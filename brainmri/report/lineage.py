"""The report's 'Lineage': per model, where it came from as dvc.lock recorded it (read by brainmri.provenance.lineage)."""

from __future__ import annotations

import pandas as pd

from brainmri.config import Params
from brainmri.core.errors import BrainMRIError
from brainmri.provenance.lineage import lineage, read_lock


def _lineage_row(p: Params, name: str, info: dict) -> dict:
    """One model's row from its lineage `info`: its file's hash, the raw data's and manifest's, its key params, the commit."""
    chain = {e["stage"]: e for e in info["chain"]}
    manifest = next((o["md5"] for o in chain.get("ingest", {}).get("outs", []) if o["path"] == p.paths.ingest_manifest), None)
    raw = next((d["md5"] for d in chain.get("ingest", {}).get("deps", []) if d["path"] == str(p.ingest.source)), None)
    bb = chain[f"train@{name}"]["params"].get(f"backbones.{p.models[name].backbone}", {})
    git = info["git"]
    return {
        "Model": name,
        "model.keras md5": (info["current_md5"] or "")[:10] + ("" if info["matches_dvc_lock"] else " (not as recorded)"),
        "Stages": " ← ".join(chain),
        "Weights / lr / dense / dropout": " / ".join(str(bb.get(k)) for k in ("weights", "learning_rate", "dense", "dropout")),
        "Raw data md5": (raw or "n/a")[:10],
        "Manifest md5": (manifest or "n/a")[:10],
        "Git commit": (git["commit"] or "none")[:10] + (" (dirty)" if git.get("dirty") else ""),
    }


def lineage_table(p: Params) -> pd.DataFrame | str:
    """Per model, where it came from (dvc.lock): its file's hash, the data manifest's, its key params and the git commit;
    or a sentence saying why that is not recorded."""
    rows = []
    try:
        stages = read_lock(p.root)
    except BrainMRIError as exc:
        return f"Lineage not recorded: {exc}."
    for name in p.models:
        try:
            info = lineage(p.root, p.model_file("models", name, "model"), with_metrics=False, stages=stages)
        except BrainMRIError as exc:
            return f"Lineage not recorded: {exc}."
        rows.append(_lineage_row(p, name, info))
    return pd.DataFrame(rows)


def lineage_section(p: Params) -> list:
    """The section's lines: what the table shows, then the table."""
    return [
        "## Lineage",
        "",
        "Where each model came from, as `dvc.lock` recorded it when this report was written; "
        "`brainmri lineage FILE` prints the whole chain with every hash, param and metric.",
        "",
        lineage_table(p),
        "",
    ]
