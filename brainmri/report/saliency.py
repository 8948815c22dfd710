"""The report's 'Where the models look': the saliency stage's Grad-CAM shares per model, and the heatmaps of the model
best by CV over the sample images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.config import Params
from brainmri.report.plots import saliency_figure, save
from brainmri.report.samples import Samples


def _share_row(p: Params, name: str, r: dict) -> dict:
    """One model's row: r its saliency record; flagged below saliency.min_head_share or with no heatmap at all."""
    mean, head = (float("nan") if r[k] is None else r[k] for k in ("mean_share_inside_head", "head_share_of_input"))  # JSON null
    flag = "LOOKS OUTSIDE THE HEAD" if mean < p.saliency.min_head_share else "NO HEATMAP" if not np.isfinite(mean) else ""
    return {
        "Model": name,
        "Heatmap inside the head": f"{mean:.2f}",
        "Head's share of the input": f"{head:.2f}",
        "Empty heatmaps": f"{r['empty_heatmaps']} of {r['n_images']}",
        "Flag": flag,
    }


def _overlays(p: Params, r: dict, samples: Samples) -> list:
    """The first saliency.images samples as the model saw them, with their heatmaps and head masks (the sample images are
    test images: the saliency stage drew their heatmaps)."""
    from brainmri.intake.preprocess import load_batch

    with np.load(p.model_file("saliency", samples.model, "heatmaps")) as f:
        at = {image: i for i, image in enumerate(f["images"].tolist())}
        cams, heads = f["cams"].astype(np.float32), f["heads"]
    picked = list(zip(samples.paths[: p.saliency.images], samples.shown, strict=False))
    x = load_batch([path for path, _ in picked], r["input_size"])
    overlays = []
    for xi, (path, (_, title, correct)) in zip(x, picked, strict=True):
        i = at[Path(path).stem]  # every sample is a test image, with its heatmap: a missing one is a bug, so KeyError
        overlays.append((xi.astype(np.uint8), cams[i], heads[i], title, correct))
    return overlays


def saliency_section(p: Params, samples: Samples, out: Path) -> list:
    """The Grad-CAM shares per model, flagged below saliency.min_head_share; and the heatmaps of the samples' model
    (drawn into `out`)."""
    rows, overlays = [], []
    for name in p.models:
        r = json.loads(p.model_file("saliency", name, "saliency").read_text())
        rows.append(_share_row(p, name, r))
        if name == samples.model:
            overlays = _overlays(p, r, samples)
    if overlays:
        save(saliency_figure(overlays), out / "saliency.png")
    flagged = [r["Model"] for r in rows if r["Flag"]]
    return [
        "### Where the models look",
        "",
        "Grad-CAM heatmaps on each Keras model (the frozen base's last feature map, weighted by the gradient of the output "
        "logit; for a no-tumour call, the evidence against tumour), over the test images, and the share of each heatmap "
        "inside the head (the region ingest crops to, holes filled). A share below "
        f"{p.saliency.min_head_share} (`saliency.min_head_share`) is flagged: such a model looks mostly at margins, text, "
        "padding or borders. Compare each share with the head's share of the input, what attention spread evenly would give. "
        + (f"Flagged: {', '.join(flagged)}." if flagged else "No model is flagged."),
        "",
        pd.DataFrame(rows),
        "",
        *(
            [f"![Grad-CAM heatmaps of {samples.model} over the sample images; the head's outline in white](saliency.png)", ""]
            if overlays
            else []
        ),
    ]
