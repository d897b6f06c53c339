"""What an experiment is, and the pieces most of them share: training runs by arm and seed,
tables of means with 95% CIs, comparisons against a reference arm, and per-epoch curves."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import matplotlib.pyplot as plt

from bnlab.lab.params import TrainParams
from bnlab.lab.plan import Run
from bnlab.lab.report import Block, Figure, Section, Table, Text
from bnlab.lab.scale import Scale
from bnlab.lab.stats import Comparison, Interval, compare, mean_ci

Planned = list[tuple[str, Run]]  # (arm label, run): seeds of one arm share the label
Results = Mapping[Run, dict[str, Any]]


class Experiment(Protocol):
    name: str
    title: str
    claim: str

    def plan(self, scale: Scale, results: Results | None = None) -> Planned:
        """The runs to make; adaptive experiments (the lr bisection) plan more as ``results``
        come in, static ones ignore it."""
        ...

    def summarize(
        self, scale: Scale, planned: Planned, results: Results, fig_dir: Path
    ) -> Section: ...


# ---- metrics ------------------------------------------------------------------------------

# name -> (what the report calls it, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "test_acc_precise": ("test accuracy, precise statistics", True),
    "test_acc_moving": ("test accuracy, moving averages", True),
    "test_acc_batch_stats": ("test accuracy, batch statistics", True),
    "train_loss": ("final training loss", False),
    "train_acc": ("final training accuracy", True),
    "train_error": ("final training error", False),
}


def metric_value(result: dict[str, Any], metric: str) -> float:
    final = result["final"]
    if metric == "train_error":
        return 1.0 - float(final["train_acc"])
    return float(final[metric])


def train_config(scale: Scale, seed: int, **overrides: Any) -> dict[str, Any]:
    """A run's TrainConfig as JSON, with only its non-default fields, so that two experiments
    asking for the same configuration in different words share one run. (Changing a
    TrainConfig default changes what cached runs mean: bump plan.RESULT_VERSION then.)"""
    from bnlab.train import TrainConfig

    wanted = {
        "epochs": scale.epochs,
        "subset": scale.subset,
        "test_subset": scale.test_subset,
        "seed": seed,
        **overrides,
    }
    full = TrainConfig.from_dict(wanted).to_dict()
    default = TrainConfig().to_dict()
    runtime = {"device", "threads", "data_dir", "out"}  # where, not what: never in a key
    return {k: v for k, v in full.items() if k not in runtime and v != default[k]}


def train_run(
    experiment: str, arm: str, scale: Scale, seed: int, **overrides: Any
) -> tuple[str, Run]:
    """One training run of an arm: the chapter's defaults, the scale's epochs and data."""
    params = TrainParams(config=train_config(scale, seed, **overrides)).to_dict()
    return arm, Run(experiment, f"{arm} seed={seed}", "train", params)


def seed_of(run: Run) -> int:
    return int(run.params.get("config", run.params).get("seed", 0))


def by_arm(planned: Planned, results: Results) -> dict[str, dict[int, dict[str, Any]]]:
    """Results grouped by arm and seed, in plan order; runs without a result are left out
    (an arm with none maps to {})."""
    grouped: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for arm, run in planned:
        grouped[arm]  # keep the arm's place even before it has results
        if run in results:
            grouped[arm][seed_of(run)] = results[run]
    return dict(grouped)


Groups = dict[str, dict[int, dict[str, Any]]]


def values(runs: Mapping[int, dict[str, Any]], metric: str) -> dict[int, float]:
    return {seed: metric_value(r, metric) for seed, r in runs.items()}


def mean_ci_of(runs: Mapping[int, dict[str, Any]], metric: str) -> Interval:
    return mean_ci(list(values(runs, metric).values()))


def comparisons(
    groups: Groups, reference: str, metric: str, arms: Sequence[str] | None = None
) -> list[Comparison]:
    """Every arm (with results) against ``reference`` on ``metric``."""
    _, higher = METRICS[metric]
    ref = values(groups.get(reference, {}), metric)
    out = []
    for arm in arms or list(groups):
        if arm == reference or not groups.get(arm) or not ref:
            continue
        out.append(
            compare(
                values(groups[arm], metric),
                ref,
                a_name=arm,
                b_name=reference,
                metric=metric,
                higher_is_better=higher,
            )
        )
    return out


def claim(
    experiment: str, metric: str, reference: str, comps: Sequence[Comparison], **extra: Any
) -> dict[str, Any]:
    """One entry of verdicts.json."""
    return {
        "id": experiment,
        "metric": metric,
        "reference": reference,
        "comparisons": [c.to_dict() for c in comps],
        **extra,
    }


# ---- tables and sentences ------------------------------------------------------------------


def arms_table(
    groups: Groups,
    metrics: Sequence[str] = ("train_loss", "test_acc_precise", "test_acc_moving"),
    caption: str = "Final epoch: mean and 95% t-interval over seeds.",
    first_header: str = "arm",
) -> Table:
    rows = []
    for arm, runs in groups.items():
        if not runs:
            continue
        rows.append([arm, str(len(runs))] + [mean_ci_of(runs, m).fmt() for m in metrics])
    return Table([first_header, "n", *(METRICS[m][0] for m in metrics)], rows, caption)


def comparisons_table(comps: Sequence[Comparison], caption: str | None = None) -> Table:
    rows = [
        [
            f"{c.a} − {c.b}",
            METRICS[c.metric][0] if c.metric in METRICS else c.metric,
            f"{c.diff:+.3f}".replace("-", "−"),
            f"[{c.ci95[0]:+.3f}, {c.ci95[1]:+.3f}]".replace("-", "−")
            if math.isfinite(c.ci95[0])
            else "—",
            _word(c),
            f"{c.detectable:.3f}" if math.isfinite(c.detectable) else "—",
            f"{c.n_a}/{c.n_b}" + (" paired" if c.paired else ""),
        ]
        for c in comps
    ]
    return Table(
        ["difference", "metric", "Δ", "95% CI", "verdict", "detectable", "n"],
        rows,
        caption
        or "Each arm minus the reference arm, paired by seed (a seed fixes the initialization "
        "and the data order) with a t-interval; the verdict follows from the CI alone. "
        "'detectable': the smallest true difference this n finds with 80% power at the observed "
        "spread.",
    )


def _word(c: Comparison) -> str:
    if c.verdict == "no detectable difference":
        return "no detectable difference"
    return f"{c.a if c.verdict == 'a better' else c.b} better"


def verdict_sentence(comps: Sequence[Comparison]) -> str:
    """The comparisons as one sentence per metric; undetectable differences are not ranked."""
    by_metric: dict[str, list[Comparison]] = defaultdict(list)
    for c in comps:
        by_metric[c.metric].append(c)
    parts = []
    for metric, cs in by_metric.items():
        name = METRICS[metric][0] if metric in METRICS else metric
        parts.append(f"By {name}: " + "; ".join(c.phrase() for c in cs) + ".")
    return " ".join(parts) if parts else "No comparison has results yet."


def power_note(comps: Sequence[Comparison]) -> list[Block]:
    """How large a difference this section's n could have detected, per metric (a list of
    none or one block, to add to a section's blocks)."""
    by_metric: dict[str, list[float]] = defaultdict(list)
    for c in comps:
        if c.verdict == "no detectable difference" and math.isfinite(c.detectable):
            by_metric[c.metric].append(c.detectable)
    if not by_metric:
        return []

    def span(d: list[float]) -> str:
        lo, hi = f"{min(d):.3f}", f"{max(d):.3f}"
        return lo if lo == hi else f"{lo}–{hi}"

    parts = [f"{METRICS[m][0] if m in METRICS else m}: {span(d)}" for m, d in by_metric.items()]
    return [
        Text(
            "Where this section finds no detectable difference, its seeds would have detected "
            "(80% power, 95% CI) true differences of about " + "; ".join(parts) + " or more."
        )
    ]


