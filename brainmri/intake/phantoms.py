"""Synthetic brain-MRI phantoms (skull, tissue, ventricles, optional tumour mass) for tests and an offline demo."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from brainmri.core.files import atomic_dir


def _ellipse(yy, xx, cy, cx, ry, rx, angle):
    c, s = np.cos(angle), np.sin(angle)
    y, x = yy - cy, xx - cx
    return ((x * c + y * s) / rx) ** 2 + ((-x * s + y * c) / ry) ** 2


def phantom(rng: np.random.Generator, tumor: bool | int, height: int, width: int) -> np.ndarray:
    """One axial slice as a uint8 grayscale array; deterministic for a given generator state. `tumor` False: none;
    True: the two-class demo's mass; an int k >= 1: tumour type k of an N-class set (`_typed_mass`), 0: none."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    cy, cx = height * rng.uniform(0.46, 0.54), width * rng.uniform(0.46, 0.54)
    ry, rx = height * rng.uniform(0.36, 0.44), width * rng.uniform(0.30, 0.38)
    angle = rng.uniform(-0.25, 0.25)
    head = _ellipse(yy, xx, cy, cx, ry, rx, angle)
    brain_mask = head <= 0.80
    img = np.zeros((height, width))
    img[(head <= 1.0) & (head > 0.88)] = rng.uniform(0.75, 0.95)  # skull / scalp fat: bright ring
    img[(head <= 0.88) & (head > 0.80)] = rng.uniform(0.10, 0.20)  # cerebrospinal fluid rim: dark
    texture = ndimage.gaussian_filter(rng.normal(size=(height, width)), sigma=max(height, width) / 40)
    texture /= np.abs(texture).max() + 1e-9
    img[brain_mask] = rng.uniform(0.40, 0.55) + 0.12 * texture[brain_mask]  # grey/white matter
    for side in (-1, 1):  # lateral ventricles: two dark lobes beside the midline
        vy = cy + ry * rng.uniform(-0.08, 0.05)
        vx = cx + side * rx * rng.uniform(0.10, 0.16)
        lobe = _ellipse(yy, xx, vy, vx, ry * rng.uniform(0.18, 0.26), rx * rng.uniform(0.06, 0.10), angle + side * 0.3)
        img[lobe <= 1.0] = rng.uniform(0.05, 0.15)
    if not isinstance(tumor, bool) and tumor:
        _typed_mass(rng, img, (yy, xx), (cy, cx, ry, rx, angle), brain_mask, int(tumor))
    elif tumor:
        for _ in range(100):  # place the mass fully inside the brain
            r = rng.uniform(0.07, 0.22) * min(ry, rx)
            ty, tx = cy + rng.uniform(-0.55, 0.55) * ry, cx + rng.uniform(-0.55, 0.55) * rx
            if _ellipse(np.array(ty), np.array(tx), cy, cx, ry, rx, angle) <= (0.80 - r / min(ry, rx)) ** 2:
                break
        mass = _ellipse(yy, xx, ty, tx, r * rng.uniform(0.7, 1.3), r, rng.uniform(0, np.pi))
        contrast = rng.choice([-1.0, 1.0]) * rng.uniform(0.18, 0.45)
        img[mass <= 1.0] += contrast
        if rng.random() < 0.5:  # ring enhancement around a necrotic core
            img[(mass > 0.7) & (mass <= 1.0)] += abs(contrast)
        edema = (mass > 1.0) & (mass <= 2.2) & brain_mask
        img[edema] += 0.08 * rng.uniform(0.5, 1.5)
    img = ndimage.gaussian_filter(img, sigma=rng.uniform(0.6, 1.4))
    img += rng.normal(0.0, rng.uniform(0.01, 0.04), img.shape)  # acquisition noise
    img = np.abs(img) * rng.uniform(0.85, 1.15)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _typed_mass(rng: np.random.Generator, img: np.ndarray, grid, head, brain_mask: np.ndarray, kind: int) -> None:
    """Tumour type `kind` (1, 2, 3, then again with the contrast flipped) drawn into `img`, after the patterns of the
    four-class sets: 1 a large mass anywhere with a ring and oedema (glioma-like), 2 a bright round mass at the brain's
    edge (meningioma-like), 3 a small mass low on the midline (pituitary-like). Types differ in place, size and
    texture, so an N-class demo has something to learn; they model no real pathology."""
    yy, xx = grid
    cy, cx, ry, rx, angle = head
    style = (kind - 1) % 3
    size = ((0.16, 0.26), (0.10, 0.17), (0.05, 0.09))[style]
    r = rng.uniform(*size) * min(ry, rx)
    if style == 0:
        ty, tx = cy + rng.uniform(-0.4, 0.4) * ry, cx + rng.uniform(-0.4, 0.4) * rx
    elif style == 1:
        t = rng.uniform(0, 2 * np.pi)
        ty, tx = cy + np.sin(t) * (0.8 * ry - r), cx + np.cos(t) * (0.8 * rx - r)
    else:
        ty, tx = cy + rng.uniform(0.35, 0.5) * ry, cx + rng.uniform(-0.05, 0.05) * rx
    mass = _ellipse(yy, xx, ty, tx, r * rng.uniform(0.85, 1.15), r, rng.uniform(0, np.pi))
    sign = 1.0 if (kind - 1) // 3 % 2 == 0 else -1.0
    img[mass <= 1.0] += sign * rng.uniform(0.25, 0.45)
    if style == 0:
        img[(mass > 0.6) & (mass <= 1.0)] += 0.2  # the ring
        img[(mass > 1.0) & (mass <= 2.4) & brain_mask] += 0.1  # oedema


