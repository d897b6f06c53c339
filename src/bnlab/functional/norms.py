"""The normalization family on the shared core: which axes each one reduces over, what it keeps.

Every function here is pure (nothing passed in is mutated; new running statistics are returned)
and is built from the same two steps as :func:`bnlab.functional.batch_norm`:
``moments`` over some axes, then one ``y = x * scale + shift``.

    norm             statistics per            over                    running state
    layer_norm       sample                    C and the spatial axes  none
    group_norm       (sample, group of C/G)    C/G channels, spatial   none
    instance_norm    (sample, channel)         the spatial axes        optional mean, var (per C)
    batch_renorm     channel                   N and the spatial axes  mean, var (+ r, d clipping)
    ghost_batch_norm (virtual batch, channel)  n_v samples, spatial    mean, var of the full batch

Layer, group and instance norm compute statistics of shape (N, C) (a group's statistics are
repeated over its channels), fold them with the per-channel γ, β into ``scale, shift`` of shape
(N, C), and apply them to the input viewed as (1, N·C, L): the per-channel apply step of the
core, with "channel" meaning (sample, channel).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from bnlab.functional.batch_norm import (
    DEFAULT_MOMENTUM,
    TRAIN_KERNELS,
    BatchNormResult,
    Convention,
    MomentumArg,
    batch_norm,
    get_convention,
    resolve_momentum,
    running_update,
)
from bnlab.functional.checks import (
    check_dtype_device,
    check_enough_values,
    check_eps,
    check_float,
    check_input,
    check_per_channel,
)
from bnlab.functional.core import accumulation_dtype, apply_scale_shift, moments, scale_shift

# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def keep_memory_format(y: Tensor, like: Tensor) -> Tensor:
    """Return ``y`` in ``like``'s memory format (channels_last in, channels_last out)."""
    if (
        like.ndim == 4
        and not like.is_contiguous()
        and like.is_contiguous(memory_format=torch.channels_last)
    ):
        return y.contiguous(memory_format=torch.channels_last)
    if (
        like.ndim == 5
        and not like.is_contiguous()
        and like.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return y.contiguous(memory_format=torch.channels_last_3d)
    return y


def check_positive_int(value: object, name: str, hint: str) -> int:
    """``value`` as an int >= 1, or a TypeError/ValueError naming it and how to fix it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {value!r}. {hint}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}. {hint}")
    return value


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_groups(num_groups: object, num_channels: int) -> int:
    g = check_positive_int(
        num_groups, "num_groups", f"Use a divisor of the channel count: {divisors(num_channels)}."
    )
    if num_channels % g:
        raise ValueError(
            f"num_groups: expected a divisor of the {num_channels} input channels, got {g}. "
            f"Choose one of {divisors(num_channels)}."
        )
    return g


def group_moments(x: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Mean and biased variance per (sample, group), repeated over the group's channels.

    ``x`` (N, C, *spatial) -> mean, var (N, C), float32 for half inputs (as ``moments``).
    num_groups = 1 is layer norm's statistics, num_groups = C instance norm's.
    """
    n, c = x.shape[:2]
    mean, var = moments(x.reshape(n, num_groups, -1), dims=[2])  # (N, G)
    per_group = c // num_groups
    return mean.repeat_interleave(per_group, dim=1), var.repeat_interleave(per_group, dim=1)


def apply_per_sample(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``y = x * scale + shift`` with ``scale, shift`` of shape (N, C): the core apply step on
    ``x`` viewed as (1, N·C, L)."""
    n, c = x.shape[:2]
    y = apply_scale_shift(x.reshape(1, n * c, -1), scale.reshape(-1), shift.reshape(-1))
    return keep_memory_format(y.reshape(x.shape), x)


def check_affine(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
    for name, t in (("weight", weight), ("bias", bias)):
        check_per_channel(t, name, x.shape[1])
        check_dtype_device(x, t, name)


def check_running(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None) -> None:
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        check_per_channel(t, name, x.shape[1])
        check_dtype_device(x, t, name)
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean and running_var: expected both tensors or both None, got "
            f"running_mean={'None' if running_mean is None else 'tensor'}, "
            f"running_var={'None' if running_var is None else 'tensor'}."
        )


def reduce_dims(x: Tensor) -> list[int]:
    """Every axis but the channels (axis 1): batch norm's statistics axes."""
    return [0, *range(2, x.ndim)]


# ---------------------------------------------------------------------------------------------
# Layer, group and instance normalization
# ---------------------------------------------------------------------------------------------


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-5,
) -> Tensor:
    """Group normalization (Wu & He, 2018, arXiv:1803.08494).

    The C channels are split into ``num_groups`` contiguous groups; each (sample, group) is
    normalized by its own mean and biased variance over its C/G channels and all spatial
    positions, then a per-channel affine is applied:

        y[n, c] = γ[c] · (x[n, c] - μ[n, g(c)]) / sqrt(σ²[n, g(c)] + ε) + β[c]

    The same in training and prediction (no running state). Equals ``torch.nn.GroupNorm``.
    num_groups = 1 is layer norm (CNN convention), num_groups = C is instance norm.

    Args:
        x: (N, C, *spatial), rank >= 2, any float dtype (half is computed in float32).
        num_groups: a divisor of C.
        weight, bias: γ, β of shape (C,), or None.
        eps: added to the variance.
    """
    check_input(x)
    g = check_groups(num_groups, x.shape[1])
    check_affine(x, weight, bias)
    check_eps(eps)
    per_group = x.numel() // (x.shape[0] * g) if x.shape[0] else 0
    if per_group <= 1:
        raise ValueError(
            f"group_norm: expected more than 1 value per (sample, group), got input shape "
            f"{tuple(x.shape)} with num_groups={g} ({per_group} value per group): the output "
            "would always be 0. Use fewer groups or an input with spatial axes."
        )
    mean, var = group_moments(x, g)  # (N, C), (N, C)
    scale, shift = scale_shift(mean, var, eps, weight, bias)  # (N, C): γ broadcasts over N
    return apply_per_sample(x, scale, shift)


def layer_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalization (Ba, Kiros & Hinton, 2016, arXiv:1607.06450) over every non-batch
    axis: each sample is normalized by the mean and biased variance of all its C·H·W values.

        y[n] = γ ⊙ (x[n] - μ[n]) / sqrt(σ²[n] + ε) + β

    The affine transform follows the shape of ``weight``/``bias``:

    * (C,): per channel, the CNN convention (Wu & He's "LN" in the Group Norm paper); equals
      ``torch.nn.GroupNorm(1, C)``. This is the default of :class:`bnlab.nn.LayerNorm`.
    * ``x.shape[1:]`` = (C, *spatial): elementwise, ``torch.nn.LayerNorm(x.shape[1:])``'s
      ``normalized_shape`` convention.

    For (N, C) inputs the two coincide and equal ``torch.nn.LayerNorm(C)``.
    """
    check_input(x)
    check_eps(eps)
    c = x.shape[1]
    per_channel = all(t is None or tuple(t.shape) == (c,) for t in (weight, bias))
    elementwise = all(t is None or tuple(t.shape) == tuple(x.shape[1:]) for t in (weight, bias))
    if not (per_channel or elementwise):
        shapes = [None if t is None else tuple(t.shape) for t in (weight, bias)]
        raise ValueError(
            f"layer_norm: expected weight and bias of shape ({c},) (per channel) or "
            f"{tuple(x.shape[1:])} (elementwise, torch's normalized_shape), got {shapes} for an "
            f"input of shape {tuple(x.shape)}. Build the layer for this input's shape."
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_float(t, name)
            check_dtype_device(x, t, name)
    if x[0].numel() <= 1:
        raise ValueError(
            f"layer_norm: expected more than 1 value per sample, got input shape "
            f"{tuple(x.shape)}: the output would always be 0."
        )
    mean, var = group_moments(x, 1)  # (N, C), every channel carries its sample's statistics
    if per_channel:
        scale, shift = scale_shift(mean, var, eps, weight, bias)
        return apply_per_sample(x, scale, shift)
    # Elementwise affine: normalize, then a second apply step whose "channels" are the C·H·W
    # positions of one sample.
    scale, shift = scale_shift(mean, var, eps)
    xhat = apply_per_sample(x, scale, shift)
    n = x.shape[0]
    ones = torch.ones(x[0].numel(), dtype=xhat.dtype, device=x.device)
    w = ones if weight is None else weight.reshape(-1)
    b = torch.zeros_like(ones) if bias is None else bias.reshape(-1)
    return keep_memory_format(apply_scale_shift(xhat.reshape(n, -1), w, b).reshape(x.shape), x)


def instance_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    training: bool,
    momentum: MomentumArg = DEFAULT_MOMENTUM,
    eps: float = 1e-5,
    convention: str | Convention = "torch",
    num_batches_tracked: int = 0,
) -> BatchNormResult:
    """Instance normalization (Ulyanov, Vedaldi & Lempitsky, 2016, arXiv:1607.08022): each
    (sample, channel) is normalized over its spatial positions,

        y[n, c] = γ[c] · (x[n, c] - μ[n, c]) / sqrt(σ²[n, c] + ε) + β[c].

    It is batch norm applied to ``x`` viewed as (1, N·C, *spatial): that is how it is computed
    here, so momentum conventions are batch norm's. With running statistics (PyTorch's
    ``track_running_stats=True``), training updates them with the average over the N samples of
    the per-instance mean and (unbiased, in the torch convention) variance, and prediction
    (``training=False``) uses them per channel; without, both modes use instance statistics.
    Equals ``torch.nn.InstanceNorm1d/2d/3d``. Needs spatial axes: an (N, C) input has one value
    per instance.
    """
    check_input(x)
    check_affine(x, weight, bias)
    check_running(x, running_mean, running_var)
    n, c = x.shape[:2]
    tracking = running_mean is not None
    spatial = x.numel() // (n * c) if n * c else 0
    if (training or not tracking) and spatial <= 1:
        raise ValueError(
            f"instance_norm: expected more than 1 spatial value per (sample, channel), got "
            f"input shape {tuple(x.shape)}: instance statistics of one value normalize it to 0. "
            "Use an input with spatial axes (N, C, H, W), or layer/group norm for (N, C) inputs."
        )

    def rep(t: Tensor | None) -> Tensor | None:  # per channel -> per (sample, channel)
        return None if t is None else t.repeat(n)

    res = batch_norm(
        x.reshape(1, n * c, *x.shape[2:]),
        rep(weight),
        rep(bias),
        rep(running_mean),
        rep(running_var),
        training=training,
        momentum=momentum,
        eps=eps,
        convention=convention,
        num_batches_tracked=num_batches_tracked,
    )
    y = keep_memory_format(res.y.reshape(x.shape), x)
    if not (training and tracking):
        return BatchNormResult(y, running_mean, running_var)
    assert res.running_mean is not None and res.running_var is not None
    new_mean = res.running_mean.reshape(n, c).mean(0)
    new_var = res.running_var.reshape(n, c).mean(0)
    return BatchNormResult(y, new_mean, new_var)


# ---------------------------------------------------------------------------------------------
# Batch renormalization
# ---------------------------------------------------------------------------------------------


class BatchRenormResult(NamedTuple):
    y: Tensor
    running_mean: Tensor
    running_var: Tensor
    r: Tensor | None  # (C,) the correction applied in training, None in prediction
    d: Tensor | None


def renorm_limits(
    step: int,
    *,
    rmax: float = 3.0,
    dmax: float = 5.0,
    warmup_start: int = 5000,
    rmax_warmup_end: int = 40000,
    dmax_warmup_end: int = 25000,
) -> tuple[float, float]:
    """The clipping limits ``(rmax_t, dmax_t)`` at a training step, as in Ioffe (2017), §4:
    (1, 0) until ``warmup_start`` (plain batch norm), then linear in the step to ``rmax`` at
    ``rmax_warmup_end`` and ``dmax`` at ``dmax_warmup_end``, constant afterwards. The defaults
    are the paper's ImageNet schedule (5k, 40k, 25k steps)."""
    for name, v in (
        ("step", step),
        ("warmup_start", warmup_start),
        ("rmax_warmup_end", rmax_warmup_end),
        ("dmax_warmup_end", dmax_warmup_end),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}: expected a non-negative int (a step count), got {v!r}.")
    check_renorm_clips(rmax, dmax)
    for name, end in (("rmax_warmup_end", rmax_warmup_end), ("dmax_warmup_end", dmax_warmup_end)):
        if end < warmup_start:
            raise ValueError(
                f"{name}: expected a step >= warmup_start={warmup_start}, got {end}. The limits "
                "relax from warmup_start to the end step; pass equal values for a jump."
            )

    def ramp(end: int) -> float:
        if step >= end:  # also when end == warmup_start: no warm-up
            return 1.0
        if step <= warmup_start:
            return 0.0
        return (step - warmup_start) / (end - warmup_start)

    return 1.0 + (rmax - 1.0) * ramp(rmax_warmup_end), dmax * ramp(dmax_warmup_end)


def check_renorm_clips(rmax: float, dmax: float) -> None:
    for name, v in (("rmax", rmax), ("dmax", dmax)):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise TypeError(f"{name}: expected a float, got {v!r}.")
    if not rmax >= 1.0:
        raise ValueError(
            f"rmax: expected a float >= 1 (r is clipped to [1/rmax, rmax]), got {rmax}. "
            "rmax=1 is plain batch norm; the paper relaxes it to 3."
        )
    if not dmax >= 0.0:
        raise ValueError(
            f"dmax: expected a float >= 0 (d is clipped to [-dmax, dmax]), got {dmax}. "
            "dmax=0 is plain batch norm; the paper relaxes it to 5."
        )


def batch_renorm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    *,
    training: bool,
    rmax: float,
    dmax: float,
    momentum: MomentumArg = DEFAULT_MOMENTUM,
    eps: float = 1e-5,
    convention: str | Convention = "torch",
    num_batches_tracked: int = 0,
) -> BatchRenormResult:
    """Batch renormalization (Ioffe, 2017, arXiv:1702.03275), Algorithm 1.

    Training, with batch statistics μ_B, σ_B = sqrt(σ²_B + ε) per channel over N and every
    spatial axis (N·H·W values for convolutions) and running ones μ, σ = sqrt(σ̂² + ε):

        r = clip(σ_B / σ, 1/rmax, rmax),   d = clip((μ_B - μ) / σ, -dmax, dmax)    (no gradient)
        y = γ · ((x - μ_B) / σ_B · r + d) + β

    folded into one apply step: ``scale_shift(μ_B, σ²_B, ε, γ·r, β + γ·d)``. Since r and d are
    constants, the gradient is batch norm's, scaled by r. With r = 1, d = 0 (rmax = 1,
    dmax = 0, the start of the warm-up) this is batch norm exactly.

    Prediction uses the running statistics as batch norm does; they are updated by batch norm's
    rule and convention (the paper averages σ rather than σ²; averaging σ² keeps the state dict
    and the prediction path those of batch norm). ``rmax``/``dmax`` at a step come from
    :func:`renorm_limits`.
    """
    check_input(x)
    check_affine(x, weight, bias)
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            raise ValueError(
                f"{name}: batch renormalization needs running statistics (it corrects the batch "
                "statistics towards them), got None. Pass running_mean=torch.zeros(C) and "
                "running_var=torch.ones(C) to start."
            )
    check_running(x, running_mean, running_var)
    check_eps(eps)
    check_renorm_clips(rmax, dmax)
    conv = get_convention(convention)
    m = resolve_momentum(momentum, conv)
    if not training:
        res = batch_norm(x, weight, bias, running_mean, running_var, training=False, eps=eps)
        return BatchRenormResult(res.y, running_mean, running_var, None, None)

    count = x.numel() // x.shape[1]
    check_enough_values(x, count, "N" if x.ndim == 2 else "N and the spatial axes")
    mean, var = moments(x, reduce_dims(x))  # (C,), (C,) over N·H·W
    acc = mean.dtype
    with torch.no_grad():  # r and d are constants for backprop
        sigma_b = torch.sqrt(var + eps)
        sigma = torch.sqrt(running_var.to(acc) + eps)
        r = (sigma_b / sigma).clamp(1.0 / rmax, rmax)
        d = ((mean - running_mean.to(acc)) / sigma).clamp(-dmax, dmax)
    w = r if weight is None else weight.to(acc) * r
    b = d if weight is None else weight.to(acc) * d
    if bias is not None:
        b = b + bias.to(acc)
    scale, shift = scale_shift(mean, var, eps, w, b)
    y = apply_scale_shift(x, scale, shift)
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
    return BatchRenormResult(y, new_mean, new_var, r, d)


