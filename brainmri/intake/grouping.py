"""Duplicate groups without judging every pair: a lossless screen proposes candidate pairs, the exact rules judge them.

`duplicates.joined` scores all n² pairs with every rule in full: 1,024-number thumbnails, 514 small trims and turns
(the close rule) and 920 trims of each of 3 views (the crop rule), and n x n matrices. Every rule but the hash's is a correlation of
two zero-mean, unit-norm thumbnails at a bar tau, and for unit vectors u, w: corr(u, w) >= tau exactly when
||u - w||² <= 2(1 - tau). An orthonormal projection P only shortens distances, so ||Pu - Pw||² <= 2(1 - tau) holds
for every pair a rule joins: screening pairs in the projected space can only propose too many, never lose one.
P keeps the K x K lowest 2-D DCT coefficients of a thumbnail (K² numbers, not 1,024).

- equal bytes: grouped by sha256;
- the whole-head rule (hash distance and correlation): every pair within the hash distance (exact, blocked);
- the crop and close rules: each image's views, trimmed as the rules trim them (the crop rule's trims only against
  images cut on those sides) and its head region turned, projected, against every other image's whole views.

Candidates then go to `verdicts`, the rules of `joined` for one pair, so a verdict stays a function of the pair,
measuring only the transforms of an image that came within the radius of another image's whole view in the screen
(`_Reached`: one beyond it cannot carry a join; on 3,000 look-alike phantoms 89 of an image's 514 close ones);
groups are the components of the joined pairs (union-find). Nothing n x n is kept (the screen runs in blocks):
memory grows with n and with the number of candidates, which is itself up to quadratic where many images look
alike (smooth phantoms). Time is still quadratic in the screen, coarse to fine: each pair is first compared in the
COARSE principal directions of the projected views (a rotation, so again only shorter), and only the (image,
transform) pairs that bound keeps in all K² numbers: about 32/1,024 of the rules' work per pair. Blocks and verdicts
run on the stage's cores in threads (docs/measurements.md: how it grows). tests/test_grouping.py checks the pairs
against `joined`'s.

Above `dedupe.exact_up_to` distinct images the screen is approximate (`dedupe.neighbours`): it measures only the
pairs where one image is among the other's k nearest in a faiss index of each image's whole views and 80
representative trims (`neighbour_pairs`), with the same test and the same verdicts, so it can miss a pair but never
join one the rules do not; its time grows sub-quadratically (the index's search about as n^1.5, the rest linearly),
and its recall is measured, not guaranteed (docs/measurements.md, tests/test_neighbours.py). Written by hand:
the radius test is a blocked matrix product (numpy), over the rules' own transforms; scikit-learn's ball trees,
tried before at a looser bar on 16 x 16 thumbnails, lost pairs the rules join.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np
from threadpoolctl import threadpool_limits

from brainmri.core.machine import stage_cores
from brainmri.intake.duplicates import (
    MIN_INNER,
    SMALL_TRIM,
    THUMB,
    TRIM_STEP,
    TURNS,
    Fingerprint,
    _shrink,
    _stacked,
    _thumbs,
    _transforms,
    _unit,
    close_view,
    components,
    inner_correlations,
    inside,
    trims,
)

# DCT coefficients kept per side: K² = 144 numbers. At K = 8 the low frequencies hold only ~60% of a thumbnail's
# energy and 2,057 of the real set's 31,878 pairs were candidates; at 12, 196 (78 joined)
K = 12
SLACK = 1e-3  # added to the squared radius: float32 rounding in the screen must not drop a pair the rules join
I_CHUNK = 128  # query images per block product: x J_CHUNK x 750 crop trims is 25 MB; on real scans 128 took 0.72 s where 512 took 0.99
J_CHUNK = 64  # transformed images per block
FAR = 1e30  # a squared distance no radius reaches (float32 holds it): flat rows and transforms not allowed
COARSE = 32  # rotated numbers the screen compares first: on real scans 0.02% of (image, transform) pairs pass, 1.7% of image pairs
REFINE = 32_768  # (query, transform) pairs measured in all K² numbers at a time: 2 x 19 MB of gathered rows
MERGE_EVERY = 4_000_000  # pairs found before they are merged with those kept: bounds the screen's memory
FETCH = 6  # points fetched per image wanted (k): an image has 81 points a view, and a query's nearest are often one image's
FLAT_UP_TO = 200_000  # index points searched exactly (2,469 images: tests, a lowered exact_up_to); above, faiss's inverted file
KMEANS_ROUNDS = 10  # of the inverted file's k-means (faiss: 25): a third of the training time, the same pairs at 30,000
NPROBE = 16  # lists searched per query: on the 10,100 set, 16 of 1,024 found the pairs the exact search found


@cache
def _dct_rows() -> np.ndarray:
    """The first K rows of the orthonormal DCT-II matrix of the thumbnail's side (K x THUMB)."""
    from scipy.fft import dct

    return dct(np.eye(THUMB), norm="ortho", axis=0)[:K].astype(np.float32)


def project(thumbs: np.ndarray) -> np.ndarray:
    """(m, THUMB²) thumbnails -> (m, K²) lowest 2-D DCT coefficients (transposed), an orthonormal projection: distances
    only shrink. Two products over all rows at once, not m small ones."""
    d, m = _dct_rows(), len(thumbs)
    cols = thumbs.reshape(m * THUMB, THUMB) @ d.T  # (m x THUMB, K): each row's K lowest frequencies
    return (cols.reshape(m, THUMB, K).transpose(0, 2, 1).reshape(m * K, THUMB) @ d.T).reshape(m, K * K)


def _projected_units(units: np.ndarray) -> np.ndarray:
    """project(units), with NaN for a flat (all-zero) unit row: it correlates at 0 with anything, so it can reach no
    rule's bar, and a NaN compares false in the screen (two flat rows would otherwise be at distance 0)."""
    low = project(units)
    low[~units.any(1)] = np.nan
    return low


def candidates(
    prints: list[Fingerprint],
    max_distance: int,
    min_partial: float | None,
    new: np.ndarray | None = None,
    near: np.ndarray | None = None,
    reached: dict | None = None,
) -> np.ndarray:
    """(m, 2) index pairs i < j worth judging: every pair `joined` joins is among them (the module docstring); with
    `new` (a mask), only the pairs with a new image (the others were judged before: `memo.PairMemo`). With `near`
    (pairs, `neighbour_pairs`), the crop and close rules' screen measures only those pairs: the approximate screen.
    `reached` (a dict), without `near`: filled with each image's transforms that reached another's whole view in the
    screen (`_Reached`), all that `verdicts` need measure in full, for these candidates only (with `new`, an earlier
    image's entry covers the new images' views alone; with `near`, it stays empty)."""
    n = len(prints)
    if n < 2:
        return np.zeros((0, 2), np.int32)
    found = _hash_close(prints, max_distance, new)
    if min_partial is not None:
        radius2 = _radius2(min_partial)
        screened = _screened(prints, radius2, new, reached) if near is None else _screened_near(prints, radius2, near)
        found = itertools.chain(found, screened)
    keys, pending, size = np.zeros(0, np.int64), [], 0
    for f in found:  # one number per pair (i < j), merged as they come: a pair found many ways is kept once
        f = np.sort(np.asarray(f, np.int64).reshape(-1, 2), axis=1)
        pending.append(f[f[:, 0] != f[:, 1]] @ np.array([n, 1], np.int64))
        size += len(pending[-1])
        if size > MERGE_EVERY:
            keys, pending, size = np.unique(np.concatenate([keys, *pending])), [], 0
    keys = np.unique(np.concatenate([keys, *pending]))
    pairs = np.empty((len(keys), 2), np.int32)  # half of int64's memory: a large set can have millions of candidates
    pairs[:, 0], pairs[:, 1] = keys // n, keys % n
    return pairs


