"""Batch statistics over the valid values only, for padded batches (variable-length sequences,
images of several sizes in one tensor).

A boolean ``mask`` with the input's shape less the channel axis — (N,) for (N, C), (N, L) for
(N, C, L), (N, H, W) for (N, C, H, W) — marks the real values (True). Per channel, over the n
valid values (the same n for every channel), by the corrected two-pass algorithm (Chan, Golub &
LeVeque, 1983), which has no E[x²] − E[x]² cancellation:

    m₀ = Σ_valid x / n,   d = x − m₀ (0 where padded),   δ = Σ d / n
    μ = m₀ + δ,           σ² = Σ d² / n − δ²

The padded values never enter a sum (they are replaced, not multiplied, by zero, so a NaN in
the padding stays out too). BN's apply step then normalizes every position with (μ, σ²), so the
output is finite everywhere, and autograd gives exact gradients: a padded position gets only
the gradient of its own output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.functional.core import accumulation_dtype, channel_view


def check_mask(x: Tensor, mask: object, channel_axis: int) -> Tensor:
    """``mask`` as the boolean tensor it must be for ``x`` with channels on ``channel_axis``
    (a non-negative index), or a clear error."""
    expected = (*x.shape[:channel_axis], *x.shape[channel_axis + 1 :])
    where = f"the input's shape {tuple(x.shape)} without its channel axis {channel_axis}"
    example = "torch.arange(L) < lengths[:, None] for (N, C, L) sequences of the given lengths"
    if not isinstance(mask, Tensor):
        raise TypeError(
            f"mask: expected a boolean tensor of shape {expected} ({where}), True at real "
            f"values, got {type(mask).__name__}. Build one as {example}."
        )
    if mask.dtype != torch.bool:
        raise TypeError(
            f"mask: expected dtype torch.bool (True marks a real value), got {mask.dtype}. "
            f"Convert it with mask.bool() if its nonzero entries are the real values, or build "
            f"it as {example}."
        )
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"mask: expected shape {expected} ({where}), got {tuple(mask.shape)}. There is one "
            f"mask entry per position, shared by all channels; build it as {example}."
        )
    if mask.device != x.device:
        raise ValueError(
            f"mask: expected it on the input's device {x.device}, got {mask.device}. Move it "
            f"with mask.to({str(x.device)!r})."
        )
    return mask


def masked_moments(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean and biased variance (C,) of ``x`` (N, C, *) over the positions where
    ``mask`` (N, *) is True, in the accumulation dtype, and the number of those positions as a
    0-d tensor (module docstring). Differentiable in ``x``; NaN where there are none."""
    acc = accumulation_dtype(x.dtype)
    valid = mask.unsqueeze(1)  # (N, 1, *): broadcast over the channels
    dims = [0, *range(2, x.ndim)]
    count = valid.sum(dtype=acc)  # every channel has the same positions
    xa = torch.where(valid, x.to(acc), 0)  # (N, C, *); padding replaced, never multiplied
    m0 = (xa.sum(dims) / count).detach()  # (C,); a constant: μ and σ² below do not depend on it
    d = torch.where(valid, xa - channel_view(m0, x.ndim), 0)
    delta = d.sum(dims) / count
    mean = m0 + delta
    var = (d.square().sum(dims) / count - delta.square()).clamp_min(0)
    return mean, var, count


def check_enough_valid(
    x: Tensor, count: int, *, running_stats: bool = True, where: str = "in the mask"
) -> None:
    """More than one valid value per channel, as a batch needs more than one value."""
    if count > 1:
        return
    fix = (
        "normalize with the running statistics instead (training=False; for a layer, .eval())"
        if running_stats
        else "there are no running statistics to normalize with instead"
    )
    raise ValueError(
        f"expected more than 1 valid value per channel to compute batch statistics, got "
        f"{count} True position{'' if count == 1 else 's'} {where} (input shape "
        f"{tuple(x.shape)}). With fewer than 2 the statistics are undefined or normalize "
        f"everything to 0. Give batches with at least 2 real (unpadded) positions, or {fix}."
    )


def refuse_mask(layer: object, mask: Tensor | None) -> None:
    """For BN variants whose statistics have no masked form (batch renorm, ghost BN)."""
    if mask is not None:
        raise TypeError(
            f"mask: {type(layer).__name__} has no masked statistics. Use bnlab.nn.BatchNorm "
            "(or SyncBatchNorm) for padded batches, or call this layer without a mask."
        )


__all__ = ["check_enough_valid", "check_mask", "masked_moments", "refuse_mask"]
