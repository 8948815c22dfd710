"""audit stage: can the class be predicted without anatomy? A shortcut audit on file metadata and on image framing
(brainmri.stats.shortcut_audit says how). Writes audit.json (the full record) and scores.json (the two AUCs)."""

from __future__ import annotations

import numpy as np

from brainmri.config import Params
from brainmri.core.files import read_manifest, write_json, write_metrics
from brainmri.core.progress import summary
from brainmri.stats.shortcut_audit import auc_text, check_folds, grouped_cv, image_features, metadata_features, scores


def audit(p: Params) -> dict:
    """Run the stage: write audit.json (the full record) and scores.json (the two AUCs, DVC metrics)."""
    manifest = read_manifest(p.path("ingest_manifest"))
    usable = manifest[~manifest["conflict"].astype(bool)].reset_index(drop=True)  # as split: conflicting labels are nobody's truth
    y = p.ingest.label_index(usable["label"])  # two classes: 1 = positive_class
    per_class = np.bincount(y, minlength=len(p.ingest.label_names))
    groups = usable["group"].to_numpy()
    check_folds(per_class, groups, p.audit.folds, p.path("ingest_manifest"))

    meta = grouped_cv(metadata_features(usable), y, groups, p)
    framing = grouped_cv(image_features(p, usable), y, groups, p)
    record = {
        "n_images": len(usable),
        "per_class": {c: int(n) for c, n in zip(p.ingest.label_names, per_class, strict=True)},
        "folds": p.audit.folds,
        "auc_kind": "pooled out-of-fold (one AUC over every image's held-out prediction); 95% interval over "
        f"{p.audit.bootstrap} resamples of whole duplicate groups",
        "shortcut_auc": p.audit.shortcut_auc,
        "crop_to_content": p.ingest.crop_to_content,
        "image_size": p.audit.image_size,
        "metadata": meta,
        "framing": framing,
    }

    out = p.path("audit")
    write_json(out / p.paths.files.audit, record)
    write_metrics(out / p.paths.files.scores, scores(meta, framing))
    summary(
        "audit",
        f"metadata AUC {auc_text(meta)}{' (shortcut)' if meta['shortcut'] else ''}; "
        f"framing AUC {auc_text(framing)}{' (shortcut)' if framing['shortcut'] else ''}",
    )
    return record
