"""Experiment `batch-size`: BN's dependence on the batch, and the small-batch alternatives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
from bnlab.lab.experiments.exercises import RENORM_OPTIONS
from bnlab.lab.plan import Run
from bnlab.lab.report import Block, Figure, Section, Table, Text
from bnlab.lab.scale import Scale

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


class BatchSize:
    name = "batch-size"
    title = "Batch size: from 1 to 256, with BN and the small-batch alternatives"
    claim = (
        "With a batch of 1 BN cannot learn (the normalized output is 0); BN's statistics get "
        "noisy for small batches, and sizes of 50-100 work best."
    )

    def subset(self, scale: Scale) -> int | None:
        return scale.subset if scale.quick else FULL_SUBSET

    def plan(self, scale: Scale) -> Planned:
        planned: Planned = [("batch 1", Run(self.name, "batch 1", "batch_one", {}))]
        planned += [
            train_run(
                self.name,
                f"{label} b={b}",
                scale,
                0,
                batch_size=b,
                lr=lr_for(b),
                subset=self.subset(scale),
                **cfg,
            )
            for label, cfg in NORMS
            for b in SIZES
        ]
        return planned

    def summarize(self, scale: Scale, planned: Planned, results: Results, fig_dir: Path) -> Section:
        groups = by_variant(planned, results)
        if not any(groups.values()):
            return empty_section(self, "No run of this experiment has finished yet.")
        blocks: list[Block] = [
            Text(
                f"*Scale: {scale.describe()}; here {self.subset(scale) or 60000:,} training "
                "images, 1 seed per point, equal epochs, lr = batch/256 (linear scaling from "
                "the chapter's 1.0 at 256).*"
            ),
        ]
        one = groups.get("batch 1", [])
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
        fig, ax = plt.subplots(figsize=(6, 3.8))
        rows = []
        best: dict[str, int] = {}
        best_loss: dict[str, tuple[int, float]] = {}  # by final training loss
        for label, _ in NORMS:
            xs, ys, losses = [], [], []
            for b in SIZES:
                rs = groups.get(f"{label} b={b}", [])
                if rs:
                    acc = mean(finals(rs, "test_acc"))
                    xs.append(b)
                    ys.append(acc)
                    losses.append(mean(finals(rs, "train_loss")))
                    rows.append(
                        [
                            label,
                            str(b),
                            f"{lr_for(b):.4g}",
                            f"{acc:.3f}",
                            f"{mean(finals(rs, 'train_loss')):.3f}",
                        ]
                    )
            if xs:
                best[label] = xs[max(range(len(ys)), key=lambda i: ys[i])]
                i_loss = min(range(len(losses)), key=lambda i: losses[i])
                best_loss[label] = (xs[i_loss], losses[i_loss])
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (log scale)")
        ax.set_ylabel("final test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = fig_dir / "batch_size.png"
        save(fig, path)
        blocks += [
            Table(["norm", "batch", "lr", "test acc", "train loss"], rows, "Final epoch."),
            Figure(path, "Final test accuracy against the batch size (equal epochs)."),
        ]
        gap = missing(planned, results)
        if gap:
            blocks.append(Text(gap.note()))

        def in_range(b: int | None) -> str:
            if b is None:
                return ""
            inside = 50 <= b <= 128
            return f" — {'inside' if inside else 'outside'} the chapter's 50-100 range"

        bn_best = best.get("BN")
        verdict = (
            f"By final test accuracy BN's best batch here is {bn_best}{in_range(bn_best)}"
            + "; best per norm: "
            + ", ".join(f"{k} {v}" for k, v in best.items())
            + "."
        )
        if "BN" in best_loss:
            b, loss = best_loss["BN"]
            verdict += (
                f" By final training loss (less noisy: one seed per point, and test accuracy "
                f"with moving-average statistics moves by several points between seeds, "
                f"sections 1 and 7) BN's best batch is {b} (loss {loss:.3f}){in_range(b)}."
            )
        return Section(self.name, self.title, self.claim, verdict, blocks)


BATCH_SIZE = BatchSize()
