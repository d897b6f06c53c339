"""The benchmark's result: machine facts, every timing, the goals checked, as JSON and markdown."""

from __future__ import annotations

import datetime
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from bnlab._machine import cpu_model
from bnlab.bench.kernels import BASELINE, LARGE_SHAPES, LENET_SHAPES, KernelResult, NativeStatus
from bnlab.bench.lenet import EpochResult
from bnlab.bench.startup import FirstStep
from bnlab.bench.timing import Ratio
from bnlab.bench.train import TrainEpochs

TRAIN_NAMES = (
    "native",
    "eager",
    "compiled",
    "reference",
    "naive",
    "torch",
    "floor",
    "floor_alloc",
)
EVAL_NAMES = ("native", "bnlab", "naive", "torch", "floor", "floor_alloc")
LAYER_NAMES = ("bnlab", "bnlab_eager", "torch")
DEFAULT_LAYER = "bnlab"  # bnlab.nn.BatchNorm(C) with its default kernel
# the goals of the issue the default was built for (docs/speed.md)
LAYER_TARGET = 1.0  # layer training and eval, every case, as a ratio to torch's layer
LENET_MEAN_TARGET = 0.6  # layer training, geometric mean over the LeNet's four shapes
# `bnlab train` epoch, default norm, ratio to `--norm torch`. The in-process BN-LeNet epoch is
# shown, not checked: a few rounds in one process carry that process's speed (bench/train.py).
TRAIN_TARGET = 0.95
TRAIN_GOAL = "`bnlab train` epoch, default norm vs `--norm torch` (real data)"
FLOOR_TARGET = 3.0  # the native function on the large shapes, ratio to the traffic floor
FIRST_STEP_TARGET_S = 2.0  # a fresh process's first step, import included


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the platform has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # not on every platform
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "loadavg_start": loadavg(),  # the machine may be shared: other work skews timings
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


@dataclass
class Goal:
    name: str
    threads: int | None  # the thread count it was measured with; None: not thread-bound
    target: str
    value: str
    met: bool


