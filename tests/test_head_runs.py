"""The plan of a grid's compiled head runs (brainmri.learn.head_runs): which heads are epoch twins, and the runs of
least cost, against brute force."""

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from brainmri.learn.head_runs import RUN_COST, epoch_twins, plan_runs


def test_epoch_twins_point_each_shorter_head_to_the_first_longest_of_its_key():
    assert epoch_twins(["a", "b", "a", "a", "b"], [30, 100, 100, 100, 30]) == {0: 2, 3: 2, 4: 1}
    assert epoch_twins(["a", "b"], [30, 30]) == {}


def _cost(runs, rows, epochs, batch):
    return sum(len(r) * -(-max(rows[i] for i in r) // batch) * max(epochs[i] for i in r) + RUN_COST for r in runs)


def _brute(rows, epochs, batch, max_group):
    """The least cost over every cut of the (rows, epochs) order into stretches of at most max_group."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i], epochs[i]))
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=max(len(order) - 1, 0)):
        runs, start = [], 0
        for at, cut in enumerate(cuts, 1):
            if cut:
                runs.append(order[start:at])
                start = at
        runs.append(order[start:])
        if all(len(r) <= max_group for r in runs):
            best = min(best, _cost(runs, rows, epochs, batch))
    return best


@settings(max_examples=150, deadline=None)
@given(
    heads=st.lists(st.tuples(st.integers(1, 2000), st.sampled_from([1, 30, 100])), min_size=1, max_size=8),
    batch=st.sampled_from([1, 8, 32]),
    max_group=st.integers(1, 5),
)
def test_plan_runs_covers_every_head_once_within_the_cap_at_the_least_cost(heads, batch, max_group):
    rows, epochs = [h[0] for h in heads], [h[1] for h in heads]
    runs = plan_runs(rows, epochs, batch, max_group)
    assert sorted(i for r in runs for i in r) == list(range(len(heads)))
    assert all(1 <= len(r) <= max_group for r in runs)
    assert _cost(runs, rows, epochs, batch) == _brute(rows, epochs, batch, max_group)


def test_heads_with_and_without_copies_train_in_runs_of_their_own_width():
    """The real set's resnet50v2-aug grid after twins: 20 heads of ~138 rows and 20 of ~830 (with the copies), 100
    epochs each; in chunks of 32 in (rows, epochs) order 12 of the wide heads had joined the narrow ones' run."""
    rows = [136, 137, 138, 139, 140] * 4 + [820, 825, 830, 826, 829] * 4
    runs = plan_runs(rows, [100] * 40, 32, 32)
    assert sorted(map(len, runs)) == [20, 20] and {max(rows[i] for i in r) for r in runs} == {140, 830}
