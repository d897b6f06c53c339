"""Experiment `lr` (exercise 2): learning rates with and without BN."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt

from bnlab.lab.experiments.base import (
    Planned,
    Results,
    by_variant,
    empty_section,
    finals,
    mean,
    missing,
    save,
    train_run,
)
from bnlab.lab.report import Block, Figure, Section, Table, Text
from bnlab.lab.scale import Scale

LRS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
NORMS = (("BN", "bnlab"), ("no BN", "none"))
CONVERGED_ACC = 0.5  # a run "converges" if its final training accuracy beats this (chance 0.1)


def converged(result: dict) -> bool:
    h = result["history"][-1]
    return math.isfinite(h["train_loss"]) and h["train_acc"] > CONVERGED_ACC


class LearningRate:
    name = "lr"
    title = "Exercise 2: learning rates with and without BN"
    claim = (
        "BN allows much larger learning rates. Plot training and test error with and without "
        "BN for a range of rates: what is the largest rate that still converges?"
    )

    def seeds(self, scale: Scale) -> int:
        return min(scale.seeds, 2)

    def plan(self, scale: Scale) -> Planned:
        return [
            train_run(self.name, f"{label} lr={lr:g}", scale, seed, norm=norm, lr=lr)
            for label, norm in NORMS
            for lr in LRS
            for seed in range(self.seeds(scale))
        ]

    def summarize(self, scale: Scale, planned: Planned, results: Results, fig_dir: Path) -> Section:
        groups = by_variant(planned, results)
        if not any(groups.values()):
            return empty_section(self, "No run of this experiment has finished yet.")
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
        rows, largest = [], {}
        for label, _ in NORMS:
            ok = []
            tr_err, te_err, xs = [], [], []
            for lr in LRS:
                rs = groups.get(f"{label} lr={lr:g}", [])
                if not rs:
                    continue
                conv = sum(converged(r) for r in rs)
                if conv == len(rs):
                    ok.append(lr)
                tr = [1 - a for a in finals(rs, "train_acc")]
                te = [1 - a for a in finals(rs, "test_acc")]
                xs.append(lr)
                tr_err.append(mean(tr))
                te_err.append(mean(te))
                rows.append(
                    [label, f"{lr:g}", f"{mean(tr):.3f}", f"{mean(te):.3f}", f"{conv}/{len(rs)}"]
                )
            largest[label] = max(ok) if ok else None
            axes[0].plot(xs, tr_err, marker="o", label=label)
            axes[1].plot(xs, te_err, marker="o", label=label)
        for ax, what in zip(axes, ("training error", "test error"), strict=True):
            ax.set_xscale("log")
            ax.set_xlabel("learning rate (log scale)")
            ax.set_ylabel(f"final {what}")
            ax.axhline(1 - CONVERGED_ACC, color="grey", ls=":", lw=1)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        final_path = fig_dir / "lr_final_error.png"
        save(fig, final_path)
        curves_path = self._curves(groups, fig_dir)
        blocks: list[Block] = [
            Text(
                f"*Scale: {scale.describe()}; seeds per rate here: {self.seeds(scale)}. A run "
                f"converges if its final training accuracy exceeds {CONVERGED_ACC} (chance is "
                "0.1) with a finite loss; a rate converges if all its seeds do.*"
            ),
            Table(
                ["model", "lr", "train error", "test error", "converged"],
                rows,
                "Final-epoch errors, mean over seeds.",
            ),
            Figure(
                final_path,
                "Final training and test error against the learning rate, with "
                "and without BN (dotted: the convergence threshold).",
            ),
            Figure(
                curves_path, "Training error per epoch for each learning rate, with and without BN."
            ),
        ]
        gap = missing(planned, results)
        if gap:
            blocks.append(Text(gap.note()))
        bn, no = largest.get("BN"), largest.get("no BN")
        verdict = (
            f"The largest rate that converges is {bn:g} with BN and "
            f"{'none of those tried' if no is None else f'{no:g}'} without"
            if bn is not None
            else "With BN no rate converged in this run"
        ) + f" (grid {', '.join(f'{x:g}' for x in LRS)})."
        return Section(self.name, self.title, self.claim, verdict, blocks)

    def _curves(self, groups: dict, fig_dir: Path) -> Path:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
        cmap = plt.get_cmap("viridis")
        for ax, (label, _) in zip(axes, NORMS, strict=True):
            for i, lr in enumerate(LRS):
                rs = groups.get(f"{label} lr={lr:g}", [])
                if not rs:
                    continue
                n = min(len(r["history"]) for r in rs)
                err = [mean([1 - r["history"][e]["train_acc"] for r in rs]) for e in range(n)]
                ax.plot(range(1, n + 1), err, color=cmap(i / (len(LRS) - 1)), label=f"lr {lr:g}")
            ax.set_title(label)
            ax.set_xlabel("epoch")
            ax.set_ylabel("training error")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = fig_dir / "lr_curves.png"
        save(fig, path)
        return path


LR = LearningRate()
