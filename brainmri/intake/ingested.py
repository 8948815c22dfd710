"""The ingested set seen from outside it: which images of another set duplicate an ingested one."""

from __future__ import annotations

import pandas as pd
from PIL import Image

from brainmri.config import Params
from brainmri.core.errors import DataError
from brainmri.core.files import read_manifest
from brainmri.intake.duplicates import fingerprint
from brainmri.intake.grouping import group_ids


def match_ingested(p: Params, manifest: pd.DataFrame, prints: list) -> tuple[list[str], list[str]]:
    """Each external image's duplicate group (joined with the ingested images by ingest's own detector: equal bytes,
    perceptual hash and thumbnail correlation both close, or one a copy of the other cropped into the head) and the
    ingested image it duplicates ('' if none)."""
    if manifest.empty:
        return [], []
    if not p.path("ingest_manifest").is_file():
        raise DataError(f"{p.path('ingest_manifest')} not found: run the ingest stage before ingest_external (dvc repro orders them)")
    ingested = read_manifest(p.path("ingest_manifest"))
    theirs = []
    for name, sha in zip(ingested["image"], ingested["sha256"], strict=True):
        with Image.open(p.path("ingest_images") / name) as img:  # both sides normalized by the same decoder
            theirs.append(fingerprint(img, sha, p.dedupe.hash_size))
    keys = [*ingested["sha256"], *manifest["sha256"]]
    dd = p.dedupe
    groups = group_ids(
        keys, [*theirs, *prints], dd.max_distance, dd.min_correlation, dd.min_partial_correlation, None, dd.neighbours, dd.exact_up_to
    )
    first = {}
    for g, src in zip(groups[: len(ingested)], ingested["source_path"], strict=True):
        first.setdefault(g, src)
    mine = groups[len(ingested) :]
    return mine, [first.get(g, "") for g in mine]
