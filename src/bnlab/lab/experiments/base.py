"""What an experiment is, and the pieces most of them share: training runs by variant and seed,
mean ± std tables, and per-epoch curves."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import matplotlib.pyplot as plt

from bnlab.lab.plan import Run
from bnlab.lab.report import Figure, Section, Table, fmt_mean_std
from bnlab.lab.scale import Scale

Planned = list[tuple[str, Run]]  # (variant label, run): seeds of one variant share the label
Results = Mapping[Run, dict[str, Any]]


class Experiment(Protocol):
    name: str
    title: str
    claim: str

    def plan(self, scale: Scale) -> Planned: ...

    def summarize(
        self, scale: Scale, planned: Planned, results: Results, fig_dir: Path
    ) -> Section: ...


def train_run(
    experiment: str,
    variant: str,
    scale: Scale,
    seed: int,
    *,
    probes: Sequence[str] = (),
    epochs: int | None = None,
    subset: int | str | None = "scale",
    **config: Any,
) -> tuple[str, Run]:
    """One training run of a variant: the chapter's defaults, the scale's epochs and data."""
    params_config = {
        "epochs": epochs or scale.epochs,
        "subset": scale.subset if subset == "scale" else subset,
        "test_subset": scale.test_subset,
        "seed": seed,
        **config,
    }
    params = {"config": params_config, "probes": list(probes)}
    return variant, Run(experiment, f"{variant} seed={seed}", "train", params)


def by_variant(planned: Planned, results: Results) -> dict[str, list[dict[str, Any]]]:
    """Results grouped by variant label, in plan order; runs without a result are left out."""
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for variant, run in planned:
        if run in results:
            grouped[variant].append(results[run])
        else:
            grouped.setdefault(variant, [])
    return dict(grouped)


def last(result: dict[str, Any]) -> dict[str, Any]:
    return dict(result["history"][-1])


def finals(results: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(last(r)[key]) for r in results]


def mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def final_table(
    groups: Mapping[str, Sequence[dict[str, Any]]], caption: str, first_header: str = "variant"
) -> Table:
    rows = []
    for variant, rs in groups.items():
        rows.append(
            [
                variant,
                fmt_mean_std(finals(rs, "train_loss")),
                fmt_mean_std(finals(rs, "train_acc")),
                fmt_mean_std(finals(rs, "test_acc")),
                fmt_mean_std([mean([e["seconds"] for e in r["history"]]) for r in rs], 2),
            ]
        )
    headers = [first_header, "train loss", "train acc", "test acc", "s / epoch"]
    return Table(headers, rows, caption)


def curves_figure(
    groups: Mapping[str, Sequence[dict[str, Any]]],
    path: Path,
    caption: str,
    metrics: Sequence[tuple[str, str]] = (
        ("train_loss", "train loss"),
        ("train_acc", "train accuracy"),
        ("test_acc", "test accuracy"),
    ),
) -> Figure:
    """One panel per metric; a line per variant (mean over seeds), a band for min..max."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics, strict=True):
        for variant, rs in groups.items():
            if not rs:
                continue
            n = min(len(r["history"]) for r in rs)
            per_epoch = [[float(r["history"][e][key]) for r in rs] for e in range(n)]
            xs = list(range(1, n + 1))
            line = ax.plot(xs, [mean(v) for v in per_epoch], marker="o", ms=3, label=variant)
            if len(rs) > 1:
                ax.fill_between(
                    xs,
                    [min(v) for v in per_epoch],
                    [max(v) for v in per_epoch],
                    alpha=0.2,
                    color=line[0].get_color(),
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)
    return Figure(path, caption)


def save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class Missing:
    """Planned runs without results (the report says so instead of guessing)."""

    count: int

    def note(self) -> str:
        return f"{self.count} planned run(s) have no result yet; run `bnlab reproduce` first."


def missing(planned: Planned, results: Results) -> Missing | None:
    n = sum(1 for _, run in planned if run not in results)
    return Missing(n) if n else None


def scale_note(scale: Scale, seeds: int | None = None, epochs: int | None = None) -> str:
    text = scale.describe()
    if seeds is not None or epochs is not None:
        text += (
            f"; this experiment: {epochs or scale.epochs} epoch(s), {seeds or scale.seeds} seed(s)"
        )
    return f"*Scale: {text}.*"


def empty_section(exp: Experiment, note: str) -> Section:
    from bnlab.lab.report import Text

    return Section(exp.name, exp.title, exp.claim, "No measurement yet.", [Text(note)])
