"""The approximate screen above dedupe.exact_up_to (brainmri.intake.grouping.neighbour_pairs and _screened_near): it
measures exactly the exact screen's test on the pairs it is given, its neighbour lists are the nearest whole views,
and through the memo it gives the groups a run without the memo gives, whichever files come and go."""

import itertools

import numpy as np
import pytest
from test_grouping import RULES, _set
from test_memo import _cut_set, _pairs

from brainmri.intake.duplicates import fingerprint
from brainmri.intake.grouping import (
    _close_joins,
    _crop_joins,
    _judged_near,
    _radius2,
    _screen_near,
    _Wholes,
    candidates,
    group_ids,
    neighbour_pairs,
    verdicts,
    whole_views,
)
from brainmri.intake.memo import PairMemo


def _prints(kind: str, seed: int) -> list:
    made = _set(10, seed) if kind == "copies" else _cut_set(seed)
    return [fingerprint(img, f"{kind}{seed}-{i}", 8) for i, img in enumerate(made)]  # the key stands for the sha256


@pytest.mark.parametrize("images", ["copies 5", "cut 4"])
def test_the_screen_of_given_pairs_is_the_exact_screen_on_those_pairs(images):
    """candidates(near=S) is the hash rule's pairs and the exact screen's other pairs that lie in S, for S every pair
    and random halves of them: the approximate screen loses only what its pairs leave out."""
    kind, seed = images.split()
    prints = _prints(kind, int(seed))
    full = _pairs(candidates(prints, RULES[0], RULES[2]))
    hashed = _pairs(candidates(prints, RULES[0], None))
    every = np.array(list(itertools.combinations(range(len(prints)), 2)))
    assert _pairs(candidates(prints, RULES[0], RULES[2], near=every)) == full
    rng = np.random.default_rng(int(seed))
    for _ in range(3):
        some = every[rng.random(len(every)) < 0.5]
        got = _pairs(candidates(prints, RULES[0], RULES[2], near=some))
        assert got == hashed | (full & _pairs(some))
    assert len(full - hashed) > 10  # the screen itself found pairs, so losing one would show


@pytest.mark.parametrize("images", ["copies 5", "cut 4"])
def test_judging_only_what_the_screen_reached_gives_the_full_verdicts(images):
    """_judged_near(S) joins exactly the pairs that candidates(near=S) proposes and verdicts() joins measuring every
    trim and turn of both images, for S every pair and random halves, with and without a mask of new images: the
    crop and close rules measured only on the transforms that reached a query in the screen lose no join, add none."""
    kind, seed = images.split()
    prints = _prints(kind, int(seed))
    every = np.array(list(itertools.combinations(range(len(prints)), 2)))
    rng, hashed = np.random.default_rng(int(seed)), _pairs(candidates(prints, RULES[0], None))
    for some in [every] + [every[rng.random(len(every)) < 0.5] for _ in range(3)]:
        for new in (None, rng.random(len(prints)) < 0.5):
            cand = candidates(prints, RULES[0], RULES[2], new, some)
            expected = _pairs(cand[verdicts(prints, cand, *RULES)])
            assert _pairs(_judged_near(prints, *RULES, new, some)) == expected
            if new is None and len(some) == len(every):
                assert len(expected - hashed) >= (5 if kind == "cut" else 1)  # joins the crop and close rules made: losing one would show


@pytest.mark.parametrize("images", ["copies 5", "cut 4"])
def test_the_exact_screen_reaches_what_the_screen_of_every_pair_reaches_and_its_verdicts_are_the_full_ones(images):
    """candidates(reached=...) records, per image, the transforms that came within the radius of another image's whole
    view: those `_screen_near` finds on every pair (an image's own whole view, which its small trims always reach,
    left out), and the verdicts measuring only them are the verdicts measuring every transform, with and without a
    mask of new images."""
    kind, seed = images.split()
    prints = _prints(kind, int(seed))
    every = np.array(list(itertools.combinations(range(len(prints)), 2)))
    reached: dict = {}
    cand = candidates(prints, RULES[0], RULES[2], reached=reached)
    _, expected = _screen_near(prints, _radius2(RULES[2]), every)
    assert set(reached) == set(range(len(prints)))  # every image, those that reached nothing with empty lists
    for j, r in reached.items():
        want = expected.get(j)
        assert np.array_equal(r.transforms, want.transforms if want else []), j
        assert all(np.array_equal(r.trims[v], want.trims[v] if want else []) for v in range(3)), j
    assert np.mean([len(r.transforms) for r in reached.values()]) < 514 / 2  # fewer than all: the restriction does something
    full = verdicts(prints, cand, *RULES)
    assert np.array_equal(verdicts(prints, cand, *RULES, reached), full) and full.sum() >= 5
    new = np.random.default_rng(int(seed)).random(len(prints)) < 0.5
    reached = {}
    cand = candidates(prints, RULES[0], RULES[2], new, reached=reached)
    assert np.array_equal(verdicts(prints, cand, *RULES, reached), verdicts(prints, cand, *RULES))


