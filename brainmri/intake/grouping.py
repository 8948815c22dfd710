"""Duplicate groups without scoring every pair: an index proposes candidate pairs, the exact rules judge only those.

`duplicates.joined` scores all n² pairs with every rule (its crop rule alone: 920 trims of 3 views). Here each image
gets small LOW x LOW thumbnails (zero-mean, unit norm) of its three views and of its head region turned by each of
duplicates.TURNS, and, for the crop rule, of each view trimmed on a coarse grid (every COARSE-th trim step). Radius
searches in scikit-learn ball trees find the pairs whose small thumbnails correlate at BAR or more: the same views,
a view against another image's turned head region, and an image that looks cut against every other image trimmed
on its cut sides. Only those pairs go to `duplicates.pair_joined`, the rules of `joined` for one pair, so a verdict
stays a function of the pair; groups are the components of the joined pairs (union-find), never an n x n matrix.
The index can only lose pairs, never add any: tests/test_grouping.py compares it with the exhaustive `joined` on
phantoms, `benchmarks/duplicates.py --index` on the perturbed real images. Not yet used by ingest (`group_ids`):
at the bar below, 15 of the 1,997 copies the rules join to their original were not candidates (crops at 0.64 and
burned-in text at 0.73 here), and a third of all pairs of a 300-image set of phantoms and copies were candidates
(smooth heads look alike at 16 x 16; verifying them cost more than scoring every pair).
"""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors

from brainmri.intake.duplicates import (
    MIN_INNER,
    TRIM_STEP,
    TURNS,
    Fingerprint,
    _close_pair,
    _thumbs,
    _transforms,
    components,
    joined,
    trimmed,
    trims,
)

LOW = 16  # side of the small thumbnails (256 numbers): at 8 x 8 smooth phantoms and different real scans all looked alike
COARSE = 3  # the crop search trims by every third step of the exact rule's grid (9%): the nearest is at most 3% off a side
# small-thumbnail correlation a candidate needs; pairs the exact rules join on benchmarks/duplicates.py scored at least
# XXX here, different real scans mostly below it
BAR = 0.85


def _radius_pairs(queries: np.ndarray, targets: np.ndarray, bar: float) -> list[tuple[int, int]]:
    """(query index, target index) for every target within correlation `bar` of a query (unit vectors: distance
    sqrt(2 - 2 bar)), found in a ball tree over the targets."""
    if not len(queries) or not len(targets):
        return []
    tree = NearestNeighbors(radius=float(np.sqrt(2 - 2 * bar)) + 1e-6, algorithm="ball_tree").fit(targets)
    found = tree.radius_neighbors(queries, return_distance=False)
    return [(q, int(t)) for q, ts in enumerate(found) for t in ts]


def coarse_trims() -> list[tuple[float, float, float, float]]:
    """The exact rule's trims whose every share is a multiple of COARSE steps past the first (3%, 12%, 21%...)."""
    on_grid = [round(TRIM_STEP * (1 + COARSE * k), 4) for k in range(int(1 / (TRIM_STEP * COARSE)) + 1)]
    return [t for t in trims() if all(c == 0 or round(c, 4) in on_grid for c in t)]


def candidates(prints: list[Fingerprint]) -> np.ndarray:
    """(m, 2) index pairs i < j worth judging: equal bytes, or small thumbnails alike as the module docstring says."""
    found: set[tuple[int, int]] = set()
    first: dict[str, int] = {}
    for k, p in enumerate(prints):  # equal bytes: each joined to the first copy
        found.add((first.setdefault(p.sha256, k), k))
    wholes = []
    for v in range(3):
        views = np.stack([p.views[v] for p in prints])
        whole = _thumbs(views, out=LOW)
        wholes.append(whole)
        found.update(_radius_pairs(whole, whole, BAR))
        cuts = np.stack([p.cuts[v] for p in prints])
        for trim in coarse_trims():
            rows = np.nonzero(cuts[:, np.array(trim) > 0].all(1))[0]  # as the crop rule: only images cut there
            if len(rows):
                found.update((int(rows[q]), t) for q, t in _radius_pairs(whole[rows], _thumbs(views, trim, LOW), BAR))
    for a in range(len(TURNS)):
        turned = _thumbs(np.stack([p.turned[a] for p in prints]), out=LOW)
        found.update(_radius_pairs(wholes[0], turned, BAR))
    pairs = {(min(i, j), max(i, j)) for i, j in found if i != j}
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def joined_pairs(prints: list[Fingerprint], max_distance: int, min_correlation: float, min_partial: float | None = None) -> np.ndarray:
    """The candidate pairs (i < j) that `duplicates.pair_joined` joins: `duplicates.joined`'s pairs, found through
    the index."""
    cand = candidates(prints)
    return cand[verdicts(prints, cand, max_distance, min_correlation, min_partial)] if len(cand) else cand


