"""Probability-integral-transform normalization: every channel to a standard normal marginal.

If F is the CDF of a continuous channel value X, F(X) is uniform and Φ⁻¹(F(X)) is N(0, 1)
(the probability integral transform, then the normal quantile function). Batch norm matches
only the first two moments; this matches the whole marginal. The estimate of F used here:

**Definition.** Per channel, over its n = N·H·W values, take M batch quantiles at the fixed
levels p_j = (j + ½)/M (Hazen positions: order statistic k sits at level (k + ½)/n, linearly
interpolated), q_0 ≤ … ≤ q_{M-1}, and their normal scores z_j = Φ⁻¹(p_j). The transform is the
piecewise-linear map through the knots (q_j, z_j), extended linearly beyond the first and last
knot (Gaussian-like tails):

    T(x) = z_j + (x - q_j) · (z_{j+1} - z_j) / (q_{j+1} - q_j),   q_j ≤ x < q_{j+1}

so T(q_j) = Φ⁻¹(F̂(q_j)) exactly and T ≈ Φ⁻¹∘F̂ in between.

**Why this estimate.** It is a genuine, continuous function of the batch: the knots are order
statistics (differentiable, as ``torch.sort``'s values), T is continuous in x and in the knots,
and its gradient exists almost everywhere, as a ReLU network's. dT/dx = Δz/Δq is the local
density over φ(z), positive; gradients also flow into the knots, as batch norm's flow into μ_B
and σ_B. A kernel-smoothed empirical CDF costs O(n·M) time and memory per channel for the kernel
matrix and needs a bandwidth; a rank transform with a straight-through gradient has no true
gradient at all. Training and prediction share one representation (M quantiles), so the
running estimate is simply an exponential average of the batch quantiles on the same fixed
grid (an average of quantile functions), and prediction is the same map T with those knots.

**Cost per channel:** O(s log s) time for the sort, s = min(n, max_samples) (the quantiles of
a conv channel's N·H·W values are estimated from a random subsample of ``max_samples`` = 4096
by default), plus O(n log M) for the knot search and O(n) for the map; O(n + M) memory. No
n × n or n × M matrix is ever formed. Keep s/M large (≳ 8 values per segment, e.g. M = 32 for
batches of 256), since the slope Δz/Δq of a segment holding few values is noisy.

Ties (e.g. the zeros after a ReLU) give knots with equal values: zero-width segments are
skipped and every tied x maps to the same score. An atom whose *location* moves during training
(a conv bias over exactly-zero background pixels) is smeared by the running average of
quantiles, and prediction then scores it differently from training: drop such a bias (T is
shift-invariant, so it is useless before this layer) or re-estimate the running quantiles with
frozen weights (``momentum=None`` over a few batches). Outside the running range,
prediction extends the end segments' slopes (flat if an end segment has zero width).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from bnlab.functional.batch_norm import get_convention
from bnlab.functional.checks import (
    check_dtype_device,
    check_enough_values,
    check_input,
    check_momentum,
)
from bnlab.functional.core import accumulation_dtype, apply_scale_shift
from bnlab.functional.norms import check_affine, check_positive_int, keep_memory_format


class PITResult(NamedTuple):
    y: Tensor
    running_quantiles: Tensor | None


def quantile_levels(
    num_quantiles: int, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> Tensor:
    """The fixed probability grid p_j = (j + ½)/M, j = 0 … M-1."""
    m = check_positive_int(num_quantiles, "num_quantiles", "Use e.g. 32 quantiles per channel.")
    if m < 2:
        raise ValueError(
            f"num_quantiles: expected at least 2 (one segment needs two knots), got {m}."
        )
    return (torch.arange(m, dtype=dtype, device=device) + 0.5) / m


def normal_scores(
    num_quantiles: int, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> Tensor:
    """z_j = Φ⁻¹(p_j): where the knots go (computed in float64, returned in ``dtype``)."""
    p = quantile_levels(num_quantiles, dtype=torch.float64, device=device)
    return torch.special.ndtri(p).to(dtype)


def channel_quantiles(
    x: Tensor,
    num_quantiles: int,
    *,
    max_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-channel quantiles of ``x`` (N, C, *spatial) at the levels :func:`quantile_levels`:
    (C, M), differentiable (a sort, then linear interpolation between order statistics).

    With ``max_samples`` and more values per channel than that, the quantiles are those of
    ``max_samples`` values drawn uniformly with replacement (the same positions in every
    channel, from ``generator`` or the global RNG): the sort then costs O(s log s) for
    s = max_samples instead of O(n log n), at a standard error of about sqrt(p(1-p)/s) in
    probability (0.008 at s = 4096), well below the grid spacing 1/M for M <= 64.
    """
    check_input(x)
    levels = quantile_levels(num_quantiles, dtype=torch.float64)
    if max_samples is not None:
        check_positive_int(max_samples, "max_samples", "Use e.g. 4096, or None for all values.")
    c = x.shape[1]
    xt = x.to(accumulation_dtype(x.dtype)).transpose(0, 1).reshape(c, -1)  # (C, n)
    n = xt.shape[1]
    if n < 1:
        raise ValueError(f"x: expected at least one value per channel, got {tuple(x.shape)}.")
    if max_samples is not None and n > max_samples:
        pick = torch.randint(n, (max_samples,), generator=generator, device="cpu").to(x.device)
        xt, n = xt[:, pick], max_samples
    xs = xt.sort(dim=1).values
    pos = (levels * n - 0.5).clamp(0, n - 1)  # Hazen: order statistic k at level (k + ½)/n
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max(n - 1)
    frac = (pos - lo).to(xs.dtype).to(x.device)
    lo, hi = lo.to(x.device), hi.to(x.device)
    return xs[:, lo] + frac * (xs[:, hi] - xs[:, lo])  # (C, M)