@pytest.mark.parametrize("images", ["copies 5", "cut 4"])
def test_each_rule_on_the_transforms_the_screen_reached_is_the_rule_on_all(images):
    """Per ordered pair (i whole, j trimmed or turned): the crop and close rules measuring only the transforms of j
    that reached a query in the screen give what they give measuring all 920 trims, 510 small trims and 4 turns;
    the ordered pairs the screen did not keep are joined by neither rule."""
    kind, seed = images.split()
    prints = _prints(kind, int(seed))
    every = np.array(list(itertools.combinations(range(len(prints)), 2)))
    hits, reached = _screen_near(prints, _radius2(RULES[2]), every)
    ordered = np.concatenate([every, every[:, ::-1]])
    kept = np.isin(ordered @ [len(prints), 1], hits @ [len(prints), 1])
    wholes = _Wholes(prints, ordered.ravel())
    for rule, least in ((_crop_joins, 2 if kind == "cut" else 0), (_close_joins, 3)):
        full = rule(prints, ordered, RULES[2], wholes)
        assert not full[~kept].any()
        assert np.array_equal(rule(prints, ordered[kept], RULES[2], wholes, reached), full[kept])
        assert full.sum() >= least, rule  # joins to lose


def _nearest_images(prints: list, k: int) -> set:
    """Each image's k nearest others in each view, an image's distance being its nearest point's (whole view or a
    representative trim), by a plain distance sort; and the points checked against the float32 products."""
    from brainmri.intake.grouping import _index_basis, _transformed, _views, index_points, representatives

    points, expected = index_points(prints).astype(np.float64), set()
    for v, w in enumerate(whole_views(prints)):
        exact = np.concatenate([w[:, None], _transformed(_views(prints, v), representatives())], 1) @ _index_basis()
        assert np.allclose(points[:, v], exact, atol=2e-3, equal_nan=True)  # float16 of the same numbers
        d = ((np.nan_to_num(points[:, v, :1][:, None], nan=1e3) - np.nan_to_num(points[None, :, v], nan=-1e3)) ** 2).sum(-1).min(2)
        np.fill_diagonal(d, np.inf)
        for i in np.nonzero(~np.isnan(w).any(1))[0]:
            expected |= {tuple(sorted((int(i), int(j)))) for j in np.argsort(d[i], kind="stable")[:k] if d[i, j] < 1e5}
    return expected


def test_neighbour_pairs_are_each_images_nearest_images(monkeypatch):
    """The k nearest images of each (by their nearest point), either way, against a plain distance sort, searched
    exactly and through the inverted file (searching every list, so it must be exact too); k past the set's size
    gives every pair; flat views are in no list."""
    from brainmri.intake import grouping

    prints = _prints("cut", 3)
    prints[4].views[:] = 0  # a flat image in every view: near nothing
    n, k = len(prints), 3
    expected = _nearest_images(prints, k)
    assert _pairs(neighbour_pairs(prints, k)) == expected
    assert k * n // 2 < len(expected) < n * (n - 1) // 2  # neither the bare minimum nor every pair
    monkeypatch.setattr(grouping, "FLAT_UP_TO", 0)
    monkeypatch.setattr(grouping, "NPROBE", 10**6)
    assert _pairs(neighbour_pairs(prints, k)) == expected
    monkeypatch.undo()
    everything = _pairs(neighbour_pairs(prints, n))
    assert everything == {(i, j) for i, j in itertools.combinations(range(n), 2) if 4 not in (i, j)}


def test_approximate_groups_with_every_neighbour_are_the_exact_groups():
    prints = _prints("cut", 4)
    keys = [p.sha256 for p in prints]
    exact = group_ids(keys, prints, *RULES)
    assert group_ids(keys, prints, *RULES, neighbours=len(prints), exact_up_to=0) == exact
    assert len(set(exact)) < len(prints) - 5  # crops were joined to their scans
    few = group_ids(keys, prints, *RULES, neighbours=1, exact_up_to=0)
    assert all(len({e for e, f in zip(exact, few, strict=True) if f == g}) == 1 for g in few)  # only ever splits exact groups


def test_groups_through_the_memo_are_the_groups_without_it_when_approximate(tmp_path, monkeypatch):
    """Neighbour lists change as files come and go: a pair screened before is not screened again, a pair not screened
    before is, a joined pair no longer among the neighbours is dropped (unless the hash rule finds it), and a switch
    to the exact screen screens every pair. Each run with the memo gives the groups of the same run without it."""
    from brainmri.intake import grouping

    prints = _prints("cut", 4) + _prints("copies", 5)
    n, keys = len(prints), [p.sha256 for p in prints]
    every = np.array(list(itertools.combinations(range(n), 2)))
    hashed = _pairs(candidates(prints, RULES[0], None))
    joined = {tuple(map(int, x)) for x in grouping.joined_pairs(prints, *RULES)}
    screened_only, by_hash = sorted(joined - hashed), sorted(joined & hashed)
    assert len(screened_only) >= 2 and by_hash  # pairs the screen alone joins, and one the hash rule joins
    left_out = [{screened_only[0]}, set(), {screened_only[1], by_hash[0]}, {screened_only[0]}, {screened_only[0]}]
    exact_up_to = [0, 0, 0, 0, 10**6]  # the last run exact
    memo = PairMemo(tmp_path / "memo", *RULES)
    for out, limit in zip(left_out, exact_up_to, strict=True):
        monkeypatch.setattr(grouping, "neighbour_pairs", lambda prints, k, out=out: np.array([x for x in every if tuple(x) not in out]))
        runs = [grouping._links(prints, *RULES, m, 1, limit) for m in (memo, None)]  # the joined pairs, as file pairs
        with_memo, without = ({frozenset((keys[f[a]], keys[f[b]])) for a, b in pairs} for f, _, pairs in runs)
        assert with_memo == without, (out, limit)
