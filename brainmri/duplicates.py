"""Group exact and near-duplicate images: same bytes, or same scan re-saved, resized or slightly cropped."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image

from brainmri.images import content_crop

THUMB = 32  # side of the grayscale thumbnail used to confirm a near-duplicate by correlation


@dataclass(frozen=True)
class Fingerprint:
    sha256: str  # of the original file bytes: equal means exact duplicate
    phash: np.ndarray  # flattened boolean perceptual hash of the content crop
    thumb: np.ndarray  # zero-mean, unit-norm THUMB x THUMB vector of the content crop


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
