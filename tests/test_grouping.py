"""The screened duplicate search (brainmri.intake.grouping, what ingest groups with) against the exhaustive all-pairs
check (duplicates.joined)."""

import numpy as np
from PIL import Image

from brainmri.intake.duplicates import components, fingerprint, inner_correlation, inside, joined
from brainmri.intake.grouping import candidates, group_ids, joined_pairs, project, verdicts
from brainmri.intake.phantoms import phantom

RULES = (10, 0.95, 0.93)  # params.yaml's dedupe: max_distance, min_correlation, min_partial_correlation


def _set(n_scans: int = 12, seed: int = 5) -> list[Image.Image]:
    """Phantom scans on black film, each followed by copies the way real copies differ: cropped into the head on one
    or two sides, turned by 2-3 degrees, nicked, padded and rescaled."""
    rng = np.random.default_rng(seed)
    images = []
    for k in range(n_scans):
        scan = Image.fromarray(np.pad(phantom(rng, bool(k % 2), 160, 150), 24)).convert("RGB")
        w, h = scan.size
        images.append(scan)
        if k % 4 == 0:  # into the head: 20% off the top, or 15% off the left and 10% off the bottom
            box = (0, int(0.2 * h), w, h) if k % 8 == 0 else (int(0.15 * w), 0, w, int(0.9 * h))
            images.append(scan.crop(box))
        if k % 4 == 1:
            images.append(scan.rotate(2.5 if k % 8 == 1 else -3, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)))
        if k % 4 == 2:  # a nick of 8% off the right, where no straight edge shows
            images.append(scan.crop((0, 0, int(w * 0.92), h)))
        if k % 4 == 3:
            images.append(scan.resize((w * 3 // 4, h * 3 // 4)).crop((0, 0, w * 3 // 4, h * 3 // 4 - 4)))
    return images


def test_indexed_search_finds_the_groups_of_the_all_pairs_check():
    prints = [fingerprint(img, f"k{i}", 8) for i, img in enumerate(_set())]
    keys = [p.sha256 for p in prints]
    exhaustive = np.argwhere(np.triu(joined(prints, *RULES), 1))
    indexed = joined_pairs(prints, *RULES)
    assert len(exhaustive) >= 6, exhaustive  # the copies are found at all (most of the 12), so the comparison means something
    assert components(keys, indexed) == components(keys, exhaustive)
    assert {tuple(p) for p in indexed} == {tuple(p) for p in exhaustive}  # not only the same groups: the same pairs
    assert len(candidates(prints, RULES[0], RULES[2])) < len(prints) * (len(prints) - 1) // 2  # and fewer pairs were judged than all


def test_a_pair_verdict_is_the_exhaustive_one_for_every_pair():
    """verdicts() on every pair (index or no index) gives duplicates.joined's matrix, entry for entry."""
    prints = [fingerprint(img, f"k{i}", 8) for i, img in enumerate(_set(6, seed=9))]
    n = len(prints)
    pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n)])
    same = joined(prints, *RULES)
    assert np.array_equal(verdicts(prints, pairs, *RULES), same[pairs[:, 0], pairs[:, 1]])


def test_copies_of_one_file_and_flat_images_group_as_the_all_pairs_check_does():
    """Equal bytes stand for one another in the search (one fingerprint), and a flat image (no head, no texture) and a
    tiny one neither crash the screen nor join anything the rules would not."""
    rng = np.random.default_rng(3)
    scans = [Image.fromarray(np.pad(phantom(rng, k % 2 == 0, 150, 140), 20)).convert("RGB") for k in range(4)]
    flat = Image.new("RGB", (90, 90), (40, 40, 40))
    tiny = scans[0].resize((24, 24))
    images = [scans[0], scans[1], scans[0], flat, scans[2], flat, tiny, scans[3], scans[0]]
    shas = ["a", "b", "a", "f", "c", "f", "t", "d", "a"]  # the three scans[0] are one file, so are the two flats
    prints = [fingerprint(img, s, 8) for img, s in zip(images, shas, strict=True)]
    exhaustive = np.argwhere(np.triu(joined(prints, *RULES), 1))
    assert {tuple(p) for p in joined_pairs(prints, *RULES)} == {tuple(p) for p in exhaustive}
    assert group_ids(shas, prints, *RULES) == components(shas, exhaustive)
    ids = group_ids(shas, prints, *RULES)
    assert ids[0] == ids[2] == ids[8] and ids[3] == ids[5] and len(set(ids)) < len(ids)


