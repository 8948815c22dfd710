"""DVCLive's files for one trained model: what `dvc plots` and `dvc metrics` read."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


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
