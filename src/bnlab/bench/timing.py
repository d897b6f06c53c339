"""Interleaved timing: every contender of a case is timed in turn, round after round, so that a
slow spell of a shared machine hits all of them alike; each contender's time is its median."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median over ``samples`` samples of ``inner`` back-to-back calls."""

    median_s: float
    q1_s: float  # first and third quartile, to show the spread
    q3_s: float
    samples: int
    inner: int
    values: tuple[float, ...] = ()  # every sample, in the order of the interleaved rounds


@dataclass(frozen=True)
class Ratio:
    """The median over rounds of a paired ratio (a's sample / b's sample of the same
    interleaved round) and its distribution-free 95% confidence interval (order statistics of
    the n ratios; None when n is too small for one)."""

    median: float
    low: float | None
    high: float | None
    n: int

    def describe(self) -> str:
        if self.low is None or self.high is None:
            return f"{self.median:.2f}x (n={self.n})"
        return f"{self.median:.2f}x [{self.low:.2f}, {self.high:.2f}]"


def median_ci_ranks(n: int, level: float = 0.95) -> tuple[int, int] | None:
    """1-based ranks (k, n + 1 - k) of the order statistics that bound the median with at least
    ``level`` confidence (the binomial(n, 1/2) sign-test interval), or None if n is too small."""
    tail = (1.0 - level) / 2
    k, below = 0, 0.0  # below: P(Binomial(n, 1/2) < k + 1)
    while True:
        p_next = below + math.comb(n, k) / 2**n
        if p_next > tail:
            break
        below, k = p_next, k + 1
    return (k, n + 1 - k) if k >= 1 else None


def paired_ratio(a: Timing, b: Timing) -> Ratio:
    """a / b over the rounds both were sampled in (see :class:`Ratio`)."""
    if not any(y > 0 for y in b.values):
        return Ratio(a.median_s / b.median_s, None, None, 0)
    return median_ratio(a.values, b.values)


def median_ratio(a: Sequence[float], b: Sequence[float]) -> Ratio:
    """The median of the paired ratios a[i] / b[i] (pairs with b[i] > 0) and its sign-test 95%
    interval."""
    ratios = sorted(x / y for x, y in zip(a, b, strict=True) if y > 0)
    if not ratios:
        raise ValueError(f"expected paired positive times, got {list(a)} and {list(b)}.")
    ranks = median_ci_ranks(len(ratios))
    med = statistics.median(ratios)
    if ranks is None:
        return Ratio(med, None, None, len(ratios))
    return Ratio(med, ratios[ranks[0] - 1], ratios[ranks[1] - 1], len(ratios))


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for queued device work (CUDA is asynchronous), else does nothing."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


Clock = Literal["wall", "cpu"]


def clock_function(clock: Clock) -> Callable[[], float]:
    """``"wall"``: elapsed time. ``"cpu"``: CPU time of the calling thread, which a busy shared
    machine does not inflate by preempting it; it misses other threads' work, so it is only
    meaningful with one torch thread (``torch.set_num_threads(1)``) on the CPU."""
    if clock == "wall":
        return time.perf_counter
    if clock == "cpu":
        if torch.get_num_threads() != 1:
            raise ValueError(
                f"clock='cpu' counts the calling thread only: expected torch.get_num_threads() "
                f"== 1, got {torch.get_num_threads()}. Use --threads 1, or clock='wall'."
            )
        return time.thread_time
    raise ValueError(f"clock: expected 'wall' or 'cpu', got {clock!r}.")


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    reps: int,
    warmup: int,
    min_sample_s: float,
    sync: Callable[[], None],
    clock: Clock = "wall",
) -> dict[str, Timing]:
    """Median seconds per call of each function in ``fns``, measured in interleaved rounds.

    Each function first runs ``warmup`` times; a sample then times as many back-to-back calls
    as fill ``min_sample_s`` (so that microsecond calls are not below the clock's resolution).
    """
    now = clock_function(clock)
    if reps < 1 or warmup < 0 or min_sample_s < 0:
        raise ValueError(
            f"expected reps >= 1, warmup >= 0 and min_sample_s >= 0, got reps={reps}, "
            f"warmup={warmup}, min_sample_s={min_sample_s}."
        )
    inner: dict[str, int] = {}
    for name, fn in fns.items():
        start = now()
        for _ in range(max(warmup, 1)):
            fn()
        sync()
        one = (now() - start) / max(warmup, 1)
        inner[name] = max(1, math.ceil(min_sample_s / one)) if one > 0 else 1
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            k = inner[name]
            sync()
            start = now()
            for _ in range(k):
                fn()
            sync()
            samples[name].append((now() - start) / k)
    out = {}
    for name, ts in samples.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[name] = Timing(statistics.median(ts), q[0], q[2], len(ts), inner[name], tuple(ts))
    return out
