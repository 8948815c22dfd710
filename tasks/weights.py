"""weights stage: one backbone's pretrained weights as a file under data/, so DVC versions, pushes and pulls them.

- `imagenet`: Keras downloads its file (hash-checked by Keras) where there is internet; the file Keras keeps is copied.
- a local file: must lie in the workspace's weights inbox (paths.weights_inbox, a DVC dependency of this stage, so a
  file replaced in place is noticed); copied, and checked by loading it into the backbone.
- `none`: recorded, no file.
train loads the copy and depends on its md5; an air-gapped machine gets the same bytes with `dvc pull`.
"""

from __future__ import annotations

import shutil

from brainmri.config import SMALL_CNN, Params
from brainmri.core.errors import ConfigError
from brainmri.core.files import atomic_dir, write_json
from brainmri.core.progress import summary
from brainmri.learn.weights import RECORD, imagenet_file, local_file, source_record, weights_kind


def weights(p: Params, key: str) -> dict:
    """Run the stage for backbone `key`: write data/weights/KEY/ (weights.h5 unless 'none', source.json)."""
    if key not in p.backbones:
        raise ConfigError(f"unknown backbone {key!r}; backbones in params: {', '.join(p.backbones)}")
    bb = p.backbones[key]
    if bb.application == SMALL_CNN and bb.weights != "none":
        raise ConfigError(f"backbones.{key}.weights must be 'none' for {SMALL_CNN}, got {bb.weights!r}")
    kind = weights_kind(p, key)
    source = None if kind == "none" else imagenet_file(p, key) if kind == "imagenet" else local_file(p, key)
    record = source_record(p, key, source)
    with atomic_dir(p.path("weights") / key) as tmp:
        if source is not None:
            shutil.copyfile(source, tmp / record["file"])
            if kind == "file":
                from brainmri.learn.models import load_base

                load_base(p, key, tmp / record["file"])  # checked: it must fit the backbone, or stop here with the reason
        write_json(tmp / RECORD, record)
    summary(f"weights {key}", f"{kind}" + (f" from {record['origin']} (sha256 {record['sha256'][:12]}...)" if source else ""))
    return record
