"""The report's 'Where the models look': the saliency stage's Grad-CAM shares per model, and the heatmaps of the model
best by CV over its most confident validation calls."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.config import Params
from brainmri.core.files import read_manifest
from brainmri.report.plots import saliency_figure, save


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


def _overlays(p: Params, r: dict, name: str, threshold: float) -> list:
    """The first saliency.images of `name`'s most confident right and wrong calls on val (half each, right first), as
    the model saw them, with their heatmaps and head masks: the saliency stage recorded each call and its heatmap."""
    from brainmri.intake.preprocess import load_batch

    images = read_manifest(p.path("split_manifest")).set_index("image_id")["image"]
    calls = pd.DataFrame({"probability": r["probability_by_image"], "label": r["label_by_image"]})
    if "predicted_by_image" in r:  # N classes: the call is the most probable class, its probability the confidence
        said = pd.Series(r["predicted_by_image"]).reindex(calls.index).to_numpy()
        calls = calls.assign(said=said, correct=said == calls["label"], confidence=calls["probability"])
    else:
        said = np.where(calls["probability"] >= threshold, p.ingest.positive_class, p.ingest.negative_class)
        calls = calls.assign(said=said, correct=said == calls["label"], confidence=(calls["probability"] - threshold).abs())
    calls = calls.sort_values("confidence", ascending=False, kind="stable")
    half = -(-p.saliency.images // 2)
    picked = pd.concat([calls[calls["correct"]].head(half), calls[~calls["correct"]].head(half)]).head(p.saliency.images)
    with np.load(p.model_file("saliency", name, "heatmaps")) as f:
        at = {image: i for i, image in enumerate(f["images"].tolist())}
        cams, heads = f["cams"].astype(np.float32), f["heads"]
    x = load_batch([p.path("ingest_images") / images[i] for i in picked.index], r["input_size"])
    overlays = []
    for xi, (image, c) in zip(x, picked.iterrows(), strict=True):
        title = f"{'right' if c.correct else 'WRONG'}: said {c.said} (p={c.probability:.2f})\nactually {c.label}"
        overlays.append((xi.astype(np.uint8), cams[at[image]], heads[at[image]], title, bool(c.correct)))
    return overlays


def saliency_section(p: Params, reference: str, threshold: float, out: Path) -> list:
    """The Grad-CAM shares per model, flagged below saliency.min_head_share; and the heatmaps of the reference model's
    most confident right and wrong calls on val, at its `threshold` (drawn into `out`)."""
    rows, overlays = [], []
    for name in p.models:
        r = json.loads(p.model_file("saliency", name, "saliency").read_text())
        rows.append(_share_row(p, name, r))
        if name == reference:
            overlays = _overlays(p, r, name, threshold)
    if overlays:
        save(saliency_figure(overlays), out / "saliency.png")
    flagged = [r["Model"] for r in rows if r["Flag"]]
    return [
        "### Where the models look",
        "",
        "Grad-CAM heatmaps on each Keras model (the frozen base's last feature map, weighted by the gradient of the output "
        "logit; for a no-tumour call, the evidence against tumour), over the validation images (test is read by evaluate "
        "alone), and the share of each heatmap "
        "inside the head (the region ingest crops to, holes filled). A share below "
        f"{p.saliency.min_head_share} (`saliency.min_head_share`) is flagged: such a model looks mostly at margins, text, "
        "padding or borders. Compare each share with the head's share of the input, what attention spread evenly would give. "
        + (f"Flagged: {', '.join(flagged)}." if flagged else "No model is flagged."),
        "",
        pd.DataFrame(rows),
        "",
        *(
            [
                f"![Grad-CAM heatmaps of {reference}'s most confident calls on val; the head's outline in white](saliency.png)",
                "",
            ]
            if overlays
            else []
        ),
    ]
