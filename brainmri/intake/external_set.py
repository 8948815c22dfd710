"""The external set as ingest_external left it: its record, the images to score, and why there may be none."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from brainmri.config import Params
from brainmri.core.files import read_manifest


def external_set(p: Params) -> tuple[dict, pd.DataFrame]:
    """ingest_external's record, and the manifest rows of the images to score (not quarantined, not duplicates)."""
    intake = json.loads(p.path("external_report").read_text())
    manifest = read_manifest(p.path("external_manifest"), also=("used",))
    return intake, manifest[manifest["used"] == "True"].reset_index(drop=True)


def external_images(p: Params, used: pd.DataFrame) -> tuple[list, np.ndarray, np.ndarray]:
    """The images of `used` rows: their files, labels (1: the positive class) and duplicate groups."""
    paths = [p.path("external_images") / n for n in used["image"]]
    return paths, p.ingest.label_index(used["label"]), used["group"].to_numpy()


def no_external_note(intake: dict) -> str:
    """Why there is nothing to score: no external set configured, or every image of it left out."""
    if not intake["configured"]:
        return f"no external set: {intake['source']} holds nothing but hidden files"
    return "no external image left: every one duplicates an ingested image or was quarantined"