def group_ids(
    keys: list[str], prints: list[Fingerprint], max_distance: int, min_correlation: float, min_partial: float | None = None
) -> list[str]:
    """A group id per image: images joined (transitively) by `duplicates.joined`, every pair scored (`components`
    names them). Not through the index: on benchmarks/duplicates.py its candidates missed pairs the rules join
    (docs/measurements.md), so ingest keeps the exhaustive, O(n²) search until they do not."""
    return components(keys, np.argwhere(np.triu(joined(prints, max_distance, min_correlation, min_partial), 1)))


def verdicts(
    prints: list[Fingerprint], pairs: np.ndarray, max_distance: int, min_correlation: float, min_partial: float | None
) -> np.ndarray:
    """`duplicates.joined`'s verdict for each pair (i, j), computed from the pair alone: equal bytes, the whole-head
    rule, the crop rule either way, or the close rule either way (cheapest first; only pairs still apart go on)."""
    a, b = pairs[:, 0], pairs[:, 1]
    ok = np.array([prints[i].sha256 == prints[j].sha256 for i, j in pairs], dtype=bool)
    dist = np.array([int((prints[i].phash != prints[j].phash).sum()) for i, j in pairs])
    corr = np.array([float(prints[i].thumb @ prints[j].thumb) for i, j in pairs])
    ok |= (dist <= max_distance) & (corr >= min_correlation)
    if min_partial is None or ok.all():
        return ok
    for rule in (_crop_joins, _close_joins):
        todo = np.nonzero(~ok)[0]
        if not len(todo):
            break
        both = np.concatenate([np.stack([a[todo], b[todo]], 1), np.stack([b[todo], a[todo]], 1)])  # each way
        hit = rule(prints, both, min_partial)
        ok[todo] = hit[: len(todo)] | hit[len(todo) :]
    return ok


def _by_second(ordered: np.ndarray) -> dict[int, np.ndarray]:
    """The rows of `ordered` (a, b) grouped by b, the image trimmed or turned: its transforms are made once."""
    groups: dict[int, list[int]] = {}
    for k, j in enumerate(ordered[:, 1]):
        groups.setdefault(int(j), []).append(k)
    return {j: np.array(ks) for j, ks in groups.items()}


def _crop_joins(prints: list[Fingerprint], ordered: np.ndarray, bar: float) -> np.ndarray:
    """Per ordered pair (a, b): `partial_similarity`'s entry [a, b] at `bar`: a's thumbnail against b trimmed on the
    sides where a looks cut."""
    grid = trims()
    sides = np.array(grid) > 0
    out = np.zeros(len(ordered), bool)
    for j, ks in _by_second(ordered).items():
        for v in range(3):
            cuts = np.stack([prints[i].cuts[v] for i in ordered[ks, 0]])
            applies = (cuts[:, None, :] | ~sides[None]).all(2)  # (a, trim): a is cut on every side the trim cuts
            need = np.nonzero(applies.any(0))[0]
            if not len(need):
                continue
            wholes = np.concatenate([_thumbs(prints[i].views[v][None]) for i in ordered[ks, 0]])
            c = np.where(applies[:, need], wholes @ trimmed(prints[j].views[v], tuple(grid[t] for t in need)).T, -1.0)
            out[ks] |= c.max(1) >= bar
    return out


def _close_joins(prints: list[Fingerprint], ordered: np.ndarray, bar: float) -> np.ndarray:
    """Per ordered pair (a, b): `close_similarity`'s best [a, b] (the first transform reaching it, as there) at `bar`,
    and the heads' insides there at MIN_INNER (`duplicates.joined`)."""
    grid = _transforms()
    small = [tuple(t for w, t in grid if w == v) for v in range(3)]
    out = np.zeros(len(ordered), bool)
    for j, ks in _by_second(ordered).items():
        firsts = ordered[ks, 0]
        wholes = [np.concatenate([_thumbs(prints[i].views[v][None]) for i in firsts]) for v in range(3)]
        c = np.concatenate(
            [wholes[v] @ trimmed(prints[j].views[v], small[v]).T for v in range(3)] + [wholes[0] @ _thumbs(prints[j].turned).T], axis=1
        )
        best = c.argmax(1)  # the first transform reaching the best, as close_similarity's strict ">" keeps it
        for r, (k, i, t) in enumerate(zip(ks, firsts, best, strict=True)):
            out[k] = bool(c[r, t] >= bar) and _close_pair(prints[i], prints[j], grid[t]) >= MIN_INNER
    return out
