"""The report's 'Sample test images': the most confident right and wrong calls of the reference model (best by pooled CV AUC)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from brainmri.config import Params
from brainmri.core.files import read_manifest
from brainmri.report.plots import samples_figure, save
from brainmri.report.results import reference_model
from brainmri.stats.multiclass_evaluation import probability_columns


class Samples(NamedTuple):
    model: str  # the reference model (best by pooled CV AUC), whose calls these are
    shown: list  # (image, title, correct) per sample, right calls first
    paths: list  # each sample's ingested image file, in the same order
    n_right: int
    n_wrong: int


def sample_grid(p: Params, evaluated: dict, trained: dict, per_kind: int = 6) -> Samples:
    """Test images of the reference model (best by pooled CV AUC) (never chosen on test): its most confident right and wrong calls."""
    from PIL import Image

    name = reference_model(p, trained)
    preds = read_manifest(p.model_file("eval", name, "predictions"))
    images = read_manifest(p.path("split_manifest")).set_index("source_path")["image"]
    if p.ingest.binary:
        preds["confidence"] = (preds["probability"] - evaluated[name]["threshold"]).abs()
    else:  # the most probable class's probability: the call's confidence, and what the title shows
        preds["probability"] = preds[probability_columns(p.ingest.label_names)].max(axis=1)
        preds["confidence"] = preds["probability"]
    preds = preds.sort_values("confidence", ascending=False)
    picked = pd.concat([preds[preds["correct"]].head(per_kind), preds[~preds["correct"]].head(per_kind)])
    samples, paths = [], []
    for r in picked.itertuples():
        paths.append(p.path("ingest_images") / images[r.source_path])
        with Image.open(paths[-1]) as img:
            arr = np.asarray(img.convert("RGB"))
        mark = "right" if r.correct else "WRONG"
        samples.append((arr, f"{mark}: said {r.predicted} (p={r.probability:.2f})\nactually {r.actual}", bool(r.correct)))
    n_right, n_wrong = int(picked["correct"].sum()), int((~picked["correct"]).sum())
    return Samples(name, samples, paths, n_right, n_wrong)


def samples_section(samples: Samples, out: Path) -> list:
    """The section's lines; the grid drawn into `out` as samples.png."""
    save(samples_figure(samples.shown), out / "samples.png")
    return [
        "## Sample test images",
        "",
        f"The test images {samples.model} (the reference model, best by pooled CV AUC) got most confidently right "
        f"({samples.n_right} shown, green) and wrong ({samples.n_wrong} shown, red).",
        "",
        "![Test images with their predictions](samples.png)",
        "",
    ]
