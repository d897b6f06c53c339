"""Experiment `controversy`: internal covariate shift and the loss landscape, measured as
Santurkar et al. (2018) did; the measurements live in :mod:`bnlab.lab.controversy`."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
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
    seed_of,
    verdict_sentence,
)
from bnlab.lab.plan import Run
from bnlab.lab.report import Block, Figure, Section, Table, Text
from bnlab.lab.scale import Scale
from bnlab.lab.stats import Comparison, compare

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
        return scale.seeds_for(costly=True)

    def plan(self, scale: Scale, results: Results | None = None) -> Planned:
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
        headers, rows, _ = summarize_controversy(done)
        groups: dict[str, dict[int, dict[str, Any]]] = {}
        for label, run in planned:
            if run in results:
                groups.setdefault(label, {})[seed_of(run)] = results[run]
        comps = controversy_comparisons(groups)
        first = planned[0][1].params
        blocks: list[Block] = [
            Text(
                f"*Scale: {scale.describe()}; here {first['epochs']} epoch(s) on "
                f"{first['subset'] or 60000:,} images, {self.seeds(scale)} seed(s), probes every "
                f"{first['measure_every']} steps.*"
            ),
            # two tables of five columns or so: one nine-column table does not fit a page
            Table(
                headers[:5],
                [row[:5] for row in rows],
                "Per arm, pooled over seeds: final test accuracy (moving averages) and internal "
                "covariate shift (means over probes and layers).",
            ),
            Table(
                headers[:1] + headers[5:],
                [row[:1] + row[5:] for row in rows],
                "The loss landscape along the gradient: 'all / off plateau' are medians over "
                "every probe and over the probes whose batch loss was below 0.9 · ln 10 (only "
                "as many as the last column says; few probes make that median fragile).",
            ),
            comparisons_table(
                comps,
                "Each arm minus BN on one number per run (the run's final value, or its mean "
                "or median over probes), paired by seed, t-interval. For ICS, loss variation "
                "and gradient change lower is 'better' (less shift, smoother); for cos(G, G') "
                "higher.",
            ),
        ]
        blocks += power_note(comps)
        blocks += [Figure(path, caption) for path, caption in plot_controversy(done, fig_dir)]
        blocks += missing_note(planned, results)
        claims = [
            claim(self.name, metric, "BN", [c for c in comps if c.metric == metric])
            for metric in dict.fromkeys(c.metric for c in comps)
        ]
        verdict = " ".join([verdict_sentence(comps), *plateau_caveats(groups)])
        return Section(self.name, self.title, self.claim, verdict, blocks, claims=claims)


def plateau_caveats(groups: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> list[str]:
    """A caveat for each arm whose probes mostly found it on its initial plateau: there the
    landscape is flat because nothing is learned, so its smoothness readings are not those of
    a network that trains."""
    from bnlab.lab.controversy.summary import PLATEAU_LOSS

    out = []
    for arm, runs in groups.items():
        losses = [v for r in runs.values() for v in r["probes"]["loss"]]
        on = sum(1 for v in losses if v is None or not v < PLATEAU_LOSS)
        if losses and 2 * on > len(losses):
            out.append(
                f"Caveat: {on} of {arm}'s {len(losses)} probes found it on its initial plateau "
                f"(batch loss >= 0.9 · ln 10), where the landscape is flat because nothing is "
                f"learned; its loss-variation and gradient-change comparisons read that plateau, "
                f"not a smoother landscape of a network that trains."
            )
    return out


def _mean(values: list[float]) -> float:
    ok = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(ok) if ok else math.nan


def _median(values: list[float]) -> float:
    ok = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(ok) if ok else math.nan


# per-run summaries: name -> (how to read it from a run's result, higher is better)
RUN_METRICS: dict[str, tuple[Callable[[Mapping[str, Any]], float], bool]] = {
    "final training loss": (lambda r: r["history"][-1]["train_loss"], False),
    "test accuracy, moving averages": (lambda r: r["final_test_acc"], True),
    "ICS mean ||G−G'||": (
        lambda r: _mean([v for vs in r["probes"]["ics_l2"].values() for v in vs]),
        False,
    ),
    "ICS mean cos(G, G')": (
        lambda r: _mean([v for vs in r["probes"]["ics_cos"].values() for v in vs]),
        True,
    ),
    "median loss variation": (lambda r: _median(r["probes"]["loss_variation"]), False),
    "median gradient change": (lambda r: _median(r["probes"]["grad_predictiveness"]), False),
}


def controversy_comparisons(
    groups: Mapping[str, Mapping[int, Mapping[str, Any]]],
) -> list[Comparison]:
    """noisy BN vs BN on training (does noise hurt?), no BN vs BN on the probes."""
    out = []
    for arm, metrics in (
        ("noisy BN", ("final training loss", "test accuracy, moving averages")),
        ("no BN", tuple(RUN_METRICS)),
    ):
        if not groups.get(arm) or not groups.get("BN"):
            continue
        for metric in metrics:
            get, higher = RUN_METRICS[metric]
            out.append(
                compare(
                    {s: get(r) for s, r in groups[arm].items()},
                    {s: get(r) for s, r in groups["BN"].items()},
                    a_name=arm,
                    b_name="BN",
                    metric=metric,
                    higher_is_better=higher,
                )
            )
    return out


CONTROVERSY = Controversy()
