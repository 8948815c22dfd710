"""augment stage: K deterministic augmented copies of each training image, linked to their source."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance

from brainmri.config import Augment, Params
from brainmri.core.files import atomic_dir, write_csv
from brainmri.core.progress import progress, summary
from brainmri.intake.decode import load_rgb, save_png
from brainmri.intake.parts import split_part


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


def augment(p: Params) -> dict:
    """Run the stage: write augmented images and their manifest; return a summary."""
    train = split_part(p, "train").frame
    src_dir = p.path("ingest_images")
    rows = []
    with atomic_dir(p.path("augment_images")) as out:
        for r in progress(train.itertuples(index=False), "augment", total=len(train)):
            img = load_rgb(src_dir / r.image)
            for k, t, copy in copies(p, img, r.image_id):
                name = f"{r.image_id}_{k}.png"
                save_png(copy, out / name)
                rows.append(
                    {
                        "image": name,
                        "source_image": r.image,
                        "source_path": r.source_path,
                        "label": r.label,
                        "group": r.group,
                        "copy": k,
                        **{key: round(v, 6) if isinstance(v, float) else v for key, v in t.items()},
                    }
                )
    cols = ["image", "source_image", "source_path", "label", "group", "copy", *draw(np.random.default_rng(0), p.augment)]
    write_csv(p.path("augment_manifest"), pd.DataFrame(rows, columns=cols))
    summary("augment", f"{len(rows)} augmented images from {len(train)} training images ({p.augment.copies} each)")
    return {"n_source": len(train), "n_augmented": len(rows), "copies": p.augment.copies}
