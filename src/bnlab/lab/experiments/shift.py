"""Experiment `shift` (beyond the chapter): BN's statistics adapted at test time to shifted
inputs — Gaussian noise, contrast, brightness, blur — against the GroupNorm LeNet, which has
no batch statistics to adapt."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from bnlab.lab.experiments.base import (
    Planned,
    Results,
    claim,
    comparisons_table,
    empty_section,
    missing_note,
    power_note,
    scale_note,
    seed_of,
    train_run,
    verdict_sentence,
)
from bnlab.lab.params import ShiftParams
from bnlab.lab.plan import Run
from bnlab.lab.report import Block, Section, Table
from bnlab.lab.scale import Scale
from bnlab.lab.stats import compare, mean_ci

MODELS = (
    ("BN", {"norm": "bnlab"}),
    ("GroupNorm", {"norm": "group", "norm_options": ["num_groups=2"]}),
)
PRIORS = (0, 1_000, 10_000)  # adapt_bn's weight of the source, in examples (10,000 targets)
TENT_LR = 1e-3  # the paper's Adam rate for CIFAR
METHODS = ("source", "target", "prior 1000", "prior 10000", "tent")


class Shift:
    name = "shift"
    title = "Beyond the chapter: BN statistics adapted at test time to shifted inputs"
    claim = (
        "Under a shift of the inputs (noise, contrast, brightness, blur) BN's statistics are "
        "the cheapest thing to adapt: the target's own statistics (prediction-time BN), a "
        "prior-weighted mixture with the source's (Schneider et al., NeurIPS 2020) or TENT's "
        "entropy minimization on γ and β (Wang et al., ICLR 2021) recover accuracy that the "
        "source statistics lose; a GroupNorm network has no batch statistics to adapt."
    )

    def seeds(self, scale: Scale) -> int:
        return scale.seeds_for(costly=True)

    def plan(self, scale: Scale, results: Results | None = None) -> Planned:
        """Each model's train run (shared with the other sections), then, once it has a
        result (its work directory then holds the finished model), the shift evaluation."""
        results = results or {}
        planned: Planned = []
        for label, overrides in MODELS:
            for seed in range(self.seeds(scale)):
                arm, train = train_run(self.name, label, scale, seed, **overrides)
                planned.append((f"{arm} (trained)", train))
                if train in results:
                    params = ShiftParams(
                        train_key=train.key,
                        config=train.params["config"],
                        priors=PRIORS,
                        tent_lr=TENT_LR,
                    ).to_dict()
                    planned.append((arm, Run(self.name, f"{arm} seed={seed}", "shift", params)))
        return planned

    def summarize(self, scale: Scale, planned: Planned, results: Results, fig_dir: Path) -> Section:
        runs: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
        for arm, run in planned:
            if run.task == "shift" and run in results:
                runs[arm][seed_of(run)] = results[run]["accuracy"]
        if not runs:
            return empty_section(self, "No shift evaluation has finished yet.")

        def shifted_mean(acc: dict[str, dict[str, float]], method: str) -> float:
            vals = [row[method] for name, row in acc.items() if name != "clean" and method in row]
            return sum(vals) / len(vals) if vals else float("nan")

        rows = []
        for arm, by_seed in runs.items():
            for method in METHODS:
                if not all(method in acc["clean"] for acc in by_seed.values()):
                    continue
                clean = mean_ci([acc["clean"][method] for acc in by_seed.values()])
                shifted = mean_ci([shifted_mean(acc, method) for acc in by_seed.values()])
                rows.append([arm, method, str(len(by_seed)), clean.fmt(), shifted.fmt()])
        kinds = (
            sorted({name.split("/")[0] for acc in runs["BN"].values() for name in acc} - {"clean"})
            if "BN" in runs
            else []
        )
        per_kind = []
        for arm, by_seed in runs.items():
            for method in METHODS:
                if not all(method in acc["clean"] for acc in by_seed.values()):
                    continue
                cells = []
                for kind in kinds:
                    vals = [
                        sum(row[method] for name, row in acc.items() if name.startswith(kind + "/"))
                        / sum(1 for name in acc if name.startswith(kind + "/"))
                        for acc in by_seed.values()
                    ]
                    cells.append(mean_ci(vals).fmt())
                per_kind.append([arm, method, *cells])
        comps = []
        bn = runs.get("BN", {})
        source = {s: shifted_mean(acc, "source") for s, acc in bn.items()}
        for method in METHODS[1:]:
            comps.append(
                compare(
                    {s: shifted_mean(acc, method) for s, acc in bn.items()},
                    source,
                    a_name=f"BN, {method}",
                    b_name="BN, source",
                    metric="shifted test accuracy",
                    higher_is_better=True,
                )
            )
        if "GroupNorm" in runs:
            comps.append(
                compare(
                    {s: shifted_mean(acc, "source") for s, acc in runs["GroupNorm"].items()},
                    source,
                    a_name="GroupNorm, source",
                    b_name="BN, source",
                    metric="shifted test accuracy",
                    higher_is_better=True,
                )
            )
        blocks: list[Block] = [
            scale_note(
                scale,
                self.seeds(scale),
                " Source: precise statistics of the clean training images. Target: precise "
                "statistics of the unlabelled corrupted test set (adapt_bn, prior 0). Prior N: "
                f"adapt_bn with N ∈ {list(PRIORS[1:])} examples on the source, for 10,000 "
                f"target images. TENT: one Adam step (lr {TENT_LR:g}) on γ and β per 256-image "
                "batch, predicting with each batch's statistics. Corruptions: "
                "`bnlab.data.corrupt`, 3 severities each, seeded by the run's seed.",
            ),
            Table(
                ["model", "method", "n", "clean test acc", "shifted test acc (mean of 12 sets)"],
                rows,
                "Mean and 95% CI over seeds.",
            ),
            Table(
                ["model", "method", *kinds],
                per_kind,
                "Shifted test accuracy per corruption (mean over its 3 severities), mean and "
                "95% CI over seeds.",
            ),
            comparisons_table(
                comps, "Each method minus BN with source statistics, paired by seed."
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
            claims=[claim(self.name, "shifted test accuracy", "BN, source", comps)],
        )


SHIFT = Shift()
