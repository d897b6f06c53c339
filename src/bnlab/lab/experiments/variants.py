"""The common shape of most experiments: a few model/training variants, each trained with
several seeds, compared by their final numbers and curves."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnlab.lab.experiments.base import (
    Planned,
    Results,
    by_variant,
    curves_figure,
    empty_section,
    final_table,
    missing,
    train_run,
)
from bnlab.lab.report import Block, Section, Text
from bnlab.lab.scale import Scale

Groups = dict[str, list[dict[str, Any]]]


@dataclass
class VariantExperiment:
    name: str
    title: str
    claim: str
    variants: Sequence[tuple[str, dict[str, Any]]]  # (label, TrainConfig overrides)
    verdict: Callable[[Groups], str]
    probes: Sequence[str] = ()
    max_seeds: int | None = None  # cap on the scale's seeds (cost control), stated in the report
    extra: Callable[[Groups, Path, Scale], list[Block]] | None = None
    notes: str = ""

    def seeds(self, scale: Scale) -> int:
        return min(scale.seeds, self.max_seeds) if self.max_seeds else scale.seeds

    def plan(self, scale: Scale) -> Planned:
        return [
            train_run(self.name, label, scale, seed, probes=self.probes, **overrides)
            for label, overrides in self.variants
            for seed in range(self.seeds(scale))
        ]

    def summarize(self, scale: Scale, planned: Planned, results: Results, fig_dir: Path) -> Section:
        groups = {k: v for k, v in by_variant(planned, results).items() if v}
        if not groups:
            return empty_section(self, "No run of this experiment has finished yet.")
        blocks: list[Block] = [
            Text(
                f"*Scale: {scale.describe()}; seeds per variant here: {self.seeds(scale)}.*"
                + (f" {self.notes}" if self.notes else "")
            ),
            final_table(groups, "Final epoch, mean ± std over seeds (n = seeds)."),
            curves_figure(
                groups,
                fig_dir / f"{self.name}_curves.png",
                f"{self.title}: per-epoch training loss, training accuracy and test accuracy "
                "(mean over seeds; band: min to max).",
            ),
        ]
        if self.extra:
            blocks += self.extra(groups, fig_dir, scale)
        gap = missing(planned, results)
        if gap:
            blocks.append(Text(gap.note()))
        return Section(self.name, self.title, self.claim, self.verdict(groups), blocks)
