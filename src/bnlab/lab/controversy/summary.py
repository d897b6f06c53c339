"""The controversy's table, verdict and figures, from :func:`bnlab.lab.controversy.run_controversy`
results: :func:`summarize_controversy` and :func:`plot_controversy`."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bnlab.lab.controversy.config import NORMS

NORM_LABELS: Final[dict[str, str]] = {"bnlab": "BN", "noisy": "noisy BN", "none": "no norm"}
NORM_COLORS: Final[dict[str, str]] = {"bnlab": "C0", "noisy": "C1", "none": "C3"}
# A probe whose batch loss is above 0.9 · ln 10 (the cross-entropy of a uniform guess over the
# 10 classes) finds the network on its initial plateau, not learning yet.
PLATEAU_LOSS: Final = 0.9 * math.log(10)
SAME_RATIO: Final = 1.1  # medians within 10% of each other are reported as "about the same"


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _group(results: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Results grouped by norm, plus every other parameter that differs between results
    (seeds are what a group averages over), in the order NORMS lists the norms."""
    if isinstance(results, Mapping) or not isinstance(results, Sequence):
        raise TypeError(
            f"results: expected a list of run_controversy results, got {type(results).__name__}."
        )
    for r in results:
        if not isinstance(r, Mapping) or "params" not in r or "probes" not in r:
            raise ValueError(
                "results: expected dicts returned by run_controversy (with 'params' and "
                f"'probes'), got {type(r).__name__} with keys "
                f"{sorted(r) if isinstance(r, Mapping) else '—'}."
            )
    varying = sorted(
        k
        for k in {k for r in results for k in r["params"]} - {"norm", "seed"}
        if len({repr(r["params"].get(k)) for r in results}) > 1
    )
    order = {norm: i for i, norm in enumerate(NORMS)}
    keyed: dict[tuple[int, str], list[Mapping[str, Any]]] = defaultdict(list)
    for r in results:
        norm = r["params"]["norm"]
        extra = ", ".join(f"{k}={r['params'].get(k)}" for k in varying)
        label = NORM_LABELS.get(norm, norm) + (f" ({extra})" if extra else "")
        keyed[(order.get(norm, len(order)), label)].append(r)
    return {label: keyed[(i, label)] for i, label in sorted(keyed)}


Getter = Callable[[Mapping[str, Any]], list[Any]]


def _column(key: str, layer: str | None = None) -> Getter:
    """Reads ``probes[key]`` (or ``probes[key][layer]``) of a result."""

    def get(result: Mapping[str, Any]) -> list[Any]:
        column = result["probes"][key]
        return list(column if layer is None else column.get(layer, []))

    return get


def _by_step(runs: Sequence[Mapping[str, Any]], get: Getter) -> tuple[list[int], list[list[Any]]]:
    """(steps, per-step lists of the values of every run that probed that step)."""
    table: dict[int, list[Any]] = defaultdict(list)
    for r in runs:
        for s, v in zip(r["probes"]["step"], get(r), strict=True):
            table[int(s)].append(v)
    steps = sorted(table)
    return steps, [table[s] for s in steps]


def _nanstats(values: list[float]) -> tuple[float, float, float]:
    """(mean, min, max) of the finite values; NaN if none."""
    ok = [v for v in values if math.isfinite(v)]
    if not ok:
        return float("nan"), float("nan"), float("nan")
    return statistics.fmean(ok), min(ok), max(ok)


def _plot_band(
    ax: Axes,
    runs: Sequence[Mapping[str, Any]],
    get: Getter,
    label: str,
    color: str,
) -> None:
    steps, values = _by_step(runs, get)
    stats = [_nanstats([_num(v) for v in per]) for per in values]
    ax.plot(steps, [s[0] for s in stats], color=color, label=f"{label} (n={len(runs)})")
    if len(runs) > 1:
        ax.fill_between(
            steps, [s[1] for s in stats], [s[2] for s in stats], color=color, alpha=0.2, lw=0
        )


def _color(runs: Sequence[Mapping[str, Any]], i: int) -> str:
    return NORM_COLORS.get(runs[0]["params"]["norm"], f"C{4 + i}")


