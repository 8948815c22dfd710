"""Group exact and near-duplicate images: same bytes, or same scan re-saved, resized, marked or cropped.

Three rules join a pair, and groups are their transitive closure:
- the whole head region: perceptual-hash distance and thumbnail correlation both close (re-saves, rescales, marks
  in the margin, padding);
- nearly the whole head region (`close_similarity`): the other's view trimmed by a little (at most SMALL_TRIM) on
  one or two sides, or turned by a few degrees, correlates with it at the crop rule's bar (min_partial), and the
  insides of the two heads correlate at MIN_INNER (`inner_correlation`). A crop that nicks the head, or a slight
  turn, stretches or tilts the whole view, and the hash moves too far. The inside test keeps apart smooth heads
  (phantoms), whose outlines alone correlate at 0.98 once cropped to the head;
- one image is part of the other (`partial_similarity`): a copy cropped into the head. The other's view, trimmed on
  one or two sides, correlates with it.
Written by hand, as no well-kept library matches partial crops and small turns without OpenCV-style keypoints.
Measured by `benchmarks/duplicates.py` on perturbed copies of the real images. `joined` judges every pair (n x n
matrices): the reference the tests and the benchmark compare with. Ingest finds the same pairs through
`grouping`'s lossless screen, judging each candidate with these rules one pair at a time.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from functools import cache, lru_cache

import imagehash
import numpy as np
from PIL import Image

from brainmri.intake.decode import BACKGROUND, content_crop

THUMB = 32  # side of the grayscale thumbnail used to confirm a near-duplicate by correlation
VIEW = 64  # side of the stored views the partial matcher trims and shrinks to THUMB (2x THUMB: trims stay sub-pixel)
TRIM_STEP = 0.03  # trim grid, as a share of the view's side; a finer step (0.015) found 0.1 points more copies, at 4x the time
MAX_TRIM = 0.45  # up to this share cut off one side: a 25% crop of an image takes at most ~40% of a head that fills 60% of it
MIN_KEPT = 0.5  # the trimmed part keeps at least half the view's area: smaller parts look alike across different scans
BORDER_TOLERANCE = 12  # gray levels: a border row or column within this of the border's median level is fill (padding, film)
BORDER_SHARE = 0.98  # ...when this share of its pixels are (a few JPEG-noise pixels or a stray mark do not stop the trim)
CUT_BAND = 3  # view pixels (of VIEW) along a side where a straight cut shows: ~5% of the side
CUT_SHARE = 0.6  # a side is cut when content spans this share of its band; a round head edge spans ~0.4 (real set median)
# trims up to this share on any one or two sides need no cut side: a crop that only nicks a round head leaves no straight edge to see
# (benchmarks/duplicates.py: 40 of 48 crops the other rules missed then correlate at 0.956 or more; different real scans at most 0.912)
SMALL_TRIM = 0.15
# degrees: each image's head region is also viewed turned by these (a rescan or re-save tilted slightly; the benchmark's
# copies turn up to 3 degrees; different real scans at most 0.885)
TURNS = (-3.0, -1.5, 1.5, 3.0)
INNER_ERODE = 5  # view pixels (of VIEW) taken off the head's edge for the inside test: the outline band is what smooth heads share
# inside correlation of a close match: copies of real scans 0.83 or more (1st percentile of crops, pads, turns, text),
# different real scans at most 0.39, different smooth phantoms and synthetic heads at most 0.817 (64 x 72 px ones)
MIN_INNER = 0.82


@dataclass(frozen=True)
class Fingerprint:
    sha256: str  # of the original file bytes: equal means exact duplicate
    phash: np.ndarray  # flattened boolean perceptual hash of the content crop
    thumb: np.ndarray  # zero-mean, unit-norm THUMB x THUMB vector of the content crop
    views: np.ndarray  # (3, VIEW, VIEW) uint8: the head region, the head region of the frame, the frame (`frame`)
    cuts: np.ndarray  # (3, 4) bool: per view, whether its top, bottom, left, right side looks cut straight (`cut_sides`)
    turned: np.ndarray  # (len(TURNS), VIEW, VIEW) uint8: the head region of the image turned by each of TURNS
    points: np.ndarray | None = None  # (3, 81, 36) float16: `grouping.index_points`, made by ingest's workers (else when needed)

    def view(self, v: int) -> np.ndarray:
        """views[v] as float32, what the rules compute with."""
        return self.views[v].astype(np.float32)


def frame(gray: np.ndarray) -> np.ndarray:
    """The image without its uniform border: rows and columns of the border's fill level are cut, repeatedly (a pad of
    gray around a black film border comes off in two rounds). Padding a copy changes its frame back to the original's."""
    a = gray
    for _ in range(4):
        if min(a.shape) < 8:
            break
        fill = np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]))
        near = np.abs(a - fill) <= BORDER_TOLERANCE
        rows, cols = np.nonzero(near.mean(1) < BORDER_SHARE)[0], np.nonzero(near.mean(0) < BORDER_SHARE)[0]
        if len(rows) == 0 or len(cols) == 0:
            break
        cut = a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        if cut.shape == a.shape:
            break
        a = cut
    return a


