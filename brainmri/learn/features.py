"""Frozen-feature cache: a frozen base maps an image to the same features every time, so compute them once.

Entries are content-addressed (`<image sha256>-<features sha256>.npy`) inside a folder keyed by everything that
determines the features (the extractor's architecture and weight bytes, the preprocessing code, Keras version). Each entry
is written atomically and verified against its own hash when read, so a killed run resumes where it stopped
and a tampered or truncated entry is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from brainmri.config import Params
from brainmri.core.files import atomic_path
from brainmri.core.progress import log, progress
from brainmri.intake import preprocess
from brainmri.intake.preprocess import load_batch

PREPROCESS = Path(preprocess.__file__)  # the image preprocessing's code: part of the cache key


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_folder(p: Params, key: str, extractor) -> Path:
    """The folder for one extractor: keyed by its architecture and weight bytes, the image preprocessing and Keras."""
    import keras

    h = hashlib.sha256()
    h.update(architecture(extractor).encode())
    for w in extractor.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    h.update(PREPROCESS.read_bytes())
    h.update(keras.__version__.encode())
    return p.path("feature_cache") / f"{key}-{h.hexdigest()[:16]}"


def architecture(model) -> str:
    """The model's JSON with every layer name replaced by its order of first appearance.

    Keras numbers unnamed layers from a per-process counter ("input_layer", then "input_layer_1", ...), so the
    raw JSON of the same architecture differs between two builds in one process, and the cache was never reused
    there: a retrain in the same process recomputed every feature."""
    import json

    config = json.loads(model.to_json())
    names: dict[str, str] = {}

    def collect(node):
        if isinstance(node, dict):
            if isinstance(node.get("name"), str):
                names.setdefault(node["name"], f"layer{len(names)}")
            for v in node.values():
                collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)

    def rename(node):
        if isinstance(node, dict):
            return {k: rename(v) for k, v in node.items()}
        if isinstance(node, list):
            return [rename(v) for v in node]
        return names.get(node, node) if isinstance(node, str) else node

    collect(config)
    return json.dumps(rename(config), sort_keys=True)


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


def extract(p: Params, key: str, extractor, paths: list[Path], desc: str) -> np.ndarray:
    """Features for each image in `paths` (n, d), computing only those not yet cached."""
    folder = cache_folder(p, key, extractor)
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
        out = np.asarray(extractor.predict_on_batch(load_batch([f for _, f in chunk], size)))  # 2x faster than eager
        for (s, _), vec in zip(chunk, out, strict=True):
            _write(folder, s, vec)
            found[s] = vec
    if not paths:
        return np.zeros((0, int(extractor.output_shape[-1])), np.float32)
    return np.stack([found[s] for s in shas]).astype(np.float32)
