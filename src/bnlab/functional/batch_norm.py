"""Batch normalization as a pure function (Ioffe & Szegedy, 2015, arXiv:1502.03167).

Training (batch statistics over every axis but the channel axis 1):

    μ_B = mean(x),  σ²_B = mean((x - μ_B)²)            (biased, as the paper and the chapter)
    y   = γ · (x - μ_B) / sqrt(σ²_B + ε) + β

Prediction: the same with the running estimates (μ̂, σ̂²) in place of (μ_B, σ²_B).

Running-statistic update, with w the weight on the new batch:

    μ̂ ← (1 - w) · μ̂ + w · μ_B
    σ̂² ← (1 - w) · σ̂² + w · s²,   s² = σ²_B · n/(n-1) if the convention is unbiased, else σ²_B

    convention  w               default momentum  running variance
    "torch"     momentum        0.1               unbiased (PyTorch)
    "d2l"       1 - momentum    0.9               biased   (the chapter's from-scratch code)
    "mxnet"     1 - momentum    0.9               biased
    "keras"     1 - momentum    0.99              biased
    "flax"      1 - momentum    0.99              biased
    any         1 / (k + 1)     momentum=None     cumulative average of the k+1 batches seen

The fully-connected case (N, C) reduces over N; the convolutional case (N, C, *spatial) over N
and every spatial axis, i.e. per channel over N·H·W. Nothing passed in is mutated: the new running
statistics are returned.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final, Literal, NamedTuple

import torch
from torch import Tensor

from bnlab.functional.checks import (
    MismatchError,
    check_batch_norm_eps,
    check_dtype_device,
    check_enough_values,
    check_input,
    check_momentum,
)
from bnlab.functional.core import accumulation_dtype, apply_scale_shift, moments, scale_shift
from bnlab.functional.masked import check_enough_valid, check_mask, masked_moments


@dataclass(frozen=True)
class Convention:
    """How a framework defines momentum and the running variance."""

    name: str
    momentum_is_decay: bool  # True: momentum weights the *old* value (MXNet, Keras, Flax, d2l)
    unbiased_running_var: bool  # True: n/(n-1) correction before averaging (PyTorch)
    default_momentum: float

    def new_batch_weight(
        self,
        momentum: float | None,
        batches_seen: int | Tensor,
        dtype: torch.dtype = torch.float32,
    ) -> float | Tensor:
        """The weight w on the new batch's statistics (see the module docstring). A tensor
        count (a layer's ``num_batches_tracked``) gives a tensor w of ``dtype``, so tracing
        (torch.compile, torch.export, torch.func) needs no data-dependent Python number; it
        equals the float w rounded to ``dtype``."""
        if momentum is None:
            if isinstance(batches_seen, Tensor):
                return (batches_seen + 1).to(dtype).reciprocal()
            return 1.0 / (batches_seen + 1)
        return 1.0 - momentum if self.momentum_is_decay else momentum


CONVENTIONS: Final[dict[str, Convention]] = {
    c.name: c
    for c in (
        Convention(
            "torch", momentum_is_decay=False, unbiased_running_var=True, default_momentum=0.1
        ),
        Convention("d2l", momentum_is_decay=True, unbiased_running_var=False, default_momentum=0.9),
        Convention(
            "mxnet", momentum_is_decay=True, unbiased_running_var=False, default_momentum=0.9
        ),
        Convention(
            "keras", momentum_is_decay=True, unbiased_running_var=False, default_momentum=0.99
        ),
        Convention(
            "flax", momentum_is_decay=True, unbiased_running_var=False, default_momentum=0.99
        ),
    )
}


class _Default(Enum):
    """Sentinel: 'use the convention's default momentum' (None already means cumulative)."""

    MOMENTUM = "default"


DEFAULT_MOMENTUM: Final = _Default.MOMENTUM
MomentumArg = float | None | Literal[_Default.MOMENTUM]


def get_convention(convention: str | Convention) -> Convention:
    if isinstance(convention, Convention):
        return convention
    try:
        return CONVENTIONS[convention]
    except KeyError:
        raise ValueError(
            f"convention: expected one of {sorted(CONVENTIONS)}, got {convention!r}."
        ) from None


def resolve_momentum(momentum: MomentumArg, convention: Convention) -> float | None:
    value = convention.default_momentum if momentum is DEFAULT_MOMENTUM else momentum
    check_momentum(value)
    return value


class BatchNormResult(NamedTuple):
    y: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None


# A training-mode kernel: (x, weight, bias, eps) -> (y, batch mean, biased batch var).
# The statistics it returns are used only for the running update and must be detached.
TrainKernel = Callable[[Tensor, Tensor | None, Tensor | None, float], tuple[Tensor, Tensor, Tensor]]


def reference_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The readable path: statistics, then one scale/shift; gradients come from autograd."""
    dims = [0, *range(2, x.ndim)]  # every axis but the channels
    mean, var = moments(x, dims)  # (C,), (C,)
    scale, shift = scale_shift(mean, var, eps, weight, bias)
    return apply_scale_shift(x, scale, shift), mean.detach(), var.detach()


TRAIN_KERNELS: dict[str, TrainKernel] = {"reference": reference_train}

# A prediction kernel: (x, running_mean, running_var, weight, bias, eps) -> y, or None to use
# the reference scale/shift (e.g. when it cannot handle this input).
EvalKernel = Callable[[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, float], Tensor | None]
EVAL_KERNELS: dict[str, EvalKernel] = {}

# A training kernel that also updates the running statistics in the same call:
# (x, weight, bias, eps, running_mean, running_var, w, unbiased) -> (y, new_mean, new_var),
# with w the weight on the new batch (a 0-dim tensor when momentum is None) and unbiased the
# n/(n-1) correction (see running_update),
# or None to decline this input (then the train kernel and running_update run instead).
UpdatingKernel = Callable[
    [Tensor, Tensor | None, Tensor | None, float, Tensor, Tensor, float | Tensor, bool],
    tuple[Tensor, Tensor, Tensor] | None,
]
UPDATING_KERNELS: dict[str, UpdatingKernel] = {}


def batch_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    training: bool,
    momentum: MomentumArg = DEFAULT_MOMENTUM,
    eps: float = 1e-5,
    convention: str | Convention | None = None,
    num_batches_tracked: int | Tensor = 0,
    channel_axis: int = 1,
    impl: str = "auto",
    mask: Tensor | None = None,
) -> BatchNormResult:
    """Normalize ``x`` (N, C, *spatial) per channel; return ``(y, new_mean, new_var)``.

    Args:
        x: input with channels on axis 1, rank >= 2, any float dtype; float16/bfloat16 are
            computed in float32 and returned in their own dtype; memory format is kept.
        weight, bias: γ and β with C values, or None for no affine transform.
        running_mean, running_var: running estimates with C values, or both None to always use
            batch statistics (PyTorch's ``track_running_stats=False``). The new estimates are
            returned in the shape these came in.
        training: batch statistics (and an updated running estimate) if True; running
            statistics if False.
        momentum: in the meaning of ``convention`` (module docstring); None for a cumulative
            average over ``num_batches_tracked + 1`` batches; by default the convention's own.
            Checked (a float in [0, 1]) only where it is used: training with running statistics.
        eps: added to the variance before the square root; > 0 where batch statistics are
            used, >= 0 with running statistics (as ``torch.nn.functional.batch_norm``).
        convention: "torch" (the default), "d2l", "mxnet", "keras", "flax" or a ``Convention``.
            Left out, a momentum above 0.5 warns: it looks like a decay-style momentum.
        num_batches_tracked: batches already averaged in (used only when momentum is None);
            an int, or a 0-dim integer tensor (a layer's buffer) for code that is traced.
        channel_axis: the channel axis (1 as in PyTorch; -1 for channels-last data laid out
            as (N, H, W, C), as Keras/Flax default to).
        impl: the kernel (docs/speed.md): "auto" (default: the C++ kernel "native" for CPU
            tensors where it is built, else "eager"), "native", "eager" (analytic backward in
            eager PyTorch operations; bnlab.functional.fast), "compiled" and
            "eager_then_compiled" (the same, compiled by inductor), "reference" (the readable
            path through autograd), or another registered one.
        mask: for padded batches, a boolean tensor with ``x``'s shape less the channel axis
            ((N,) for (N, C), (N, L) for (N, C, L), (N, H, W) for (N, C, H, W)), True at real
            values. Batch statistics and the running update (unbiased with the valid count)
            use the valid values only; every position is normalized with them
            (:mod:`bnlab.functional.masked`; one path for every ``impl``). Ignored, once
            checked, when the running statistics are used.

    Per-channel tensors are (C,) as in PyTorch, or any shape that broadcasts against ``x`` as
    one value per channel, such as the chapter's (1, C) and (1, C, 1, 1). An empty batch gives
    an empty output and leaves the running statistics as they were, as in PyTorch.
    """
    check_input(x)
    check_impl(impl)  # in every mode, so that a typo shows at once
    axis = channel_axis_index(channel_axis, x.ndim)
    if mask is not None:
        mask = check_mask(x, mask, axis)  # its axes keep their order when channels move
    if axis != 1:  # kernels see channels on axis 1; a view, not a copy
        y, new_mean, new_var = batch_norm(
            x.movedim(axis, 1),
            weight,
            bias,
            running_mean,
            running_var,
            training=training,
            momentum=momentum,
            eps=eps,
            convention=convention,
            num_batches_tracked=num_batches_tracked,
            impl=impl,
            mask=mask,
        )
        return BatchNormResult(y.movedim(1, axis), new_mean, new_var)
    num_channels = x.shape[1]
    per_channel, device = (num_channels,), x.device
    stats_shape = running_mean.shape if isinstance(running_mean, Tensor) else None
    # the common valid case in one test (this runs every step); per_channel_view words the errors
    if not all(
        t is None
        or (
            isinstance(t, Tensor)
            and t.shape == per_channel
            and t.device == device
            and t.is_floating_point()
        )
        for t in (weight, bias, running_mean, running_var)
    ):
        weight = per_channel_view(weight, "weight", x)
        bias = per_channel_view(bias, "bias", x)
        running_mean = per_channel_view(running_mean, "running_mean", x)
        running_var = per_channel_view(running_var, "running_var", x)
    if (running_mean is None) != (running_var is None):
        raise MismatchError(
            "running_mean and running_var: expected both tensors or both None, got "
            f"running_mean={'None' if running_mean is None else 'a tensor'}, "
            f"running_var={'None' if running_var is None else 'a tensor'}."
        )
    tracking = running_mean is not None and running_var is not None
    batch_stats = training or not tracking
    check_batch_norm_eps(eps, batch_statistics=batch_stats)
    conv = get_convention("torch" if convention is None else convention)

    if not batch_stats:
        assert running_mean is not None and running_var is not None  # for the type checker
        eval_kernel = EVAL_KERNELS.get(impl)
        y_fused = None
        if eval_kernel is not None and x.numel():  # an empty batch needs no kernel
            y_fused = eval_kernel(x, running_mean, running_var, weight, bias, eps)
        if y_fused is not None:
            return _result(y_fused, running_mean, running_var, stats_shape)
        acc = accumulation_dtype(x.dtype)
        scale, shift = scale_shift(running_mean.to(acc), running_var.to(acc), eps, weight, bias)
        y = apply_scale_shift(x, scale, shift)
        return _result(y, running_mean, running_var, stats_shape)

    update = training and tracking
    m = resolve_momentum(momentum, conv) if update else None
    if update and convention is None and m is not None and m > 0.5:
        warn_decay_like_momentum(m)
    count = x.numel() // num_channels if num_channels else 0
    if count == 0:  # an empty batch: nothing to normalize, the running statistics stay
        y = _affine_only(x, weight, bias)
        return _result(y, running_mean, running_var, stats_shape)
    if mask is not None:
        return _masked_batch_norm(
            x,
            mask,
            weight,
            bias,
            running_mean if update else None,
            running_var if update else None,
            eps=eps,
            convention=conv,
            momentum=m,
            num_batches_tracked=num_batches_tracked,
            tracking=tracking,
            stats_shape=stats_shape,
        )
    check_enough_values(
        x, count, "N" if x.ndim == 2 else "N and the spatial axes", running_stats=tracking
    )
    kernel = TRAIN_KERNELS[impl]
    updating = UPDATING_KERNELS.get(impl)
    if update and updating is not None:
        assert running_mean is not None and running_var is not None
        fused = updating(
            x,
            weight,
            bias,
            eps,
            running_mean,
            running_var,
            conv.new_batch_weight(m, num_batches_tracked, accumulation_dtype(running_mean.dtype)),
            conv.unbiased_running_var,
        )
        if fused is not None:
            return _result(*fused, stats_shape)
    y, mean, var = kernel(x, weight, bias, eps)
    if not update:
        return _result(y, running_mean, running_var, stats_shape)

    assert running_mean is not None and running_var is not None
    new_mean, new_var = running_update(
        running_mean,
        running_var,
        mean,
        var,
        count,
        convention=conv,
        momentum=m,
        num_batches_tracked=num_batches_tracked,
    )
    return _result(y, new_mean, new_var, stats_shape)


def _masked_batch_norm(
    x: Tensor,
    mask: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    eps: float,
    convention: Convention,
    momentum: float | None,
    num_batches_tracked: int | Tensor,
    tracking: bool,
    stats_shape: torch.Size | None,
) -> BatchNormResult:
    """Batch statistics of the valid values, then the shared apply step over every position;
    running statistics given means they are updated."""
    mean, var, count = masked_moments(x, mask)
    n = int(count)  # one host sync: the check needs the number
    check_enough_valid(x, n, running_stats=tracking)
    scale, shift = scale_shift(mean, var, eps, weight, bias)
    y = apply_scale_shift(x, scale, shift)
    if running_mean is None or running_var is None:
        return _result(y, running_mean, running_var, stats_shape)
    new_mean, new_var = running_update(
        running_mean,
        running_var,
        mean,
        var,
        n,
        convention=convention,
        momentum=momentum,
        num_batches_tracked=num_batches_tracked,
    )
    return _result(y, new_mean, new_var, stats_shape)


def _result(
    y: Tensor, mean: Tensor | None, var: Tensor | None, shape: torch.Size | None
) -> BatchNormResult:
    """The result, with the running statistics in the shape they were passed in."""
    if shape is None or mean is None or var is None or mean.shape == shape:
        return BatchNormResult(y, mean, var)
    return BatchNormResult(y, mean.reshape(shape), var.reshape(shape))


def _affine_only(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """γ·x + β for an empty batch: an empty output in x's dtype, and zero gradients for γ and β
    (sums over no values), as PyTorch gives."""
    acc = accumulation_dtype(x.dtype)
    ones = torch.ones(x.shape[1], dtype=acc, device=x.device)
    scale = ones if weight is None else weight
    shift = torch.zeros_like(ones) if bias is None else bias
    return apply_scale_shift(x, scale, shift)


def per_channel_view(t: Tensor | None, name: str, x: Tensor) -> Tensor | None:
    """``t`` as a (C,) view for input ``x``: PyTorch's (C,), or a shape that broadcasts against
    ``x`` as one value per channel (the chapter's (1, C) and (1, C, 1, 1)); else a clear error."""
    if t is None:
        return None
    num_channels = x.shape[1]
    if not isinstance(t, Tensor):
        raise TypeError(
            f"{name}: expected a torch.Tensor with {num_channels} values, got {type(t).__name__}."
        )
    if t.shape != (num_channels,):
        padded = (1,) * (x.ndim - t.ndim) + tuple(t.shape)
        if len(padded) != x.ndim or padded[1] != num_channels or t.numel() != num_channels:
            chapter = (1, num_channels, *([1] * (x.ndim - 2)))
            fresh = "torch.zeros" if name in ("bias", "running_mean") else "torch.ones"
            raise MismatchError(
                f"{name}: expected one value per channel of the input's {num_channels} channels "
                f"(axis 1 of shape {tuple(x.shape)}): shape ({num_channels},), or "
                f"{chapter} as the chapter's code has it; got shape {tuple(t.shape)}. Pass a "
                f"{name} with {num_channels} values, e.g. {fresh}({num_channels})."
            )
        t = t.reshape(num_channels)
    if not t.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating-point tensor, got dtype {t.dtype}; it holds "
            f"{'running averages' if name.startswith('running') else 'learned values'}. "
            f"Convert it first, e.g. {name}.float()."
        )
    check_dtype_device(x, t, name)
    return t


def warn_decay_like_momentum(momentum: float) -> None:
    """momentum > 0.5 in PyTorch's convention, without the convention named: a likely mix-up."""
    warnings.warn(
        f"batch_norm: momentum={momentum} is read in PyTorch's convention, as the weight of the "
        f"new batch, so the running statistics keep only {1 - momentum:.3g} of their past. If "
        f"{momentum} is meant as the decay of the old value (the chapter, MXNet, Keras, Flax), "
        "pass convention='d2l' (or 'mxnet', 'keras', 'flax'); PyTorch's equivalent is "
        f"momentum={1 - momentum:.3g}. Pass convention='torch' to keep this meaning without "
        "the warning.",
        UserWarning,
        stacklevel=3,
    )


def running_update(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int | float | Tensor,
    *,
    convention: Convention,
    momentum: float | None,
    num_batches_tracked: int | Tensor,
) -> tuple[Tensor, Tensor]:
    """One step of the running estimates (the module docstring's update):
    ``r ← (1 - w)·r + w·s`` with ``w`` from the convention and ``s`` the batch mean and the
    (biased or, for PyTorch's convention, unbiased) batch variance over ``count`` values
    (a tensor count keeps the update on the device, without a host synchronization)."""
    dtype = running_mean.dtype
    w = convention.new_batch_weight(momentum, num_batches_tracked, accumulation_dtype(dtype))
    # lerp(r, s, w) = r + w·(s - r): one operation per statistic (this runs every training
    # step, where small operations cost more in dispatch than in arithmetic)
    mean, var = mean.detach(), var.detach()
    if convention.unbiased_running_var:
        var = var * (count / (count - 1))
    if isinstance(w, Tensor) and w.dtype != dtype:  # half statistics: a float32 tensor weight
        # blends in float32 and rounds once, as lerp with a Python weight does internally
        new_mean = torch.lerp(running_mean.detach().to(w.dtype), mean.to(dtype).to(w.dtype), w)
        new_var = torch.lerp(running_var.detach().to(w.dtype), var.to(dtype).to(w.dtype), w)
        return new_mean.to(dtype), new_var.to(dtype)
    new_mean = torch.lerp(running_mean.detach(), mean.to(dtype), w)
    new_var = torch.lerp(running_var.detach(), var.to(dtype), w)
    return new_mean, new_var


def channel_axis_index(channel_axis: int, ndim: int) -> int:
    """``channel_axis`` as a non-negative index, which may not be the batch axis 0."""
    if not -ndim <= channel_axis < ndim or channel_axis % ndim == 0:
        raise ValueError(
            f"channel_axis: expected an axis in 1..{ndim - 1} (or -{ndim - 1}..-1) of a "
            f"rank-{ndim} input, got {channel_axis}. Axis 0 is the batch axis."
        )
    return channel_axis % ndim


# earlier names of kernels, for the error that points to the current one
RENAMED_KERNELS: Final[dict[str, str]] = {
    "fast": "eager",
    "fast_compiled": "compiled",
    "fast_auto": "eager_then_compiled",
}


def check_impl(impl: str) -> None:
    """A ValueError naming the registered kernels unless ``impl`` is one of them."""
    if impl not in TRAIN_KERNELS:
        renamed = RENAMED_KERNELS.get(impl) if isinstance(impl, str) else None
        hint = f" impl={impl!r} is now called {renamed!r}." if renamed else ""
        raise ValueError(
            f"impl: expected one of {sorted(TRAIN_KERNELS)}, got {impl!r}.{hint} "
            "The default, 'auto', picks the fastest one available."
        )


def register_train_kernel(name: str, kernel: TrainKernel) -> None:
    """Make ``impl=name`` available to :func:`batch_norm` (used by the fast path)."""
    TRAIN_KERNELS[name] = kernel


def register_updating_kernel(name: str, kernel: UpdatingKernel) -> None:
    """Let ``impl=name`` update the running statistics in its own training call."""
    UPDATING_KERNELS[name] = kernel


def register_eval_kernel(name: str, kernel: EvalKernel) -> None:
    """Give ``impl=name`` its own prediction kernel (else prediction is the reference math)."""
    EVAL_KERNELS[name] = kernel
