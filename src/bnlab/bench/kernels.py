"""One batch-norm call, timed for every contender on the same tensors.

Contenders (training: forward and backward to x, γ and β; eval: forward only, without grad):

    native         bnlab.batch_norm(impl="native"), the fused C++ kernel: the default
                   (impl="auto") on the CPU wherever it is built (its load is timed apart, by
                   :func:`prepare_native`, which never compiles)
    eager          bnlab.batch_norm(impl="eager"), the analytic kernel in eager PyTorch
                   operations: the default where the C++ kernel is not built
    compiled       bnlab.batch_norm(impl="compiled"), after its compile (timed apart)
    reference      bnlab.batch_norm(impl="reference"), autograd through the readable math
    naive          the chapter's from-scratch formula, through autograd
    torch          torch.nn.functional.batch_norm, PyTorch's C++/CUDA kernel
    floor          the bytes a fused kernel must move, moved by plain copies into
                   preallocated buffers: training reads x, writes y, reads dy and x and writes
                   dx (5 tensor-sized transfers); eval reads x and writes y (2)
    floor_alloc    the same copies into newly allocated y and dx, as every contender's outputs
                   are: on large tensors the allocator returns fresh pages from the OS, and
                   their first touch (page faults, zeroing) costs more than the copy

In eval the eager bnlab kernels share one path (running statistics folded into a scale and a
shift), so it is listed once, as "bnlab"; "native" has its own one-pass C++ eval kernel and is
listed beside it. The native kernel is CPU-only (on other devices it runs the eager kernel), so it
is measured on the CPU only. :mod:`bnlab.bench.modules` times the layers as users build them.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from bnlab.bench.timing import (
    Clock,
    Ratio,
    Timing,
    clock_function,
    paired_ratio,
    synchronizer,
    time_interleaved,
)
from bnlab.functional import fast as fast  # registers the fast kernels
from bnlab.functional import native as native_ext  # registers impl="native" and "auto"
from bnlab.functional.batch_norm import batch_norm

Mode = Literal["train", "eval"]

LENET_SHAPES: tuple[tuple[int, ...], ...] = (
    (256, 6, 24, 24),
    (256, 16, 8, 8),
    (256, 120),
    (256, 84),
)
LARGE_SHAPES: tuple[tuple[int, ...], ...] = ((32, 256, 14, 14), (64, 64, 56, 56))
SHAPES = LENET_SHAPES + LARGE_SHAPES
BASELINE = "torch"


def naive_batch_norm(
    X: Tensor,
    gamma: Tensor,
    beta: Tensor,
    moving_mean: Tensor,
    moving_var: Tensor,
    eps: float,
    momentum: float,
    *,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The chapter's formula as the chapter writes it (d2l.ai, "Batch Normalization"):
    mean, ((X - mean) ** 2).mean(...), X_hat = (X - mean) / sqrt(var + eps),
    Y = gamma * X_hat + beta; with the mode passed in rather than read from the grad state."""
    if not training:
        X_hat = (X - moving_mean) / torch.sqrt(moving_var + eps)
    else:
        if X.ndim == 2:
            mean = X.mean(dim=0)
            var = ((X - mean) ** 2).mean(dim=0)
        else:
            dims = (0, *range(2, X.ndim))
            mean = X.mean(dim=dims, keepdim=True)
            var = ((X - mean) ** 2).mean(dim=dims, keepdim=True)
        X_hat = (X - mean) / torch.sqrt(var + eps)
        moving_mean = (1.0 - momentum) * moving_mean + momentum * mean
        moving_var = (1.0 - momentum) * moving_var + momentum * var
    Y = gamma * X_hat + beta
    return Y, moving_mean.detach(), moving_var.detach()


@dataclass(frozen=True)
class NativeStatus:
    """Whether the C++ kernel could be measured, and what loading it cost this process."""

    available: bool
    build_s: float | None  # seconds to load the build (or, if this process made it, to compile)
    was_cached: bool | None  # True: an existing build was loaded, nothing compiled
    loaded_before: bool  # already loaded in this process before the benchmark asked for it
    error: str | None  # why it is unavailable
    cache_limit_bytes: int | None = None  # the output cache's limit (0: off)
    path: str | None = None  # the build directory

    def describe(self) -> str:
        if not self.available:
            return f"unavailable: {self.error}"
        how = "loaded from its build" if self.was_cached else "compiled in this process"
        text = f"{how} in {self.build_s:.3f} s" + (
            " (before the benchmark started)" if self.loaded_before else ""
        )
        if self.path is not None:
            text += f" ({self.path})"
        if self.cache_limit_bytes is not None:
            limit = self.cache_limit_bytes
            text += f"; output cache {'off' if limit == 0 else f'up to {limit / 2**20:g} MiB'}"
        return text


