"""Experiment `lr` (exercise 2): learning rates with and without BN, and the largest rate that
converges, found by extending a grid until it fails and then bisecting."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from bnlab.lab.experiments.base import (
    Planned,
    Results,
    by_arm,
    claim,
    comparisons_table,
    empty_section,
    integer_epochs,
    mean_ci_of,
    missing_note,
    save,
    scale_note,
    train_run,
    values,
    verdict_sentence,
)
from bnlab.lab.report import Block, Figure, Section, Table
from bnlab.lab.scale import Scale
from bnlab.lab.stats import compare

GRID = (0.1, 1.0, 10.0, 100.0)  # decades; extended by decades while the top converges
MAX_RATE = 1e5  # the extension stops here whatever happens
BISECTIONS = 3  # geometric bisections of the bracket: a decade becomes a factor 10^(1/8) ≈ 1.33
ARMS = (("BN", "bnlab"), ("no BN", "none"))
CONVERGED_ACC = 0.5  # a run "converges" if its final training accuracy beats this (chance 0.1)


def converged(result: Mapping[str, Any]) -> bool:
    h = result["history"][-1]
    return math.isfinite(h["train_loss"]) and h["train_acc"] > CONVERGED_ACC


# Rates are recorded with 4 significant digits so that a bisection point has one spelling.
def _round(lr: float) -> float:
    return float(f"{lr:.4g}")


Outcome = Callable[[float], bool | None]  # does this rate converge (all seeds)? None: not run


def boundary_plan(outcome: Outcome) -> tuple[list[float], tuple[float, float] | None]:
    """The rates to try next and, once known, (last converging, first failing).

    The grid is extended by decades while its top rate converges; the bracket is the largest
    converging grid rate (above which a failure follows) and the next one; it is then bisected
    geometrically BISECTIONS times. Rates whose outcome is still unknown are returned to run
    (the caller plans them and asks again once they have results)."""
    grid = list(GRID)
    while True:
        pending = [lr for lr in grid if outcome(lr) is None]
        if pending:
            return pending, None
        if outcome(grid[-1]) and grid[-1] * 10 <= MAX_RATE:
            grid.append(_round(grid[-1] * 10))
            continue
        break
    ok = [lr for lr in grid if outcome(lr)]
    if not ok:
        return [], None
    top = max(ok)
    above = [lr for lr in grid if lr > top]
    if not above:  # converges up to MAX_RATE
        return [], (top, math.inf)
    lo, hi = top, min(above)
    for _ in range(BISECTIONS):
        mid = _round(math.sqrt(lo * hi))
        result = outcome(mid)
        if result is None:
            return [mid], None
        lo, hi = (mid, hi) if result else (lo, mid)
    return [], (lo, hi)


class LearningRate:
    name = "lr"
    title = "Exercise 2: learning rates with and without BN"
    claim = (
        "BN allows much larger learning rates. Plot training and test error with and without "
        "BN for a range of rates: what is the largest rate that still converges?"
    )

    def seeds(self, scale: Scale) -> int:
        return scale.seeds_for(costly=True)

    def _runs(self, scale: Scale, arm: str, norm: str, lr: float) -> Planned:
        return [
            train_run(self.name, f"{arm} lr={lr:g}", scale, seed, norm=norm, lr=lr)
            for seed in range(self.seeds(scale))
        ]

    def _outcome(self, scale: Scale, arm: str, norm: str, results: Results) -> Outcome:
        def outcome(lr: float) -> bool | None:
            runs = [run for _, run in self._runs(scale, arm, norm, lr)]
            if not all(run in results for run in runs):
                return None
            return all(converged(results[run]) for run in runs)

        return outcome

    def plan(self, scale: Scale, results: Results | None = None) -> Planned:
        """Every rate the boundary search has asked about so far, finished or not."""
        results = results or {}
        planned: Planned = []
        for arm, norm in ARMS:
            outcome = self._outcome(scale, arm, norm, results)
            asked: list[float] = []

            def recording(
                lr: float, outcome: Outcome = outcome, asked: list = asked
            ) -> bool | None:
                asked.append(lr)
                return outcome(lr)

            boundary_plan(recording)
            for lr in dict.fromkeys(asked):
                planned += self._runs(scale, arm, norm, lr)
        return planned

    def summarize(self, scale: Scale, planned: Planned, results: Results, fig_dir: Path) -> Section:
        groups = by_arm(planned, results)
        if not any(groups.values()):
            return empty_section(self, "No run of this experiment has finished yet.")
        rates = {arm: self._rates(planned, arm) for arm, _ in ARMS}
        brackets = {
            arm: boundary_plan(self._outcome(scale, arm, norm, results))[1] for arm, norm in ARMS
        }
        rows = []
        for arm, _ in ARMS:
            for lr in rates[arm]:
                runs = groups.get(f"{arm} lr={lr:g}", {})
                if not runs:
                    continue
                conv = sum(converged(r) for r in runs.values())
                rows.append(
                    [
                        arm,
                        f"{lr:g}",
                        mean_ci_of(runs, "train_error").fmt(),
                        _error(runs, "test_acc_precise"),
                        f"{conv}/{len(runs)}",
                    ]
                )
        common = sorted(set(rates["BN"]) & set(rates["no BN"]))
        comps = [
            compare(
                values(groups.get(f"BN lr={lr:g}", {}), "train_error"),
                values(groups.get(f"no BN lr={lr:g}", {}), "train_error"),
                a_name=f"BN lr={lr:g}",
                b_name=f"no BN lr={lr:g}",
                metric="train_error",
                higher_is_better=False,
            )
            for lr in common
            if groups.get(f"BN lr={lr:g}") and groups.get(f"no BN lr={lr:g}")
        ]
        blocks: list[Block] = [
            scale_note(
                scale,
                self.seeds(scale),
                f" A run converges if its final training accuracy exceeds {CONVERGED_ACC} "
                "(chance is 0.1) with a finite loss; a rate converges if all its seeds do. The "
                f"grid {', '.join(f'{x:g}' for x in GRID)} is extended by decades while its top "
                "rate converges; the bracket between the largest converging grid rate and the "
                f"next is then bisected {BISECTIONS} times (geometric midpoints).",
            ),
            Table(
                ["model", "lr", "train error", "test error (precise)", "converged"],
                rows,
                "Final-epoch errors, mean and 95% CI over seeds.",
            ),
            comparisons_table(comps, "BN minus no BN at each rate both tried, paired by seed."),
            self._final_figure(groups, rates, fig_dir),
            self._curves(groups, rates, fig_dir),
        ]
        blocks += missing_note(planned, results)
        largest = {
            arm: [b[0], b[1] if math.isfinite(b[1]) else None] if b else None
            for arm, b in brackets.items()
        }
        words = []
        for arm, b in brackets.items():
            if b is None:
                words.append(f"{arm}: not determined yet")
            elif math.isinf(b[1]):
                words.append(f"{arm}: converges up to at least {b[0]:g} (the search's limit)")
            else:
                words.append(f"{arm}: converges up to {b[0]:g}, fails at {b[1]:g}")
        verdict = "Largest converging rate — " + "; ".join(words) + ". " + verdict_sentence(comps)
        grid = sorted({lr for rs in rates.values() for lr in rs})
        return Section(
            self.name,
            self.title,
            self.claim,
            verdict,
            blocks,
            claims=[
                claim(
                    self.name,
                    "train_error",
                    "no BN",
                    comps,
                    grid=grid,
                    largest_converging=largest,
                    rule=f"final training accuracy > {CONVERGED_ACC} with a finite loss, all seeds",
                )
            ],
        )

    @staticmethod
    def _rates(planned: Planned, arm: str) -> list[float]:
        return sorted({float(a.split("lr=")[1]) for a, _ in planned if a.startswith(f"{arm} lr=")})

    def _final_figure(
        self, groups: Any, rates: Mapping[str, Sequence[float]], fig_dir: Path
    ) -> Figure:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
        for i, (arm, _) in enumerate(ARMS):
            for ax, metric in zip(axes, ("train_error", "test_error"), strict=True):
                xs, ys, lo, hi = [], [], [], []
                for lr in rates[arm]:
                    runs = groups.get(f"{arm} lr={lr:g}", {})
                    if not runs:
                        continue
                    ci = (
                        mean_ci_of(runs, "train_error")
                        if metric == "train_error"
                        else _error_ci(runs, "test_acc_precise")
                    )
                    xs.append(lr)
                    ys.append(ci.mean)
                    lo.append(ci.lo if math.isfinite(ci.lo) else ci.mean)
                    hi.append(ci.hi if math.isfinite(ci.hi) else ci.mean)
                line = ax.plot(xs, ys, marker="os"[i], ls="-" if i == 0 else "--", label=arm)
                ax.fill_between(xs, lo, hi, alpha=0.15, color=line[0].get_color())
        for ax, what in zip(axes, ("training error", "test error (precise)"), strict=True):
            ax.set_xscale("log")
            ax.set_xlabel("learning rate (log scale)")
            ax.set_ylabel(f"final {what}")
            ax.axhline(1 - CONVERGED_ACC, color="grey", ls=":", lw=1)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        fig.tight_layout()
        path = fig_dir / "lr_final_error.png"
        save(fig, path)
        return Figure(
            path,
            "Final training and test error against the learning rate, with and without BN "
            "(band: 95% CI over seeds; dotted: the convergence threshold).",
        )

    def _curves(self, groups: Any, rates: Mapping[str, Sequence[float]], fig_dir: Path) -> Figure:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
        cmap = plt.get_cmap("viridis")
        everything = sorted({lr for rs in rates.values() for lr in rs})
        span = max(1e-9, math.log10(max(everything)) - math.log10(min(everything)))
        for ax, (arm, _) in zip(axes, ARMS, strict=True):
            for lr in rates[arm]:
                runs = groups.get(f"{arm} lr={lr:g}", {})
                if not runs:
                    continue
                rs = list(runs.values())
                n = min(len(r["history"]) for r in rs)
                err = [
                    sum(1 - r["history"][e]["train_acc"] for r in rs) / len(rs) for e in range(n)
                ]
                shade = (math.log10(lr) - math.log10(min(everything))) / span
                ax.plot(range(1, n + 1), err, color=cmap(shade), label=f"lr {lr:g}")
            ax.set_title(arm)
            ax.set_xlabel("epoch")
            ax.set_ylabel("training error")
            ax.grid(alpha=0.3)
            integer_epochs(
                ax,
                max((len(r["history"]) for rs in groups.values() for r in rs.values()), default=1),
            )
            if ax.get_legend_handles_labels()[0]:  # an arm may have no finished run yet
                ax.legend(fontsize=7, ncol=2, loc="upper right")
        fig.tight_layout()
        path = fig_dir / "lr_curves.png"
        save(fig, path)
        return Figure(path, "Training error per epoch (mean over seeds) for each learning rate.")


def _error_ci(runs: Mapping[int, dict[str, Any]], metric: str) -> Any:
    from bnlab.lab.stats import mean_ci

    return mean_ci([1 - v for v in values(runs, metric).values()])


def _error(runs: Mapping[int, dict[str, Any]], metric: str) -> str:
    return str(_error_ci(runs, metric).fmt())


LR = LearningRate()
