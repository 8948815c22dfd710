"""Which heads train, and which train together: the plan of a grid's compiled runs (brainmri.learn.headfit).

Two savings; neither changes what a head learns, up to float rounding (a head's low bits can depend on the heads
beside it in a run, as on the thread count: see MAX_GROUP in headfit).

- **Epoch twins.** Without early stopping, a head trained for 30 epochs is the first 30 epochs of the same head
  trained for 100: the same initial weights, rows, seed (its shuffles and dropout are drawn per epoch from its own
  stream), learning rate and penalty. A grid's `epochs` candidates are such twins, so only the longest of each set
  trains, and the shorter ones are its weights after their own epoch count (a snapshot in the loop).
- **Runs of like heads.** A compiled run steps every head through its longest head's rows and epochs, the rest
  masked but still computed (the heads are stacked on one axis), so a run's cost is its heads times its widest
  head's mini-batches times its most epochs. The heads, sorted by rows and epochs, are cut into the stretches of
  that order of least total cost. Chunks of 32 in that order had put heads without augmented copies (a sixth of the rows) and 30-epoch
  heads into 100-epoch runs of the copies' width: the real set's resnet50v2-aug grid trained 80 heads in 3 runs of
  32, 32 and 16, each 100 epochs; now 40 heads train, in runs of their own width, and the stage (features cached)
  took 134 s where it took 251 s, with the same model (docs/measurements.md).

Written here because it is bookkeeping over plain numbers, no library's: `epoch_twins` groups by a key,
`plan_runs` is a small dynamic programme over the sorted heads.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

# A compiled run's own cost, in head-steps (one head, one mini-batch): tracing a run of a new shape and compiling its
# Adam update took about 0.5 s on a 2-core EPYC (AVX2), and a 2048 x 256 head takes a mini-batch step in about
# 1.6 ms there, so ~300 head-steps; rounded up, as fewer runs also mean fewer traced graphs held in memory.
RUN_COST = 500


def epoch_twins(keys: Sequence[Hashable], epochs: Sequence[int]) -> dict[int, int]:
    """{i: j} for every head i that is the first `epochs[i]` epochs of head j: the same key (everything but the
    epoch count) and no more epochs. j is the first head of the most epochs among those with its key; it trains,
    and i does not."""
    longest: dict[Hashable, int] = {}
    for i, (key, e) in enumerate(zip(keys, epochs, strict=True)):
        if key not in longest or e > epochs[longest[key]]:
            longest[key] = i
    return {i: longest[key] for i, key in enumerate(keys) if longest[key] != i}


def plan_runs(rows: Sequence[int], epochs: Sequence[int], batch: int, max_group: int) -> list[list[int]]:
    """The heads (by index) cut into compiled runs of at most `max_group`, the cut of least total cost: each run costs its
    heads x its widest head's mini-batches of `batch` rows x its most epochs, plus RUN_COST. The heads are sorted by
    (rows, epochs), as the runs were before, and each run is a stretch of that order: the least cost among such cuts."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i], epochs[i]))
    steps = [-(-rows[i] // batch) for i in order]
    best, cut = [0.0] * (len(order) + 1), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        best[end], most = float("inf"), 0
        for start in range(end - 1, max(0, end - max_group) - 1, -1):
            most = max(most, epochs[order[start]])
            cost = best[start] + (end - start) * steps[end - 1] * most + RUN_COST  # sorted: the last is the widest
            if cost < best[end]:
                best[end], cut[end] = cost, start
    runs, end = [], len(order)
    while end:
        runs.append(order[cut[end] : end])
        end = cut[end]
    return runs[::-1]