def plot_controversy(
    results: Sequence[Mapping[str, Any]], out_dir: str | Path
) -> list[tuple[Path, str]]:
    """Four PNG figures in ``out_dir`` (created if needed): ICS per layer, loss landscape,
    gradient predictiveness, training curves. Lines are means over seeds; shaded: min–max over
    seeds (for the landscape, also the range of the loss along the gradient). Returns
    ``[(path, caption), ...]``."""
    groups = _group(results)
    if not groups:
        raise ValueError("results: expected at least one run_controversy result, got none.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[Path, str]] = []

    def save(fig: Figure, name: str, caption: str) -> None:
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        figures.append((path, caption))

    # (1) ICS per layer
    layers = list(dict.fromkeys(name for r in results for name in r["layers"]))
    fig = Figure(figsize=(3.4 * len(layers), 6.2))
    axes = fig.subplots(2, len(layers), squeeze=False)
    for j, layer in enumerate(layers):
        for i, (label, runs) in enumerate(groups.items()):
            have = [r for r in runs if layer in r["probes"]["ics_l2"]]
            if not have:
                continue
            for row, key in enumerate(("ics_l2", "ics_cos")):
                _plot_band(
                    axes[row][j],
                    have,
                    _column(key, layer),
                    label,
                    _color(runs, i),
                )
        axes[0][j].set_title(f"layer {layer}")
        axes[0][j].set_yscale("log")
        axes[0][j].set_ylabel("||G − G'||₂")
        axes[1][j].set_ylabel("cos(G, G')")
        axes[1][j].set_xlabel("training step")
    axes[0][0].legend(fontsize="small")
    fig.suptitle("Internal covariate shift (Santurkar et al. Def. 2.1): gradient change")
    save(
        fig,
        "controversy_ics.png",
        "Internal covariate shift per layer: ||G − G'||₂ (top, log scale) and cos(G, G') "
        "(bottom) between a layer's gradient before and after the layers below it take the "
        "SGD step; mean over seeds, shaded min–max over seeds. Higher ||G − G'|| and lower "
        "cosine mean more shift.",
    )

    # (2) loss landscape along the gradient
    fig = Figure(figsize=(11, 4.2))
    ax_band, ax_var = fig.subplots(1, 2)
    for i, (label, runs) in enumerate(groups.items()):
        color = _color(runs, i)
        steps, along = _by_step(runs, _column("losses_along"))
        lo = [statistics.fmean(min(_num(v) for v in a) for a in per) for per in along]
        hi = [statistics.fmean(max(_num(v) for v in a) for a in per) for per in along]
        ax_band.fill_between(steps, lo, hi, color=color, alpha=0.35, lw=0, label=label)
        _plot_band(ax_var, runs, _column("loss_variation"), label, color)
    ax_band.set(
        xlabel="training step",
        ylabel="loss",
        title="Loss along the gradient: L(w − ηg), η ∈ lr·step_sizes",
    )
    ax_var.set(
        xlabel="training step",
        ylabel="max − min of L(w − ηg)",
        title="Loss variation",
        yscale="log",
    )
    ax_band.legend(fontsize="small")
    ax_var.legend(fontsize="small")
    save(
        fig,
        "controversy_loss_landscape.png",
        "Loss landscape along the gradient (Santurkar et al. Fig. 4a): left, the band between "
        "the lowest and highest loss met along the gradient direction (mean over seeds); right, "
        "its width (lower = smoother), mean over seeds with the min–max over seeds shaded.",
    )

    # (3) gradient predictiveness
    fig = Figure(figsize=(11, 4.2))
    ax_pred, ax_beta = fig.subplots(1, 2)
    for i, (label, runs) in enumerate(groups.items()):
        color = _color(runs, i)
        _plot_band(ax_pred, runs, _column("grad_predictiveness"), label, color)
        _plot_band(ax_beta, runs, _column("beta_smoothness"), label, color)
    ax_pred.set(
        xlabel="training step",
        ylabel="max_η ||∇L(w − ηg) − ∇L(w)||₂",
        title="Gradient predictiveness (lower = more predictive)",
        yscale="log",
    )
    ax_beta.set(
        xlabel="training step",
        ylabel="max_η ||∇L(w − ηg) − ∇L(w)||₂ / ||ηg||₂",
        title="Effective β-smoothness",
        yscale="log",
    )
    ax_pred.legend(fontsize="small")
    ax_beta.legend(fontsize="small")
    save(
        fig,
        "controversy_gradient_predictiveness.png",
        "Gradient predictiveness (left) and effective β-smoothness (right) along the gradient "
        "direction (Santurkar et al. Fig. 4b, c); mean over seeds, shaded min–max over seeds.",
    )

    # (4) training curves
    fig = Figure(figsize=(11, 4.2))
    ax_acc, ax_loss = fig.subplots(1, 2)
    for i, (label, runs) in enumerate(groups.items()):
        color = _color(runs, i)
        epochs = sorted({h["epoch"] for r in runs for h in r["history"]})
        for ax, key in ((ax_acc, "test_acc"), (ax_loss, "train_loss")):
            per = [
                _nanstats([_num(h[key]) for r in runs for h in r["history"] if h["epoch"] == e])
                for e in epochs
            ]
            ax.plot(
                epochs, [s[0] for s in per], "o-", color=color, label=f"{label} (n={len(runs)})"
            )
            if len(runs) > 1:
                ax.fill_between(
                    epochs, [s[1] for s in per], [s[2] for s in per], color=color, alpha=0.2, lw=0
                )
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy")
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss (epoch mean)")
    ax_acc.legend(fontsize="small")
    ax_loss.legend(fontsize="small")
    save(
        fig,
        "controversy_training.png",
        "Training curves of BN, noisy BN (non-stationary noise after every BN) and no norm: "
        "test accuracy and mean training loss per epoch; mean over seeds, shaded min–max.",
    )
    return figures


def _mean_std(values: list[float], digits: int = 3) -> str:
    ok = [v for v in values if math.isfinite(v)]
    if not ok:
        return "—"
    if len(ok) == 1:
        return f"{ok[0]:.{digits}f} (n=1)"
    return f"{statistics.fmean(ok):.{digits}f} ± {statistics.stdev(ok):.{digits}f} (n={len(ok)})"


def _pooled(runs: Sequence[Mapping[str, Any]], get: Getter) -> list[float]:
    return [v for r in runs for v in map(_num, get(r)) if math.isfinite(v)]


def _stat(values: list[float], how: Callable[[list[float]], float]) -> float:
    return how(values) if values else float("nan")


def _relative_ics(runs: Sequence[Mapping[str, Any]], layers: list[str]) -> list[float]:
    """||G - G'|| / ||G|| of every probe and layer: ICS free of the gradient's scale, which
    differs by orders of magnitude between a BN and a plain sigmoid network."""
    out = []
    for r in runs:
        for layer in layers:
            l2 = map(_num, _column("ics_l2", layer)(r))
            norms = map(_num, _column("ics_g_norm", layer)(r))
            out += [d / g for d, g in zip(l2, norms, strict=True) if g > 0 and math.isfinite(d / g)]
    return out


def _off_plateau(runs: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """The values of probe column ``key`` at probes whose batch loss was below the plateau
    level (:data:`PLATEAU_LOSS`), i.e. while the network was learning."""
    out = []
    for r in runs:
        for loss, v in zip(r["probes"]["loss"], r["probes"][key], strict=True):
            if _num(loss) < PLATEAU_LOSS and math.isfinite(_num(v)):
                out.append(_num(v))
    return out


LANDSCAPE = (
    ("loss_var", "loss_variation"),
    ("pred", "grad_predictiveness"),
    ("beta", "beta_smoothness"),
)


def _group_stats(runs: Sequence[Mapping[str, Any]], layers: list[str]) -> dict[str, Any]:
    ics = {
        layer: _stat(_pooled(runs, _column("ics_l2", layer)), statistics.fmean) for layer in layers
    }
    cos_all = [v for layer in layers for v in _pooled(runs, _column("ics_cos", layer))]
    stats: dict[str, Any] = {
        "acc": [_num(r["final_test_acc"]) for r in runs],
        "ics": ics,
        "ics_mean": _stat([v for v in ics.values() if math.isfinite(v)], statistics.fmean),
        "cos": _stat(cos_all, statistics.fmean),
        "rel": _stat(_relative_ics(runs, layers), statistics.fmean),
        "probes": sum(len(r["probes"]["loss"]) for r in runs),
        "learning": len(_off_plateau(runs, "loss")),
    }
    for short, key in LANDSCAPE:
        stats[short] = _stat(_pooled(runs, _column(key)), statistics.median)
        stats[short + "_off"] = _stat(_off_plateau(runs, key), statistics.median)
    return stats


def _g(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{v:.3g}"


def summarize_controversy(
    results: Sequence[Mapping[str, Any]],
) -> tuple[list[str], list[list[str]], str]:
    """(headers, one row per norm, one-sentence verdict computed from the numbers).

    Columns: final test accuracy (mean ± std over seeds, n); mean ||G − G'|| per layer; mean
    cos(G, G') and mean ||G − G'|| / ||G|| over layers and probes; the medians of loss
    variation, gradient predictiveness and effective β-smoothness over all probes and over the
    probes "off the plateau" (batch loss below 0.9 · ln 10, where the network was learning).

    The verdict compares BN with no norm off the plateau when both have such probes: a network
    still on its initial plateau is flat along the gradient because it is not learning, which
    says nothing about the landscape it trains on.
    """
    groups = _group(results)
    if not groups:
        raise ValueError("results: expected at least one run_controversy result, got none.")
    layers = list(dict.fromkeys(name for r in results for name in r["layers"]))
    off = "all / off plateau"
    headers = [
        "norm",
        "final test acc",
        f"ICS ||G−G'|| ({' / '.join(layers)})",
        "ICS cos(G, G')",
        "ICS ||G−G'||/||G||",
        f"median loss variation ({off})",
        f"median grad. predictiveness ({off})",
        f"median β-smoothness ({off})",
        "probes off plateau",
    ]
    stats = {label: _group_stats(runs, layers) for label, runs in groups.items()}
    rows = [
        [
            label,
            _mean_std(s["acc"]),
            " / ".join(_g(s["ics"][layer]) for layer in layers),
            _g(s["cos"]),
            _g(s["rel"]),
            *[f"{_g(s[short])} / {_g(s[short + '_off'])}" for short, _ in LANDSCAPE],
            f"{s['learning']} of {s['probes']}",
        ]
        for label, s in stats.items()
    ]
    per_norm: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for runs in groups.values():
        per_norm[runs[0]["params"]["norm"]].extend(runs)
    by_norm = {norm: _group_stats(runs, layers) for norm, runs in per_norm.items()}
    return headers, rows, _verdict(by_norm, len(groups) > len(by_norm))


def _compare(what: str, a: float, b: float) -> str | None:
    """'its <what> was N× smaller (a vs b)': BN's value a against no norm's b."""
    if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
        return None
    ratio = b / a
    if 1 / SAME_RATIO < ratio < SAME_RATIO:
        how = "about the same"
    else:
        how = f"{ratio:.1f}× smaller" if ratio > 1 else f"{1 / ratio:.1f}× larger"
    return f"its {what} was {how} ({_g(a)} vs {_g(b)})"


def _verdict(by_norm: Mapping[str, Mapping[str, Any]], mixed: bool) -> str:
    def acc(norm: str) -> str:
        ok = [v for v in by_norm[norm]["acc"] if math.isfinite(v)]
        return f"{statistics.fmean(ok):.3f}" if ok else "diverged"

    parts: list[str] = []
    present = [n for n in ("noisy", "bnlab", "none") if n in by_norm]
    if present:
        parts.append(
            "final test accuracy " + " vs ".join(f"{acc(n)} ({NORM_LABELS[n]})" for n in present)
        )
    bn, none = by_norm.get("bnlab"), by_norm.get("none")
    if bn is not None and none is not None:
        l2_less = bn["ics_mean"] < none["ics_mean"]
        cos_more = bn["cos"] > none["cos"]
        if l2_less and cos_more:
            word = "reduced"
        elif not l2_less and not cos_more:
            word = "did not reduce"
        else:
            word = "gave mixed evidence on"
        parts.append(
            f"BN {word} internal covariate shift (mean ||G−G'|| {_g(bn['ics_mean'])} vs "
            f"{_g(none['ics_mean'])} without norm, mean cos(G, G') {bn['cos']:.3f} vs "
            f"{none['cos']:.3f})"
        )
        learning = bn["learning"] > 0 and none["learning"] > 0
        suffix = "_off" if learning else ""

        def pair(short: str) -> tuple[float, float]:
            return bn[short + suffix], none[short + suffix]

        where = (
            f"while learning (batch loss < {PLATEAU_LOSS:.2f}; {bn['learning']} and "
            f"{none['learning']} probes)"
            if learning
            else "over all probes"
        )
        compared = (
            _compare(f"median loss variation along the gradient {where}", *pair("loss_var")),
            _compare("median gradient change along the gradient", *pair("pred")),
        )
        parts += [c for c in compared if c is not None]
        if none["learning"] == 0:
            parts.append(
                f"but the network without norm never left its initial plateau (batch loss >= "
                f"{PLATEAU_LOSS:.2f} at all {none['probes']} probes), so its flat landscape goes "
                "with not learning"
            )
    if not parts:
        return "No comparable results."
    sentence = "; ".join(parts)
    if mixed:
        sentence += " (pooled over differing settings; see the table)"
    return sentence[0].upper() + sentence[1:] + "."


__all__ = ["NORM_LABELS", "PLATEAU_LOSS", "plot_controversy", "summarize_controversy"]
