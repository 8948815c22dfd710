"""Augmented copies of a training image: random affine transforms, flips and brightness with the ranges of Keras's
ImageDataGenerator, each drawn from a seed of its own (the image and the copy), so a copy never depends on the others."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance

from brainmri.config import Augment, Params

SOURCE_COLUMNS = ["image", "source_image", "source_path", "label", "group", "copy"]  # the manifest's first columns


def draw(rng: np.random.Generator, a: Augment) -> dict:
    """Random transform parameters, with the ranges of Keras's ImageDataGenerator."""
    return {
        "rotation": float(rng.uniform(-a.rotation, a.rotation)),
        "shift_x": float(rng.uniform(-a.shift, a.shift)),
        "shift_y": float(rng.uniform(-a.shift, a.shift)),
        "shear": float(rng.uniform(-a.shear, a.shear)),
        "zoom_x": float(rng.uniform(1 - a.zoom, 1 + a.zoom)),
        "zoom_y": float(rng.uniform(1 - a.zoom, 1 + a.zoom)),
        "flip": bool(a.horizontal_flip and rng.random() < 0.5),
        "brightness": float(rng.uniform(*a.brightness)),
    }


def apply(img: Image.Image, t: dict) -> Image.Image:
    """Apply one drawn transform: affine about the centre (black fill), then flip and brightness."""
    w, h = img.size
    rot, shear = math.radians(t["rotation"]), math.radians(t["shear"])
    rotate = np.array([[math.cos(rot), -math.sin(rot), 0], [math.sin(rot), math.cos(rot), 0], [0, 0, 1]])
    shear_m = np.array([[1, -math.sin(shear), 0], [0, math.cos(shear), 0], [0, 0, 1]])
    zoom = np.diag([t["zoom_x"], t["zoom_y"], 1.0])
    centre = np.array([[1, 0, w / 2 + t["shift_x"] * w], [0, 1, h / 2 + t["shift_y"] * h], [0, 0, 1]])
    uncentre = np.array([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1]])
    forward = centre @ rotate @ shear_m @ zoom @ uncentre  # input pixel -> output pixel
    inv = np.linalg.inv(forward)  # Pillow maps each output pixel back to the input
    out = img.transform((w, h), Image.Transform.AFFINE, tuple(inv[:2].ravel()), Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    if t["flip"]:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return ImageEnhance.Brightness(out).enhance(t["brightness"])


def copies(p: Params, img: Image.Image, image_id: str):
    """The K augmented copies of one image, as (k, transform, image): drawn from a seed per image and copy."""
    for k in range(p.augment.copies):
        t = draw(np.random.default_rng([p.seed, int(image_id, 16), k]), p.augment)
        yield k, t, apply(img, t)


def manifest_row(name: str, source, k: int, t: dict) -> dict:
    """The manifest's row for copy `k` of the training image `source` (a split row), saved as `name`."""
    return {
        "image": name,
        "source_image": source.image,
        "source_path": source.source_path,
        "label": source.label,
        "group": source.group,
        "copy": k,
        **{key: round(v, 6) if isinstance(v, float) else v for key, v in t.items()},
    }


def manifest_columns(a: Augment) -> list[str]:
    """The manifest's columns: the source's, then each transform parameter (named by a throwaway draw)."""
    return [*SOURCE_COLUMNS, *draw(np.random.default_rng(0), a)]