def prepare_native(device: torch.device) -> NativeStatus:
    """Load the C++ kernel's build once, before any timing, and say what it cost.

    It never compiles: the benchmark measures what a user's default gets. Without a build the
    kernel is unavailable, with the reason and the fix (``bnlab build``), and the default
    contenders run the eager kernel, as a user's would.
    """
    if device.type != "cpu":
        return NativeStatus(
            False,
            None,
            None,
            False,
            f"the native kernel is CPU-only (on {device.type} it runs the eager kernel)",
        )
    loaded_before = native_ext.native_load() is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", native_ext.NativeKernelWarning)  # reported instead
        module = native_ext.load_native()
    load = native_ext.native_load()
    if module is None or load is None:
        reason = native_ext.unavailable_reason() or "not loaded"
        return NativeStatus(False, None, None, loaded_before, f"{reason}. {native_ext.FIX}")
    limit = native_ext.output_cache_info()["limit_bytes"]
    return NativeStatus(
        True, load.seconds, not load.compiled, loaded_before, None, limit, str(load.path)
    )


@dataclass(frozen=True)
class KernelResult:
    shape: tuple[int, ...]
    channels_last: bool
    mode: Mode
    times: dict[str, Timing]
    compile_s: float | None  # first call of "compiled" (forward + backward compiles)
    threads: int = 1  # torch.get_num_threads() during the measurement

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"

    def ratio(self, name: str) -> float:
        return self.times[name].median_s / self.times[BASELINE].median_s

    def paired_ratio(self, name: str) -> Ratio:
        """``name`` / torch per interleaved round: median and 95% confidence interval."""
        return paired_ratio(self.times[name], self.times[BASELINE])


