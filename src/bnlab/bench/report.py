"""The benchmark's result: machine facts, every timing, the goals checked, as JSON and markdown."""

from __future__ import annotations

import datetime
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from bnlab.bench.kernels import BASELINE, LARGE_SHAPES, LENET_SHAPES, KernelResult, NativeStatus
from bnlab.bench.lenet import EpochResult

TRAIN_NAMES = (
    "fast",
    "fast_compiled",
    "native",
    "reference",
    "naive",
    "torch",
    "floor",
    "floor_alloc",
)
EVAL_NAMES = ("bnlab", "native", "naive", "torch", "floor", "floor_alloc")
# the bnlab training kernels with goals of their own, and their BN-LeNet norm names
GOAL_KERNELS = ("fast", "fast_compiled", "native")
LENET_GOAL_NORMS = ("bnlab", "bnlab_compiled", "bnlab_native")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


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
    target: str
    value: str
    met: bool


@dataclass
class BenchResult:
    machine: dict[str, Any]
    config: dict[str, Any]
    kernels: list[KernelResult] = field(default_factory=list)
    lenet: list[EpochResult] = field(default_factory=list)
    native: NativeStatus | None = None  # None: impl="native" was not asked for

    # ------------------------------------------------------------------ goals

    def _train(self, shapes: tuple[tuple[int, ...], ...]) -> list[KernelResult]:
        return [k for k in self.kernels if k.mode == "train" and k.shape in shapes]

    def goals(self) -> list[Goal]:
        """The performance goals, the training ones for each bnlab kernel that was measured.

        A native kernel that was asked for but could not be built gets one goal, not met,
        that says so (rather than silently dropping out of the list)."""
        trains = [k for k in self.kernels if k.mode == "train"]
        evals = [k for k in self.kernels if k.mode == "eval"]
        names = [n for n in GOAL_KERNELS if trains and n in trains[0].times]
        goals: list[Goal] = []
        if self.native is not None and not self.native.available:
            goals.append(
                Goal(
                    "native kernel measured",
                    "built and timed",
                    "unavailable (see the native kernel line above)",
                    False,
                )
            )
        for name in names:
            worst = max(trains, key=lambda k: k.ratio(name))
            goals.append(
                Goal(
                    f"training fwd+bwd, {name}, every case",
                    "<= 1.0x torch",
                    f"worst {worst.ratio(name):.2f}x ({_case(worst)})",
                    worst.ratio(name) <= 1.0,
                )
            )
            # the LeNet's own layout (contiguous); the goal needs all four shapes
            lenet = [k for k in self._train(LENET_SHAPES) if not k.channels_last]
            if len({k.shape for k in lenet}) == len(LENET_SHAPES):
                gm = math.exp(sum(math.log(k.ratio(name)) for k in lenet) / len(lenet))
                goals.append(
                    Goal(
                        f"training fwd+bwd, {name}, geometric mean over the 4 LeNet shapes",
                        "<= 0.7x torch",
                        f"{gm:.2f}x over {len(lenet)} cases",
                        gm <= 0.7,
                    )
                )
            large = self._train(LARGE_SHAPES)
            if large:
                worst_floor = max(large, key=lambda k: _over_floor(k, name))
                r = _over_floor(worst_floor, name)
                goals.append(
                    Goal(
                        f"training fwd+bwd, {name}, large shapes",
                        "<= 3x the memory-traffic floor",
                        f"worst {r:.1f}x ({_case(worst_floor)})",
                        r <= 3.0,
                    )
                )
        for name in [n for n in ("bnlab", "native") if evals and n in evals[0].times]:
            worst = max(evals, key=lambda k: k.ratio(name))
            goals.append(
                Goal(
                    f"eval forward, {name}, every case",
                    "<= 1.0x torch",
                    f"worst {worst.ratio(name):.2f}x ({_case(worst)})",
                    worst.ratio(name) <= 1.0,
                )
            )
        epochs = {e.norm: e for e in self.lenet}
        for norm in LENET_GOAL_NORMS:
            if norm in epochs and "torch" in epochs:
                r = epochs[norm].median_s / epochs["torch"].median_s
                goals.append(
                    Goal(f"BN-LeNet epoch, {norm}", "<= 1.0x torch", f"{r:.3f}x", r <= 1.0)
                )
        return goals

    # ------------------------------------------------------------------ output

    def to_json(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "config": self.config,
            "native": asdict(self.native) if self.native is not None else None,
            "kernels": [
                {
                    "shape": list(k.shape),
                    "layout": k.layout,
                    "mode": k.mode,
                    "compile_s": k.compile_s,
                    "times": {n: asdict(t) for n, t in k.times.items()},
                    "ratio_to_torch": {n: k.ratio(n) for n in k.times},
                }
                for k in self.kernels
            ],
            "lenet": [
                {
                    "norm": e.norm,
                    "seconds": e.seconds,
                    "median_s": e.median_s,
                    "images": e.images,
                    "warmup_s": e.warmup_s,
                }
                for e in self.lenet
            ],
            "goals": [asdict(g) for g in self.goals()],
        }

    def _clock_words(self) -> str:
        if self.config.get("clock") == "cpu":
            return "CPU time of the calling thread (one torch thread)"
        return "wall-clock time"

    def to_markdown(self) -> str:
        m = self.machine
        lines = [
            "# bnlab benchmark",
            "",
            f"{m['date']}; {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads); "
            f"torch {m['torch']}, Python {m['python']}; device {m['device']}"
            + (f" ({m['gpu']})" if "gpu" in m else "")
            + f". Load average (1, 5, 15 min) at start {m.get('loadavg_start')}, "
            f"at end {m.get('loadavg_end')}.",
            "",
            f"Median {self._clock_words()} per call in µs (ratio to "
            "torch.nn.functional.batch_norm); training = forward + backward to x, γ, β.",
        ]
        if self.native is not None:
            # its build is not in any timing below, so it is stated here
            lines += ["", f'Native kernel (impl="native"): {self.native.describe()}.']
        unavailable = self.native is not None and not self.native.available
        for mode, names in (("train", TRAIN_NAMES), ("eval", EVAL_NAMES)):
            rows = [k for k in self.kernels if k.mode == mode]
            if not rows:
                continue
            present = [n for n in names if n in rows[0].times or (n == "native" and unavailable)]
            head = ["shape", "layout", *present]
            if mode == "train" and "fast_compiled" in present:
                head.append("compile s")
            lines += ["", f"## {'Training' if mode == 'train' else 'Eval'}", ""]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for k in rows:
                cells = ["×".join(map(str, k.shape)), k.layout]
                for n in present:
                    if n not in k.times:  # native, unavailable
                        cells.append("unavailable")
                        continue
                    t = k.times[n].median_s * 1e6
                    cells.append(f"{t:.0f}" if n == BASELINE else f"{t:.0f} ({k.ratio(n):.2f}x)")
                if len(head) > len(cells):
                    cells.append(f"{k.compile_s:.1f}" if k.compile_s is not None else "")
                lines.append("| " + " | ".join(cells) + " |")
        if self.lenet:
            base = {e.norm: e for e in self.lenet}.get("torch")
            lines += [
                "",
                f"## BN-LeNet training epoch ({self.lenet[0].images} images, batch "
                f"{self.config.get('batch_size', 256)})",
                "",
                "| norm | median s | ratio to torch | rounds | untimed warm-up s |",
                "|---|---|---|---|---|",
            ]
            for e in self.lenet:
                ratio = f"{e.median_s / base.median_s:.2f}x" if base else ""
                lines.append(
                    f"| {e.norm} | {e.median_s:.2f} | {ratio} | {len(e.seconds)} | "
                    f"{e.warmup_s:.1f} |"
                )
        lines += ["", "## Goals", "", "| goal | target | measured | met |", "|---|---|---|---|"]
        for g in self.goals():
            lines.append(f"| {g.name} | {g.target} | {g.value} | {'yes' if g.met else 'no'} |")
        return "\n".join(lines) + "\n"


def _over_floor(k: KernelResult, name: str) -> float:
    return k.times[name].median_s / k.times["floor"].median_s


def _case(k: KernelResult) -> str:
    return f"{'×'.join(map(str, k.shape))} {k.layout}"


__all__ = ["BenchResult", "Goal", "cpu_model", "loadavg", "machine_info"]
