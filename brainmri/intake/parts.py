"""The split's parts as the stages read them: rows of one split (or of the augment manifest), their files and labels.

Only the split stage decides splits (tasks/split.py); every stage that reads one reads it here, so a change to how
splits are made does not make the stages that merely read them stale."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.config import Params
from brainmri.core.files import read_manifest

SPLITS = ("train", "val", "test")


@dataclass
class Part:
    """Rows of one split (or of the augment manifest), in a fixed order, with their image files and labels."""

    frame: pd.DataFrame
    paths: list[Path]
    y: np.ndarray  # label indices into ingest's label_names: 1 = the positive class for two classes


def make_part(p: Params, frame: pd.DataFrame, folder: Path) -> Part:
    frame = frame.reset_index(drop=True)
    return Part(frame, [folder / n for n in frame["image"]], p.ingest.label_index(frame["label"]))


def split_part(p: Params, which: str) -> Part:
    """The `which` split (train, val or test) of the split manifest, sorted by source path."""
    split = read_manifest(p.path("split_manifest"))
    return make_part(p, split[split["split"] == which].sort_values("source_path", kind="stable"), p.path("ingest_images"))
