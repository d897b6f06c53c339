"""The batch-norm layers as users build them, timed against PyTorch's on the same tensors.

Contenders (training: the layer's forward, then ``torch.autograd.grad`` to x, γ and β, with
the running statistics updated as in a training step; eval: the forward without grad):

    bnlab        ``bnlab.nn.BatchNorm(C)``, the default: impl="auto", the C++ kernel where it
                 is built (the whole step one C++ call), else the eager kernel
    bnlab_eager   ``bnlab.nn.BatchNorm(C, impl="eager")``, the eager kernel, what the default
                 runs where the C++ kernel is not built
    torch        ``torch.nn.BatchNorm1d/2d/3d(C)``, PyTorch's layer

Each layer's Python ``forward`` is part of what is timed: this is what a model pays per layer
and step, beyond the kernel the function benchmark (:mod:`bnlab.bench.kernels`) times.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from bnlab.bench.kernels import KernelResult, Mode, _inputs
from bnlab.bench.timing import Clock, clock_function, synchronizer, time_interleaved
from bnlab.nn import BatchNorm

BASELINE = "torch"


def torch_layer(c: int, rank: int) -> nn.Module:
    """PyTorch's batch norm for a rank-``rank`` input with ``c`` channels."""
    if rank in (2, 3):
        return nn.BatchNorm1d(c)
    if rank == 4:
        return nn.BatchNorm2d(c)
    if rank == 5:
        return nn.BatchNorm3d(c)
    raise ValueError(f"expected an input of rank 2 to 5 for torch's layers, got rank {rank}.")


def layers(c: int, rank: int) -> dict[str, nn.Module]:
    return {
        "bnlab": BatchNorm(c),
        "bnlab_eager": BatchNorm(c, impl="eager"),
        BASELINE: torch_layer(c, rank),
    }


def _contenders(
    shape: tuple[int, ...], channels_last: bool, mode: Mode, device: torch.device, seed: int
) -> dict[str, Callable[[], object]]:
    x, g, w, b, _, _ = _inputs(shape, channels_last, device, seed)
    fns: dict[str, Callable[[], object]] = {}
    for name, layer in layers(shape[1], len(shape)).items():
        layer.to(device).train(mode == "train")
        with torch.no_grad():  # the same γ and β for every layer
            layer.weight.copy_(w)  # type: ignore[operator]
            layer.bias.copy_(b)  # type: ignore[operator]
        fns[name] = _step(layer, x, g) if mode == "train" else _predict(layer, x)
    return fns


def _step(layer: nn.Module, x: Tensor, g: Tensor) -> Callable[[], object]:
    xr = x.detach().requires_grad_()
    inputs = (xr, *layer.parameters())
    return lambda: torch.autograd.grad(layer(xr), inputs, g)


def _predict(layer: nn.Module, x: Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return layer(x)

    return run


def bench_module(
    shape: tuple[int, ...],
    *,
    channels_last: bool,
    mode: Mode,
    device: torch.device,
    reps: int,
    warmup: int,
    min_sample_s: float,
    seed: int = 0,
    clock: Clock = "wall",
) -> KernelResult:
    """Time every layer on one (shape, memory format, mode) case, interleaved."""
    clock_function(clock)  # reject a bad clock before any work
    fns = _contenders(shape, channels_last, mode, device, seed)
    times = time_interleaved(
        fns,
        reps=reps,
        warmup=warmup,
        min_sample_s=min_sample_s,
        sync=synchronizer(device),
        clock=clock,
    )
    return KernelResult(tuple(shape), channels_last, mode, times, None, torch.get_num_threads())


__all__ = ["BASELINE", "bench_module", "layers", "torch_layer"]
