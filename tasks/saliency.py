"""saliency stage: where one model looks. Grad-CAM on the Keras model over the validation images
(brainmri.learn.saliency), the share of each heatmap inside the head, and the model's call on each image; the report
reads every model's, flags those that look elsewhere and draws the reference model's most confident calls.

A stage of its own per model, not part of the report: it is the one step there that runs Keras models, so the report
imports no TensorFlow, an edit to the report reruns no Grad-CAM, and retraining one model reruns its own only. It
reads val, never test: only evaluate opens test images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brainmri.config import Params
from brainmri.core.files import atomic_dir, write_json, write_npz
from brainmri.core.progress import log
from brainmri.intake.parts import split_part
from brainmri.intake.preprocess import load_batch


def saliency(p: Params, name: str) -> dict:
    """Run the stage for model `name`: Grad-CAM over the validation images; write its record and its heatmaps (with
    the head masks) under paths.saliency/MODEL; return the record."""
    p.model(name)  # an unknown name stops here, before any work
    from brainmri.learn import saliency as cam
    from brainmri.learn.models import load_model

    val = split_part(p, "val")
    images = [Path(t).stem for t in val.paths]  # image ids
    model = load_model(p.model_file("models", name, "model"))
    x = load_batch(val.paths, int(model.inputs[0].shape[1]))  # the size the model was built for
    (cams, prob), head = cam.grad_cam(model, x), cam.masks(x)
    share = cam.head_share(cams, head)
    finite = np.isfinite(share)
    record = {
        "method": "Grad-CAM on the Keras model (brainmri/learn/saliency.py), over the validation images",
        "images": "val",
        "input_size": int(x.shape[1]),
        "n_images": len(share),
        "mean_share_inside_head": float(np.mean(share[finite])) if finite.any() else None,  # None: every heatmap empty
        "head_share_of_input": float(head.mean()) if len(head) else None,
        "empty_heatmaps": int(np.sum(~finite)),
        "share_by_image": dict(zip(images, share.tolist(), strict=True)),  # NaN (null): an empty heatmap
        "probability_by_image": dict(zip(images, np.round(prob, 6).tolist(), strict=True)),  # for the report's samples
        "label_by_image": dict(zip(images, val.frame["label"].tolist(), strict=True)),
    }
    if prob.ndim == 2:  # N classes: the heatmap is the predicted class's; the probability, that class's
        record["heatmap_of"] = "the predicted (most probable) class"
        record["probability_by_image"] = dict(zip(images, np.round(prob.max(axis=1), 6).tolist(), strict=True))
        names = p.ingest.label_names
        record["predicted_by_image"] = dict(zip(images, [names[c] for c in prob.argmax(axis=1)], strict=True))
    with atomic_dir(p.path("saliency") / name) as out:
        write_json(out / p.paths.files.saliency, record)
        write_npz(out / p.paths.files.heatmaps, images=np.array(images), cams=cams.astype(np.float16), heads=head)
    log.info("saliency %s: mean share of the heatmaps inside the head %s", name, record["mean_share_inside_head"])
    return record
