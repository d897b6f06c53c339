"""The speed benchmark behind ``bnlab bench`` and docs/speed.md.

Three comparisons, each timed interleaved in one process, for every thread count asked for:

* the layers as users build them: ``bnlab.nn.BatchNorm(C)`` (the default kernel) against
  ``torch.nn.BatchNorm1d/2d(C)`` (:mod:`bnlab.bench.modules`);
* the functions: every bnlab kernel, the chapter's formula and a memory-traffic floor against
  ``torch.nn.functional.batch_norm`` (:mod:`bnlab.bench.kernels`);
* one BN-LeNet training epoch per norm layer (:mod:`bnlab.bench.lenet`);
* ``bnlab train`` itself on the real data, default norm against ``--norm torch``, in pairs of
  fresh processes (:mod:`bnlab.bench.train`);

and, once, the first training step of a default layer in a fresh process, import included
(:mod:`bnlab.bench.startup`). The C++ kernel's build is loaded (never compiled) before any
timing and its load time is reported; without a build it is reported unavailable, with the fix.
:func:`run_benchmark` returns a :class:`BenchResult` that writes itself as JSON and markdown.
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
    KernelResult,
    NativeStatus,
    bench_kernel,
    kernel_cases,
    prepare_native,
)
from bnlab.bench.lenet import NORMS, bench_lenet
from bnlab.bench.modules import bench_module
from bnlab.bench.report import BenchResult, loadavg, machine_info
from bnlab.bench.startup import first_step
from bnlab.bench.timing import Clock, clock_function
from bnlab.bench.train import bench_train


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how long (defaults: the full benchmark of docs/speed.md)."""

    shapes: tuple[tuple[int, ...], ...] = SHAPES  # batch-norm inputs (N, C, *spatial)
    reps: int = 41  # interleaved samples per contender; the median is reported
    warmup: int = 5  # untimed calls per contender first
    min_sample_s: float = 0.002  # a sample times enough calls to last this long
    compiled: bool = True  # also time impl="compiled" (compiles every case once)
    native: bool = True  # also time impl="native" by name (CPU only; its load is timed apart)
    functions: bool = True  # also time the functions, not only the layers
    lenet_norms: tuple[str, ...] = ("bnlab", "bnlab_eager", "bnlab_compiled", "torch", "none")
    lenet_images: int = 60000  # 0 skips the end-to-end epoch
    lenet_rounds: int = 3  # epochs per norm, interleaved
    batch_size: int = 256
    train_pairs: int = 10  # pairs of `bnlab train` runs on the real data; 0 skips them
    train_epochs: int = 3  # epochs per run; the first is not timed
    train_subset: int | None = None  # `bnlab train --subset` (None: all 60000 images)
    data_dir: str | None = None  # where the runs find Fashion-MNIST (None: as `bnlab train`)
    threads: tuple[int, ...] = (1, 2)  # torch.set_num_threads for each pass of the benchmark
    first_step: bool = True  # time a default layer's first step in a fresh process
    device: str = "cpu"
    seed: int = 0
    clock: Clock = "wall"  # "cpu": thread CPU time, robust on a busy machine (1 thread only)

    @classmethod
    def quick(cls, **overrides: object) -> BenchConfig:
        """A smoke run: every shape, few samples, a 4096-image epoch, one thread (the current
        setting), no torch.compile, no `bnlab train` runs."""
        base = cls(
            reps=5,
            warmup=2,
            min_sample_s=0.0005,
            compiled=False,
            lenet_norms=("bnlab", "bnlab_eager", "torch", "none"),
            lenet_images=4096,
            lenet_rounds=1,
            train_pairs=0,
            threads=(torch.get_num_threads(),),
        )
        return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def _check(config: BenchConfig, device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device: expected an available device, got {config.device!r} but "
            "torch.cuda.is_available() is False. Use --device cpu."
        )
    for shape in config.shapes:
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"shapes: expected (N, C, *spatial) with positive sizes, got {shape}.")
    if not config.threads or min(config.threads) < 1:
        raise ValueError(f"threads: expected positive thread counts, got {config.threads}.")
    if config.clock == "cpu" and set(config.threads) != {1}:
        raise ValueError(
            f"clock='cpu' counts the calling thread only: expected threads (1,), got "
            f"{config.threads}. Use --threads 1, or clock='wall'."
        )
    if config.clock == "cpu" and device.type != "cpu":
        raise ValueError(
            f"clock: 'cpu' measures host CPU time, which misses {device.type} work; use "
            "clock='wall' on a GPU."
        )
    if config.train_pairs < 0 or config.train_epochs < 2:
        raise ValueError(
            f"train_pairs, train_epochs: expected >= 0 and >= 2 (the first epoch is not timed), "
            f"got {config.train_pairs} and {config.train_epochs}."
        )
    unknown = [n for n in config.lenet_norms if n not in NORMS]
    if unknown:
        raise ValueError(f"lenet_norms: expected names from {sorted(NORMS)}, got {unknown}.")