def _faster(r: Ratio, target: float) -> bool:
    """A paired-ratio goal is met when the median is at most ``target`` and, where n allows an
    interval, the interval lies below 1 (faster than torch, not within the noise)."""
    return r.median <= target and (r.high is None or r.high < 1.0)


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _threads_words(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


@dataclass
class BenchResult:
    machine: dict[str, Any]
    config: dict[str, Any]
    kernels: list[KernelResult] = field(default_factory=list)  # the functions
    modules: list[KernelResult] = field(default_factory=list)  # the layers
    lenet: list[EpochResult] = field(default_factory=list)
    native: NativeStatus | None = None
    first_step: FirstStep | None = None
    train: list[TrainEpochs] = field(default_factory=list)  # `bnlab train` runs, per thread count
    train_unavailable: str | None = None  # why `bnlab train` was not (fully) timed

    def thread_counts(self) -> list[int]:
        seen = [k.threads for k in (*self.modules, *self.kernels)] + [e.threads for e in self.lenet]
        return sorted(set(seen + [t.threads for t in self.train]))

    # ------------------------------------------------------------------ goals

    def goals(self) -> list[Goal]:
        """The performance goals: the default layer against torch's per thread count, the
        native function's, and a fresh process's first step. A C++ kernel that could not be
        loaded gets a goal, not met, that says so (rather than silently dropping out)."""
        goals: list[Goal] = []
        if self.native is not None and not self.native.available:
            goals.append(
                Goal(
                    "C++ kernel available (the default's kernel on the CPU)",
                    None,
                    "built (`bnlab build`) and loaded",
                    "unavailable (see the native kernel line above)",
                    False,
                )
            )
        if self.first_step is not None:
            f = self.first_step
            goals.append(
                Goal(
                    "first training step of a default BatchNorm in a fresh process",
                    None,
                    f"compiles nothing, <= {FIRST_STEP_TARGET_S:g} s, import included",
                    f.describe(),
                    not f.compiled and f.seconds <= FIRST_STEP_TARGET_S,
                )
            )
        if self.train_unavailable is not None:
            goals.append(
                Goal(
                    TRAIN_GOAL,
                    None,
                    f"<= {TRAIN_TARGET:g}x",
                    f"not measured: {self.train_unavailable.splitlines()[0]}",
                    False,
                )
            )
        for n in self.thread_counts():
            goals += self._layer_goals(n) + self._function_goals(n) + self._train_goals(n)
        return goals

    def _train_goals(self, n: int) -> list[Goal]:
        goals: list[Goal] = []
        for t in (t for t in self.train if t.threads == n):
            r = t.ratio()
            goals.append(
                Goal(
                    TRAIN_GOAL,
                    n,
                    f"<= {TRAIN_TARGET:g}x",
                    r.describe() + ("" if r.low is None else f", {t.pairs} pairs"),
                    _faster(r, TRAIN_TARGET),
                )
            )
        return goals

    def _layer_goals(self, n: int) -> list[Goal]:
        goals: list[Goal] = []
        rows = [k for k in self.modules if k.threads == n]
        for mode, words in (("train", "layer training fwd+bwd"), ("eval", "layer eval")):
            cases = [k for k in rows if k.mode == mode]
            if not cases:
                continue
            worst = max(cases, key=lambda k: k.paired_ratio(DEFAULT_LAYER).median)
            r = worst.paired_ratio(DEFAULT_LAYER)
            goals.append(
                Goal(
                    f"{words}, default BatchNorm, every case",
                    n,
                    f"<= {LAYER_TARGET:g}x torch's layer",
                    f"worst {r.describe()} ({_case(worst)})",
                    _faster(r, LAYER_TARGET),
                )
            )
        lenet = [
            k for k in rows if k.mode == "train" and k.shape in LENET_SHAPES and not k.channels_last
        ]
        if len({k.shape for k in lenet}) == len(LENET_SHAPES):
            gm = _geomean([k.paired_ratio(DEFAULT_LAYER).median for k in lenet])
            goals.append(
                Goal(
                    "layer training fwd+bwd, default BatchNorm, geometric mean over the 4 "
                    "LeNet shapes",
                    n,
                    f"<= {LENET_MEAN_TARGET:g}x torch's layer",
                    f"{gm:.2f}x",
                    gm <= LENET_MEAN_TARGET,
                )
            )
        return goals

    def _function_goals(self, n: int) -> list[Goal]:
        goals: list[Goal] = []
        rows = [k for k in self.kernels if k.threads == n]
        for mode, words in (("train", "function training fwd+bwd"), ("eval", "function eval")):
            cases = [k for k in rows if k.mode == mode and "native" in k.times]
            if not cases:
                continue
            worst = max(cases, key=lambda k: k.ratio("native"))
            goals.append(
                Goal(
                    f"{words}, native, every case",
                    n,
                    "<= 1.0x torch.nn.functional.batch_norm",
                    f"worst {worst.ratio('native'):.2f}x ({_case(worst)})",
                    worst.ratio("native") <= 1.0,
                )
            )
        large = [
            k for k in rows if k.mode == "train" and k.shape in LARGE_SHAPES and "native" in k.times
        ]
        if large:
            worst = max(large, key=lambda k: _over_floor(k, "native"))
            r = _over_floor(worst, "native")
            goals.append(
                Goal(
                    "function training fwd+bwd, native, large shapes",
                    n,
                    f"<= {FLOOR_TARGET:g}x the memory-traffic floor",
                    f"worst {r:.1f}x ({_case(worst)})",
                    r <= FLOOR_TARGET,
                )
            )
        return goals

    # ------------------------------------------------------------------ output

    def to_json(self) -> dict[str, Any]:
        def cases(rows: list[KernelResult]) -> list[dict[str, Any]]:
            return [
                {
                    "shape": list(k.shape),
                    "layout": k.layout,
                    "mode": k.mode,
                    "threads": k.threads,
                    "compile_s": k.compile_s,
                    "times": {n: asdict(t) for n, t in k.times.items()},
                    "ratio_to_torch": {n: k.ratio(n) for n in k.times},
                }
                for k in rows
            ]

        return {
            "machine": self.machine,
            "config": self.config,
            "native": asdict(self.native) if self.native is not None else None,
            "first_step": asdict(self.first_step) if self.first_step is not None else None,
            "modules": cases(self.modules),
            "kernels": cases(self.kernels),
            "lenet": [
                {
                    "norm": e.norm,
                    "threads": e.threads,
                    "seconds": e.seconds,
                    "median_s": e.median_s,
                    "images": e.images,
                    "warmup_s": e.warmup_s,
                }
                for e in self.lenet
            ],
            "train": [
                {**asdict(t), "ratio": asdict(t.ratio()), "pairs": t.pairs} for t in self.train
            ],
            "train_unavailable": self.train_unavailable,
            "goals": [asdict(g) for g in self.goals()],
        }

    def _clock_words(self) -> str:
        if self.config.get("clock") == "cpu":
            return "CPU time of the calling thread (one torch thread)"
        return "wall-clock time"

    def _default_words(self) -> str:
        if self.native is not None and self.native.available:
            return (
                'the default kernel (impl="auto") is the C++ kernel ("native") for CPU tensors; '
                f"its build was {self.native.describe()}"
            )
        if self.native is not None:
            return (
                'the default kernel (impl="auto") is the eager kernel ("eager") here: the C++ '
                f"kernel is {self.native.describe()}"
            )
        return 'the default kernel is impl="auto"'

    def to_markdown(self) -> str:
        m = self.machine
        lines = [
            "# bnlab benchmark",
            "",
            f"{m['date']}; {m['cpu']}, {m['cores']} cores; torch {m['torch']}, Python "
            f"{m['python']}; device {m['device']}"
            + (f" ({m['gpu']})" if "gpu" in m else "")
            + f". Load average (1, 5, 15 min) at start {m.get('loadavg_start')}, "
            f"at end {m.get('loadavg_end')}.",
            "",
            f"Median {self._clock_words()} per call in µs, and its ratio to PyTorch's (lower is "
            f"faster); training = forward + backward to x, γ, β; n = {self.config.get('reps')} "
            f"interleaved rounds per case. In bnlab {self._default_words()}.",
        ]
        if self.first_step is not None:
            lines += [
                "",
                "First training step of `BatchNorm(6)` in a fresh process, import included: "
                f"{self.first_step.describe()}.",
            ]
        unavailable = self.native is not None and not self.native.available
        for n in self.thread_counts():
            lines += ["", f"## {_threads_words(n)}"]
            lines += _table(
                [k for k in self.modules if k.threads == n and k.mode == "train"],
                LAYER_NAMES,
                "Layers, training (ratio to torch.nn.BatchNorm1d/2d, median over rounds "
                "[95% confidence interval])",
                unavailable=False,
                paired=True,
            )
            lines += _table(
                [k for k in self.modules if k.threads == n and k.mode == "eval"],
                LAYER_NAMES,
                "Layers, eval",
                unavailable=False,
                paired=True,
            )
            lines += _table(
                [k for k in self.kernels if k.threads == n and k.mode == "train"],
                TRAIN_NAMES,
                "Functions, training (ratio to torch.nn.functional.batch_norm)",
                unavailable=unavailable,
            )
            lines += _table(
                [k for k in self.kernels if k.threads == n and k.mode == "eval"],
                EVAL_NAMES,
                "Functions, eval",
                unavailable=unavailable,
            )
            epochs = [e for e in self.lenet if e.threads == n]
            if epochs:
                base = {e.norm: e for e in epochs}.get("torch")
                lines += [
                    "",
                    f"### BN-LeNet training epoch ({epochs[0].images} images, batch "
                    f"{self.config.get('batch_size', 256)}, random data, one process)",
                    "",
                    "Every norm's model in this process, its epochs interleaved: where the time "
                    "goes, not a goal (a few rounds in one process carry that process's speed; "
                    "the goal is `bnlab train`'s, over pairs of fresh processes).",
                    "",
                    "| norm | median s | ratio to torch | rounds | untimed warm-up s |",
                    "|---|---|---|---|---|",
                ]
                for e in epochs:
                    ratio = f"{e.median_s / base.median_s:.2f}x" if base else ""
                    lines.append(
                        f"| {e.norm} | {e.median_s:.2f} | {ratio} | {len(e.seconds)} | "
                        f"{e.warmup_s:.1f} |"
                    )
            lines += self._train_lines(n)
        if self.train_unavailable is not None:
            lines += ["", f"`bnlab train` was not (fully) timed: {self.train_unavailable}"]
        lines += [
            "",
            "## Goals",
            "",
            "| goal | threads | target | measured | met |",
            "|---|---|---|---|---|",
        ]
        for g in self.goals():
            threads = "" if g.threads is None else str(g.threads)
            lines.append(
                f"| {g.name} | {threads} | {g.target} | {g.value} | {'yes' if g.met else 'no'} |"
            )
        return "\n".join(lines) + "\n"

    def _train_lines(self, n: int) -> list[str]:
        lines: list[str] = []
        for t in (t for t in self.train if t.threads == n):
            images = "all 60000" if t.subset is None else f"the first {t.subset}"
            lines += [
                "",
                f"### `bnlab train` epoch ({images} training images, fresh processes)",
                "",
                f"`bnlab train --epochs {t.epochs} --threads {n}` with the default norm and with "
                f"`--norm torch`, in {t.pairs} pairs of runs, the order swapped from pair to "
                "pair; a run's time is the median of its epochs after the first (training pass "
                f"only, from metrics.json). bnlab / torch: {t.ratio().describe()} (median of the "
                "pairs' ratios [sign-test 95% interval]).",
                "",
                "| pair | bnlab s | torch s | ratio |",
                "|---|---|---|---|",
            ]
            for i, (a, b) in enumerate(zip(t.seconds["bnlab"], t.seconds["torch"], strict=True)):
                lines.append(f"| {i + 1} | {a:.2f} | {b:.2f} | {a / b:.3f}x |")
        return lines


def _table(
    rows: list[KernelResult],
    names: tuple[str, ...],
    title: str,
    *,
    unavailable: bool,
    paired: bool = False,
) -> list[str]:
    """A markdown table of ``rows`` (one mode): µs per contender and the ratio to torch (with
    ``paired``, the per-round ratio's median and 95% confidence interval)."""
    if not rows:
        return []
    present = [n for n in names if n in rows[0].times or (n == "native" and unavailable)]
    head = ["shape", "layout", *present]
    compiled = "compiled" in present
    if compiled:
        head.append("compile s")
    lines = ["", f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in rows:
        cells = ["×".join(map(str, k.shape)), k.layout]
        for n in present:
            if n not in k.times:  # native, unavailable
                cells.append("unavailable")
                continue
            t = k.times[n].median_s * 1e6
            ratio = k.paired_ratio(n).describe() if paired else f"{k.ratio(n):.2f}x"
            cells.append(f"{t:.0f}" if n == BASELINE else f"{t:.0f} ({ratio})")
        if compiled:
            cells.append(f"{k.compile_s:.1f}" if k.compile_s is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _over_floor(k: KernelResult, name: str) -> float:
    return k.times[name].median_s / k.times["floor"].median_s


def _case(k: KernelResult) -> str:
    return f"{'×'.join(map(str, k.shape))} {k.layout}"


__all__ = ["BenchResult", "Goal", "loadavg", "machine_info"]