def _view(img: Image.Image) -> np.ndarray:
    """The 8-bit image box-shrunk to VIEW x VIEW: 8-bit levels (Pillow rounds), kept as uint8, a quarter of float32's
    memory (a 10,000-image set's fingerprints: about 300 MB, not 1.2 GB); the rules compute in float32 from them."""
    return np.asarray(img.resize((VIEW, VIEW), Image.Resampling.BOX), np.uint8)


def cut_sides(view: np.ndarray) -> np.ndarray:
    """Top, bottom, left, right: does content run along most of that side, as where a crop cut through the head? Only a
    side cut so can be the trimmed side of a partial match: whole heads (and smooth phantoms) end round, so two
    different scans are not matched by trimming one until it happens to look like the other."""
    bright = view > max(BACKGROUND, 0.2 * float(np.percentile(view, 95)))
    k = CUT_BAND
    bands = [bright[:k].any(0), bright[-k:].any(0), bright[:, :k].any(1), bright[:, -k:].any(1)]
    return np.array([b.mean() >= CUT_SHARE for b in bands])


def fingerprint(img: Image.Image, sha256: str, hash_size: int, crop: Image.Image | None = None) -> Fingerprint:
    """`crop`: `content_crop(img.convert("L"))` when the caller has it already (ingest: the decoder found the head)."""
    gray = img.convert("L")
    crop = content_crop(gray) if crop is None else crop
    ph = imagehash.phash(crop, hash_size=hash_size).hash.flatten()
    thumb = np.asarray(crop.resize((THUMB, THUMB), Image.Resampling.BILINEAR), dtype=np.float64).ravel()
    thumb -= thumb.mean()
    norm = np.linalg.norm(thumb)
    framed = Image.fromarray(frame(np.asarray(gray, np.float32)).astype(np.uint8))
    views = np.stack([_view(crop), _view(content_crop(framed)), _view(framed)])
    turned = np.stack([_view(content_crop(gray.rotate(a, resample=Image.Resampling.BILINEAR, fillcolor=0))) for a in TURNS])
    cuts = np.stack([cut_sides(v.astype(np.float32)) for v in views])
    return Fingerprint(sha256, ph, thumb / norm if norm > 0 else thumb, views, cuts, turned)