def run_benchmark(
    config: BenchConfig, progress: Callable[[str], None] | None = None
) -> BenchResult:
    """Run every case of ``config``; ``progress`` gets one line per finished case."""
    device = torch.device(config.device)
    _check(config, device)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(config.threads[0])
        clock_function(config.clock)  # a bad clock fails before any measurement
        result = BenchResult(machine_info(device), dataclasses.asdict(config))
        _run(config, device, result, progress or (lambda line: None))
    finally:
        torch.set_num_threads(before)
    result.machine["loadavg_end"] = loadavg()
    return result


def _run(
    config: BenchConfig, device: torch.device, result: BenchResult, say: Callable[[str], None]
) -> None:
    status: NativeStatus = prepare_native(device)  # before any timing, reported apart
    result.native = status
    say(f"native kernel: {status.describe()}")
    native = config.native and status.available
    timing = {
        "device": device,
        "reps": config.reps,
        "warmup": config.warmup,
        "min_sample_s": config.min_sample_s,
        "seed": config.seed,
        "clock": config.clock,
    }
    train_data = config.train_pairs > 0 and _train_data(config, result)
    if config.first_step and device.type == "cpu":
        result.first_step = first_step()
        say(f"first step in a fresh process: {result.first_step.describe()}")
    for threads in config.threads:
        torch.set_num_threads(threads)
        for shape, cl, mode in kernel_cases(config.shapes):
            k = bench_module(shape, channels_last=cl, mode=mode, **timing)  # type: ignore[arg-type]
            result.modules.append(k)
            say(_line(f"{threads}t layer", k))
        if config.functions:
            for shape, cl, mode in kernel_cases(config.shapes):
                k = bench_kernel(
                    shape,
                    channels_last=cl,
                    mode=mode,
                    compiled=config.compiled,
                    native=native,
                    **timing,  # type: ignore[arg-type]
                )
                result.kernels.append(k)
                say(_line(f"{threads}t fn", k))
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
                say(f"{threads}t epoch {e.norm:14} {e.median_s:.2f}s (rounds: {e.seconds})")
        if train_data:
            try:
                result.train.append(
                    bench_train(
                        pairs=config.train_pairs,
                        threads=threads,
                        epochs=config.train_epochs,
                        device=config.device,
                        data_dir=config.data_dir,
                        subset=config.train_subset,
                        say=say,
                    )
                )
            except RuntimeError as e:  # a run failed: keep what was measured, say why
                result.train_unavailable = str(e)
                train_data = False


def _train_data(config: BenchConfig, result: BenchResult) -> bool:
    """Whether the `bnlab train` runs find Fashion-MNIST; loads it (downloading it to the cache
    as `bnlab train` would) before any run is timed, else records why not."""
    from bnlab.data import DataError, load_fashion_mnist

    try:
        load_fashion_mnist(config.data_dir, progress=False)
    except DataError as e:
        result.train_unavailable = str(e)
        return False
    return True


def _line(what: str, k: KernelResult) -> str:
    shape = "×".join(map(str, k.shape))
    times = " ".join(f"{n}={t.median_s * 1e6:.0f}µs" for n, t in k.times.items())
    return f"{what} {k.mode:5} {shape:>14} {k.layout:13} {times}"


__all__ = [
    "LARGE_SHAPES",
    "LENET_SHAPES",
    "SHAPES",
    "BenchConfig",
    "BenchResult",
    "NativeStatus",
    "run_benchmark",
]
