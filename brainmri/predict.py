"""`brainmri predict`: run an exported ONNX model on image files and folders, without TensorFlow.

Each image goes through the same decoding as ingest (format from content, EXIF, every mode to RGB, the same size
cap) and the same preprocessing as training (brainmri.preprocess); threshold, class names and limits come from the
model's metadata, written by the export stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.errors import BrainMRIError, ImageError
from brainmri.fsutil import atomic_path, write_csv
from brainmri.images import decode_bytes
from brainmri.onnxrt import metadata, probabilities, session
from brainmri.preprocess import square

COLUMNS = ["path", "probability", "label", "error"]


def collect(inputs: list[str]) -> list[Path]:
    """Files named directly, plus every non-hidden file under the folders named (recursively), in sorted order."""
    out = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                out += [Path(root) / f for f in sorted(files) if not f.startswith(".")]
        elif path.exists():
            out.append(path)
        else:
            raise BrainMRIError(f"input {item} does not exist")
    return out


def predict(model: str | Path, inputs: list[str], out: str | Path, batch: int = 16) -> pd.DataFrame:
    model = Path(model)
    if model.suffix.lower() != ".onnx":
        raise BrainMRIError(f"{model}: --model must be an exported .onnx file (Keras and other model files are not accepted)")
    if not model.is_file():
        raise BrainMRIError(f"{model}: model file not found")
    sess = session(model)
    meta = metadata(sess)
    missing = [k for k in ("input_size", "threshold", "positive_class", "negative_class") if k not in meta]
    if missing:
        raise BrainMRIError(f"{model}: not exported by brainmri (metadata lacks {', '.join(missing)})")
    size, threshold = int(meta["input_size"]), float(meta["threshold"])
    limits = {"max_pixels": int(meta.get("max_pixels", 40_000_000)), "max_side": int(meta.get("max_side", 512))}  # as ingest did
    files = collect(inputs)
    rows, arrays, index = [], [], []
    for f in files:
        try:
            dec = decode_bytes(f.read_bytes(), **limits)
            arrays.append(square(dec.image, size))
            index.append(len(rows))
            rows.append({"path": str(f), "probability": None, "label": None, "error": ""})
        except (ImageError, OSError) as exc:
            rows.append({"path": str(f), "probability": None, "label": None, "error": str(exc)})
    if arrays:
        probs = probabilities(sess, np.stack(arrays).astype(np.float32), batch)
        for i, prob in zip(index, probs, strict=True):
            rows[i]["probability"] = round(float(prob), 6)
            rows[i]["label"] = meta["positive_class"] if prob >= threshold else meta["negative_class"]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    out = Path(out)
    if out.suffix.lower() == ".json":
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps({"model": str(model), "threshold": threshold, "predictions": rows}, indent=2) + "\n")
    else:
        write_csv(out, frame)
    return frame