def test_the_screen_only_shortens_distances_and_the_inside_test_is_unchanged():
    """The two facts the screen rests on, on real-looking inputs: the low-frequency DCT projection of unit thumbnails
    never lengthens a distance (so no pair within a rule's radius is dropped), and the inside test made from each
    image's own eroded mask equals the test made from the eroded common mask."""
    from scipy.ndimage import binary_erosion

    from brainmri.intake.duplicates import INNER_ERODE, _thumbs

    prints = [fingerprint(img, f"k{i}", 8) for i, img in enumerate(_set(8, seed=2))]
    thumbs = _thumbs(np.stack([p.views[0] for p in prints]))
    full = np.linalg.norm(thumbs[:, None] - thumbs[None], axis=2)
    low = project(thumbs)
    short = np.linalg.norm(low[:, None] - low[None], axis=2)
    assert (short <= full + 1e-5).all() and (short < 0.9 * full + 1e-6).any()  # shorter, and not the identity
    for a in prints[:6]:
        for b in prints[:6]:
            x, y = a.views[0].astype(np.float64), b.views[0].astype(np.float64)
            assert np.array_equal(binary_erosion(_inside_raw(x) & _inside_raw(y), iterations=INNER_ERODE), inside(x) & inside(y))
            assert inner_correlation(x, y) == inner_correlation(x, y, inside(x), inside(y))


def _inside_raw(x: np.ndarray) -> np.ndarray:
    """The head's inside before erosion, as duplicates.inside thresholds it."""
    from scipy.ndimage import gaussian_filter

    from brainmri.intake.decode import BACKGROUND

    return gaussian_filter(x, 1) > max(BACKGROUND, 0.25 * float(np.percentile(x, 95)))


def test_the_screens_trims_are_the_rules_trims_projected():
    """grouping._transformed (made from shared factors, never the thumbnails) against each trim made as the rules make
    it (`duplicates._thumbs`, unit, then projected): equal to float32 rounding, flat and near-flat views included."""
    from brainmri.intake.duplicates import _thumbs, trims
    from brainmri.intake.grouping import _projected_units, _transformed

    prints = [fingerprint(img, f"k{i}", 8) for i, img in enumerate(_set(4, seed=4))]
    views = np.stack([p.views[v] for p in prints for v in range(3)])
    edge = np.zeros((64, 64), np.float32)
    edge[:, :6] = 200.0  # flat once the left 10% or more is trimmed off: the rules' flat rows
    views = np.concatenate([views, np.full((1, 64, 64), 90.0, np.float32), edge[None]])
    grid = tuple(trims()[::7])
    made = _transformed(views, grid)
    for k, trim in enumerate(grid):
        ref = _projected_units(_thumbs(views, trim))
        assert np.array_equal(np.isnan(made[:, k]), np.isnan(ref)), trim
        assert np.allclose(np.nan_to_num(made[:, k]), np.nan_to_num(ref), atol=2e-6), trim
    assert np.isnan(made[-2]).all() and np.isnan(made[-1]).any() and not np.isnan(made[-1]).all()


def test_inner_correlations_are_inner_correlation_row_by_row():
    """The verdicts' batched inside test gives each pair what inner_correlation gives it, small insides (-1) included."""
    from brainmri.intake.duplicates import inner_correlations

    prints = [fingerprint(img, f"k{i}", 8) for i, img in enumerate(_set(6, seed=7))]
    views = np.stack([p.views[v] for p in prints for v in range(3)] + [np.zeros((64, 64), np.float32)])
    insides = np.stack([inside(x) for x in views])
    refs = []
    for b in views[::4]:
        refs.append(np.array([inner_correlation(a, b) for a in views]))
        assert np.allclose(inner_correlations(views, b, insides, inside(b)), refs[-1], rtol=0, atol=1e-12)
    assert (np.concatenate(refs) == -1).any() and (np.concatenate(refs) > 0.5).any()  # both kinds of answer compared


