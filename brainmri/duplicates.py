"""Group exact and near-duplicate images: same bytes, or same scan re-saved, resized or slightly cropped."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image
from scipy import ndimage

THUMB = 32  # side of the grayscale thumbnail used to confirm a near-duplicate by correlation
BACKGROUND = 24  # 8-bit level below which a pixel counts as background when cropping to the content
BORDER_MARGIN = 10  # ...or this far above the image border's median level: some scans sit on gray (25), not black, film
CLOSING = 2  # binary-closing iterations that bridge dark gaps splitting one head into pieces (without it, real pairs were lost)
THIN = 3  # binary-opening iterations: a region with nothing left after it (text strokes, edge stripes under ~7 px) is a mark
MIN_PART = 0.05  # a thick region at least this share of the largest is head too (a head split by a dark gap); smaller blobs are not


@dataclass(frozen=True)
class Fingerprint:
    sha256: str  # of the original file bytes: equal means exact duplicate
    phash: np.ndarray  # flattened boolean perceptual hash of the content crop
    thumb: np.ndarray  # zero-mean, unit-norm THUMB x THUMB vector of the content crop


def content_crop(gray: Image.Image) -> Image.Image:
    """Crop to the head, so padding, re-crops and marks in the margin do not change the fingerprint.

    The head is the largest connected bright region (scipy.ndimage.label) that is not a thin mark, with any
    other thick region at least MIN_PART of its size. A box around every bright pixel would also take in
    burned-in margin text (window/level numbers, a panel letter) or a white stripe at the edge, and then two
    crops of one scan no longer line up: two such real pairs straddled train and test.
    """
    a = np.asarray(gray)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    mask = ndimage.binary_closing(a > max(BACKGROUND, float(np.median(border)) + BORDER_MARGIN), iterations=CLOSING)
    labels, n = ndimage.label(mask)
    if n == 0:
        return gray
    sizes = np.bincount(labels.ravel())
    thick = np.bincount(labels[ndimage.binary_opening(mask, iterations=THIN)], minlength=n + 1) > 0
    thick[0] = False  # the background
    if not thick.any():  # nothing but thin marks (a line drawing): fall back on every region
        thick = sizes > 0
        thick[0] = False
    keep = thick & (sizes >= MIN_PART * sizes[thick].max())
    ys, xs = np.nonzero(keep[labels])
    return gray.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))


def fingerprint(img: Image.Image, sha256: str, hash_size: int) -> Fingerprint:
    crop = content_crop(img.convert("L"))
    ph = imagehash.phash(crop, hash_size=hash_size).hash.flatten()
    thumb = np.asarray(crop.resize((THUMB, THUMB), Image.Resampling.BILINEAR), dtype=np.float64).ravel()
    thumb -= thumb.mean()
    norm = np.linalg.norm(thumb)
    return Fingerprint(sha256, ph, thumb / norm if norm > 0 else thumb)


def similarity(prints: list[Fingerprint]) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise perceptual-hash Hamming distances and thumbnail correlations."""
    hashes = np.stack([p.phash for p in prints]).astype(np.int32)
    dist = hashes.shape[1] - (hashes @ hashes.T + (1 - hashes) @ (1 - hashes).T)
    thumbs = np.stack([p.thumb for p in prints])
    return dist, thumbs @ thumbs.T


def group_ids(keys: list[str], prints: list[Fingerprint], max_distance: int, min_correlation: float) -> list[str]:
    """A group id per image: images joined (transitively) by equal bytes or by both measures agreeing.

    `keys` are per-image content keys (the sha256 of the file bytes): a group's id derives from its members'
    keys only, so it depends neither on listing order nor on file names; renaming a file renames no group.
    A new copy whose key sorts first does rename its group: the split stage's ledger, keyed by each image's
    sha256, is what keeps splits put, not these ids.
    """
    n = len(prints)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if n:
        dist, corr = similarity(prints)
        same = (dist <= max_distance) & (corr >= min_correlation)
        by_sha: dict[str, int] = {}
        for i, p in enumerate(prints):
            j = by_sha.setdefault(p.sha256, i)
            same[i, j] = same[j, i] = True
        for i, j in zip(*np.nonzero(np.triu(same, 1)), strict=True):
            parent[find(int(i))] = find(int(j))
    members: dict[int, list[str]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(keys[i])
    gid = {root: "g" + hashlib.sha256(min(ks).encode("utf-8", "surrogateescape")).hexdigest()[:10] for root, ks in members.items()}
    return [gid[find(i)] for i in range(n)]
