"""The fast training kernel: analytic backward, one scale and shift, compiled where it pays.

Per channel c, over its n = N·∏spatial values (Ioffe & Szegedy, 2015, arXiv:1502.03167, §3):

    forward     μ, σ² = batch moments,   invstd = 1 / sqrt(σ² + ε)
                y = x · s + t,           s = γ · invstd,   t = β - μ · s
    backward    ∂β = Σ dy,   ∂γ = Σ dy · x̂,   x̂ = (x - μ) · invstd
                ∂x = s · (dy - ∂β / n - x̂ · ∂γ / n)

Only x, μ and invstd (and γ) are saved for the backward pass; the naive formula's autograd
graph keeps several input-sized intermediates and runs a kernel per operation to differentiate
them.

Statistics without E[x²] - E[x]² cancellation, by the corrected two-pass algorithm (Chan,
Golub & LeVeque, 1983), eager and compiled alike:

    m₀ = Σx / n,  d = x - m₀,  δ = Σd / n,  μ = m₀ + δ,  σ² = Σd² / n - δ²

δ repairs the rounding error of m₀ (δ² ≤ Σd²/n, so nothing cancels). Without it a float32
channel with mean 1e4 and std 1e-2 loses tens of percent of its variance, and so does
inductor's lowering of ``torch.var_mean`` for such a channel (tests/test_fast.py).

Layouts. Every input is seen as one of two contiguous views, without a copy where possible:
``rows`` (M, C) for (N, C) and channels-last inputs of any rank (M = N·∏spatial), reduced over
axis 0; ``ncl`` (N, C, L) for contiguous inputs of rank >= 3, reduced over axes 0 and 2. The
output has the input's memory format. float16/bfloat16 are computed in float32 and returned in
their own dtype; the statistics are float32.

Kernels, registered for ``batch_norm(..., impl=...)``:

    "eager"                eager PyTorch operations, never compiles
    "compiled"             compiles each case on its first call
    "eager_then_compiled"  eager until a case's compilation pays (below), then compiled

(The default, ``impl="auto"``, is the C++ kernel of :mod:`bnlab.functional.native` on the CPU
where it is built, and "eager" elsewhere.)

Compiled and eager kernels round differently (a few float32 ulps), so a run stays bitwise
reproducible, and resumes exactly, with "eager" or "compiled"; "eager_then_compiled" switches
kernels after a time that depends on the machine's speed.

A *case* is (forward or backward, layout, view shape, dtype, device, affine, ε). Compiled
kernels come from ``make_fx`` + ``torch._inductor.compile`` (C++/OpenMP on CPU, Triton on CUDA),
keyed by the case, so a call pays one dict lookup instead of TorchDynamo's guards.

When compilation pays ("eager_then_compiled"): a case is compiled once the eager time already
spent on it reaches the expected compile time (the last compile time measured in this process,
or :data:`INITIAL_COMPILE_ESTIMATE_S` before the first). This is the rent-or-buy rule: a run never
spends on compiling more than it has already spent running that case eagerly, so compilation
at most doubles any case's cost, and a short run (a test, a few batches) never compiles. The
measurements behind it are in docs/speed.md.

Where the compiled or eager fast path cannot be used, the kernel falls back to the reference
math: under ``torch.func`` transforms and forward-mode AD. Double backward (``create_graph=
True``) recomputes the backward from x with differentiable operations, so higher-order
gradients are exact. Under ``torch.compile`` the eager math is traced and fused into the
caller's graph.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final, Literal

import torch
from torch import Tensor
from torch.autograd import forward_ad

from bnlab.functional.batch_norm import reference_train, register_train_kernel
from bnlab.functional.core import accumulation_dtype

Layout = Literal["rows", "ncl"]
Policy = Literal["auto", "eager", "compiled"]

#: Expected seconds to compile one kernel before any was measured in this process: on the
#: 2-core reference machine a further kernel takes 0.3-0.8 s with a warm inductor cache and
#: 1.7-2.7 s without; the first in a process several seconds more (docs/speed.md).
INITIAL_COMPILE_ESTIMATE_S: Final = 2.0


# --------------------------------------------------------------------------- layouts


def _canonical(t: Tensor) -> tuple[Tensor, Layout]:
    """A contiguous ``rows`` (M, C) or ``ncl`` (N, C, L) view of ``t``, copying only odd strides."""
    c = t.shape[1]
    if t.ndim == 2:
        return (t if t.is_contiguous() else t.contiguous()), "rows"
    if t.is_contiguous():
        return t.view(t.shape[0], c, -1), "ncl"
    last = t.movedim(1, -1)  # channels-last input: (N, *spatial, C) is contiguous
    if last.is_contiguous():
        return last.view(-1, c), "rows"
    return t.contiguous().view(t.shape[0], c, -1), "ncl"


def _as_layout(t: Tensor, layout: Layout) -> Tensor:
    """``t`` (a gradient, shaped like the input) in the input's ``layout``, contiguous."""
    c = t.shape[1]
    if layout == "ncl":
        v = t.reshape(t.shape[0], c, -1)
    else:
        v = t.movedim(1, -1).reshape(-1, c) if t.ndim > 2 else t
    return v if v.is_contiguous() else v.contiguous()


