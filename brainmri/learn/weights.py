"""Where a backbone's pretrained weights file comes from, for the weights stage: the file Keras downloads for
`imagenet`, or a local file, which must lie in the weights inbox. Keras is imported only when needed."""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path

from brainmri.config import Params
from brainmri.core.errors import ConfigError, WeightsError

FILES = ("weights.weights.h5", "weights.h5")  # the copy keeps the source's kind: Keras 3 reads `.weights.h5` as its own
# format and any other `.h5` as the legacy one (ImageNet downloads are legacy files)
RECORD = "source.json"  # kind, origin and sha256 of the weights: what train, the model card and lineage show


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextmanager
def recording_downloads(seen: list[str]):
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


def imagenet_file(p: Params, key: str) -> Path:
    """The ImageNet weights file Keras downloads (or finds in its cache) for backbone `key`."""
    from brainmri.learn.models import application

    bb = p.backbones[key]
    cls = application(bb.application, key)
    seen: list[str] = []
    try:
        with recording_downloads(seen):
            cls(include_top=False, weights="imagenet", input_shape=(bb.input_size, bb.input_size, 3))
    except ValueError as exc:
        raise ConfigError(f"backbones.{key}: {bb.application} cannot be built at input_size {bb.input_size}: {exc}") from None
    except Exception as exc:  # Keras raises a bare Exception on a failed download
        if "URL fetch failure" in str(exc) or "HTTP" in str(exc) or isinstance(exc, OSError):
            raise WeightsError(offline_message(key, exc)) from None
        raise
    if not seen:
        raise WeightsError(f"backbones.{key}: Keras built {bb.application} with ImageNet weights but named no weights file")
    return Path(seen[-1])


def offline_message(key: str, exc: Exception) -> str:
    url = re.search(r"https?://\S+?\.h5", str(exc))
    fname = url.group(0).rsplit("/", 1)[-1] if url else "the backbone's ImageNet weights file"
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models" / fname
    return (
        f"backbones.{key}.weights is 'imagenet' but Keras could not download {fname}"
        f"{' from ' + url.group(0) if url else ''} (no internet?). Either download it once into {cache}, "
        f"or set backbones.{key}.weights to a local weights file, or to 'none' to train from random weights."
    )


def local_file(p: Params, key: str) -> Path:
    """Backbone `key`'s local weights file, checked to exist and to lie in the weights inbox."""
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


def weights_kind(p: Params, key: str) -> str:
    """'imagenet', 'none' or 'file' (a local file): what backbone `key`'s weights in params name."""
    w = p.backbones[key].weights
    return w if w in ("imagenet", "none") else "file"


def source_record(p: Params, key: str, source: Path | None) -> dict:
    """source.json for backbone `key` whose weights file is `source` (None for 'none'): its kind, origin, the name of
    the copy and its sha256."""
    bb, kind = p.backbones[key], weights_kind(p, key)
    record = {"backbone": key, "application": bb.application, "kind": kind, "origin": None, "file": None, "sha256": None}
    if source is not None:
        name = FILES[0] if source.name.endswith(".weights.h5") else FILES[1]
        record.update(origin=bb.weights if kind == "file" else source.name, file=name, sha256=sha256(source))
    return record
