"""The two steps every normalization shares: statistics over some axes, then a scale and a shift.

Batch, layer, group and instance norm differ only in *which axes* they reduce over and *what
state* they keep; the math lives here once.

    mean, var = moments(x, dims)                      # biased variance, float32 accumulation
    scale, shift = scale_shift(mean, var, eps, weight, bias)
    y = x * scale + shift          # = weight * (x - mean) / sqrt(var + eps) + bias
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from bnlab.functional.checks import check_float


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 accumulate in float32; float32 and float64 in themselves."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def moments(x: Tensor, dims: Sequence[int], *, keepdim: bool = False) -> tuple[Tensor, Tensor]:
    """Mean and *biased* variance of ``x`` over ``dims``, numerically sound.

    ``torch.var_mean`` uses a two-pass/Welford reduction, so a channel with a large mean and a
    tiny spread keeps its variance (no ``E[x²] - E[x]²`` cancellation). Half-precision inputs
    are reduced in float32 and the statistics are returned in float32.
    """
    check_float(x, "x")
    xa = x.to(accumulation_dtype(x.dtype))
    var, mean = torch.var_mean(xa, dim=tuple(dims), correction=0, keepdim=keepdim)
    return mean, var


def scale_shift(
    mean: Tensor,
    var: Tensor,
    eps: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Fold statistics and affine parameters into one ``(scale, shift)`` pair.

    scale = weight / sqrt(var + eps),  shift = bias - mean * scale.
    Train, eval and folded inference all apply ``y = x * scale + shift``.
    """
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


def channel_view(t: Tensor, ndim: int, channel_axis: int = 1) -> Tensor:
    """Reshape a per-channel vector (C,) so it broadcasts against an ``ndim`` input."""
    shape = [1] * ndim
    shape[channel_axis] = t.numel()
    return t.reshape(shape)


def apply_scale_shift(x: Tensor, scale: Tensor, shift: Tensor, channel_axis: int = 1) -> Tensor:
    """``y = x * scale + shift`` per channel, computed in the accumulation dtype, returned in
    ``x``'s dtype and memory format (channels_last in, channels_last out)."""
    acc = accumulation_dtype(x.dtype)
    xa = x.to(acc)
    s = channel_view(scale.to(acc), x.ndim, channel_axis)
    t = channel_view(shift.to(acc), x.ndim, channel_axis)
    # channels innermost (2-D, channels_last): one addcmul; channels outer (NCHW): two simple
    # passes, ~3x faster on CPU than addcmul's strided broadcast
    y = torch.addcmul(t, xa, s) if xa.stride(channel_axis) == 1 else torch.mul(xa, s).add_(t)
    return y.to(x.dtype)
