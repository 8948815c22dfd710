"""ONNX Runtime sessions scored on image files, decoded a chunk at a time and once for all sessions."""

from __future__ import annotations

import numpy as np

from brainmri.deploy.onnxrt import probabilities
from brainmri.intake.preprocess import load_batch

CHUNK = 32  # images decoded and scored at a time: memory stays bounded whatever the set's size


def score_files(sessions: dict, paths: list, size: int, tta: bool) -> dict:
    """Each session's probabilities on image files, read CHUNK at a time and decoded once for all sessions; with `tta`
    the mean over the image and its mirror."""
    out: dict = {k: [] for k in sessions}
    for i in range(0, len(paths), CHUNK):
        x = load_batch(paths[i : i + CHUNK], size)
        mirrored = x[:, :, ::-1].copy() if tta else None
        for k, sess in sessions.items():
            prob = probabilities(sess, x)
            out[k].append((prob + probabilities(sess, mirrored)) / 2 if tta else prob)
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}
