"""Where the time of one small batch-norm training call goes (docs/speed.md, "Where the time
goes"): PyTorch's fused op against bnlab's pieces, as CPU time of one thread, interleaved.

    python benchmarks/bench_overhead.py [--shape 256x120] [--reps 41]

Pieces: the layers, ``torch.nn.BatchNorm1d/2d`` and ``bnlab.nn.BatchNorm`` (the default
kernel: one C++ call per step), and that C++ call alone; the whole call through
``bnlab.functional.batch_norm`` (kernel, autograd and the running-statistics update); the same
with a kernel that does no work (the wrapper and the autograd.Function machinery alone); the
eager and the compiled forward and backward math alone; the native C++ kernel through
``batch_norm`` and called directly (no Python wrapper).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from bnlab.bench.modules import torch_layer
from bnlab.bench.timing import time_interleaved
from bnlab.cli.bench import parse_shapes
from bnlab.functional import batch_norm, native
from bnlab.functional import fast as fast_mod
from bnlab.nn import BatchNorm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=parse_shapes, default=((256, 120),))
    parser.add_argument("--reps", type=int, default=41)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    (shape,) = args.shape
    c = shape[1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).requires_grad_()
    w = (torch.rand(c, generator=gen) + 0.5).requires_grad_()
    b = torch.randn(c, generator=gen).requires_grad_()
    g = torch.randn(shape, generator=gen)
    rm, rv = torch.zeros(c), torch.ones(c)
    params = (x, w, b)
    xd, wd, bd = x.detach(), w.detach(), b.detach()

    with torch.no_grad():  # precomputed results for a kernel that does no work
        y0, mean0, var0, invstd0 = fast_mod._forward(xd, wd, bd, 1e-5, "eager")
        grads0 = fast_mod._backward(g, xd, mean0, invstd0, wd, "eager")
    batch_norm(x, w, b, rm, rv, training=True, impl="compiled").y.backward(g)  # compile

    real_forward, real_backward = fast_mod._forward, fast_mod._backward
    ext = native.build_native()

    def machinery() -> object:  # the eager kernel's Function with free forward and backward
        fast_mod._forward = lambda *a: (y0.clone(), mean0, var0, invstd0)
        fast_mod._backward = lambda *a: grads0
        try:
            y = batch_norm(x, w, b, rm, rv, training=True, impl="eager").y
            return torch.autograd.grad(y, params, g)
        finally:
            fast_mod._forward, fast_mod._backward = real_forward, real_backward

    def no_grad(fn: object) -> object:
        def run() -> object:
            with torch.no_grad():
                return fn()  # type: ignore[operator]

        return run

    layer, oracle = BatchNorm(c), torch_layer(c, len(shape))
    buffers = (layer.running_mean, layer.running_var, layer.num_batches_tracked)
    layer_call = (x, layer.weight, layer.bias, *buffers, 1e-5, 0.1, False, True, True, -1, c)
    layer_params, oracle_params = (x, *layer.parameters()), (x, *oracle.parameters())

    fns = {
        "torch nn.BatchNorm, fwd+bwd": lambda: torch.autograd.grad(oracle(x), oracle_params, g),
        "bnlab BatchNorm (default), fwd+bwd": lambda: torch.autograd.grad(
            layer(x), layer_params, g
        ),
        "C++ layer_forward alone, fwd+bwd": lambda: torch.autograd.grad(
            ext.layer_forward(*layer_call), layer_params, g
        ),
        "torch nn.BatchNorm, forward only": no_grad(lambda: oracle(x)),
        "bnlab BatchNorm, forward only": no_grad(lambda: layer(x)),
        "native.layer_forward(layer, x) only": no_grad(lambda: native.layer_forward(layer, x)),
        "C++ layer_forward alone, forward only": no_grad(lambda: ext.layer_forward(*layer_call)),
        "torch F.batch_norm, fwd+bwd": lambda: torch.autograd.grad(
            F.batch_norm(x, rm, rv, w, b, training=True), params, g
        ),
        "bnlab eager, fwd+bwd": lambda: torch.autograd.grad(
            batch_norm(x, w, b, rm, rv, training=True, impl="eager").y, params, g
        ),
        "bnlab compiled, fwd+bwd": lambda: torch.autograd.grad(
            batch_norm(x, w, b, rm, rv, training=True, impl="compiled").y, params, g
        ),
        "bnlab native, fwd+bwd": lambda: torch.autograd.grad(
            batch_norm(x, w, b, rm, rv, training=True, impl="native").y, params, g
        ),
        "native C++ call alone, fwd+bwd": lambda: torch.autograd.grad(
            ext.train_update(x, w, b, 1e-5, rm, rv, 0.1, True)[0], params, g
        ),
        "torch F.batch_norm, forward only": no_grad(
            lambda: F.batch_norm(x, rm, rv, w, b, training=True)
        ),
        "native C++ call alone, forward only": no_grad(
            lambda: ext.train_update(x, w, b, 1e-5, rm, rv, 0.1, True)
        ),
        "wrapper + Function, no math": machinery,
        "eager forward math": no_grad(lambda: real_forward(xd, wd, bd, 1e-5, "eager")),
        "eager backward math": no_grad(lambda: real_backward(g, xd, mean0, invstd0, wd, "eager")),
        "compiled forward call": no_grad(lambda: real_forward(xd, wd, bd, 1e-5, "compiled")),
        "compiled backward call": no_grad(
            lambda: real_backward(g, xd, mean0, invstd0, wd, "compiled")
        ),
    }
    times = time_interleaved(
        fns,  # type: ignore[arg-type]
        reps=args.reps,
        warmup=20,
        min_sample_s=0.005,
        sync=lambda: None,
        clock="cpu",
    )
    print(f"shape {shape}, CPU time of one thread, median of {args.reps} interleaved samples")
    for name, t in times.items():
        print(f"  {name:36} {t.median_s * 1e6:8.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