def _encode(arr: np.ndarray, rng: np.random.Generator) -> tuple[bytes, str]:
    img = Image.fromarray(arr, "L")
    if rng.random() < 0.5:
        img = img.convert("RGB")  # the real data mixes grayscale and RGB files
    buf = io.BytesIO()
    if rng.random() < 0.8:
        img.save(buf, format="JPEG", quality=int(rng.integers(80, 96)))
        return buf.getvalue(), ".jpg"
    img.save(buf, format="PNG")
    return buf.getvalue(), ".png"


def _near_copy(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same scan re-saved: slightly cropped and resized, as in the real dataset."""
    h, w = arr.shape
    dy, dx = int(h * rng.uniform(0, 0.04)), int(w * rng.uniform(0, 0.04))
    crop = Image.fromarray(arr[dy : h - dy, dx : w - dx])
    scale = rng.uniform(0.7, 1.3)
    return np.asarray(crop.resize((max(32, int(crop.width * scale)), max(32, int(crop.height * scale))), Image.Resampling.BILINEAR))


MARKER = ".brainmri-synthetic"  # written at a generated dataset's root; ingest records it, the report says so


def generate(
    out: str | Path, classes: dict[str, bool | int], n_per_class: int, seed: int, min_size: int, max_size: int, duplicate_fraction: float
) -> int:
    """Write `n_per_class` phantoms per class folder under `out` (replaced atomically); return the file count.

    `classes` maps each class folder name to whether its phantoms carry a tumour (two classes), or to a tumour type
    (N classes: 0 none, k >= 1 type k; see `phantom`).
    """
    count = 0
    with atomic_dir(out) as tmp:
        (tmp / MARKER).write_text("Synthetic phantom MRI slices made by `brainmri synthesize`: not patient data.\n")
        for ci, (name, tumor) in enumerate(sorted(classes.items())):
            folder = tmp / name
            folder.mkdir()
            for i in range(n_per_class):
                rng = np.random.default_rng([seed, ci, i])
                height = int(rng.integers(min_size, max_size + 1))
                width = int(np.clip(height * rng.uniform(0.8, 1.25), min_size, max_size))
                arr = phantom(rng, tumor, height, width)
                data, ext = _encode(arr, rng)
                (folder / f"{name} {i:03d}{ext}").write_bytes(data)
                count += 1
                if rng.random() < duplicate_fraction:
                    data, ext = _encode(_near_copy(arr, rng), rng)
                    (folder / f"{name} {i:03d} copy{ext}").write_bytes(data)
                    count += 1
    return count


NO_TUMOUR = re.compile(r"(no|none|normal|healthy|no[ _-]?tumou?r)", re.IGNORECASE)  # folder names of the tumour-free class in public sets


def class_kinds(classes: list[str], positive_class: str) -> dict[str, bool | int]:
    """What `generate` draws in each class folder: two classes, a tumour in positive_class only (the demo as ever);
    N classes, no tumour in a class named like 'notumor' or 'none' and a tumour type of its own in each other."""
    if len(classes) == 2:
        return {c: c == positive_class for c in classes}
    kinds, k = {}, 0
    for c in classes:
        if NO_TUMOUR.fullmatch(c):
            kinds[c] = 0
        else:
            k += 1
            kinds[c] = k
    return kinds
