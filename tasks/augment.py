"""augment stage: K deterministic augmented copies of each training image, linked to their source."""

from __future__ import annotations

import pandas as pd

from brainmri.config import Params
from brainmri.core.files import atomic_dir, write_csv
from brainmri.core.progress import progress, summary
from brainmri.intake.augment import copies, manifest_columns, manifest_row
from brainmri.intake.decode import load_rgb, save_png
from brainmri.intake.parts import split_part


def augment(p: Params) -> dict:
    """Run the stage: write augmented images and their manifest; return a summary."""
    train = split_part(p, "train").frame
    src_dir = p.path("ingest_images")
    rows = []
    with atomic_dir(p.path("augment_images")) as out:
        for r in progress(train.itertuples(index=False), "augment", total=len(train)):
            img = load_rgb(src_dir / r.image)
            for k, t, copy in copies(p, img, r.image_id):
                name = f"{r.image_id}_{k}.png"
                save_png(copy, out / name)
                rows.append(manifest_row(name, r, k, t))
    write_csv(p.path("augment_manifest"), pd.DataFrame(rows, columns=manifest_columns(p.augment)))
    summary("augment", f"{len(rows)} augmented images from {len(train)} training images ({p.augment.copies} each)")
    return {"n_source": len(train), "n_augmented": len(rows), "copies": p.augment.copies}