def similarity(prints: list[Fingerprint]) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise perceptual-hash Hamming distances and thumbnail correlations."""
    hashes = np.stack([p.phash for p in prints]).astype(np.int32)
    dist = hashes.shape[1] - (hashes @ hashes.T + (1 - hashes) @ (1 - hashes).T)
    thumbs = np.stack([p.thumb for p in prints])
    return dist, thumbs @ thumbs.T


@cache
def _shrink(lo: float, hi: float, out: int = THUMB) -> np.ndarray:
    """out x VIEW matrix: each output pixel is the mean of the view over its share of [lo, hi) (area resampling)."""
    edges = (lo + (hi - lo) * np.arange(out + 1) / out) * VIEW
    m = np.zeros((out, VIEW), np.float64)
    for i in range(out):
        for j in range(int(edges[i]), min(VIEW, int(np.ceil(edges[i + 1])))):
            m[i, j] = max(0.0, min(edges[i + 1], j + 1) - max(edges[i], j))
    return (m / m.sum(1, keepdims=True)).astype(np.float32)


@cache  # made once (0.65 ms): the close verdicts asked for it 514 times a call, a minute of the test suite's CPU
def trims() -> tuple[tuple[float, float, float, float], ...]:
    """(top, bottom, left, right) shares cut off one or two sides, keeping at least MIN_KEPT of the area."""
    steps = np.round(np.arange(TRIM_STEP, MAX_TRIM + 1e-9, TRIM_STEP), 4)
    out = []
    for sides in [*itertools.combinations(range(4), 1), *itertools.combinations(range(4), 2)]:
        for cut in itertools.product(*[steps if s in sides else [0.0] for s in range(4)]):
            t, b, left, r = (float(c) for c in cut)
            if (1 - t - b) * (1 - left - r) >= MIN_KEPT:
                out.append((t, b, left, r))
    return tuple(out)


def _thumbs(views: np.ndarray, trim=(0.0, 0.0, 0.0, 0.0), out: int = THUMB) -> np.ndarray:
    """Each view's part that `trim` keeps, area-shrunk to out x out, zero-mean and unit-norm (flattened)."""
    t, b, left, r = trim
    return _unit((_shrink(t, 1 - b, out) @ views @ _shrink(left, 1 - r, out).T).reshape(len(views), -1))


def trimmed(view: np.ndarray, grid: tuple) -> np.ndarray:
    """One view trimmed by each of `grid`, as `_thumbs` makes each (the same products, stacked): (len(grid), THUMB²)."""
    rows, cols = _stacked(grid)
    return _unit((rows @ view @ cols).reshape(len(grid), -1))


@lru_cache(maxsize=8)  # bounded: the crop verdicts ask for many subsets of the trims, up to 12 MB each
def _stacked(grid: tuple) -> tuple[np.ndarray, np.ndarray]:
    """`_shrink`'s row and (transposed) column matrices of each trim of `grid`, stacked."""
    rows = np.stack([_shrink(t, 1 - b) for t, b, _, _ in grid])
    cols = np.stack([_shrink(left, 1 - r).T for _, _, left, r in grid])
    return rows, cols


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows zero-mean and unit-norm; a flat row stays zero."""
    mean = x.mean(1, keepdims=True)
    x -= mean
    n = np.linalg.norm(x, axis=1, keepdims=True)
    # a flat region keeps only float32 rounding noise after the mean goes; scaled to unit norm it would be a stripe
    # pattern that can correlate with anything, so it stays zero (correlates with nothing)
    flat = n <= 1e-3 * (np.abs(mean) + 1) * np.sqrt(x.shape[1])
    return np.where(flat, 0.0, x / np.where(flat, 1.0, n)).astype(np.float32)


def partial_similarity(prints: list[Fingerprint], chunk: int = 512) -> np.ndarray:
    """best[i, j]: the highest correlation between image i's thumbnail and image j's trimmed on one or two sides, over
    the three views and the trims whose sides look cut in image i (a copy cropped into the head is a trimmed
    original; -1 where no trim applies). O(n^2): a few seconds for 253 images on 2 cores."""
    n, grid = len(prints), trims()
    best = np.full((n, n), -1.0, np.float32)
    for v in range(3):
        views = np.stack([p.views[v] for p in prints]).astype(np.float32)
        cuts = np.stack([p.cuts[v] for p in prints])
        whole = _thumbs(views)
        for trim in grid:
            rows = np.nonzero(cuts[:, np.array(trim) > 0].all(1))[0]  # images cut on every side this trim cuts
            if not len(rows):
                continue
            part = _thumbs(views, trim)
            for i in range(0, len(rows), chunk):  # bounded memory: chunk x n at a time
                r = rows[i : i + chunk]
                best[r] = np.maximum(best[r], whole[r] @ part.T)
    return best


def _transforms() -> list[tuple[int, tuple[float, float, float, float] | int]]:
    """The close rule's ways of viewing the other image: (view, small trim) for the three views, (-1, turn index)."""
    small = [t for t in trims() if max(t) <= SMALL_TRIM + 1e-9]
    return [(v, t) for v in range(3) for t in small] + [(-1, a) for a in range(len(TURNS))]


