"""Experiment `controversy`: internal covariate shift and the loss landscape, measured as
Santurkar et al. (2018) did; the measurements live in :mod:`bnlab.lab.controversy`."""

from __future__ import annotations

from pathlib import Path

from bnlab.lab.experiments.base import Planned, Results, empty_section, missing
from bnlab.lab.plan import Run
from bnlab.lab.report import Block, Figure, Section, Table, Text
from bnlab.lab.scale import Scale

VARIANTS = (("BN", "bnlab"), ("noisy BN", "noisy"), ("no BN", "none"))


class Controversy:
    name = "controversy"
    title = "The controversy: internal covariate shift or a smoother landscape?"
    claim = (
        "BN was introduced to reduce internal covariate shift; Santurkar et al. (2018) argue "
        "instead that BN with injected noise still trains, that BN need not reduce ICS, and that "
        "it makes the loss and its gradient smoother along the gradient direction."
    )

    def seeds(self, scale: Scale) -> int:
        return min(scale.seeds, 2)

    def plan(self, scale: Scale) -> Planned:
        return [
            (
                label,
                Run(
                    self.name,
                    f"{label} seed={seed}",
                    "controversy",
                    {
                        "norm": norm,
                        "lr": 1.0 if norm != "none" else 0.9,
                        "epochs": min(scale.epochs, 5),
                        "subset": scale.subset if scale.quick else 20_000,
                        "batch_size": 256,
                        "seed": seed,
                        "measure_every": scale.measure_every,
                    },
                ),
            )
            for label, norm in VARIANTS
            for seed in range(self.seeds(scale))
        ]

    def summarize(self, scale: Scale, planned: Planned, results: Results, fig_dir: Path) -> Section:
        from bnlab.lab.controversy import plot_controversy, summarize_controversy

        done = [results[run] for _, run in planned if run in results]
        if not done:
            return empty_section(self, "No run of this experiment has finished yet.")
        headers, rows, verdict = summarize_controversy(done)
        first = planned[0][1].params
        blocks: list[Block] = [
            Text(
                f"*Scale: {scale.describe()}; here {first['epochs']} epoch(s) on "
                f"{first['subset'] or 60000:,} images, {self.seeds(scale)} seed(s), probes every "
                f"{first['measure_every']} steps.*"
            ),
            Table(headers, rows, "Per variant: final test accuracy and the landscape probes."),
        ]
        blocks += [Figure(path, caption) for path, caption in plot_controversy(done, fig_dir)]
        gap = missing(planned, results)
        if gap:
            blocks.append(Text(gap.note()))
        return Section(self.name, self.title, self.claim, verdict, blocks)


CONTROVERSY = Controversy()
