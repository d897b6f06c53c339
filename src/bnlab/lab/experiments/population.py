"""Experiment `population-stats`: prediction with moving averages vs whole-dataset statistics."""

from __future__ import annotations

from pathlib import Path

from bnlab.lab.experiments.base import (
    Planned,
    Results,
    by_arm,
    claim,
    comparisons_table,
    empty_section,
    mean_ci_of,
    missing_note,
    power_note,
    scale_note,
    train_run,
    values,
    verdict_sentence,
)
from bnlab.lab.report import Block, Section, Table
from bnlab.lab.scale import Scale
from bnlab.lab.stats import compare

MOMENTA = (0.01, 0.1, 0.5)  # PyTorch's convention: weight on the newest batch


class PopulationStats:
    name = "population-stats"
    title = "Population statistics: moving averages vs the whole dataset"
    claim = (
        "After training, the mean and variance used for prediction should come from the whole "
        "dataset; the moving averages kept during training are an approximation."
    )

    def seeds(self, scale: Scale) -> int:
        return scale.seeds_for(costly=False)

    def plan(self, scale: Scale, results: Results | None = None) -> Planned:
        return [
            train_run(
                self.name,
                f"momentum {m:g}",
                scale,
                seed,
                norm="bnlab",
                norm_options=[] if m == 0.1 else [f"momentum={m}"],  # 0.1: the default run
            )
            for m in MOMENTA
            for seed in range(self.seeds(scale))
        ]

    def summarize(self, scale: Scale, planned: Planned, results: Results, fig_dir: Path) -> Section:
        groups = {k: v for k, v in by_arm(planned, results).items() if v}
        if not groups:
            return empty_section(self, "No run of this experiment has finished yet.")
        rows = [
            [
                arm,
                str(len(runs)),
                mean_ci_of(runs, "test_acc_moving").fmt(),
                mean_ci_of(runs, "test_acc_precise").fmt(),
                mean_ci_of(runs, "test_acc_batch_stats").fmt(),
            ]
            for arm, runs in groups.items()
        ]
        # the same trained network read two ways: paired within each run
        comps = [
            compare(
                values(runs, "test_acc_precise"),
                values(runs, "test_acc_moving"),
                a_name=f"precise ({arm})",
                b_name=f"moving averages ({arm})",
                metric="test accuracy",
                higher_is_better=True,
            )
            for arm, runs in groups.items()
        ]
        blocks: list[Block] = [
            scale_note(
                scale,
                self.seeds(scale),
                " Precise statistics: `bnlab.tools.precise_bn` over all the training images, "
                "exact and count-weighted, each BN in turn as the prediction network sees it.",
            ),
            Table(
                ["momentum", "n", "moving averages", "precise", "batch statistics"],
                rows,
                "Test accuracy in eval mode with each source of statistics, mean and 95% CI "
                "over seeds (batch statistics: training mode on 256-image test batches).",
            ),
            comparisons_table(
                comps,
                "Precise minus moving-average reading of the same trained networks, paired by "
                "run, t-interval.",
            ),
        ]
        blocks += power_note(comps)
        blocks += missing_note(planned, results)
        return Section(
            self.name,
            self.title,
            self.claim,
            verdict_sentence(comps),
            blocks,
            claims=[claim(self.name, "test_acc_precise - test_acc_moving", "moving", comps)],
        )


POPULATION = PopulationStats()
