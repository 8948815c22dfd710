"""saliency stage: where one model looks. Grad-CAM on the Keras model over the test images (brainmri.learn.saliency), and the
share of each heatmap inside the head; the report reads every model's and flags those that look elsewhere.

A stage of its own per model, not part of the report: it is the one step there that runs Keras models, so the report
imports no TensorFlow, an edit to the report reruns no Grad-CAM, and retraining one model reruns its own only. It
reads test images, never their labels.
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
    """Run the stage for model `name`: Grad-CAM over the test images; write its record and its heatmaps (with the
    head masks) under paths.saliency/MODEL; return the record."""
    p.model(name)  # an unknown name stops here, before any work
    from brainmri.learn import saliency as cam
    from brainmri.learn.models import load_model

    test = split_part(p, "test").paths  # images only: no label is read here
    images = [Path(t).stem for t in test]  # image ids
    model = load_model(p.model_file("models", name, "model"))
    x = load_batch(test, int(model.inputs[0].shape[1]))  # the size the model was built for
    cams, head = cam.grad_cam(model, x), cam.masks(x)
    share = cam.head_share(cams, head)
    finite = np.isfinite(share)
    record = {
        "method": "Grad-CAM on the Keras model (brainmri/learn/saliency.py), over the test images; labels not read",
        "input_size": int(x.shape[1]),
        "n_images": len(share),
        "mean_share_inside_head": float(np.mean(share[finite])) if finite.any() else None,  # None: every heatmap empty
        "head_share_of_input": float(head.mean()) if len(head) else None,
        "empty_heatmaps": int(np.sum(~finite)),
        "share_by_image": dict(zip(images, share.tolist(), strict=True)),  # NaN (null): an empty heatmap
    }
    with atomic_dir(p.path("saliency") / name) as out:
        write_json(out / p.paths.files.saliency, record)
        write_npz(out / p.paths.files.heatmaps, images=np.array(images), cams=cams.astype(np.float16), heads=head)
    log.info("saliency %s: mean share of the heatmaps inside the head %s", name, record["mean_share_inside_head"])
    return record