def _radius2(min_partial: float) -> float:
    """The screen's squared radius: unit vectors correlate at min_partial or more exactly when this close (SLACK added)."""
    return 2 * (1 - min_partial) + SLACK


def _hash_close(prints: list[Fingerprint], max_distance: int, new: np.ndarray | None = None):
    """Pairs (i < j) whose perceptual hashes differ in at most max_distance bits (the whole-head rule's first test),
    a block of rows at a time; with `new`, the new rows against all (the distance is symmetric)."""
    h = np.stack([p.phash for p in prints]).astype(np.float32) * 2 - 1  # +-1: bits differing = (length - dot) / 2
    if new is not None:
        rows = np.nonzero(new)[0]
        for i in range(0, len(rows), I_CHUNK):
            a, b = np.nonzero((h.shape[1] - h[rows[i : i + I_CHUNK]] @ h.T) / 2 <= max_distance + 0.5)
            yield np.stack([rows[i + a], b], 1)  # self pairs and pairs found twice go in `candidates`
        return
    for i in range(0, len(h), I_CHUNK):
        diff = (h.shape[1] - h[i : i + I_CHUNK] @ h[i:].T) / 2  # against the rows from i on: each pair once
        a, b = np.nonzero(np.triu(diff <= max_distance + 0.5, 1))
        yield np.stack([a + i, b + i], 1)


def _screened(prints: list[Fingerprint], radius2: float, new: np.ndarray | None = None, reached: dict | None = None):
    """Pairs (i, j) where one of j's trims or turns, projected, lies within radius2 of i's whole view: the close rule's
    small trims and turns for every i, the crop rule's larger trims only for an i cut on every side they cut. Blocks
    of j are independent: they run on the stage's cores (`_each`; BLAS's own second thread mostly waited on these
    small products: 2 threads used 2 cores' CPU time in the same wall time as one). With `new`, the pairs with a new
    image either way: every i against the new j, the new i against the others. `reached`: filled per j (`_Screen.reached`)."""
    wholes = whole_views(prints)
    basis, everyone = _basis(np.concatenate(wholes)), np.arange(len(prints))
    new = np.ones(len(prints), bool) if new is None else new
    for rows, js in ((everyone, np.nonzero(new)[0]), (np.nonzero(new)[0], np.nonzero(~new)[0])):
        if len(rows) and len(js):
            screen = _Screen(prints, wholes, basis, radius2, rows)
            for found, seen in _each(screen.block, [js[s : s + J_CHUNK] for s in range(0, len(js), J_CHUNK)]):
                yield from found
                if reached is not None:
                    reached.update(screen.reached(*seen))


def whole_views(prints: list[Fingerprint]) -> list[np.ndarray]:
    """Each image's three views whole, unit and projected (n, K²) each; NaN rows for flat views."""
    return [_projected_units(_thumbs(_views(prints, v))) for v in range(3)]


@cache
def representatives() -> tuple:
    """The trims that stand for an image in the approximate screen's index, beside its whole view: one side cut at
    every other step of the grid, two sides at 0.09-0.27 (80 a view). A copy cut into the head lies near its scan
    trimmed, not near its scan: whole views alone left 124 more groups than the exact screen's 4,859 on 10,000
    real-like images, one-side trims alone 16 more on the 10,100, these none (docs/measurements.md)."""
    out = [t for t in trims() if sum(c > 0 for c in t) == 1 and round(max(t) / TRIM_STEP) % 2 == 0]
    pairs = {0.09, 0.18, 0.27}
    return tuple(out + [t for t in trims() if sum(c > 0 for c in t) == 2 and {c for c in t if c > 0} <= pairs])


@cache
def _index_basis() -> np.ndarray:
    """(K², 36): the DCT coefficients (u, v) with u + v <= 7, the lowest frequencies. Fixed, not the set's principal
    directions (`_basis`), so an image's index points are its own (made once, kept in the memo); on the 10,100 set
    they kept as many joined pairs as the principal directions did."""
    return np.eye(K * K, dtype=np.float32)[:, [u * K + v for u in range(K) for v in range(K) if u + v <= 7]]


def index_points(prints: list[Fingerprint]) -> np.ndarray:
    """(images, 3 views, 1 + 80, 36) float16: each view whole, then trimmed by each of `representatives`, in the
    index's numbers (`_index_basis`); NaN for a flat one. float16: the index is approximate anyway, at a quarter of
    the memory (17 KB an image)."""
    basis, reps = _index_basis(), representatives()
    out = np.empty((len(prints), 3, len(reps) + 1, basis.shape[1]), np.float16)
    for v in range(3):
        views = _views(prints, v)
        points = np.concatenate([_projected_units(_thumbs(views))[:, None], _transformed(views, reps)], 1)
        out[:, v] = points @ basis
    return out