def _inputs(
    shape: tuple[int, ...], channels_last: bool, device: torch.device, seed: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    g = torch.randn(shape, generator=gen)
    c = shape[1]
    w = torch.rand(c, generator=gen) + 0.5
    b = torch.randn(c, generator=gen)
    x, g, w, b = (t.to(device) for t in (x, g, w, b))
    if channels_last:
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x, g = x.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
    rm = torch.zeros(c, device=device)
    rv = torch.ones(c, device=device)
    return x, g, w, b, rm, rv


def _floor(x: Tensor, g: Tensor, mode: Mode, allocate: bool) -> Callable[[], object]:
    y_buf, dx_buf, x_buf = (torch.empty_like(x) for _ in range(3))
    xd = x.detach()
    if mode == "eval":
        return (lambda: xd.clone()) if allocate else (lambda: y_buf.copy_(xd))
    half = x.numel() // 2
    xs = xd.reshape(-1)[:half]  # one more read of x: a copy of half moves as many bytes
    xs_buf = x_buf.reshape(-1)[:half]

    def run() -> None:
        if allocate:
            xd.clone()  # read x, write a new y
            g.clone()  # read dy, write a new dx
        else:
            y_buf.copy_(xd)  # read x, write y
            dx_buf.copy_(g)  # read dy, write dx
        xs_buf.copy_(xs)  # read x again

    return run


def _contenders(
    shape: tuple[int, ...],
    channels_last: bool,
    mode: Mode,
    device: torch.device,
    compiled: bool,
    seed: int,
    native: bool = False,
) -> dict[str, Callable[[], object]]:
    x, g, w, b, rm, rv = _inputs(shape, channels_last, device, seed)
    eps, momentum = 1e-5, 0.1
    gshape = (1, shape[1]) + (1,) * (len(shape) - 2)  # the chapter's gamma shape
    gamma, beta = w.view(gshape).clone(), b.view(gshape).clone()
    mm, mv = torch.zeros(gshape, device=device), torch.ones(gshape, device=device)
    fns: dict[str, Callable[[], object]] = {}
    if mode == "eval":

        def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
            def run() -> object:
                with torch.no_grad():
                    return fn()

            return run

        fns["bnlab"] = no_grad(lambda: batch_norm(x, w, b, rm, rv, training=False).y)
        if native:
            fns["native"] = no_grad(
                lambda: batch_norm(x, w, b, rm, rv, training=False, impl="native").y
            )
        fns["naive"] = no_grad(
            lambda: naive_batch_norm(x, gamma, beta, mm, mv, eps, momentum, training=False)[0]
        )
        fns["torch"] = no_grad(
            lambda: F.batch_norm(x, rm, rv, w, b, training=False, momentum=momentum, eps=eps)
        )
        fns["floor"] = _floor(x, g, mode, allocate=False)
        fns["floor_alloc"] = _floor(x, g, mode, allocate=True)
        return fns

    for t in (x, w, b, gamma, beta):
        t.requires_grad_(True)
    params = (x, w, b)

    def bnlab(impl: str) -> Callable[[], object]:
        def run() -> object:
            y = batch_norm(x, w, b, rm, rv, training=True, momentum=momentum, eps=eps, impl=impl).y
            return torch.autograd.grad(y, params, g)

        return run

    def naive() -> object:
        y = naive_batch_norm(x, gamma, beta, mm, mv, eps, momentum, training=True)[0]
        return torch.autograd.grad(y, (x, gamma, beta), g)

    def builtin() -> object:
        y = F.batch_norm(x, rm, rv, w, b, training=True, momentum=momentum, eps=eps)
        return torch.autograd.grad(y, params, g)

    fns["eager"] = bnlab("eager")
    if compiled:
        fns["compiled"] = bnlab("compiled")
    if native:
        fns["native"] = bnlab("native")
    fns["reference"] = bnlab("reference")
    fns["naive"] = naive
    fns["torch"] = builtin
    fns["floor"] = _floor(x, g, mode, allocate=False)
    fns["floor_alloc"] = _floor(x, g, mode, allocate=True)
    return fns


def bench_kernel(
    shape: tuple[int, ...],
    *,
    channels_last: bool,
    mode: Mode,
    device: torch.device,
    reps: int,
    warmup: int,
    min_sample_s: float,
    compiled: bool = True,
    seed: int = 0,
    clock: Clock = "wall",
    native: bool = False,
) -> KernelResult:
    """Time every contender on one (shape, memory format, mode) case.

    With ``native``, impl="native" is timed too; build it first (:func:`prepare_native`, as
    :func:`bnlab.bench.run_benchmark` does) to report the build apart. Its build is loaded
    here, before timing, in any case, so that it never lands in a timed call.
    """
    clock_function(clock)  # reject a bad clock before any work
    if native:
        if device.type != "cpu":
            raise ValueError(f"native: the native kernel is CPU-only, got device {device}.")
        native_ext.build_native()  # loaded once per process: free after the first call
    fns = _contenders(shape, channels_last, mode, device, compiled, seed, native)
    sync = synchronizer(device)
    compile_s = None
    if "compiled" in fns:  # the first call compiles forward and backward: timed apart
        start = time.perf_counter()  # always wall time: compilation runs in subprocesses too
        fns["compiled"]()
        sync()
        compile_s = time.perf_counter() - start
    times = time_interleaved(
        fns, reps=reps, warmup=warmup, min_sample_s=min_sample_s, sync=sync, clock=clock
    )
    return KernelResult(
        tuple(shape), channels_last, mode, times, compile_s, torch.get_num_threads()
    )


def kernel_cases(
    shapes: tuple[tuple[int, ...], ...] = SHAPES,
) -> list[tuple[tuple[int, ...], bool, Mode]]:
    """(shape, channels_last, mode) for every shape, both memory formats where the rank has
    two (>= 4), training and eval."""
    out: list[tuple[tuple[int, ...], bool, Mode]] = []
    for shape in shapes:
        for cl in (False, True) if len(shape) in (4, 5) else (False,):
            for mode in ("train", "eval"):
                out.append((shape, cl, mode))  # type: ignore[arg-type]
    return out


__all__ = [
    "BASELINE",
    "LARGE_SHAPES",
    "LENET_SHAPES",
    "SHAPES",
    "KernelResult",
    "NativeStatus",
    "bench_kernel",
    "kernel_cases",
    "naive_batch_norm",
    "prepare_native",
]
