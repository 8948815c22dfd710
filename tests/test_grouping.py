"""The indexed duplicate search (brainmri.intake.grouping) against the exhaustive all-pairs check (duplicates.joined)."""

import numpy as np
from PIL import Image

from brainmri.intake.duplicates import components, fingerprint, joined
from brainmri.intake.grouping import candidates, joined_pairs, verdicts
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
    assert len(candidates(prints)) < len(prints) * (len(prints) - 1) // 2  # and fewer pairs were judged than all


def test_a_pair_verdict_is_the_exhaustive_one_for_every_pair():
    """verdicts() on every pair (index or no index) gives duplicates.joined's matrix, entry for entry."""
    prints = [fingerprint(img, f"k{i}", 8) for i, img in enumerate(_set(6, seed=9))]
    n = len(prints)
    pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n)])
    same = joined(prints, *RULES)
    assert np.array_equal(verdicts(prints, pairs, *RULES), same[pairs[:, 0], pairs[:, 1]])
