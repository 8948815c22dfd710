"""Timing rounds: every runtime called on the same batch in interleaved, rotated rounds, so that drifts of a shared
machine hit all alike."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def time_calls(fn: Callable, x: np.ndarray, warmup: int, repeats: int) -> np.ndarray:
    """Seconds per call of fn(x), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn(x)
    out = np.empty(repeats)
    for i in range(repeats):
        t = time.perf_counter()
        fn(x)
        out[i] = time.perf_counter() - t
    return out


def timing_batch(images: np.ndarray, n: int) -> np.ndarray:
    """`n` images to time on: the given ones, repeated when there are fewer (a graph's cost does not depend on content)."""
    return np.concatenate([images] * -(-n // max(1, len(images))))[:n]


def interleaved(runtimes: dict[str, Callable], x: np.ndarray, b, first: bool = True) -> dict[str, list[float]]:
    """Seconds per call of each runtime on `x`: `b.warmup` untimed calls each (`b.warmup_next` when the runtimes
    have already run at another batch size: `first` False), then rounds, each timing every runtime
    once in a rotated order, so that drifts of a shared machine hit all alike. Rounds stop at `b.repeats`, or sooner,
    once `b.min_repeats` rounds are done and `b.seconds` have passed since the first: a round of seven runtimes on
    VGG19 at batch 8 takes about 7 s on 2 cores, one at batch 1 of a small model a few milliseconds, and a fixed
    count spent minutes on the first to gain nothing on the second."""
    names = list(runtimes)
    for fn in runtimes.values():
        time_calls(fn, x, b.warmup if first else b.warmup_next, 0)
    seconds: dict[str, list[float]] = {rt: [] for rt in names}
    start = time.perf_counter()
    for i in range(b.repeats):
        if i >= b.min_repeats and time.perf_counter() - start >= b.seconds:
            break
        for rt in names[i % len(names) :] + names[: i % len(names)]:
            seconds[rt].append(time_calls(runtimes[rt], x, 0, 1)[0])
    return seconds


def round_settings(b) -> dict:
    """How `interleaved` timed the calls, for the records that carry its timings."""
    return {
        "warmup": b.warmup,
        "warmup_next": b.warmup_next,
        "repeats": b.repeats,
        "min_repeats": b.min_repeats,
        "seconds": b.seconds,
        "order": "interleaved rounds, rotated; stop at repeats, or after min_repeats once seconds have passed",
    }
