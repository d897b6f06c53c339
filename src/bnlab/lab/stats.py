"""Confidence intervals and verdicts: what the lab may claim from a handful of seeds.

Every mean gets a two-sided 95% Student-t interval, mean ± t(0.975, n−1) · s / √n. Every
comparison is the difference of an arm ``a`` and a reference arm ``b`` on one metric:

- paired by seed when both arms ran the same seeds (in this lab a seed fixes the
  initialization and the data order, so the seed-to-seed noise they share cancels):
  d_i = a_i − b_i, CI = mean(d) ± t(0.975, n−1) · sd(d) / √n;
- otherwise Welch's interval for two independent samples (Welch–Satterthwaite df).

t-intervals rather than a bootstrap: with 3–5 seeds the percentile bootstrap is too narrow
(its coverage of a 95% interval is near 80% at n = 5), while the t-interval is exact for
normal noise and robust enough for final accuracies and losses.

The verdict follows from the CI alone: "a better" or "b better" when the interval excludes 0
(the direction from ``higher_is_better``), otherwise "no detectable difference". A comparison
also reports the smallest true difference its n would detect with 80% power at the observed
spread, (t(0.975, df) + t(0.80, df)) · SE, so that "no detectable difference" says how large
a difference could have hidden in the noise. Intervals are per comparison, not adjusted for
the several comparisons a section makes.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from scipy import stats as _scipy_stats

LEVEL = 0.95
POWER = 0.80

Verdict = Literal["a better", "b better", "no detectable difference"]


def _t(q: float, df: float) -> float:
    return float(_scipy_stats.t.ppf(q, df))


def finite(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% t-interval (lo = hi = mean for a single value, nan for none)."""

    mean: float
    lo: float
    hi: float
    n: int

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0:
            return "—"
        if self.n == 1:
            return f"{fmt_num(self.mean, digits)} (n=1)"
        return (
            f"{fmt_num(self.mean, digits)} [{fmt_num(self.lo, digits)}, {fmt_num(self.hi, digits)}]"
        )


def mean_ci(values: Sequence[float]) -> Interval:
    """The mean of the finite values and its two-sided 95% t-interval."""
    xs = finite(values)
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    m = statistics.fmean(xs)
    if n == 1:
        return Interval(m, math.nan, math.nan, 1)
    half = _t(0.5 + LEVEL / 2, n - 1) * statistics.stdev(xs) / math.sqrt(n)
    return Interval(m, m - half, m + half, n)


@dataclass(frozen=True)
class Comparison:
    """``a`` against the reference ``b`` on ``metric``; ``diff`` = mean_a − mean_b."""

    a: str
    b: str
    metric: str
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    diff: float
    ci95: tuple[float, float]
    higher_is_better: bool
    verdict: Verdict
    paired: bool
    detectable: float  # the smallest difference this n detects with 80% power (nan: unknown)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci95"] = [_json_float(v) for v in self.ci95]
        for key in ("mean_a", "mean_b", "diff", "detectable"):
            d[key] = _json_float(d[key])
        d["method"] = "paired t" if self.paired else "Welch t"
        return d

    def phrase(self, digits: int = 3) -> str:
        """``torch BN vs bnlab BN: no detectable difference (Δ +0.002, 95% CI [−0.010,
        0.014])``."""
        lo, hi = self.ci95
        word = {
            "a better": "better",
            "b better": "worse",
            "no detectable difference": "no detectable difference",
        }[self.verdict]
        return (
            f"{self.a} vs {self.b}: {word} (Δ {fmt_num(self.diff, digits, sign=True)}, 95% CI "
            f"[{fmt_num(lo, digits)}, {fmt_num(hi, digits)}])"
        )


def _json_float(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def compare(
    a: Mapping[int, float],
    b: Mapping[int, float],
    *,
    a_name: str,
    b_name: str,
    metric: str,
    higher_is_better: bool,
) -> Comparison:
    """Compare two arms given their values by seed (non-finite values are dropped, e.g. a
    diverged run's loss). Paired when the arms share every seed, else Welch."""
    a = {s: float(v) for s, v in a.items() if v is not None and math.isfinite(float(v))}
    b = {s: float(v) for s, v in b.items() if v is not None and math.isfinite(float(v))}
    n_a, n_b = len(a), len(b)
    mean_a = statistics.fmean(a.values()) if a else math.nan
    mean_b = statistics.fmean(b.values()) if b else math.nan
    diff = mean_a - mean_b
    paired = n_a >= 2 and set(a) == set(b)
    lo = hi = detectable = math.nan
    if paired:
        d = [a[s] - b[s] for s in sorted(a)]
        se = statistics.stdev(d) / math.sqrt(len(d))
        df: float = len(d) - 1
    elif n_a >= 2 and n_b >= 2:
        va, vb = statistics.variance(a.values()) / n_a, statistics.variance(b.values()) / n_b
        se = math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1)) if se > 0 else n_a + n_b - 2
    else:
        se, df = math.nan, math.nan
    if math.isfinite(se):
        half = _t(0.5 + LEVEL / 2, df) * se
        lo, hi = diff - half, diff + half
        detectable = (_t(0.5 + LEVEL / 2, df) + _t(POWER, df)) * se
    return Comparison(
        a=a_name,
        b=b_name,
        metric=metric,
        n_a=n_a,
        n_b=n_b,
        mean_a=mean_a,
        mean_b=mean_b,
        diff=diff,
        ci95=(lo, hi),
        higher_is_better=higher_is_better,
        verdict=verdict_of(lo, hi, higher_is_better),
        paired=paired,
        detectable=detectable,
    )


def verdict_of(lo: float, hi: float, higher_is_better: bool) -> Verdict:
    """The verdict word from the CI of a − b alone (an interval touching 0 is not a
    difference)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "no detectable difference"
    if lo > 0:
        return "a better" if higher_is_better else "b better"
    if hi < 0:
        return "b better" if higher_is_better else "a better"
    return "no detectable difference"


def fmt_num(v: float, digits: int = 3, *, sign: bool = False) -> str:
    """Fixed point for ordinary numbers, scientific notation for small or huge ones."""
    if v is None or not math.isfinite(v):
        return "—" if v is None or math.isnan(v) else ("∞" if v > 0 else "−∞")
    plus = "+" if sign else ""
    if v != 0 and (abs(v) < 10 ** (-digits) or abs(v) >= 1e5):
        return f"{v:{plus}.{max(digits - 1, 1)}e}".replace("-", "−")
    return f"{v:{plus}.{digits}f}".replace("-", "−")