def test_the_coarse_to_fine_screen_keeps_exactly_the_pairs_within_the_radius():
    """_Parts.within (a lower bound in the basis's first numbers, then all K² for what it keeps) against the distance
    of every (query, transform) pair in all K² numbers: the same pairs, flat (NaN) rows reaching nothing. The data lie
    in 20 dimensions, so the first COARSE numbers hold all of each distance and a looser or wrong bound loses pairs."""
    from brainmri.intake.grouping import K, _basis, _Parts, _Queries

    rng = np.random.default_rng(11)
    space = np.linalg.qr(rng.normal(size=(K * K, 20)))[0]  # an orthonormal 20-dimensional subspace
    centres = rng.normal(size=(6, 20))
    whole = ((centres[rng.integers(0, 6, 300)] + 0.35 * rng.normal(size=(300, 20))) @ space.T).astype(np.float32)
    whole /= np.linalg.norm(whole, axis=1, keepdims=True)
    parts = (whole[rng.integers(0, 300, (20, 40))] + 0.05 * rng.normal(size=(20, 40, 20)) @ space.T).astype(np.float32)
    basis = _basis(whole)
    whole[7], parts[3, 5] = np.nan, np.nan
    d2 = ((np.nan_to_num(whole, nan=9.0)[:, None, None].astype(np.float64) - np.nan_to_num(parts, nan=-9.0)) ** 2).sum(-1)
    radius2 = float(np.quantile(d2.min(2), 0.05))  # about 5% of the (query, image) pairs within it
    expected = {(i, 30 + j) for i, j in np.argwhere(d2.min(2) <= radius2)}
    found = {tuple(x) for x in _Parts(parts, basis).within(_Queries.of(whole, basis), radius2, np.arange(30, 50))}
    margin = {(i, 30 + j) for i, j in np.argwhere(np.abs(d2.min(2) - radius2) < 1e-5)}  # float32 rounding decides these
    assert 100 < len(expected) < 300 * 20 // 2 and not any(i == 7 for i, _ in found)
    assert found - margin == expected - margin
    ts = np.arange(0, 40, 3)
    expected_ts = {(i, 30 + j) for i, j in np.argwhere(d2[:, :, ts].min(2) <= radius2)}
    found_ts = {tuple(x) for x in _Parts(parts, basis).within(_Queries.of(whole, basis), radius2, np.arange(30, 50), ts)}
    assert found_ts - margin == expected_ts - margin


def test_the_screen_and_verdicts_are_the_same_on_one_core_and_on_two(monkeypatch):
    """The blocks and verdicts run on the stage's cores in threads: the pairs found and judged do not depend on how many."""
    from brainmri.core.machine import THREADS

    prints = [fingerprint(img, f"k{i}", 8) for i, img in enumerate(_set(10, seed=2))]
    runs = []
    for threads in ("1", "2"):
        monkeypatch.setenv(THREADS, threads)
        cand = candidates(prints, RULES[0], RULES[2])
        runs.append((cand, verdicts(prints, cand, *RULES)))
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])
    assert runs[0][1].sum() >= 4  # copies were joined: the comparison covers the verdicts' work too


def test_a_stopped_search_cancels_the_blocks_not_started(monkeypatch):
    """Ctrl-C or an error in ingest stops the threaded screen at once: the blocks not yet started never run. Executor.map
    cancels its pending futures when its results are closed; a pool left to its own exit would first run every queued
    block (minutes on a large set)."""
    import threading
    import time

    from brainmri.core.machine import THREADS
    from brainmri.intake.grouping import _each

    monkeypatch.setenv(THREADS, "2")
    ran = []
    lock = threading.Lock()

    def work(k):
        time.sleep(0.05)
        with lock:
            ran.append(k)
        return k

    results = _each(work, range(200))
    assert next(results) == 0
    results.close()  # what an exception or KeyboardInterrupt in the consumer does to the generator
    time.sleep(0.2)
    assert len(ran) < 10, len(ran)
