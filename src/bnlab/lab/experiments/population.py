"""Experiment `population-stats`: prediction with moving averages vs whole-dataset statistics."""

from __future__ import annotations

from pathlib import Path

from bnlab.lab.experiments.base import (
    Planned,
    Results,
    by_variant,
    empty_section,
    mean,
    missing,
    train_run,
)
from bnlab.lab.report import Block, Section, Table, Text, fmt_mean_std
from bnlab.lab.scale import Scale

MOMENTA = (0.01, 0.1, 0.5)  # PyTorch's convention: weight on the newest batch


class PopulationStats:
    name = "population-stats"
    title = "Population statistics: moving averages vs the whole dataset"
    claim = (
        "After training, the mean and variance used for prediction should come from the whole "
        "dataset; the moving averages kept during training are an approximation."
    )

    def seeds(self, scale: Scale) -> int:
        return min(scale.seeds, 2)

    def plan(self, scale: Scale) -> Planned:
        return [
            train_run(
                self.name,
                f"momentum {m:g}",
                scale,
                seed,
                probes=("population",),
                norm="bnlab",
                norm_options=[f"momentum={m}"],
            )
            for m in MOMENTA
            for seed in range(self.seeds(scale))
        ]

    def summarize(self, scale: Scale, planned: Planned, results: Results, fig_dir: Path) -> Section:
        groups = {k: v for k, v in by_variant(planned, results).items() if v}
        if not groups:
            return empty_section(self, "No run of this experiment has finished yet.")
        rows = []
        deltas: dict[str, float] = {}
        for variant, rs in groups.items():
            p = [r["probes"]["population"] for r in rs]
            deltas[variant] = mean([x["precise_test"] - x["moving_test"] for x in p])
            rows.append(
                [
                    variant,
                    fmt_mean_std([x["moving_test"] for x in p]),
                    fmt_mean_std([x["precise_test"] for x in p]),
                    fmt_mean_std([x["batch_stats_test"] for x in p]),
                    fmt_mean_std([x["moving_train"] - x["moving_test"] for x in p]),
                    fmt_mean_std([x["precise_train"] - x["precise_test"] for x in p]),
                ]
            )
        blocks: list[Block] = [
            Text(
                f"*Scale: {scale.describe()}; seeds here: {self.seeds(scale)}. Precise "
                "statistics: `bnlab.tools.precise_bn` over the training images, exact and "
                "count-weighted.*"
            ),
            Table(
                [
                    "momentum",
                    "test acc, moving avg",
                    "test acc, precise",
                    "test acc, batch stats",
                    "train−test gap, moving",
                    "train−test gap, precise",
                ],
                rows,
                "Eval-mode accuracy with each source of statistics (batch stats: train mode on "
                "256-image test batches).",
            ),
        ]
        gap = missing(planned, results)
        if gap:
            blocks.append(Text(gap.note()))
        verdict = (
            "Replacing the moving averages by precise whole-dataset statistics changes test "
            "accuracy by " + ", ".join(f"{d:+.4f} ({k})" for k, d in deltas.items()) + "."
        )
        return Section(self.name, self.title, self.claim, verdict, blocks)


POPULATION = PopulationStats()