def close_similarity(prints: list[Fingerprint], chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(best, how): best[i, j] the highest correlation between image i's thumbnail and image j's trimmed by at most
    SMALL_TRIM on any one or two sides (each of the three views) or turned by one of TURNS (the head region);
    how[i, j] the index into `_transforms()` that reached it. O(n^2) in time and in memory (6 bytes a pair, beside
    similarity's and partial_similarity's matrices), in chunks of rows."""
    n = len(prints)
    best = np.full((n, n), -1.0, np.float32)
    how = np.zeros((n, n), np.uint16)  # 514 transforms
    views = [np.stack([p.views[v] for p in prints]).astype(np.float32) for v in range(3)]
    turned = np.stack([p.turned for p in prints]).astype(np.float32)
    wholes = [_thumbs(v) for v in views]
    for k, (v, t) in enumerate(_transforms()):
        whole, part = (wholes[v], _thumbs(views[v], t)) if v >= 0 else (wholes[0], _thumbs(turned[:, t]))
        for i in range(0, n, chunk):
            c = whole[i : i + chunk] @ part.T
            up = c > best[i : i + chunk]
            best[i : i + chunk][up] = c[up]
            how[i : i + chunk][up] = k
    return best, how


def inside(x: np.ndarray) -> np.ndarray:
    """A view's head inside, INNER_ERODE pixels in from its edge: `inner_correlation`'s mask of one image. Erosion
    keeps a pixel whose whole neighbourhood is set, so eroding two heads' common inside gives the common part of
    their eroded insides: each image's mask can be made once."""
    from scipy.ndimage import binary_erosion, gaussian_filter

    x = np.asarray(x, np.float64)
    return binary_erosion(gaussian_filter(x, 1) > max(BACKGROUND, 0.25 * float(np.percentile(x, 95))), iterations=INNER_ERODE)


def inner_correlation(a: np.ndarray, b: np.ndarray, inside_a: np.ndarray | None = None, inside_b: np.ndarray | None = None) -> float:
    """Correlation of two aligned views inside both heads, INNER_ERODE pixels in from their edges (-1 when too little
    is left): what a copy shares with its original and two smooth heads do not. `inside_a`, `inside_b`: `inside`
    of each, when the caller has them."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mask = (inside(a) if inside_a is None else inside_a) & (inside(b) if inside_b is None else inside_b)
    if mask.sum() < 50:
        return -1.0
    x, y = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y / norm) if norm > 1e-9 else -1.0


def inner_correlations(a: np.ndarray, b: np.ndarray, inside_a: np.ndarray, inside_b: np.ndarray) -> np.ndarray:
    """`inner_correlation(a[k], b, inside_a[k], inside_b)` for each k at once (the verdicts judge many views against
    one), from masked sums: a few passes over the stack, not a pixel list per pair. Each view's mean is taken off first
    (correlation ignores a shift), so the sums stay far from cancellation: they agree with `inner_correlation` to
    1e-12 (tests/test_grouping.py)."""
    m = len(a)
    mask = (inside_a & inside_b[None]).reshape(m, -1).astype(np.float64)
    x = np.asarray(a, np.float64).reshape(m, -1)
    x = x - x.mean(1, keepdims=True)
    y = np.asarray(b, np.float64).ravel()
    y = y - y.mean()
    n = mask.sum(1)
    mx = mask * x
    sx, sy = mx.sum(1), mask @ y
    count = np.maximum(n, 1)
    sxy, sxx, syy = mx @ y - sx * sy / count, np.einsum("ij,ij->i", mx, x) - sx**2 / count, mask @ (y * y) - sy**2 / count
    norm = np.sqrt(np.maximum(sxx, 0.0)) * np.sqrt(np.maximum(syy, 0.0))
    return np.where((n >= 50) & (norm > 1e-9), sxy / np.where(norm > 1e-9, norm, 1.0), -1.0)


def close_view(p: Fingerprint, transform) -> np.ndarray:
    """An image's view as the close rule transform (of `_transforms()`) shows it: trimmed a little, or turned."""
    v, t = transform
    if v < 0:
        return p.turned[t].astype(np.float32)
    top, bottom, left, right = t
    return _shrink(top, 1 - bottom, VIEW) @ p.view(v) @ _shrink(left, 1 - right, VIEW).T


def _close_pair(pi: Fingerprint, pj: Fingerprint, transform) -> float:
    """inner_correlation of image i's view and image j's, viewed as `transform` of `_transforms()` says."""
    return inner_correlation(pi.views[max(transform[0], 0)], close_view(pj, transform))


def joined(prints: list[Fingerprint], max_distance: int, min_correlation: float, min_partial: float | None = None) -> np.ndarray:
    """Which pairs are duplicates (symmetric boolean matrix): equal bytes, both whole-view measures agreeing, or (when
    `min_partial` is given) one nearly the other, trimmed a little or turned, at `min_partial` with insides at
    MIN_INNER (`close_similarity`, `inner_correlation`), or one a trimmed part of the other at `min_partial`. A pair's verdict
    depends on the pair alone, never on the other images."""
    n = len(prints)
    if not n:
        return np.zeros((0, 0), bool)
    dist, corr = similarity(prints)
    same = (dist <= max_distance) & (corr >= min_correlation)
    if min_partial is not None:
        part = partial_similarity(prints) >= min_partial
        same |= part | part.T
        best, how = close_similarity(prints)
        grid = _transforms()
        for i, j in np.argwhere((best >= min_partial) & ~same):  # few pairs: the inside test runs on these alone
            if not same[i, j] and _close_pair(prints[i], prints[j], grid[how[i, j]]) >= MIN_INNER:  # (j, i) may have joined
                same[i, j] = same[j, i] = True
    shas = np.array([p.sha256 for p in prints])
    return same | (shas[:, None] == shas[None, :])


def groups_of(keys: list[str], same: np.ndarray) -> list[str]:
    """A group id per image from the pairs `same` joins, transitively.

    `keys` are per-image content keys (the sha256 of the file bytes): a group's id derives from its members'
    keys only, so it depends neither on listing order nor on file names; renaming a file renames no group.
    A new copy whose key sorts first does rename its group: the split stage's ledger, keyed by each image's
    sha256, is what keeps splits put, not these ids.
    """
    return components(keys, zip(*np.nonzero(np.triu(same, 1)), strict=True))


def components(keys: list[str], pairs) -> list[str]:
    """A group id per image from index pairs (i, j) joined transitively: "g" and the first 10 hex digits of the sha256
    of the smallest key among the group's members, so the id depends only on who the members are."""
    n = len(keys)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[find(int(i))] = find(int(j))
    members: dict[int, list[str]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(keys[i])
    gid = {root: "g" + hashlib.sha256(min(ks).encode("utf-8", "surrogateescape")).hexdigest()[:10] for root, ks in members.items()}
    return [gid[find(i)] for i in range(n)]