def pit_transform(x: Tensor, quantiles: Tensor) -> Tensor:
    """The map T of the module docstring, per channel: knots ``quantiles`` (C, M) sent to the
    normal scores z_j; returns standard-normal scores of ``x``'s shape (in the accumulation
    dtype: float32 for half inputs)."""
    check_input(x)
    c = x.shape[1]
    if not isinstance(quantiles, Tensor) or quantiles.ndim != 2 or quantiles.shape[0] != c:
        got = tuple(quantiles.shape) if isinstance(quantiles, Tensor) else type(quantiles).__name__
        raise ValueError(
            f"quantiles: expected a (C, M) tensor with C={c} (the input's channels), got {got}."
        )
    check_dtype_device(x, quantiles, "quantiles")
    acc = accumulation_dtype(x.dtype)
    m = quantiles.shape[1]
    z = normal_scores(m, dtype=acc, device=x.device)  # (M,)
    q = quantiles.to(acc).contiguous()  # (C, M)
    xt = x.to(acc).transpose(0, 1).reshape(c, -1).contiguous()  # (C, n)
    # segment j with q_j <= x < q_{j+1}; the end segments extend outwards
    # per segment j (C, M-1): T(x) = intercept_j + slope_j · x
    width = q.diff(dim=1)
    positive = width > 0
    safe = torch.where(positive, width, torch.ones_like(width))  # no 0/0 in the unused branch
    slope = torch.where(positive, z.diff() / safe, torch.zeros_like(width))
    intercept = z[:-1] - slope * q[:, :-1]
    j = (torch.searchsorted(q.detach(), xt.detach(), right=True) - 1).clamp(0, m - 2)
    out = torch.addcmul(intercept.gather(1, j), slope.gather(1, j), xt)  # (C, n)
    return out.reshape(c, x.shape[0], *x.shape[2:]).transpose(0, 1)


def pit_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_quantiles: Tensor | None = None,
    *,
    training: bool,
    num_quantiles: int = 32,
    max_samples: int | None = 4096,
    momentum: float | None = 0.1,
    num_batches_tracked: int = 0,
) -> PITResult:
    """y = γ · T(x) + β per channel, T from the batch's quantiles in training and from
    ``running_quantiles`` in prediction (module docstring for T and its cost).

    Args:
        x: (N, C, *spatial); every channel's n = N·H·W values form its distribution.
        weight, bias: γ, β of shape (C,), or None.
        running_quantiles: (C, M) running knots, or None to always use the batch's. Start them
            at :func:`normal_scores` (T is then the identity), as batch norm starts at (0, 1).
        training: batch knots (and updated running ones) if True, running ones if False.
        num_quantiles: M, the number of knots per channel; must equal running_quantiles'
            second axis when both are given.
        max_samples: the batch quantiles of a channel with more values than this (conv
            layers: N·H·W) come from this many values drawn at random (global RNG); None: all.
        momentum: weight of the new batch's knots in the running average (PyTorch's meaning);
            None: cumulative average over ``num_batches_tracked + 1`` batches.
    """
    check_input(x)
    check_affine(x, weight, bias)
    check_momentum(momentum)
    m = quantile_levels(num_quantiles).numel()
    c = x.shape[1]
    if running_quantiles is not None:
        if tuple(running_quantiles.shape) != (c, m):
            raise ValueError(
                f"running_quantiles: expected shape ({c}, {m}) (channels, num_quantiles), got "
                f"{tuple(running_quantiles.shape)}. Build the layer with num_features={c} and "
                f"num_quantiles={m}."
            )
        check_dtype_device(x, running_quantiles, "running_quantiles")
    tracking = running_quantiles is not None
    if tracking and not training:
        assert running_quantiles is not None
        q = running_quantiles
    else:
        count = x.numel() // c if c else 0
        check_enough_values(x, count, "N" if x.ndim == 2 else "N and the spatial axes")
        q = channel_quantiles(x, m, max_samples=max_samples)  # (C, M)
    zx = pit_transform(x, q)
    if weight is not None or bias is not None:
        ones = torch.ones(c, dtype=zx.dtype, device=x.device)
        w = ones if weight is None else weight
        b = torch.zeros_like(ones) if bias is None else bias
        zx = apply_scale_shift(zx, w, b)
    y = keep_memory_format(zx.to(x.dtype).contiguous(), x)
    if not (tracking and training):
        return PITResult(y, running_quantiles)
    assert running_quantiles is not None
    w_new = get_convention("torch").new_batch_weight(momentum, num_batches_tracked)
    with torch.no_grad():
        new_q = (w_new * q.detach() + (1 - w_new) * running_quantiles).to(running_quantiles.dtype)
    return PITResult(y, new_q)


__all__ = [
    "PITResult",
    "channel_quantiles",
    "normal_scores",
    "pit_norm",
    "pit_transform",
    "quantile_levels",
]
