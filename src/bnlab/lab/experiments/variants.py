"""The common shape of most experiments: a few arms (model/training variants), each trained
with several seeds, compared with a named reference arm by their final numbers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnlab.lab.experiments.base import (
    Groups,
    Planned,
    Results,
    arms_table,
    by_arm,
    claim,
    comparisons,
    comparisons_table,
    curves_figure,
    empty_section,
    missing_note,
    power_note,
    scale_note,
    train_run,
    verdict_sentence,
)
from bnlab.lab.report import Block, Section
from bnlab.lab.scale import Scale


@dataclass
class VariantExperiment:
    name: str
    title: str
    claim: str
    arms: Sequence[tuple[str, dict[str, Any]]]  # (label, TrainConfig overrides)
    reference: str  # the arm every other one is compared with
    metrics: Sequence[str] = ("test_acc_precise", "train_loss")  # compared, in this order
    extra: Callable[[Groups, Path, Scale], list[Block]] | None = None
    notes: str = ""
    costly: bool = False  # a sweep of slow runs: the scale's costly seed count

    def seeds(self, scale: Scale) -> int:
        return scale.seeds_for(costly=self.costly)

    def plan(self, scale: Scale, results: Results | None = None) -> Planned:
        return [
            train_run(self.name, label, scale, seed, **overrides)
            for label, overrides in self.arms
            for seed in range(self.seeds(scale))
        ]

    def summarize(self, scale: Scale, planned: Planned, results: Results, fig_dir: Path) -> Section:
        groups = {k: v for k, v in by_arm(planned, results).items() if v}
        if not groups:
            return empty_section(self, "No run of this experiment has finished yet.")
        comps = [c for m in self.metrics for c in comparisons(groups, self.reference, m)]
        blocks: list[Block] = [
            scale_note(
                scale,
                self.seeds(scale),
                f" Reference arm: {self.reference}." + (f" {self.notes}" if self.notes else ""),
            ),
            arms_table(groups),
            comparisons_table(comps),
        ]
        blocks += power_note(comps)
        blocks.append(
            curves_figure(
                groups,
                fig_dir / f"{self.name}_curves.png",
                f"{self.title}: per-epoch training loss, training accuracy and test accuracy "
                "(moving averages), mean over seeds"
                + ("; band: 95% CI." if len(groups) <= 3 else "."),
            )
        )
        if self.extra:
            blocks += self.extra(groups, fig_dir, scale)
        blocks += missing_note(planned, results)
        claims = [
            claim(self.name, m, self.reference, [c for c in comps if c.metric == m])
            for m in self.metrics
        ]
        return Section(
            self.name, self.title, self.claim, verdict_sentence(comps), blocks, claims=claims
        )