# ---- figures -------------------------------------------------------------------------------

STYLES = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ("-", "v"), ("--", "P")]


def curves_figure(
    groups: Groups,
    path: Path,
    caption: str,
    metrics: Sequence[tuple[str, str]] = (
        ("train_loss", "training loss"),
        ("train_acc", "training accuracy"),
        ("test_acc", "test accuracy (moving averages)"),
    ),
) -> Figure:
    """One panel per metric; a line per arm (mean over seeds), each with its own line style and
    marker so that equal curves stay visible; a 95%-CI band for up to three arms (more bands
    would hide each other)."""
    arms = [(a, rs) for a, rs in groups.items() if rs]
    dodge = min(0.06, 0.3 / max(1, len(arms)))  # side by side within ±0.15 of each epoch
    epochs = max((len(r["history"]) for _, rs in arms for r in rs.values()), default=1)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics, strict=True):
        for i, (arm, runs) in enumerate(arms):
            rs = list(runs.values())
            n = min(len(r["history"]) for r in rs)
            per_epoch = [[float(r["history"][e][key]) for r in rs] for e in range(n)]
            xs = [e + 1 + dodge * (i - (len(arms) - 1) / 2) for e in range(n)]
            ls, marker = STYLES[i % len(STYLES)]
            cis = [mean_ci(v) for v in per_epoch]
            line = ax.plot(
                xs, [c.mean for c in cis], ls=ls, marker=marker, ms=3.5, lw=1.3, label=arm
            )
            if len(arms) <= 3 and len(rs) > 1:
                ax.fill_between(
                    xs,
                    [c.lo for c in cis],
                    [c.hi for c in cis],
                    alpha=0.15,
                    color=line[0].get_color(),
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        integer_epochs(ax, epochs)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False
    )
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(labels) - 1) // 5), 1, 1))
    save(fig, path)
    return Figure(path, caption)


def integer_epochs(ax: Any, epochs: int) -> None:
    """Ticks at whole epochs only (a one-epoch run has one tick, not 0.5 and 1.5)."""
    ax.set_xticks(range(1, epochs + 1, max(1, epochs // 10)))


def save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- sections ------------------------------------------------------------------------------


def missing_note(planned: Planned, results: Results) -> list[Block]:
    """A note on planned runs without results (none or one block)."""
    n = sum(1 for _, run in planned if run not in results)
    if not n:
        return []
    return [Text(f"{n} planned run(s) have no result yet; run `bnlab reproduce` first.")]


def scale_note(scale: Scale, seeds: int, extra: str = "") -> Text:
    return Text(f"*Scale: {scale.describe()}; seeds per arm here: {seeds}.{extra}*")


def empty_section(exp: Experiment, note: str) -> Section:
    return Section(exp.name, exp.title, exp.claim, "No measurement yet.", [Text(note)])
