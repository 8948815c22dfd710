"""weights stage: one backbone's pretrained weights as a file under data/, so DVC versions, pushes and pulls them.

- `imagenet`: Keras downloads its file (hash-checked by Keras) where there is internet; the file Keras keeps is copied.
- a local file: must lie in the workspace's weights inbox (paths.weights_inbox, a DVC dependency of this stage, so a
  file replaced in place is noticed); copied, and checked by loading it into the backbone.
- `none`: recorded, no file.
train loads the copy and depends on its md5; an air-gapped machine gets the same bytes with `dvc pull`.
"""

from __future__ import annotations

import hashlib
import shutil
from contextlib import contextmanager
from pathlib import Path

from brainmri.config import SMALL_CNN, Params
from brainmri.core.errors import ConfigError, WeightsError
from brainmri.core.files import atomic_dir, write_json
from brainmri.core.progress import summary

FILES = ("weights.weights.h5", "weights.h5")  # the copy keeps the source's kind: Keras 3 reads `.weights.h5` as its own
# format and any other `.h5` as the legacy one (ImageNet downloads are legacy files)
RECORD = "source.json"  # kind, origin and sha256 of the weights: what train, the model card and lineage show


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextmanager
def _recording_downloads(seen: list[str]):
    """Note the file each Keras download returns (Keras keeps it in its cache; we copy that exact file)."""
    from keras.src.utils import file_utils

    original = file_utils.get_file

    def get_file(*args, **kwargs):
        path = original(*args, **kwargs)
        seen.append(str(path))
        return path

    file_utils.get_file = get_file
    try:
        yield
    finally:
        file_utils.get_file = original


def _imagenet_file(p: Params, key: str) -> Path:
    from brainmri.learn.models import _offline_message, application

    bb = p.backbones[key]
    cls = application(bb.application, key)
    seen: list[str] = []
    try:
        with _recording_downloads(seen):
            cls(include_top=False, weights="imagenet", input_shape=(bb.input_size, bb.input_size, 3))
    except ValueError as exc:
        raise ConfigError(f"backbones.{key}: {bb.application} cannot be built at input_size {bb.input_size}: {exc}") from None
    except Exception as exc:  # Keras raises a bare Exception on a failed download
        if "URL fetch failure" in str(exc) or "HTTP" in str(exc) or isinstance(exc, OSError):
            raise WeightsError(_offline_message(key, exc)) from None
        raise
    if not seen:
        raise WeightsError(f"backbones.{key}: Keras built {bb.application} with ImageNet weights but named no weights file")
    return Path(seen[-1])


def _local_file(p: Params, key: str) -> Path:
    w = p.backbones[key].weights
    inbox = p.path("weights_inbox").resolve()
    path = p.resolve(w)
    if not path.is_file():
        raise ConfigError(f"backbones.{key}.weights: weights file {path} not found (use 'imagenet', 'none' or a .h5 file in {inbox})")
    if not path.absolute().is_relative_to(p.path("weights_inbox").absolute()):
        raise ConfigError(
            f"backbones.{key}.weights: {w} is outside the weights inbox {inbox}; put the file (or a symlink to it) there, "
            "so that DVC notices when it is replaced"
        )
    return path


def weights(p: Params, key: str) -> dict:
    """Run the stage for backbone `key`: write data/weights/KEY/ (weights.h5 unless 'none', source.json)."""
    if key not in p.backbones:
        raise ConfigError(f"unknown backbone {key!r}; backbones in params: {', '.join(p.backbones)}")
    bb = p.backbones[key]
    if bb.application == SMALL_CNN and bb.weights != "none":
        raise ConfigError(f"backbones.{key}.weights must be 'none' for {SMALL_CNN}, got {bb.weights!r}")
    kind = bb.weights if bb.weights in ("imagenet", "none") else "file"
    source = None if kind == "none" else _imagenet_file(p, key) if kind == "imagenet" else _local_file(p, key)
    record = {"backbone": key, "application": bb.application, "kind": kind, "origin": None, "file": None, "sha256": None}
    if source is not None:
        name = FILES[0] if source.name.endswith(".weights.h5") else FILES[1]
        record.update(origin=bb.weights if kind == "file" else source.name, file=name, sha256=sha256(source))
    with atomic_dir(p.path("weights") / key) as tmp:
        if source is not None:
            shutil.copyfile(source, tmp / record["file"])
            if kind == "file":
                from brainmri.learn.models import load_base

                load_base(p, key, tmp / record["file"])  # checked: it must fit the backbone, or stop here with the reason
        write_json(tmp / RECORD, record)
    summary(f"weights {key}", f"{kind}" + (f" from {record['origin']} (sha256 {record['sha256'][:12]}...)" if source else ""))
    return record
