"""Frozen-feature cache: a frozen base maps an image to the same features every time, so compute them once.

Entries are content-addressed (`<image sha256>-<features sha256>.npy`) inside a folder keyed by everything that
determines the features (the extractor's architecture and weight bytes, the preprocessing code, Keras version, and
bf16 arithmetic when `train.feature_precision` asks for it). Each entry
is written atomically and verified against its own hash when read, so a killed run resumes where it stopped
and a tampered or truncated entry is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from brainmri.config import Params
from brainmri.core.errors import ConfigError
from brainmri.core.files import read_verified, scratch_dir, write_verified
from brainmri.core.machine import BF16_FLAGS, bf16_capable, cpu_model
from brainmri.core.progress import log, progress
from brainmri.intake import preprocess
from brainmri.intake.preprocess import load_batch

PREPROCESS = Path(preprocess.__file__)  # its source is part of the cache key: a change to preprocessing recomputes features


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def precision(p: Params) -> str:
    """The arithmetic the frozen base runs in when caching features: `train.feature_precision`, with auto resolved for
    this CPU (bf16 where it has bf16 instructions). bf16 on a CPU without them is refused: there it is emulated,
    slower than fp32."""
    asked = p.train.feature_precision
    if asked == "auto":
        return "bf16" if bf16_capable() else "fp32"
    if asked == "bf16" and not bf16_capable():
        raise ConfigError(
            f"train.feature_precision is bf16, but this CPU ({cpu_model()}) has no bf16 instructions ({' or '.join(BF16_FLAGS)}): "
            "there bf16 is emulated and slower than fp32; set fp32 (or auto, which picks bf16 only where the CPU has it)"
        )
    return asked


def cache_folder(p: Params, key: str, extractor) -> Path:
    """The folder for one extractor: keyed by its architecture and weight bytes, the image preprocessing and Keras,
    and bf16 arithmetic (an fp32 folder's key is what it was before the setting existed, so its entries stay valid)."""
    import keras

    h = hashlib.sha256()
    h.update(architecture(extractor).encode())
    for w in extractor.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    h.update(PREPROCESS.read_bytes())
    h.update(keras.__version__.encode())
    if precision(p) == "bf16":
        h.update(b"bf16")
        return p.path("feature_cache") / f"{key}-bf16-{h.hexdigest()[:16]}"
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
    data = read_verified(folder, image_sha, ".npy", "recomputing it")
    return None if data is None else np.load(io.BytesIO(data), allow_pickle=False)


def _write(folder: Path, image_sha: str, vector: np.ndarray, scratch: Path | None = None) -> None:
    buf = io.BytesIO()
    np.save(buf, vector.astype(np.float32), allow_pickle=False)
    write_verified(folder, image_sha, ".npy", buf.getvalue(), scratch)


def extract(p: Params, key: str, extractor, paths: list[Path], desc: str) -> np.ndarray:
    """Features for each image in `paths` (n, d), computing only those not yet cached (`compute`, in a worker)."""
    return extract_parts(p, key, extractor, {desc: paths})[desc]


def extract_parts(p: Params, key: str, extractor, parts: dict[str, list[Path]]) -> dict[str, np.ndarray]:
    """`extract` for several lists of images at once (train, its copies, val): one worker computes what none of
    them has cached, list by list in the order given, each in the batches it had alone."""
    folder = cache_folder(p, key, extractor)
    folder.mkdir(parents=True, exist_ok=True)
    shas = {desc: [_sha(Path(f).read_bytes()) for f in paths] for desc, paths in parts.items()}
    found: dict[str, np.ndarray] = {}
    todo: dict[str, list[tuple[str, str]]] = {}
    for desc, paths in parts.items():
        for s in set(shas[desc]) - set(found):
            vec = _read(folder, s)
            if vec is not None:
                found[s] = vec
        taken = {s for work in todo.values() for s, _ in work}  # computed for an earlier list: read, not redone
        todo[desc] = sorted({s: str(f) for s, f in zip(shas[desc], paths, strict=True) if s not in found and s not in taken}.items())
        if todo[desc]:
            unique = set(shas[desc])
            cached, earlier = len(unique & set(found)), len(unique & taken)
            log.info(
                "features %s: computing %d of %d images (%d cached, %d with an earlier list)",
                desc,
                len(todo[desc]),
                len(unique),
                cached,
                earlier,
            )
    if any(todo.values()):
        compute(extractor, folder, todo, (p.backbones[key].input_size, p.train.feature_batch_size), precision(p) == "bf16")
    for s, f in (item for work in todo.values() for item in work):
        vec = _read(folder, s)
        if vec is None:
            raise RuntimeError(f"features {key}: {f} was computed but its cache entry in {folder} cannot be read")
        found[s] = vec
    empty = np.zeros((0, int(extractor.output_shape[-1])), np.float32)
    return {desc: np.stack([found[s] for s in got]).astype(np.float32) if got else empty for desc, got in shas.items()}


def compute(extractor, folder: Path, todo: dict[str, list[tuple[str, str]]], sizes: tuple[int, int], bf16: bool = False) -> None:
    """Write the features of `todo` (per list, its (image sha, path) pairs) into the cache `folder`, from a spawned
    worker process holding a copy of `extractor`: the activations of the forward passes (1.6 GB for ResNet50V2 at
    224 px; TensorFlow keeps its pooled memory until the process ends) go back to the OS before the heads train in
    this process. The worker runs the same graph and weights on the same number of threads, so the features are the
    same bytes; with `bf16` it runs the graph's bf16 copy (models.in_bf16). The copy and the worker's unfinished files
    live in a scratch folder of this process, which an interrupt removes (brainmri.core.running.stop_now kills the
    worker, then removes this process's temporaries)."""
    import multiprocessing

    from brainmri.learn.models import save_model

    with scratch_dir(folder) as scratch:
        model = scratch / "extractor.keras"
        save_model(extractor, model)
        args = (str(model), str(folder), todo, sizes, os.getpid(), str(scratch), bf16)
        proc = multiprocessing.get_context("spawn").Process(target=_compute_in_worker, args=args, name="brainmri-features")
        proc.start()
        try:
            proc.join()
        except BaseException:  # interrupted while waiting (outside brainmri.core.running.run_interruptible): no orphan
            proc.kill()
            proc.join()
            raise
    if proc.exitcode != 0:
        raise RuntimeError(f"features ({', '.join(todo)}): the feature worker process failed (exit code {proc.exitcode}); see above")


def _compute_in_worker(model: str, folder: str, todo: dict, sizes: tuple[int, int], parent: int, scratch: str, bf16: bool) -> None:
    """The worker's side of `compute`: it ends with its parent (a killed stage leaves no process writing on) and
    leaves Ctrl-C to it (the stage stops the worker and says so in one line; no second traceback from here)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _end_with(parent)
    import tensorflow as tf

    from brainmri.learn.models import in_bf16, load_model

    tf.config.experimental.enable_op_determinism()  # as the train stage runs (brainmri.learn.fitting.seed_everything)
    extractor = in_bf16(load_model(model)) if bf16 else load_model(model)
    fill(extractor, Path(folder), todo, sizes, parent, Path(scratch))


def fill(extractor, folder: Path, todo: dict[str, list[tuple[str, str]]], sizes: tuple[int, int], parent=None, scratch=None) -> None:
    """Compute and cache `todo`'s features with `extractor`, list by list, `sizes` (input size, batch) at a time;
    stop at once if the process `parent` is no longer this one's parent; unfinished files in `scratch`."""
    size, batch = sizes
    for desc, work in todo.items():
        for i in progress(range(0, len(work), batch), f"features {desc}", total=-(-len(work) // batch)):
            if parent is not None and os.getppid() != parent:
                os._exit(1)  # the stage is gone: stop rather than fill its cache alone
            chunk = work[i : i + batch]
            out = np.asarray(extractor.predict_on_batch(load_batch([f for _, f in chunk], size)))  # 2x faster than eager
            for (s, _), vec in zip(chunk, out, strict=True):
                _write(folder, s, vec, scratch)


def _end_with(parent: int) -> None:
    """Ask Linux to kill this process when the thread that started it ends (prctl PR_SET_PDEATHSIG); elsewhere, or
    if the parent is already gone, the batch loop's parent check stops it. Written by hand: no standard-library call
    sets it, and a dependency for one system call is not worth it."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)
