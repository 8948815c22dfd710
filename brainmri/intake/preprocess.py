"""The one preprocessing path, used by training, evaluation, export, benchmark and prediction alike.

An image becomes a float32 array of raw RGB values (0-255), padded to a square with black (MRI background)
and resized to the model's input size. Each backbone's own `preprocess_input` is built into the model as
its first layer (brainmri.learn.models), so this step never differs between backbones and needs no TensorFlow.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image


def square(img: Image.Image, size: int) -> np.ndarray:
    """Pad to a centred square with black, resize to size x size; uint8 RGB array."""
    img = img.convert("RGB")
    side = max(img.size)
    canvas = Image.new("RGB", (side, side), (0, 0, 0))
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return np.asarray(canvas.resize((size, size), Image.Resampling.BILINEAR))


def load_batch(paths: Iterable[str | Path], size: int) -> np.ndarray:
    """Model input for a batch of image files: shape (n, size, size, 3), float32, values 0-255."""
    arrays = []
    for path in paths:
        with Image.open(path) as img:
            arrays.append(square(img, size))
    if not arrays:
        return np.zeros((0, size, size, 3), np.float32)
    return np.stack(arrays).astype(np.float32)
