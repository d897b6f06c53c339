"""The speed benchmark behind ``bnlab bench`` and docs/speed.md.

Every batch-norm contender is timed on the same tensors in one process, interleaved, and
reported as a median and a ratio to ``torch.nn.functional.batch_norm``; one BN-LeNet training
epoch compares the layers end to end. The native C++ kernel is built (or loaded) once before any
timing, and its build time is reported; where it cannot be built it is reported unavailable.
:func:`run_benchmark` returns a :class:`BenchResult` that writes itself as JSON and as a
markdown table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bnlab.bench.kernels import (
    LARGE_SHAPES,
    LENET_SHAPES,
    SHAPES,
    NativeStatus,
    bench_kernel,
    kernel_cases,
    prepare_native,
)
from bnlab.bench.lenet import NORMS, bench_lenet
from bnlab.bench.report import BenchResult, loadavg, machine_info
from bnlab.bench.timing import Clock, clock_function


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how long (defaults: the full benchmark of docs/speed.md)."""

    shapes: tuple[tuple[int, ...], ...] = SHAPES  # batch-norm inputs (N, C, *spatial)
    reps: int = 41  # interleaved samples per contender; the median is reported
    warmup: int = 5  # untimed calls per contender first
    min_sample_s: float = 0.002  # a sample times enough calls to last this long
    compiled: bool = True  # also time impl="fast_compiled" (compiles every case once)
    native: bool = True  # also time impl="native" (CPU only; its build is timed apart)
    lenet_norms: tuple[str, ...] = ("bnlab", "bnlab_compiled", "bnlab_native", "torch", "none")
    lenet_images: int = 60000  # 0 skips the end-to-end epoch
    lenet_rounds: int = 3  # epochs per norm, interleaved
    batch_size: int = 256
    device: str = "cpu"
    seed: int = 0
    clock: Clock = "wall"  # "cpu": thread CPU time, robust on a busy machine (1 thread only)

    @classmethod
    def quick(cls, **overrides: object) -> BenchConfig:
        """A smoke run: every shape, few samples, a 4096-image epoch, no torch.compile (the
        native kernel is kept: its build is cached on disk, compiled only on a first run)."""
        base = cls(
            reps=5,
            warmup=2,
            min_sample_s=0.0005,
            compiled=False,
            lenet_norms=("bnlab", "bnlab_native", "torch", "none"),
            lenet_images=4096,
            lenet_rounds=1,
        )
        return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def run_benchmark(
    config: BenchConfig, progress: Callable[[str], None] | None = None
) -> BenchResult:
    """Run every case of ``config``; ``progress`` gets one line per finished case."""
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device: expected an available device, got {config.device!r} but "
            "torch.cuda.is_available() is False. Use --device cpu."
        )
    for shape in config.shapes:
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"shapes: expected (N, C, *spatial) with positive sizes, got {shape}.")
    clock_function(config.clock)  # a bad clock fails before any measurement
    if config.clock == "cpu" and device.type != "cpu":
        raise ValueError(
            f"clock: 'cpu' measures host CPU time, which misses {device.type} work; use "
            "clock='wall' on a GPU."
        )
    unknown = [n for n in config.lenet_norms if n not in NORMS]
    if unknown:
        raise ValueError(f"lenet_norms: expected names from {sorted(NORMS)}, got {unknown}.")
    result = BenchResult(machine_info(device), dataclasses.asdict(config))
    say = progress or (lambda line: None)
    native = False
    if config.native:
        status: NativeStatus = prepare_native(device)  # before any timing, reported apart
        result.native = status
        native = status.available
        say(f"native kernel: {status.describe()}")
    for shape, cl, mode in kernel_cases(config.shapes):
        k = bench_kernel(
            shape,
            channels_last=cl,
            mode=mode,
            device=device,
            reps=config.reps,
            warmup=config.warmup,
            min_sample_s=config.min_sample_s,
            compiled=config.compiled,
            seed=config.seed,
            clock=config.clock,
            native=native,
        )
        result.kernels.append(k)
        say(
            f"{mode:5} {'×'.join(map(str, shape)):>14} {k.layout:13} "
            + " ".join(f"{n}={t.median_s * 1e6:.0f}µs" for n, t in k.times.items())
        )
    if config.lenet_images:
        norms = config.lenet_norms
        if not config.compiled:
            norms = tuple(n for n in norms if n != "bnlab_compiled")
        if not native:  # not asked for, or unavailable (result.native says why)
            norms = tuple(n for n in norms if n != "bnlab_native")
        for e in bench_lenet(
            norms,
            images=config.lenet_images,
            rounds=config.lenet_rounds,
            device=device,
            batch_size=config.batch_size,
            seed=config.seed,
        ):
            result.lenet.append(e)
            say(f"epoch {e.norm:14} {e.median_s:.2f}s (rounds: {e.seconds})")
    result.machine["loadavg_end"] = loadavg()
    return result


__all__ = [
    "LARGE_SHAPES",
    "LENET_SHAPES",
    "SHAPES",
    "BenchConfig",
    "BenchResult",
    "NativeStatus",
    "run_benchmark",
]
