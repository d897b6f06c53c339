"""Experiment `batch-size`: BN's dependence on the batch, and the small-batch alternatives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from bnlab.lab.experiments.base import (
    METRICS,
    Planned,
    Results,
    by_arm,
    claim,
    comparisons,
    comparisons_table,
    empty_section,
    mean_ci_of,
    missing_note,
    save,
    train_run,
)
from bnlab.lab.experiments.exercises import RENORM_OPTIONS
from bnlab.lab.plan import Run
from bnlab.lab.report import Block, Figure, Section, Table, Text
from bnlab.lab.scale import Scale
from bnlab.lab.stats import Comparison

SIZES = (2, 4, 8, 16, 32, 64, 128, 256)
NORMS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("BN", {"norm": "bnlab"}),
    ("GroupNorm (2 groups)", {"norm": "group", "norm_options": ["num_groups=2"]}),
    ("Batch Renorm", {"norm": "renorm", "norm_options": RENORM_OPTIONS}),
    ("Ghost BN (virtual 16)", {"norm": "ghost", "norm_options": ["virtual_batch_size=16"]}),
)
FULL_SUBSET = 12_000  # small batches cost many steps: the full run trains on 12k images


def lr_for(batch_size: int) -> float:
    """Linear scaling from the chapter's lr 1.0 at batch 256, so every size takes the same
    'distance' per epoch (Goyal et al., 2017)."""
    return batch_size / 256


def best_batch(
    groups: dict[str, dict[int, dict[str, Any]]], norm: str, metric: str
) -> tuple[int | None, list[Comparison]]:
    """The size with the best mean on ``metric`` and every other size compared with it."""
    arms = {b: f"{norm} b={b}" for b in SIZES if groups.get(f"{norm} b={b}")}
    if not arms:
        return None, []
    sign = 1 if METRICS[metric][1] else -1
    best = max(arms, key=lambda b: sign * mean_ci_of(groups[arms[b]], metric).mean)
    return best, comparisons(groups, arms[best], metric, list(arms.values()))


def best_phrase(norm: str, best: int | None, comps: list[Comparison], metric: str) -> str:
    if best is None:
        return f"{norm}: no result yet"
    tied = [c.a.split("b=")[1] for c in comps if c.verdict == "no detectable difference"]
    name = METRICS[metric][0]
    if not tied:
        return f"{norm}: batch {best} is best by {name}, every other size is worse (95% CIs)"
    return (
        f"{norm}: the best mean {name} is at batch {best}, but sizes {', '.join(tied)} are not "
        "separable from it (95% CIs), so no single best batch is claimed"
    )


class BatchSize:
    name = "batch-size"
    title = "Batch size: from 1 to 256, with BN and the small-batch alternatives"
    claim = (
        "With a batch of 1 BN cannot learn (the normalized output is 0); BN's statistics get "
        "noisy for small batches, and sizes of 50-100 work best."
    )

    def seeds(self, scale: Scale) -> int:
        return scale.seeds_for(costly=True)

    def subset(self, scale: Scale) -> int | None:
        return scale.subset if scale.quick else FULL_SUBSET

    def plan(self, scale: Scale, results: Results | None = None) -> Planned:
        planned: Planned = [("batch 1", Run(self.name, "batch 1", "batch_one", {}))]
        planned += [
            train_run(
                self.name,
                f"{label} b={b}",
                scale,
                seed,
                batch_size=b,
                lr=lr_for(b),
                subset=self.subset(scale),
                **cfg,
            )
            for label, cfg in NORMS
            for b in SIZES
            for seed in range(self.seeds(scale))
        ]
        return planned

    def summarize(self, scale: Scale, planned: Planned, results: Results, fig_dir: Path) -> Section:
        groups = by_arm(planned, results)
        if not any(groups.values()):
            return empty_section(self, "No run of this experiment has finished yet.")
        blocks: list[Block] = [
            Text(
                f"*Scale: {scale.describe()}; here {self.subset(scale) or 60000:,} training "
                f"images, {self.seeds(scale)} seeds per point, equal epochs, lr = batch/256 "
                "(linear scaling from the chapter's 1.0 at 256).*"
            ),
        ]
        one = [results[run] for arm, run in planned if arm == "batch 1" and run in results]
        if one:
            r = one[0]
            blocks.append(
                Text(
                    "**Batch size 1.** bnlab refuses to train: "
                    f"`{r['error']}` Computed anyway, the normalized output is at most "
                    f"{r['max_abs_normalized']:g} in absolute value and γ's gradient at most "
                    f"{r['max_abs_gamma_grad']:g}: x − mean(x) is exactly 0 with one sample."
                )
            )
        rows = []
        for label, _ in NORMS:
            for b in SIZES:
                runs = groups.get(f"{label} b={b}", {})
                if runs:
                    rows.append(
                        [
                            label,
                            str(b),
                            f"{lr_for(b):.4g}",
                            str(len(runs)),
                            mean_ci_of(runs, "test_acc_precise").fmt(),
                            mean_ci_of(runs, "train_loss").fmt(),
                        ]
                    )
        blocks.append(
            Table(
                ["norm", "batch", "lr", "n", "test acc (precise)", "train loss"],
                rows,
                "Final epoch, mean and 95% CI over seeds.",
            )
        )
        blocks += self._figure(groups, fig_dir)
        claims, phrases, all_comps = [], [], []
        for metric in ("test_acc_precise", "train_loss"):
            for label, _ in NORMS:
                best, comps = best_batch(groups, label, metric)
                if best is None:
                    continue
                all_comps += comps
                phrases.append(best_phrase(label, best, comps, metric))
                claims.append(claim(self.name, metric, f"{label} b={best}", comps, norm=label))
        blocks.append(
            comparisons_table(
                all_comps,
                "Every batch size against the best one of its norm (by mean), per metric, "
                "paired by seed.",
            )
        )
        blocks += missing_note(planned, results)
        verdict = (
            "; ".join(phrases) + ". The chapter's 50-100 claim holds here only where a size in "
            "that range is best and separable from the others."
            if phrases
            else "No result yet."
        )
        return Section(self.name, self.title, self.claim, verdict, blocks, claims=claims)

    def _figure(self, groups: dict[str, dict[int, dict[str, Any]]], fig_dir: Path) -> list[Block]:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.9))
        styles = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D")]
        for i, (label, _) in enumerate(NORMS):
            for ax, metric in zip(axes, ("test_acc_precise", "train_loss"), strict=True):
                xs, ci = [], []
                for b in SIZES:
                    runs = groups.get(f"{label} b={b}", {})
                    if runs:
                        xs.append(b * 2 ** (0.04 * (i - 1.5)))  # dodge overlapping points
                        ci.append(mean_ci_of(runs, metric))
                if not xs:
                    continue
                ls, marker = styles[i % len(styles)]
                ax.errorbar(
                    xs,
                    [c.mean for c in ci],
                    yerr=[
                        [c.mean - c.lo if c.n > 1 else 0 for c in ci],
                        [c.hi - c.mean if c.n > 1 else 0 for c in ci],
                    ],
                    ls=ls,
                    marker=marker,
                    ms=4,
                    capsize=2,
                    label=label,
                )
        for ax, name in zip(
            axes, ("final test accuracy (precise)", "final training loss"), strict=True
        ):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size (log scale)")
            ax.set_ylabel(name)
            ax.axvspan(50, 100, color="grey", alpha=0.1, lw=0)
            ax.grid(alpha=0.3)
        axes[1].set_yscale("log")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = fig_dir / "batch_size.png"
        save(fig, path)
        return [
            Figure(
                path,
                "Final test accuracy and training loss against the batch size (equal epochs; "
                "bars: 95% CI over seeds; shaded: the chapter's 50-100).",
            )
        ]


BATCH_SIZE = BatchSize()