# ---------------------------------------------------------------------------------------------
# Ghost batch normalization
# ---------------------------------------------------------------------------------------------


def ghost_batch_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    virtual_batch_size: int,
    training: bool,
    momentum: MomentumArg = DEFAULT_MOMENTUM,
    eps: float = 1e-5,
    convention: str | Convention = "torch",
    num_batches_tracked: int = 0,
    impl: str = "reference",
) -> BatchNormResult:
    """Ghost batch normalization (Hoffer, Hubara & Soudry, 2017, arXiv:1705.08741).

    In training the batch is cut along N into consecutive virtual batches of
    ``virtual_batch_size`` samples (the last one may be smaller), and each is batch-normalized
    with its own statistics over its n_v·H·W values per channel. With one virtual batch this is
    batch norm exactly.

    Running statistics: one update per call (so ``momentum`` keeps its per-step meaning), with
    the statistics of the whole batch, combined exactly from the virtual batches' moments,

        μ = Σ_k n_k μ_k / n,   σ² = Σ_k n_k (σ²_k + (μ_k - μ)²) / n,

    because prediction sees population statistics, which the whole batch estimates better than
    any virtual batch. These are the running statistics batch norm itself would keep.
    Prediction (``training=False`` with running statistics) is batch norm's.
    """
    check_input(x)
    vbs = check_positive_int(
        virtual_batch_size,
        "virtual_batch_size",
        "Use the number of samples per virtual batch, e.g. 32.",
    )
    check_affine(x, weight, bias)
    check_running(x, running_mean, running_var)
    check_eps(eps)
    conv = get_convention(convention)
    m = resolve_momentum(momentum, conv)
    tracking = running_mean is not None and running_var is not None
    if tracking and not training:
        return batch_norm(
            x, weight, bias, running_mean, running_var, training=False, eps=eps, convention=conv
        )
    try:
        kernel = TRAIN_KERNELS[impl]
    except KeyError:
        raise ValueError(f"impl: expected one of {sorted(TRAIN_KERNELS)}, got {impl!r}.") from None
    chunks = x.split(vbs, dim=0)
    per_channel = x.numel() // x.shape[1] // x.shape[0] if x.shape[0] else 0
    for chunk in chunks:
        if chunk.shape[0] * per_channel <= 1:
            raise ValueError(
                f"ghost_batch_norm: expected more than 1 value per channel in every virtual "
                f"batch, got a batch of {x.shape[0]} cut into virtual batches of {vbs}, the last "
                f"with {chunk.shape[0]} sample(s) of shape {tuple(x.shape[1:])}. Use a batch "
                "size that is a multiple of virtual_batch_size (e.g. drop_last=True), or a "
                "larger virtual_batch_size."
            )
    outs = [kernel(chunk, weight, bias, eps) for chunk in chunks]  # (y_k, μ_k, σ²_k)
    y = keep_memory_format(torch.cat([o[0] for o in outs], dim=0), x)
    if not tracking:
        return BatchNormResult(y, running_mean, running_var)
    assert running_mean is not None and running_var is not None
    acc = accumulation_dtype(x.dtype)
    counts = torch.tensor([float(c.shape[0]) for c in chunks], dtype=acc, device=x.device)
    counts = counts[:, None] / x.shape[0]  # (K, 1) weights n_k / n
    means = torch.stack([o[1] for o in outs])  # (K, C)
    variances = torch.stack([o[2] for o in outs])  # (K, C)
    mean = (counts * means).sum(0)
    var = (counts * (variances + (means - mean) ** 2)).sum(0)
    new_mean, new_var = running_update(
        running_mean,
        running_var,
        mean,
        var,
        x.numel() // x.shape[1],
        convention=conv,
        momentum=m,
        num_batches_tracked=num_batches_tracked,
    )
    return BatchNormResult(y, new_mean, new_var)


__all__ = [
    "BatchRenormResult",
    "batch_renorm",
    "ghost_batch_norm",
    "group_moments",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "renorm_limits",
    "running_update",
]
