"""Frozen-feature cache: a frozen base maps an image to the same features every time, so compute them once.

Entries are content-addressed (`<image sha256>-<features sha256>.npy`) inside a folder keyed by everything that
determines the features (backbone, weights, input size, pooling, preprocessing code, Keras version). Each entry
is written atomically and verified against its own hash when read, so a killed run resumes where it stopped
and a tampered or truncated entry is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from brainmri.config import Params
from brainmri.fsutil import atomic_path
from brainmri.preprocess import load_batch
from brainmri.progress import log, progress

CODE = [Path(__file__).with_name(n) for n in ("preprocess.py", "models.py")]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_folder(p: Params, key: str, weights_sha: str) -> Path:
    import keras

    bb = p.backbones[key]
    spec = {
        "application": bb.application,
        "weights": weights_sha,
        "input_size": bb.input_size,
        "pooling": bb.pooling,
        "code": [_sha(f.read_bytes()) for f in CODE],
        "keras": keras.__version__,
    }
    return p.path("feature_cache") / f"{key}-{_sha(json.dumps(spec, sort_keys=True).encode())[:16]}"


def _read(folder: Path, image_sha: str) -> np.ndarray | None:
    for entry in folder.glob(f"{image_sha}-*.npy"):
        data = entry.read_bytes()
        if entry.stem.endswith(_sha(data)[:16]):
            return np.load(entry, allow_pickle=False)
        log.warning("feature cache: %s does not match its hash; recomputing it", entry.name)
        entry.unlink(missing_ok=True)
    return None


def _write(folder: Path, image_sha: str, vector: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, vector.astype(np.float32), allow_pickle=False)
    data = buf.getvalue()
    with atomic_path(folder / f"{image_sha}-{_sha(data)[:16]}.npy") as tmp:
        tmp.write_bytes(data)


def extract(p: Params, key: str, extractor, weights_sha: str, paths: list[Path], desc: str) -> np.ndarray:
    """Features for each image in `paths` (n, d), computing only those not yet cached."""
    folder = cache_folder(p, key, weights_sha)
    folder.mkdir(parents=True, exist_ok=True)
    shas = [_sha(Path(f).read_bytes()) for f in paths]
    found: dict[str, np.ndarray] = {}
    for s in set(shas):
        vec = _read(folder, s)
        if vec is not None:
            found[s] = vec
    todo = sorted({s: f for s, f in zip(shas, paths, strict=True) if s not in found}.items())
    size, batch = p.backbones[key].input_size, p.train.feature_batch_size
    if todo:
        log.info("features %s: computing %d of %d images (%d cached)", key, len(todo), len(set(shas)), len(found))
    for i in progress(range(0, len(todo), batch), f"features {desc}", total=-(-len(todo) // batch)):
        chunk = todo[i : i + batch]
        out = np.asarray(extractor(load_batch([f for _, f in chunk], size), training=False))
        for (s, _), vec in zip(chunk, out, strict=True):
            _write(folder, s, vec)
            found[s] = vec
    if not paths:
        return np.zeros((0, int(extractor.output_shape[-1])), np.float32)
    return np.stack([found[s] for s in shas]).astype(np.float32)
