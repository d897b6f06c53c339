"""The lab's statistics on hand-computed cases, and the learning-rate boundary search on a stub
whose convergence boundary is known."""

from __future__ import annotations

import math

import pytest

from bnlab.lab.experiments.lr import BISECTIONS, GRID, MAX_RATE, boundary_plan
from bnlab.lab.stats import compare, fmt_num, mean_ci, verdict_of

# t(0.975, df) from a printed table (e.g. NIST/SEMATECH e-Handbook, Table 1.4.2.4.3)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}


def test_mean_ci_matches_the_hand_computed_t_interval() -> None:
    xs = [0.80, 0.82, 0.84, 0.86, 0.88]  # mean 0.84, sd = sqrt(0.001) = 0.0316228
    ci = mean_ci(xs)
    half = T975[4] * math.sqrt(0.001) / math.sqrt(5)  # 0.039265
    assert ci.n == 5 and ci.mean == pytest.approx(0.84)
    assert ci.lo == pytest.approx(0.84 - half, abs=1e-4)
    assert ci.hi == pytest.approx(0.84 + half, abs=1e-4)


def test_mean_ci_of_one_value_has_no_interval_and_nan_is_dropped() -> None:
    one = mean_ci([0.5, float("nan")])
    assert one.n == 1 and one.mean == 0.5 and math.isnan(one.lo) and math.isnan(one.hi)
    assert mean_ci([]).n == 0 and one.fmt() == "0.500 (n=1)"


def test_paired_difference_uses_the_per_seed_differences() -> None:
    # per-seed differences 0.02, 0.03, 0.01, 0.02: mean 0.02, sd 0.0081650, n 4
    a = {0: 0.90, 1: 0.85, 2: 0.81, 3: 0.88}
    b = {0: 0.88, 1: 0.82, 2: 0.80, 3: 0.86}
    c = compare(a, b, a_name="a", b_name="b", metric="acc", higher_is_better=True)
    half = T975[3] * 0.0081650 / 2
    assert c.paired and c.n_a == c.n_b == 4
    assert c.diff == pytest.approx(0.02)
    assert c.ci95[0] == pytest.approx(0.02 - half, abs=1e-4)
    assert c.ci95[1] == pytest.approx(0.02 + half, abs=1e-4)
    assert c.verdict == "a better"  # the interval [0.007, 0.033] excludes 0
    # the same values unpaired (Welch) give a far wider interval that includes 0
    shifted = {s + 10: v for s, v in b.items()}
    w = compare(a, shifted, a_name="a", b_name="b", metric="acc", higher_is_better=True)
    assert not w.paired and w.ci95[0] < 0 < w.ci95[1]
    assert w.verdict == "no detectable difference"


def test_welch_interval_matches_a_hand_computation() -> None:
    a, b = {0: 1.0, 1: 2.0, 2: 3.0}, {3: 2.0, 4: 4.0, 5: 6.0}  # var 1 and 4, n 3 each
    c = compare(a, b, a_name="a", b_name="b", metric="x", higher_is_better=True)
    se = math.sqrt(1 / 3 + 4 / 3)
    df = (1 / 3 + 4 / 3) ** 2 / ((1 / 3) ** 2 / 2 + (4 / 3) ** 2 / 2)  # 2.9412
    from scipy import stats

    half = stats.t.ppf(0.975, df) * se
    assert c.diff == pytest.approx(-2.0)
    assert c.ci95 == pytest.approx((-2.0 - half, -2.0 + half))


@pytest.mark.parametrize(
    ("lo", "hi", "higher", "expected"),
    [
        (0.001, 0.02, True, "a better"),
        (0.001, 0.02, False, "b better"),  # a's loss is higher: b better
        (-0.02, -0.001, True, "b better"),
        (-0.02, -0.001, False, "a better"),
        (0.0, 0.02, True, "no detectable difference"),  # touching 0 is not excluding it
        (-0.02, 0.0, False, "no detectable difference"),
        (-0.01, 0.01, True, "no detectable difference"),
        (float("nan"), float("nan"), True, "no detectable difference"),
    ],
)
def test_verdict_follows_from_the_interval_alone(
    lo: float, hi: float, higher: bool, expected: str
) -> None:
    assert verdict_of(lo, hi, higher) == expected