def _restore(v: Tensor, like: Tensor, layout: Layout) -> Tensor:
    """Undo :func:`_canonical`: shape ``like``, keeping ``v``'s memory order."""
    if layout == "rows" and like.ndim > 2:
        return v.view(like.shape[0], *like.shape[2:], like.shape[1]).movedim(-1, 1)
    return v.view(like.shape)


def _reduce_dims(layout: Layout) -> tuple[int, ...]:
    return (0,) if layout == "rows" else (0, 2)


# --------------------------------------------------------------------------- the math


def _row_groups(m: int, c: int) -> int:
    """How many slabs to cut the M rows of a large (M, C) reduction into, for the compiled
    kernels: inductor sums an (M, C) tensor over M once per block of 8 channels, streaming all M
    rows each time; summed as (G, M/G, C) over the slabs and then over G, each slab stays in
    cache (a 1.15-1.7x faster forward kernel on (36864, 6), (200704, 64) and (6272, 256))."""
    if m * c < 1 << 16:
        return 1
    return next((g for g in range(64, 7, -1) if m % g == 0), 1)


def _sum_rows(t: Tensor, groups: int) -> Tensor:
    """Σ over axis 0 of (M, C), as partial sums over ``groups`` slabs of rows."""
    if groups == 1:
        return t.sum(0)
    return t.view(groups, t.shape[0] // groups, t.shape[1]).sum(1).sum(0)


def _forward_math(
    v: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    layout: Layout,
    groups: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, μ, σ², invstd) for the view ``v``; statistics (C,) in the accumulation dtype.

    Few operations, since on small inputs each costs more in dispatch than in arithmetic; the
    temporaries are overwritten in place (this runs without autograd recording it). ``groups``
    > 1 (rows only) sums over slabs of rows, for the compiled kernels (:func:`_row_groups`).
    """
    acc = accumulation_dtype(v.dtype)
    xa = v.to(acc)
    n = v.numel() // v.shape[1]
    rows = layout == "rows"
    if rows and groups > 1:
        m0 = _sum_rows(xa, groups).div_(n)
        d = xa - m0
        delta = _sum_rows(d, groups).div_(n)
        sum_sq = _sum_rows(d * d, groups)
    elif rows:  # (M, C): reductions over axis 0
        m0 = xa.mean(0)
        d = xa - m0
        delta = d.mean(0)  # the rounding error of m0, up to sign
        sum_sq = torch.linalg.vecdot(d, d, dim=0)
    else:  # (N, C, L): reductions over axes 0 and 2
        m0 = xa.sum((0, 2)).div_(n)
        d = xa - m0.view(1, -1, 1)
        delta = d.sum((0, 2)).div_(n)
        sum_sq = (d * d).sum((0, 2))
    var = sum_sq.div_(n).addcmul_(delta, delta, value=-1.0).clamp_min_(0.0)
    invstd = (var + eps).rsqrt_()
    scale = invstd if weight is None else invstd * weight.to(acc)
    # y = (x - μ)·s + β = d·s + (β - δ·s)
    if bias is None:
        shift = delta.mul(scale).neg_()
    else:
        shift = torch.addcmul(bias.to(acc), delta, scale, value=-1.0)
    if rows:
        y = torch.addcmul(shift, d, scale)
    else:
        y = d.mul_(scale.view(1, -1, 1)).add_(shift.view(1, -1, 1))
    return y.to(v.dtype), m0.add_(delta), var, invstd


def _backward_math(
    dy: Tensor,
    v: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    layout: Layout,
    groups: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """(∂x in the view's layout and dtype, ∂γ, ∂β), the last two in the accumulation dtype.

    With autograd recording (double backward) the same formula runs out of place; ``groups``
    as in :func:`_forward_math`.
    """
    acc = accumulation_dtype(v.dtype)
    n = v.numel() // v.shape[1]
    rows = layout == "rows"
    # out of place with autograd recording, and for a batched dy (is_grads_batched=True: a
    # hidden batch axis that x's tensors cannot take in place)
    record = torch.is_grad_enabled() or _is_batched(dy)
    dya = dy.to(acc)
    xc = v.to(acc) - (mean if rows else mean.view(1, -1, 1))
    if rows and groups > 1:
        sum_dy = _sum_rows(dya, groups)
        sum_dy_xc = _sum_rows(dya * xc, groups)
    elif rows:
        sum_dy = dya.sum(0)  # ∂β
        sum_dy_xc = torch.linalg.vecdot(dya, xc, dim=0)  # ∂γ / invstd
    else:
        sum_dy = dya.sum((0, 2))
        sum_dy_xc = (dya * xc).sum((0, 2))
    scale = invstd if weight is None else invstd * weight.to(acc)
    # ∂x = s·dy + xc·k + c,  k = -s·invstd²·Σ(dy·xc)/n,  c = -s·Σdy/n
    k = sum_dy_xc * invstd * invstd * scale * (-1.0 / n)
    c = sum_dy * scale * (-1.0 / n)
    if rows:
        dx = torch.addcmul(c, dya, scale)
        dx = dx.addcmul(xc, k) if record else dx.addcmul_(xc, k)
    else:
        k, c, s3 = k.view(1, -1, 1), c.view(1, -1, 1), scale.view(1, -1, 1)
        dx = xc * k + c + dya * s3 if record else xc.mul_(k).add_(c).add_(dya * s3)
    return dx.to(v.dtype), sum_dy_xc * invstd, sum_dy


# --------------------------------------------------------------------------- compiled kernels


@dataclass
class CaseStats:
    """What the kernel cache knows about one case (see :func:`kernel_cases`)."""

    key: tuple[Any, ...]
    calls: int = 0  # calls of any kind
    eager_s: float = 0.0  # time spent in the eager math
    compile_s: float | None = None  # time the compile took, None if not compiled
    failed: bool = False  # compilation raised: the case stays eager
    fn: Callable[..., Sequence[Tensor]] | None = None


_CASES: dict[tuple[Any, ...], CaseStats] = {}
_last_compile_s: float | None = None
_warned_compile = False


def kernel_cases() -> list[CaseStats]:
    """A snapshot of the per-case statistics (calls, eager time, compile time)."""
    return list(_CASES.values())


def clear_kernel_cache() -> None:
    """Forget every compiled kernel and every case's history (the compile estimate too)."""
    global _last_compile_s
    _CASES.clear()
    _last_compile_s = None


@contextmanager
def fresh_kernel_cache() -> Iterator[None]:
    """Run the block with an empty kernel cache and compile estimate, as a new process would;
    the previous cache is back afterwards (compiled kernels made inside are dropped)."""
    global _CASES, _last_compile_s
    saved = _CASES, _last_compile_s
    _CASES, _last_compile_s = {}, None
    try:
        yield
    finally:
        _CASES, _last_compile_s = saved


def compile_estimate_s() -> float:
    """The expected seconds to compile one kernel, used by the "eager_then_compiled" policy."""
    return INITIAL_COMPILE_ESTIMATE_S if _last_compile_s is None else _last_compile_s


def _compile(fn: Callable[..., tuple[Tensor, ...]], args: list[Tensor]) -> Callable[..., Any]:
    """An inductor kernel for ``fn`` at exactly these shapes, strides, dtypes and device."""
    import torch._inductor  # costs ~2 s on first import; only paid by a compiling run
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.no_grad():
        gm = make_fx(fn, tracing_mode="fake")(*args)
    return torch._inductor.compile(gm, list[Any](args))


def _case(key: tuple[Any, ...]) -> CaseStats:
    case = _CASES.get(key)
    if case is None:
        case = _CASES[key] = CaseStats(key)
    return case


def _ready(case: CaseStats, policy: Policy, build: Callable[[], Callable[..., Any]]) -> bool:
    """True if ``case`` has a compiled kernel now, compiling it if the policy says so."""
    if case.fn is not None:
        return True
    if case.failed:
        return False
    if policy == "auto" and case.eager_s < compile_estimate_s():
        return False
    global _last_compile_s, _warned_compile
    start = time.perf_counter()
    try:
        case.fn = build()
    except Exception as e:  # no C++ compiler, unsupported backend: stay correct, stay eager
        case.failed = True
        if not _warned_compile:
            _warned_compile = True
            warnings.warn(
                f"bnlab fast batch norm: compiling a kernel failed ({type(e).__name__}: {e}); "
                "using the eager kernels. Pass impl='eager' to skip compilation.",
                RuntimeWarning,
                stacklevel=4,
            )
        return False
    case.compile_s = _last_compile_s = time.perf_counter() - start
    return True


def _affine_args(weight: Tensor | None, bias: Tensor | None) -> list[Tensor]:
    return [t for t in (weight, bias) if t is not None]


def _forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, policy: Policy
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y shaped like x, μ, σ², invstd)."""
    v, layout = _canonical(x)
    if policy == "eager" or torch.compiler.is_compiling():  # (compiling: traced, fused there)
        y, mean, var, invstd = _forward_math(v, weight, bias, eps, layout)
        return _restore(y, x, layout), mean, var, invstd
    key = (
        "forward",
        layout,
        tuple(v.shape),
        v.stride(),
        v.dtype,
        v.device,
        None if weight is None else weight.dtype,
        None if bias is None else bias.dtype,
        eps,
    )
    case = _case(key)
    case.calls += 1
    has_w, has_b = weight is not None, bias is not None
    args = [v, *_affine_args(weight, bias)]

    groups = _row_groups(*v.shape) if layout == "rows" else 1

    def kernel(v: Tensor, *affine: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        w = affine[0] if has_w else None
        b = affine[-1] if has_b else None
        return _forward_math(v, w, b, eps, layout, groups)

    if _ready(case, policy, lambda: _compile(kernel, args)):
        assert case.fn is not None
        y, mean, var, invstd = case.fn(*args)
    else:
        start = time.perf_counter()
        y, mean, var, invstd = _forward_math(v, weight, bias, eps, layout)
        case.eager_s += time.perf_counter() - start
    return _restore(y, x, layout), mean, var, invstd


def _backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    policy: Policy,
) -> tuple[Tensor, Tensor, Tensor]:
    """(∂x shaped like x, ∂γ, ∂β), the last two in the accumulation dtype."""
    v, layout = _canonical(x)
    g = _as_layout(dy, layout)
    if policy == "eager" or torch.compiler.is_compiling():
        dx, dw, db = _backward_math(g, v, mean, invstd, weight, layout)
        return _restore(dx, x, layout), dw, db
    key = (
        "backward",
        layout,
        tuple(v.shape),
        v.stride(),
        v.dtype,
        g.dtype,
        v.device,
        None if weight is None else weight.dtype,
    )
    case = _case(key)
    case.calls += 1
    args = [g, v, mean, invstd, *_affine_args(weight, None)]

    groups = _row_groups(*v.shape) if layout == "rows" else 1

    def kernel(g: Tensor, v: Tensor, mean: Tensor, invstd: Tensor, *w: Tensor) -> Any:
        return _backward_math(g, v, mean, invstd, w[0] if w else None, layout, groups)

    if _ready(case, policy, lambda: _compile(kernel, args)):
        assert case.fn is not None
        dx, dw, db = case.fn(*args)
    else:
        start = time.perf_counter()
        dx, dw, db = _backward_math(g, v, mean, invstd, weight, layout)
        case.eager_s += time.perf_counter() - start
    return _restore(dx, x, layout), dw, db


def _backward_differentiable(
    dy: Tensor, x: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The same backward, recomputed from x with differentiable operations (double backward)."""
    v, layout = _canonical(x)
    g = _as_layout(dy, layout)
    acc = accumulation_dtype(v.dtype)
    var, mean = torch.var_mean(v.to(acc), dim=_reduce_dims(layout), correction=0)
    invstd = torch.rsqrt(var + eps)
    dx, dw, db = _backward_math(g, v, mean, invstd, weight, layout)
    return _restore(dx, x, layout), dw, db


# --------------------------------------------------------------------------- autograd


class _FastBatchNorm(torch.autograd.Function):
    """y, μ, σ² = batch_norm(x, γ, β); only y is differentiable."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        policy: Policy,
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, var, invstd = _forward(x, weight, bias, eps, policy)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.policy = policy
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)
        return y, mean, var

    @staticmethod
    def backward(
        ctx: Any, dy: Tensor | None, _dmean: Tensor | None, _dvar: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        if dy is None:
            return None, None, None, None, None
        x, weight, mean, invstd = ctx.saved_tensors
        if torch.is_autocast_enabled(dy.device.type):  # a backward inside autocast (see above)
            with torch.autocast(dy.device.type, enabled=False):
                return _FastBatchNorm.backward(ctx, dy, _dmean, _dvar)
        if torch.is_grad_enabled():  # create_graph=True: keep the graph of the backward
            dx, dw, db = _backward_differentiable(dy, x, weight, ctx.eps)
        else:
            # a batched dy (is_grads_batched=True) cannot enter a compiled kernel: eager math
            policy: Policy = "eager" if _is_batched(dy) else ctx.policy
            dx, dw, db = _backward(dy, x, mean, invstd, weight, policy)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        return (
            dx if need_x else None,
            dw.to(weight.dtype) if need_w else None,
            db.to(ctx.bias_dtype) if need_b else None,
            None,
            None,
        )


def _is_batched(t: Tensor) -> bool:
    """``t`` carries the hidden batch axis of ``torch.autograd.grad(..., is_grads_batched=True)``
    (a vmap over the backward pass)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.is_legacy_batchedtensor(t)


def fallback_needed() -> bool:
    """torch.func transforms and forward-mode AD need the plain autograd (reference) path."""
    if torch._C._are_functorch_transforms_active():
        return True
    return getattr(forward_ad, "_current_level", -1) >= 0


def _fast_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, policy: Policy
) -> tuple[Tensor, Tensor, Tensor]:
    if torch.is_autocast_enabled(x.device.type):
        # autocast would run linalg.vecdot (the rows layout's sums) in float16/bfloat16: the
        # kernel already computes in float32 and returns the input's dtype, as torch's BN does
        with torch.autocast(x.device.type, enabled=False):
            return _fast_train(x, weight, bias, eps, policy)
    if fallback_needed():
        return reference_train(x, weight, bias, eps)
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias)
    )
    if not grad:  # no graph to record: skip the autograd.Function
        y, mean, var, _ = _forward(x, weight, bias, eps, policy)
        return y, mean, var
    y, mean, var = _FastBatchNorm.apply(x, weight, bias, eps, policy)
    return y, mean, var


def fast_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``impl="eager"``: the analytic kernel in eager PyTorch operations, never compiled."""
    return _fast_train(x, weight, bias, eps, "eager")


def fast_compiled_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``impl="compiled"``: the analytic kernel, compiled on each case's first call."""
    return _fast_train(x, weight, bias, eps, "compiled")


def fast_auto_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``impl="eager_then_compiled"``: eager, each case compiled once compilation pays (module
    docstring)."""
    return _fast_train(x, weight, bias, eps, "auto")


register_train_kernel("eager", fast_train)
register_train_kernel("compiled", fast_compiled_train)
register_train_kernel("eager_then_compiled", fast_auto_train)

__all__ = [
    "INITIAL_COMPILE_ESTIMATE_S",
    "CaseStats",
    "clear_kernel_cache",
    "compile_estimate_s",
    "fallback_needed",
    "fast_auto_train",
    "fast_compiled_train",
    "fast_train",
    "fresh_kernel_cache",
    "kernel_cases",
]