def neighbour_pairs(prints: list[Fingerprint], k: int) -> np.ndarray:
    """(m, 2) pairs i < j where, in one of the three views, j is among the k images nearest to i's whole view or i
    among j's, an image's distance being its nearest point's: its whole view or one of `representatives`' trims
    (`index_points`). The pairs the approximate screen measures (`_screened_near`). Flat views are in no list."""
    n, k = len(prints), min(k, len(prints) - 1)
    if k < 1:
        return np.zeros((0, 2), np.int64)
    missing, keys = _missing_points(prints), [np.zeros(0, np.int64)]
    for v in range(3):
        points = np.stack([p.points[v] if p.points is not None else missing[i][v] for i, p in enumerate(prints)])  # one view at a time
        every = points.reshape(-1, points.shape[-1]).astype(np.float32)
        ok, whole = ~np.isnan(every).any(1), points[:, 0].astype(np.float32)
        queries = np.nonzero(~np.isnan(whole).any(1))[0]
        if ok.sum() < 2 or not len(queries):
            continue
        index, owner_of = _index(every if ok.all() else every[ok]), np.nonzero(ok)[0] // points.shape[1]
        del every, points  # faiss holds its own copy
        todo, fetch = queries, FETCH * k
        while len(todo):  # rows whose fetched points hold fewer than k other images are searched again, deeper
            _, found = index.search(np.ascontiguousarray(whole[todo]), min(fetch, int(ok.sum())))
            a, b = _first_distinct(np.where(found >= 0, owner_of[np.maximum(found, 0)], -1), todo, k)
            row = np.searchsorted(todo, a)  # a is in todo's order
            done = (np.bincount(row, minlength=len(todo)) >= k) | (found < 0).any(1) | (fetch >= ok.sum())  # or all there is
            keys.append(np.minimum(a, b)[done[row]].astype(np.int64) * n + np.maximum(a, b)[done[row]])
            todo, fetch = todo[~done], fetch * 4
    keys = np.unique(np.concatenate(keys))
    return np.stack([keys // n, keys % n], 1)


def _missing_points(prints: list[Fingerprint]) -> dict[int, np.ndarray]:
    """`index_points` of the images whose fingerprints carry none (ingest's workers make them; other callers not)."""
    missing = [i for i, p in enumerate(prints) if p.points is None]
    return {
        i: x
        for s in range(0, len(missing), 256)
        for i, x in zip(missing[s : s + 256], index_points([prints[i] for i in missing[s : s + 256]]), strict=True)
    }


def _index(points: np.ndarray):
    """A faiss index of the points: exact up to FLAT_UP_TO points, above an inverted file of about √points lists
    searched NPROBE at a time (k-means on a sample of 64 points a list, faiss's fixed seed)."""
    import faiss

    faiss.omp_set_num_threads(stage_cores())
    d = points.shape[1]
    if len(points) <= FLAT_UP_TO:
        index = faiss.IndexFlatL2(d)
    else:
        lists = int(2 ** round(np.log2(np.sqrt(len(points)))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, lists)
        index.cp.niter = KMEANS_ROUNDS
        index.train(points[np.random.default_rng(0).choice(len(points), min(len(points), 64 * lists), replace=False)])
        index.nprobe = NPROBE
    index.add(points)
    return index


def _first_distinct(owners: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(query image, owner) for the first k distinct owners of each row of `owners` (nearest first), the query's own
    points and missing results (-1) left out."""
    order = np.argsort(owners, axis=1, kind="stable")  # by owner, nearest first within one owner
    by_owner = np.take_along_axis(owners, order, 1)
    first_sorted = np.ones_like(by_owner, bool)
    first_sorted[:, 1:] = by_owner[:, 1:] != by_owner[:, :-1]
    first = np.zeros_like(first_sorted)
    np.put_along_axis(first, order, first_sorted, 1)
    first &= (owners >= 0) & (owners != queries[:, None])
    r, c = np.nonzero(first & (np.cumsum(first, 1) <= k))
    return queries[r], owners[r, c]


def _screened_near(prints: list[Fingerprint], radius2: float, near: np.ndarray):
    """`_screened`'s test for the pairs `near` alone, either way (`_screen_near`'s pairs): the approximate screen's
    candidates, as `candidates` takes them."""
    yield _screen_near(prints, radius2, near)[0]


def _screen_near(prints: list[Fingerprint], radius2: float, near: np.ndarray) -> tuple[np.ndarray, dict]:
    """(hits, reached): the ordered pairs (i, j) of `near`, either way, where one of j's trims or turns lies within
    radius2 of i's whole view (the crop rule's trims only for a query cut on the sides they cut, as `_Screen`), in
    K² numbers, coarse to fine as `_Parts.within`. reached[j]: the transforms of j that reached one of them
    (`_Reached`), all that the crop and close rules need measure in full."""
    hits, reached = [np.zeros((0, 2), np.int64)], {}
    if not len(near):
        return hits[0], reached
    both = np.concatenate([near, near[:, ::-1]]).astype(np.int64)  # (query i, image j trimmed or turned)
    partners, involved = _by_second(both), np.unique(near)
    row = np.zeros(len(prints), np.int64)
    row[involved] = np.arange(len(involved))  # the whole views of the images in a pair only: a rerun has few
    wholes = whole_views([prints[i] for i in involved])
    queries, norm2 = [np.where(np.isnan(w), 0.0, w).astype(np.float32) for w in wholes], [_norm2(w) for w in wholes]
    at, made_grid, small, rank, allowed = _near_grid()
    n_small = int(small.sum())
    patterns = [np.stack([p.cuts[v] for p in prints]) @ (1 << np.arange(4)) for v in range(3)]

    basis = _basis(np.concatenate(wholes))
    lifted = [_lifted(w @ basis, query=True) for w in wholes]

    def reach(v: int, i: np.ndarray, parts: _Parts, x: int) -> np.ndarray:  # (queries, image x's transforms): within radius2
        q, out = row[i], np.zeros((len(i), parts.parts.shape[1]), bool)
        a, t = np.nonzero(lifted[v][q] @ parts.lifted[x].T >= -radius2)  # minus a lower bound of each distance: a superset
        for s in range(0, len(a), REFINE):  # those measured in all K² numbers, in bounded memory
            qa, ta = a[s : s + REFINE], t[s : s + REFINE]
            exact = 2 * np.einsum("ij,ij->i", queries[v][q[qa]], parts.parts[x, ta]) - norm2[v][q[qa]] - parts.norm2[x, ta]
            out[qa[exact >= -radius2], ta[exact >= -radius2]] = True  # NaN (flat) compares false: reaches nothing
        return out

    def block(js: np.ndarray) -> list[tuple[int, np.ndarray, _Reached]]:
        sub = [prints[j] for j in js]
        made = [_transformed(_views(sub, v), made_grid) for v in range(3)]
        turned = np.stack([p.turned for p in sub]).astype(np.float32)
        made.append(_projected_units(_thumbs(turned.reshape(-1, *turned.shape[2:]))).reshape(len(sub), len(TURNS), -1))
        made = [_Parts(m, basis) for m in made]  # coarse numbers lifted once an image, for all its partners
        found = []
        for x, j in enumerate(js):
            i = both[partners[j], 0]
            turn = reach(0, i, made[3], x)  # turns against view 0, as the close rule
            hit, by_view, steps = turn.any(1), [], []
            for v in range(3):
                r = reach(v, i, made[v], x) & allowed[patterns[v][i]]  # the crop rule's trims only for the sides cut
                hit |= r.any(1)
                seen = r.any(0)
                by_view.append(np.sort(at[seen]))
                steps.append(v * n_small + np.sort(rank[at[seen & small[at]]]))
            if hit.any():
                found.append((j, i[hit], _Reached(by_view, np.concatenate([*steps, 3 * n_small + np.nonzero(turn.any(0))[0]]))))
        return found

    js = np.array(sorted(partners), np.int64)
    for found in _each(block, [js[s : s + J_CHUNK] for s in range(0, len(js), J_CHUNK)]):
        for j, i, r in found:
            hits.append(np.stack([i, np.full(len(i), j)], 1))
            reached[j] = r
    return np.concatenate(hits), reached


@cache
def _near_grid() -> tuple:
    """What `_screen_near` makes of `trims()`: `at`, the trims' places sorted by column cut (`_transformed` then
    writes each cut's trims as one slice), and that order as a grid; which trims are small (the close rule's, in
    `trims()` order) and each one's place among them; and per cut pattern (16) which of the sorted trims a query
    cut so is measured against: the small ones always, a larger one only if it cuts no side the query is not cut on."""
    grid = trims()
    small = np.array([max(t) <= SMALL_TRIM + 1e-9 for t in grid])
    at = np.array(sorted(range(len(grid)), key=lambda t: grid[t][2:]))
    made_grid = tuple(grid[t] for t in at)
    sides = np.array(made_grid) > 0
    allowed = np.stack([small[at] | (pattern_sides(c)[None] | ~sides).all(1) for c in range(16)])
    return at, made_grid, small, np.cumsum(small) - 1, allowed


@dataclass(frozen=True)
class _Reached:
    """The transforms of one image that came within the screen's radius of some query's whole view: per view, the
    places in `trims()` of its trims (the crop rule's; a small trim reached by any query counts, as the crop rule
    tries small trims too), and the places in `duplicates._transforms()` of its small trims and turns (the close
    rule's). Only they can carry a join: the projection only shortens distances."""

    trims: list[np.ndarray]
    transforms: np.ndarray


class _Screen:
    """What every block of `_screened` compares against: the whole views of the images `rows`, projected, and for the
    crop rule these queries grouped by the sides where they look cut, with the trims each group allows."""

    def __init__(self, prints: list[Fingerprint], wholes: list[np.ndarray], basis: np.ndarray, radius2: float, rows: np.ndarray):
        self.prints, self.basis, self.radius2, self.rows = prints, basis, radius2, rows
        self.queries = [_Queries.of(whole[rows], basis, rows) for whole in wholes]  # made once, not once a block
        grid = trims()
        self.close = tuple(t for t in grid if max(t) <= SMALL_TRIM + 1e-9)  # the close rule's small trims
        self.crop = tuple(t for t in grid if max(t) > SMALL_TRIM + 1e-9)  # the crop rule's larger ones
        self.places = np.array([_trim_places()[t] for t in self.close + self.crop])  # each one's place in `trims()`
        sides = np.array(self.crop) > 0
        allowed = [np.nonzero((pattern_sides(c)[None] | ~sides).all(1))[0] for c in range(16)]  # trims cutting only cut sides
        self.by_pattern = []
        for v in range(3):
            pattern = np.stack([prints[i].cuts[v] for i in rows]) @ (1 << np.arange(4))  # the sides where each query looks cut
            groups = [(np.nonzero(pattern == c)[0], allowed[c]) for c in range(1, 16)]
            self.by_pattern.append([(rows, ts, self.queries[v][rows]) for rows, ts in groups if len(rows) and len(ts)])

    def block(self, js: np.ndarray) -> tuple[list[np.ndarray], tuple]:
        """The pairs (image of `rows`, image of js) found with the images js as the ones trimmed or turned; and
        (js, per j and view which of close + crop reached another image's whole view, per j which turns did)."""
        prints, found, r2, small = [self.prints[j] for j in js], [], self.radius2, len(self.close)
        seen, turns_seen = np.zeros((len(js), 3, len(self.places)), bool), np.zeros((len(js), len(TURNS)), bool)
        for v, queries in enumerate(self.queries):
            made = _transformed(_views(prints, v), self.close + self.crop)  # in one call: they share most column cuts
            found.append(_Parts(made[:, :small], self.basis).within(queries, r2, js, seen=seen[:, v, :small]))
            if self.by_pattern[v]:
                cropped = _Parts(made[:, small:], self.basis)
                for rows, ts, group in self.by_pattern[v]:  # each query only against the trims it allows
                    hits = cropped.within(group, r2, js, ts, seen[:, v, small:])
                    found.append(np.stack([rows[hits[:, 0]], hits[:, 1]], 1))
        turned = np.stack([p.turned for p in prints]).astype(np.float32)  # (images, turns, VIEW, VIEW): turned head regions
        parts = _projected_units(_thumbs(turned.reshape(-1, *turned.shape[2:]))).reshape(len(turned), len(TURNS), -1)
        found.append(_Parts(parts, self.basis).within(self.queries[0], r2, js, seen=turns_seen))  # against view 0, as the close rule
        return [np.stack([self.rows[f[:, 0]], f[:, 1]], 1) for f in found], (js, seen, turns_seen)  # query positions -> images

    def reached(self, js: np.ndarray, seen: np.ndarray, turns_seen: np.ndarray) -> dict[int, _Reached]:
        """`block`'s reached transforms as `_Reached`, per j: as `_screen_near` gives them, in `trims()`'s places
        and `duplicates._transforms()`'s order."""
        small, out = len(self.close), {}
        for x, j in enumerate(js):
            steps = [v * small + np.nonzero(seen[x, v, :small])[0] for v in range(3)]
            trimmed = [np.sort(self.places[seen[x, v]]).astype(np.int16) for v in range(3)]  # int16: 920 trims, 514 close
            out[int(j)] = _Reached(trimmed, np.concatenate([*steps, 3 * small + np.nonzero(turns_seen[x])[0]]).astype(np.int16))
        return out


def pattern_sides(code: int) -> np.ndarray:
    """The four sides (top, bottom, left, right) of a cut pattern's bits, as `Fingerprint.cuts` orders them."""
    return (code >> np.arange(4) & 1).astype(bool)


def _views(prints: list[Fingerprint], v: int) -> np.ndarray:
    """View v of each image as float32, what the rules compute with."""
    return np.stack([p.views[v] for p in prints]).astype(np.float32)


def _transformed(views: np.ndarray, grid: tuple) -> np.ndarray:
    """(images, trims, K²): each view trimmed by each of grid (as the rules trim it: `duplicates._thumbs`), unit,
    projected, without making the trimmed thumbnails. A trim is S_r V S_cᵀ (row and column area-shrink matrices), so
    its low frequencies are (D S_r)(V S_cᵀ Dᵀ): the right factor is shared by every trim with that column cut. Its mean
    and energy, for the unit scaling, come from the same shared factor (`_Trims`). Each view's own mean is taken off
    first: every trim of it shifts by that constant (the shrink rows sum to 1), which leaves the unit thumbnail as it
    is and the energies far from float32's cancellation."""
    b, side, alg = len(views), views.shape[-1], _Trims.of(grid)
    level = views.mean((1, 2), dtype=np.float64)
    centred = (views - level.astype(np.float32)[:, None, None]).reshape(b * side, side)
    rows_first = centred.reshape(b, side, side).transpose(1, 0, 2).reshape(side * b, side)
    z = (rows_first @ alg.low_cols).reshape(side, b, -1, K)  # (VIEW rows, images, column cuts, K): V S_cᵀ Dᵀ for each
    out = np.empty((b, len(grid), K, K), np.float32)
    for c, (ts, lows) in enumerate(alg.by_col):  # one product per column cut over every image: (trims x K, images x K)
        low = (lows @ z[:, :, c].reshape(side, b * K)).reshape(-1, K, b, K)  # (trims, K, images, K)
        out[:, ts] = low.transpose(2, 0, 3, 1)  # `project`'s layout: (images, trims, column frequency, row frequency)
    energy = (_gram_band(centred.reshape(b, side, side), alg) @ alg.energy)[:, alg.col_of, alg.row_of]  # ||S_r V S_cᵀ||², (images, trims)
    row_means = (centred.astype(np.float64) @ alg.col_means).reshape(b, side, -1).transpose(0, 2, 1)  # Y_c's, (images, cuts, VIEW)
    mean = (row_means @ alg.mean)[:, alg.col_of, alg.row_of]
    norm = np.sqrt(np.maximum(energy - THUMB * THUMB * mean**2, 0.0))
    out[:, :, 0, 0] = 0.0  # the constant part: what taking off the mean removes
    out /= np.where(norm > 0, norm, 1.0)[:, :, None, None].astype(np.float32)
    out = out.reshape(b, len(grid), K * K)
    near_flat = norm <= 4e-3 * (np.abs(mean + level[:, None]) + 1) * THUMB  # 4x `_unit`'s bar: rounding cannot matter
    for i, t in zip(*np.nonzero(near_flat), strict=True):  # rare: made as `_unit` makes them, flat ones left out
        top, bottom, left, right = grid[t]
        x = (_shrink(top, 1 - bottom) @ views[i] @ _shrink(left, 1 - right).T).reshape(1, -1)
        out[i, t] = _projected_units(_unit(x))[0]
    return out


def _gram_band(views: np.ndarray, alg: _Trims) -> np.ndarray:
    """(images, column cuts, (band + 1) x VIEW): the band of V G_c Vᵀ (G_c = S_cᵀS_c, itself banded) that S_rᵀS_r
    reaches, row offset d major: [j, j + d] = sum over e, k of V[j, k] V[j + d, k + e] G_c[k, k + e]. One product per
    d over the (k, e) terms, never V S_cᵀ itself (images x VIEW x cuts x THUMB numbers)."""
    b, side, _ = views.shape
    v = views.astype(np.float64)  # float32 sums lose the energy of a trim that is nearly flat (tests/test_grouping.py)
    out = np.zeros((b, alg.col_diagonals.shape[1], alg.band + 1, side))
    for d in range(alg.band + 1):
        terms = np.zeros((b, side, len(alg.col_band), side))
        for n, e in enumerate(alg.col_band):
            lo, hi = max(0, -e), side - max(0, e)  # k and k + e both inside the view
            terms[:, : side - d, n, lo:hi] = v[:, : side - d, lo:hi] * v[:, d:, lo + e : hi + e]
        out[:, :, d] = (terms.reshape(b * side, -1) @ alg.col_diagonals).reshape(b, side, -1).transpose(0, 2, 1)
    return out.reshape(b, out.shape[1], -1)


class _Trims:
    """What `_transformed` needs of a grid of trims, made once: its distinct column cuts (S_cᵀDᵀ side by side, and
    the diagonals of S_cᵀS_c for `_gram_band`), and for each the trims using it with their D S_r stacked; per distinct
    row cut, the weights giving a trim's mean from Y_c's row means, and S_rᵀS_r's diagonals (banded: a shrunk pixel
    covers at most 3 view pixels) giving its energy from Y_c Y_cᵀ's band (Y_c = V S_cᵀ)."""

    @staticmethod
    @cache
    def of(grid: tuple) -> _Trims:
        return _Trims(grid)

    def __init__(self, grid: tuple):
        cols, rows = list(dict.fromkeys((t[2], t[3]) for t in grid)), list(dict.fromkeys((t[0], t[1]) for t in grid))
        self.col_of = np.array([cols.index((t[2], t[3])) for t in grid])
        self.row_of = np.array([rows.index((t[0], t[1])) for t in grid])
        col_shrinks = [_shrink(lo, 1 - hi).astype(np.float64) for lo, hi in cols]
        self.low_cols = np.concatenate([s.T @ _dct_rows().T for s in col_shrinks], axis=1).astype(np.float32)  # (VIEW, cuts x K)
        col_grams = [s.T @ s for s in col_shrinks]
        reach = max(int(np.abs(np.subtract(*np.nonzero(g))).max()) for g in col_grams)
        self.col_band = list(range(-reach, reach + 1))
        self.col_diagonals = np.concatenate(
            [np.stack([np.pad(np.diagonal(g, e), (max(0, -e), max(0, e))) for g in col_grams], axis=1) for e in self.col_band]
        )  # (offsets x VIEW, cuts): G_c[k, k + e] at row (e, k), 0 where k + e leaves the view
        self.col_means = np.stack([_shrink(lo, 1 - hi).astype(np.float64).mean(0) for lo, hi in cols], axis=1)  # (VIEW, cuts)
        shrinks = [_shrink(lo, 1 - hi).astype(np.float64) for lo, hi in rows]
        self.by_col = []
        for c in range(len(cols)):
            ts = np.nonzero(self.col_of == c)[0]
            lows = np.concatenate([_dct_rows() @ shrinks[self.row_of[t]] for t in ts]).astype(np.float32)
            contiguous = ts[-1] - ts[0] == len(ts) - 1  # written as a slice: a third of a scattered write's time
            self.by_col.append((slice(ts[0], ts[-1] + 1) if contiguous else ts, lows))
        self.mean = np.stack([s.mean(0) for s in shrinks], axis=1)  # (VIEW, row cuts)
        grams = [s.T @ s for s in shrinks]
        side = len(grams[0])
        self.band = max(int(np.abs(np.subtract(*np.nonzero(g))).max()) for g in grams)
        self.energy = np.stack(
            [np.concatenate([np.pad(np.diagonal(g, d) * (1 if d == 0 else 2), (0, d)) for d in range(self.band + 1)]) for g in grams],
            axis=1,
        )  # ((band + 1) x VIEW, row cuts)
        assert self.energy.shape[0] == (self.band + 1) * side


class _Queries:
    """Whole views compared against every block, prepared once (`of`): their coarse numbers lifted (`_lifted`), the
    rows with NaN (flat) made 0, and their squared lengths (FAR for a flat row)."""

    def __init__(self, lifted: np.ndarray, rows: np.ndarray, norm2: np.ndarray, images: np.ndarray | None = None):
        self.lifted, self.rows, self.norm2, self.images = lifted, rows, norm2, images  # images: each row's image number

    @staticmethod
    def of(whole: np.ndarray, basis: np.ndarray, images: np.ndarray | None = None) -> _Queries:
        rows = np.where(np.isnan(whole), 0.0, whole).astype(np.float32)
        return _Queries(_lifted(whole @ basis, query=True), rows, _norm2(whole), images)

    def __getitem__(self, rows: np.ndarray) -> _Queries:
        return _Queries(self.lifted[rows], self.rows[rows], self.norm2[rows], None if self.images is None else self.images[rows])


class _Parts:
    """A block of images' transforms (images, transforms, K²), with their coarse numbers (`_basis`) lifted once for
    every query set compared with them (`_lifted`)."""

    def __init__(self, parts: np.ndarray, basis: np.ndarray):
        flat = parts.reshape(-1, parts.shape[-1])
        self.parts, self.lifted = parts, _lifted(flat @ basis, query=False).reshape(*parts.shape[:2], -1)
        self.norm2 = _norm2(flat).reshape(parts.shape[:2])

    def within(
        self, queries: _Queries, radius2: float, images: np.ndarray, ts: np.ndarray | None = None, seen: np.ndarray | None = None
    ) -> np.ndarray:
        """(query row, images[part image]) for every query whose projected whole view lies within radius2 of one of
        the part image's transforms (of those in `ts`, when given). NaN rows (flat thumbnails) reach nothing. Coarse
        to fine: the distance in the basis's first COARSE numbers is a lower bound of the whole distance, so the
        (query, transform) pairs it keeps are a superset of those within radius2, and only they are measured in all
        K² numbers (as 2 w.p - ||w||² - ||p||², float32, as the one-step screen did). With `queries.images`, a query
        is never paired with its own image; `seen` (part images x all transforms) is then set where a transform came
        within radius2 of another image's whole view."""
        parts, lifted, norm2 = self.parts, self.lifted, self.norm2
        if ts is not None:
            parts, lifted, norm2 = parts[:, ts], lifted[:, ts], norm2[:, ts]
        b, t = parts.shape[:2]
        q, f, w, w_norm2 = queries.lifted, lifted.reshape(b * t, -1), queries.rows, queries.norm2
        out = []
        for i in range(0, len(q), I_CHUNK):
            closeness = (q[i : i + I_CHUNK] @ f.T).reshape(-1, b, t)  # -||Bᵀ(w - p)||² over the coarse numbers
            a, c = np.nonzero(closeness.max(2) >= -radius2)
            if queries.images is not None:  # an image against itself is no pair (and its own trims reach its whole view)
                other = queries.images[a + i] != images[c]
                a, c = a[other], c[other]
            if not len(a):
                continue
            k, s = np.nonzero(closeness[a, c] >= -radius2)  # (pair, transform) the bound keeps
            hit = np.zeros(len(a), bool)
            for x in range(0, len(k), REFINE):  # bounded memory where many look alike: REFINE rows of K² gathered
                kx, sx = k[x : x + REFINE], s[x : x + REFINE]
                a_k, c_k = a[kx] + i, c[kx]
                close = 2 * np.einsum("ij,ij->i", w[a_k], parts[c_k, sx]) - w_norm2[a_k] - norm2[c_k, sx] >= -radius2
                hit[kx[close]] = True
                if seen is not None:
                    seen[c_k[close], (sx if ts is None else ts[sx])[close]] = True
            out.append(np.stack([a[hit] + i, images[c[hit]]], 1))
        return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def _norm2(x: np.ndarray) -> np.ndarray:
    """Each row's squared length (float32, as the screen's products), FAR for a NaN (flat) row: it reaches nothing."""
    n2 = np.einsum("ij,ij->i", x, x)
    return np.where(np.isnan(n2), FAR, n2).astype(np.float32)


def _basis(wholes: np.ndarray) -> np.ndarray:
    """(K², COARSE): the principal directions of the images' projected whole views, largest spread first: an orthonormal
    rotation (its first COARSE columns), so distances in it only shrink, whatever the data. Written by hand: a
    144 x 144 eigen-decomposition (numpy), not a library's PCA with its centring and sign conventions."""
    x = wholes[~np.isnan(wholes).any(1)].astype(np.float64)
    _, vectors = np.linalg.eigh(x.T @ x if len(x) else np.eye(wholes.shape[1]))
    return np.ascontiguousarray(vectors[:, ::-1][:, :COARSE]).astype(np.float32)


def _lifted(x: np.ndarray, query: bool) -> np.ndarray:
    """Rows lifted so that one product gives -||w - p||²: [2w, -||w||², -1] . [p, 1, ||p||²]. The blocks of the screen
    are far larger than its inputs, so the norms are added here once, not in three passes over every block. A NaN
    row becomes one at distance FAR from everything, as a NaN compared false before."""
    flat = np.isnan(x).any(1)
    x = np.where(flat[:, None], 0.0, x).astype(np.float32)
    norm2 = np.where(flat, FAR, (x.astype(np.float64) ** 2).sum(1)).astype(np.float32)[:, None]
    ones = np.ones((len(x), 1), np.float32)
    return np.hstack([2 * x, -norm2, -ones]) if query else np.hstack([x, ones, norm2])


def _distinct(prints: list[Fingerprint]) -> tuple[np.ndarray, np.ndarray]:
    """(first, of): the first image of each distinct sha256, and for each image the position of its file's first in
    `first`. Copies of one file have one fingerprint, so one of them stands for all in the search."""
    seen: dict[str, int] = {}
    of = np.array([seen.setdefault(p.sha256, len(seen)) for p in prints], np.int64)
    _, first = np.unique(of, return_index=True)  # files are numbered as first met, so this is each file's first image
    return first.astype(np.int64), of


def _links(
    prints: list[Fingerprint],
    max_distance: int,
    min_correlation: float,
    min_partial: float | None,
    memo=None,
    neighbours: int = 0,
    exact_up_to: int = 0,
) -> tuple:
    """(first, of, joined pairs among the distinct files, as positions in `first`). Above `exact_up_to` distinct files,
    with `neighbours` > 0, the crop and close rules screen only `neighbour_pairs`' pairs (approximate: docs/stages.md).
    With a `memo` (`memo.PairMemo`), the pairs it joined among files it screened before are taken from it, and only
    the other pairs are screened and judged: a verdict is a function of the pair, so the result is the one without it."""
    first, of = _distinct(prints)
    distinct = [prints[i] for i in first]
    shas = [p.sha256 for p in distinct]
    approximate = neighbours > 0 and len(distinct) > exact_up_to and min_partial is not None
    near = neighbour_pairs(distinct, neighbours) if approximate else None
    known, joined, screened = memo.recall(shas) if memo is not None else (np.zeros(len(shas), bool), np.zeros((0, 2), np.int64), None)
    todo = None
    if near is None and screened is not None:  # the last run screened only its neighbours' pairs: every pair again
        known, joined = np.zeros(len(shas), bool), joined[:0]
    elif near is not None:
        todo = near[~(_among(near, screened, len(shas)) if screened is not None else known[near].all(1))]
        hashes = np.stack([p.phash for p in distinct])
        joined = joined[_among(joined, near, len(shas)) | _hash_near(hashes, joined, max_distance)]  # as found without it
    new = ~known if known.any() else None
    if todo is not None:
        found = _judged_near(distinct, max_distance, min_correlation, min_partial, new, todo)
    else:
        reached: dict = {}  # the screen's reached transforms: on look-alike phantoms 93 of an image's 514 close ones
        cand = candidates(distinct, max_distance, min_partial, new, reached=reached)
        found = cand[verdicts(distinct, cand, max_distance, min_correlation, min_partial, reached)] if len(cand) else cand
    pairs = np.unique(np.sort(np.concatenate([joined, found]).astype(np.int64), axis=1), axis=0)  # one row a pair
    if memo is not None:
        memo.keep(shas, pairs, near)
    return first, of, pairs


def _among(pairs: np.ndarray, within: np.ndarray, n: int) -> np.ndarray:
    """Which unordered pairs of `pairs` are in `within` (positions below n)."""
    return np.isin(_pair_keys(pairs.reshape(-1, 2), n), _pair_keys(within.reshape(-1, 2), n))


def _pair_keys(pairs: np.ndarray, n: int) -> np.ndarray:
    """One number per unordered pair (positions below n): min * n + max."""
    return np.minimum(pairs[:, 0], pairs[:, 1]).astype(np.int64) * n + np.maximum(pairs[:, 0], pairs[:, 1])


def _hash_near(hashes: np.ndarray, pairs: np.ndarray, max_distance: int) -> np.ndarray:
    """Which pairs' perceptual hashes (rows of `hashes`) differ in at most max_distance bits: the whole-head rule's
    first test, a candidate whatever the screen."""
    near = np.zeros(len(pairs), bool)
    for s in range(0, len(pairs), 65536):  # bounded memory: 65,536 pairs' hashes at a time
        near[s : s + 65536] = (hashes[pairs[s : s + 65536, 0]] != hashes[pairs[s : s + 65536, 1]]).sum(1) <= max_distance
    return near


def joined_pairs(
    prints: list[Fingerprint],
    max_distance: int,
    min_correlation: float,
    min_partial: float | None = None,
    neighbours: int = 0,
    exact_up_to: int = 0,
) -> np.ndarray:
    """Every pair (i < j) that `duplicates.joined` joins, found by judging the candidates alone: equal bytes, and the
    pairs joined between distinct files, for each of their copies (with `neighbours`: of the approximate screen)."""
    first, of, pairs = _links(prints, max_distance, min_correlation, min_partial, None, neighbours, exact_up_to)
    members = np.split(np.argsort(of, kind="stable"), np.cumsum(np.bincount(of))[:-1])  # each file's copies, in order
    out = [np.array([(a, b) for m in members for x, a in enumerate(m) for b in m[x + 1 :]], np.int64).reshape(-1, 2)]
    out += [np.array(np.meshgrid(members[a], members[b])).reshape(2, -1).T for a, b in pairs]
    return np.unique(np.sort(np.concatenate(out), axis=1), axis=0)


def group_ids(
    keys: list[str],
    prints: list[Fingerprint],
    max_distance: int,
    min_correlation: float,
    min_partial: float | None = None,
    memo=None,
    neighbours: int = 0,
    exact_up_to: int = 0,
) -> list[str]:
    """A group id per image: images joined (transitively) by `duplicates.joined`'s rules, found through the
    candidates (`components` names them). Each copy of a file is linked to its first, not to every other copy."""
    first, of, pairs = _links(prints, max_distance, min_correlation, min_partial, memo, neighbours, exact_up_to)
    copies = np.stack([first[of], np.arange(len(prints))], 1)
    return components(keys, np.concatenate([first[pairs].reshape(-1, 2), copies]))


def verdicts(
    prints: list[Fingerprint],
    pairs: np.ndarray,
    max_distance: int,
    min_correlation: float,
    min_partial: float | None,
    reached: dict | None = None,
) -> np.ndarray:
    """`duplicates.joined`'s verdict for each pair (i, j), computed from the pair alone: equal bytes, the whole-head
    rule, the crop rule either way, or the close rule either way (cheapest first; only pairs still apart go on).
    With `reached` (`candidates`'), the crop and close rules measure only the transforms there (`_partial`)."""
    ok = _whole_head(prints, pairs, max_distance, min_correlation)
    if min_partial is None or ok.all():
        return ok
    todo = np.nonzero(~ok)[0]
    ordered = np.concatenate([pairs[todo], pairs[todo][:, ::-1]])  # each way
    ok[todo] = _partial(prints, ordered, np.tile(np.arange(len(todo)), 2), len(todo), min_partial, reached)
    return ok


def _whole_head(prints: list[Fingerprint], pairs: np.ndarray, max_distance: int, min_correlation: float) -> np.ndarray:
    """Per pair: equal bytes, or the whole-head rule (hash distance, then the thumbnails' correlation)."""
    a, b = pairs[:, 0], pairs[:, 1]
    files, hashes = _distinct(prints)[1], np.stack([p.phash for p in prints])
    ok = files[a] == files[b]  # equal bytes
    todo = np.nonzero(_hash_near(hashes, pairs, max_distance) & ~ok)[0]  # usually few (the hash is the stricter test)
    images = np.unique(pairs[todo])
    row = np.zeros(len(prints), np.int64)
    row[images] = np.arange(len(images))
    thumbs = np.stack([prints[i].thumb for i in images]) if len(images) else np.zeros((0, 0))
    for s in range(0, len(todo), 8192):  # bounded memory: 8,192 pairs' thumbnails at a time
        k = todo[s : s + 8192]
        ok[k] = np.einsum("ij,ij->i", thumbs[row[a[k]]], thumbs[row[b[k]]]) >= min_correlation
    return ok


def _partial(
    prints: list[Fingerprint], ordered: np.ndarray, pair: np.ndarray, n: int, bar: float, reached: dict | None = None
) -> np.ndarray:
    """Per pair (n of them): does the crop rule, or else the close rule, join one of its ordered pairs (ordered[k],
    of pair[k]: the first image whole, the second trimmed or turned)? With `reached` (`_screen_near`), each second
    image is measured only in the transforms that reached a query in the screen."""
    wholes = _Wholes(prints, ordered.ravel())  # the unit views both rules compare, made once
    joined = np.zeros(n, bool)
    for rule in (_crop_joins, _close_joins):
        left = np.nonzero(~joined[pair])[0]
        if not len(left):
            break
        joined[pair[left[rule(prints, ordered[left], bar, wholes, reached)]]] = True
    return joined


def _judged_near(
    prints: list[Fingerprint], max_distance: int, min_correlation: float, min_partial: float, new: np.ndarray | None, near: np.ndarray
) -> np.ndarray:
    """The approximate screen's joined pairs (i < j), among `near` and the hash rule's pairs (those with a new image,
    with `new`): `verdicts`' verdicts, the whole-head rule first, and only the pairs it leaves screened
    (`_screen_near`) and judged by the crop and close rules, on the transforms that reached the other image in the
    screen. A transform beyond the radius in K² numbers is beyond it in all 1,024 (the projection only shortens),
    so it cannot carry a join; the screen's trims are not made a second time in full for every image. With `new`,
    a pair of `near` between two earlier images that the whole-head rule joins is joined here even if the screen
    does not reach it (`candidates` would not propose it): an earlier run joined it too, and the memo keeps it."""
    n = len(prints)
    key = lambda x: _pair_keys(x, n)  # noqa: E731
    keys = np.unique(np.concatenate([key(candidates(prints, max_distance, None, new)), key(near.reshape(-1, 2))]))
    pairs = np.stack([keys // n, keys % n], 1)
    ok = _whole_head(prints, pairs, max_distance, min_correlation)
    rest = np.nonzero(~ok)[0]
    hits, reached = _screen_near(prints, _radius2(min_partial), pairs[rest])
    if len(hits):
        ok[rest[_partial(prints, hits, np.searchsorted(keys[rest], key(hits)), len(rest), min_partial, reached)]] = True
    return pairs[ok]


def _by_second(ordered: np.ndarray) -> dict[int, np.ndarray]:
    """The rows of `ordered` (a, b) grouped by b, the image trimmed or turned: its transforms are made once."""
    order = np.argsort(ordered[:, 1], kind="stable")
    second = ordered[order, 1]
    starts = np.flatnonzero(second[1:] != second[:-1]) + 1  # already sorted: no second sort (np.unique's)
    if not len(second):
        return {}
    return dict(zip(second[np.r_[0, starts]].tolist(), np.split(order, starts), strict=True))


class _Wholes:
    """The three views of the images in `images`, as unit thumbnails (`duplicates._thumbs`), made once each."""

    def __init__(self, prints: list[Fingerprint], images: np.ndarray):
        self.row = np.full(len(prints), -1)
        kept = np.unique(images)
        self.row[kept] = np.arange(len(kept))
        chunks = [kept[s : s + 1024] for s in range(0, len(kept), 1024)]  # bounded temporaries
        self.thumbs = [np.concatenate([_thumbs(_views([prints[i] for i in c], v)) for c in chunks]) for v in range(3)]

    def __call__(self, images: np.ndarray, v: int) -> np.ndarray:
        return self.thumbs[v][self.row[images]]


def _crop_joins(prints: list[Fingerprint], ordered: np.ndarray, bar: float, wholes: _Wholes, reached: dict | None = None) -> np.ndarray:
    """Per ordered pair (a, b): `partial_similarity`'s entry [a, b] at `bar`: a's thumbnail against b trimmed on the
    sides where a looks cut (with `reached`, only b's trims there: `_partial`)."""
    grid = trims()
    sides = np.array(grid) > 0
    patterns = np.array([pattern_sides(m) for m in range(16)])
    applies_to = (patterns[:, None, :] | ~sides[None]).all(2)  # (cut pattern, trim): cut on every side the trim cuts
    pattern = [np.array([int(p.cuts[v] @ (1 << np.arange(4))) for p in prints]) for v in range(3)]
    out = np.zeros(len(ordered), bool)
    cut = np.zeros(len(ordered), bool)
    for v in range(3):
        cut |= pattern[v][ordered[:, 0]] > 0
    if not cut.any():
        return out

    cut_rows = np.nonzero(cut)[0]

    def judge(group: tuple[int, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        j, ks = group
        ks, found = cut_rows[ks], []
        for v in range(3):
            firsts = ordered[ks, 0]
            firsts_cut = pattern[v][firsts] > 0
            if not firsts_cut.any():
                continue
            rows, firsts = ks[firsts_cut], firsts[firsts_cut]
            applies = applies_to[pattern[v][firsts]]
            need = np.nonzero(applies.any(0))[0]
            if reached is not None:
                need = np.intersect1d(need, reached[j].trims[v], assume_unique=True)
                if not len(need):
                    continue
            c = np.where(applies[:, need], wholes(firsts, v) @ _trimmed_at(prints[j].view(v), need).T, -1.0)
            found.append((rows, c.max(1) >= bar))
        return found

    for found in _each(judge, _by_second(ordered[cut]).items()):
        for rows, hit in found:
            out[rows] |= hit
    return out


def _close_joins(prints: list[Fingerprint], ordered: np.ndarray, bar: float, wholes: _Wholes, reached: dict | None = None) -> np.ndarray:
    """Per ordered pair (a, b): `close_similarity`'s best [a, b] (the first transform reaching it, as there) at `bar`,
    and the heads' insides there at MIN_INNER (`duplicates.joined`). Each image's inside masks are made once, and
    every first reaching `bar` through one transform of b is judged against it at once. With `reached`, only b's
    transforms there are measured: the best, when it reaches `bar`, is among them, and so is every transform that
    ties it, so the first reaching it is the same."""
    grid = _transforms()
    view_of = np.array([w for w, _ in grid])
    at_trim = np.array([_trim_places()[t] if w >= 0 else -1 for w, t in grid])  # each small trim's place in `trims()`
    out = np.zeros(len(ordered), bool)
    insides: dict[tuple[int, int], np.ndarray] = {}  # shared by the threads: an entry made twice is the same array

    def judge(group: tuple[int, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        j, ks = group
        firsts, measured = ordered[ks, 0], np.arange(len(grid)) if reached is None else reached[j].transforms
        if not len(measured):
            return []
        columns, at = [], []  # c's columns, and their places in `_transforms()` (views 0-2, then the turns: its order)
        for v in (0, 1, 2, -1):
            ts = measured[view_of[measured] == v]
            if len(ts) and v >= 0:
                columns.append(wholes(firsts, v) @ _trimmed_at(prints[j].view(v), at_trim[ts]).T)
            elif len(ts):
                columns.append(wholes(firsts, 0) @ _thumbs(prints[j].turned[[grid[t][1] for t in ts]].astype(np.float32)).T)
            at.append(ts)
        c, at = np.concatenate(columns, axis=1), np.concatenate(at)
        best = c.argmax(1)  # the first transform reaching the best, as close_similarity's strict ">" keeps it
        reach = c[np.arange(len(ks)), best] >= bar
        best = at[best]
        found = []
        for t in np.unique(best[reach]):
            rows = np.nonzero(reach & (best == t))[0]
            v, seen = max(grid[t][0], 0), close_view(prints[j], grid[t])
            for i in firsts[rows]:
                if (i, v) not in insides:
                    insides[i, v] = inside(prints[i].views[v])
            a = np.stack([prints[i].views[v] for i in firsts[rows]])
            inner = inner_correlations(a, seen, np.stack([insides[i, v] for i in firsts[rows]]), inside(seen))
            found.append((ks[rows], inner >= MIN_INNER))
        return found

    for found in _each(judge, _by_second(ordered).items()):
        for rows, hit in found:
            out[rows] = hit
    return out


@cache
def _trim_places() -> dict[tuple, int]:
    """Each trim's place in `trims()`, for the screen's and the verdicts' lookups."""
    return {t: k for k, t in enumerate(trims())}


@cache
def _every_trim() -> tuple[np.ndarray, np.ndarray]:
    """`duplicates._stacked` of all of `trims()`, made once: the verdicts take the rows they need (a stack made
    for each image's own subset cost 70 µs a trim, more than the products)."""
    return _stacked(trims())


def _trimmed_at(view: np.ndarray, at: np.ndarray) -> np.ndarray:
    """`duplicates.trimmed(view, grid)` for grid the trims at places `at` of `trims()`: the same products."""
    rows, cols = _every_trim()
    return _unit((rows[at] @ view @ cols[at]).reshape(len(at), -1))


def _each(work, items):
    """work(item) for each item, in order, on the stage's cores (threads, one BLAS thread each): the images' verdicts
    and screen blocks are independent, and numpy lets go of the GIL in its products."""
    cores = stage_cores()
    with threadpool_limits(1), ThreadPoolExecutor(cores) as pool:
        yield from pool.map(work, items) if cores > 1 else map(work, items)