def test_lower_is_better_flips_the_direction() -> None:
    loss_a = {0: 0.30, 1: 0.31, 2: 0.29}
    loss_b = {0: 0.25, 1: 0.26, 2: 0.24}
    c = compare(loss_a, loss_b, a_name="a", b_name="b", metric="loss", higher_is_better=False)
    assert c.verdict == "b better" and "worse" in c.phrase()


def test_identical_arms_are_not_a_difference() -> None:
    same = {0: 0.8, 1: 0.9}
    c = compare(same, dict(same), a_name="a", b_name="b", metric="x", higher_is_better=True)
    assert c.diff == 0 and c.verdict == "no detectable difference"


def test_detectable_difference_is_larger_than_the_ci_half_width() -> None:
    a = {0: 0.90, 1: 0.85, 2: 0.81, 3: 0.88}
    b = {0: 0.88, 1: 0.82, 2: 0.80, 3: 0.86}
    c = compare(a, b, a_name="a", b_name="b", metric="acc", higher_is_better=True)
    half = (c.ci95[1] - c.ci95[0]) / 2
    # (t(0.975, 3) + t(0.80, 3)) · se with t(0.80, 3) = 0.978
    assert c.detectable == pytest.approx(half * (T975[3] + 0.978) / T975[3], rel=1e-3)


def test_json_form_has_the_schema_fields() -> None:
    c = compare({0: 1.0, 1: 2.0}, {0: 1.5, 1: 2.5}, a_name="a", b_name="b", metric="m",
                higher_is_better=True)  # fmt: skip
    d = c.to_dict()
    for key in ("a", "b", "n_a", "n_b", "mean_a", "mean_b", "diff", "ci95", "higher_is_better",
                "verdict", "metric"):  # fmt: skip
        assert key in d
    assert d["diff"] == pytest.approx(d["mean_a"] - d["mean_b"])


def test_fmt_num_uses_scientific_notation_for_small_numbers() -> None:
    assert fmt_num(0.8374) == "0.837"
    assert fmt_num(1.1e-6) == "1.10e−06"
    assert fmt_num(-0.02, sign=True) == "−0.020"


# ---- the learning-rate boundary search -------------------------------------------------------


def search(boundary: float) -> tuple[tuple[float, float] | None, list[float]]:
    """Drive boundary_plan against a stub that converges exactly below ``boundary``."""
    tried: list[float] = []
    known: dict[float, bool] = {}
    while True:
        pending, bracket = boundary_plan(known.get)
        if not pending:
            return bracket, tried
        for lr in pending:
            tried.append(lr)
            known[lr] = lr < boundary


@pytest.mark.parametrize("boundary", [0.5, 2.5, 37.0, 420.0, 9_000.0])
def test_bisection_brackets_a_known_boundary(boundary: float) -> None:
    bracket, tried = search(boundary)
    assert bracket is not None
    lo, hi = bracket
    assert lo < boundary <= hi
    assert hi / lo <= 10 ** (1 / 2**BISECTIONS) * 1.001  # a decade halved BISECTIONS times
    assert all(lr in tried for lr in GRID)


def test_grid_is_extended_until_the_top_fails() -> None:
    bracket, tried = search(9_000.0)
    assert 1_000.0 in tried and 10_000.0 in tried  # beyond the base grid's 100
    assert bracket is not None and bracket[0] < 9_000.0 <= bracket[1]


def test_a_model_that_never_fails_reports_the_search_limit() -> None:
    bracket, tried = search(math.inf)
    assert bracket == (MAX_RATE, math.inf) and max(tried) == MAX_RATE


def test_a_model_that_never_converges_has_no_bracket() -> None:
    bracket, tried = search(0.0)
    assert bracket is None and sorted(tried) == sorted(GRID)
