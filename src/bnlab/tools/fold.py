"""Fold an eval-mode batch norm into the convolution or linear layer before it.

In prediction mode BN is a fixed per-channel affine map (Ioffe & Szegedy, 2015, Sec. 3.2)

    BN(z) = γ (z − μ̂) / sqrt(σ̂² + ε) + β = scale · z + shift,
    scale = γ / sqrt(σ̂² + ε),  shift = β − μ̂ · scale,

so after a layer z = W x + b it is absorbed into the layer:

    W' = scale[o] · W[o, ...]   (per output channel o),   b' = scale · b + shift.

This is the chapter's exercise 1 ("can BN be folded into the previous layer?"): yes, at
prediction time, exactly; in training mode no, because μ and σ² then depend on the batch.
:func:`fold_bn_weights` is the pure weight function, :func:`fold_bn` the wrapper that finds the
pairs (:func:`bnlab.tools.find_foldable`), checks the mode and rewrites a copy of the model.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor, nn

from bnlab.functional.checks import check_eps, check_float
from bnlab.functional.core import scale_shift
from bnlab.tools.adjacency import Method, find_foldable, is_transposed
from bnlab.tools.common import (
    ModuleT,
    bn_state,
    check_all_materialized,
    check_module,
    has_running_stats,
    stat_dtype,
    tensor_attr,
    uses_batch_statistics,
    working_copy,
)

OnUnfolded = Literal["warn", "ignore", "raise"]


def _check_channel_vector(t: Tensor | None, name: str, channels: int, where: str) -> None:
    if t is None:
        return
    check_float(t, name)
    if tuple(t.shape) != (channels,):
        raise ValueError(
            f"{name}: expected shape ({channels},), one value per output channel of the layer "
            f"({where}), got {tuple(t.shape)}. Pass the BN that directly follows this layer."
        )


def fold_bn_weights(
    w: Tensor,
    b: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    gamma: Tensor | None,
    beta: Tensor | None,
    *,
    transpose: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Weights of the layer ``BN ∘ layer`` in prediction mode: ``W' = scale · W``,
    ``b' = scale · b + shift`` with ``(scale, shift)`` from :func:`bnlab.functional.scale_shift`.

    Args:
        w: the layer's weight: (C_out, C_in/groups, *kernel) for Conv and (C_out, C_in) for
            Linear; (C_in, C_out/groups, *kernel) for ConvTranspose (``transpose=True``).
        b: its bias (C_out,) or None (treated as 0).
        running_mean, running_var, eps, gamma, beta: the BN's μ̂, σ̂², ε, γ (or None for 1) and
            β (or None for 0), each (C_out,).
        transpose: ``w`` is a transposed convolution's weight (output channels on axis 1).
        groups: the transposed convolution's groups; output channel ``g·C_out/groups + j`` is
            ``w[g·C_in/groups : (g+1)·C_in/groups, j]``, so the scale is applied per group.

    Returns:
        ``(w', b')`` in ``w``'s dtype (and ``b``'s, when given). They are computed in float64
        (float32 on MPS) and rounded once. Pure: nothing passed in is modified.
    """
    check_float(w, "w")
    if w.ndim < 2:
        raise ValueError(
            f"w: expected a layer weight of rank >= 2 ((C_out, C_in) or (C_out, C_in, *kernel)), "
            f"got shape {tuple(w.shape)}."
        )
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups: expected a positive int (the layer's groups), got {groups!r}.")
    if transpose:
        if w.shape[0] % groups:
            raise ValueError(
                f"groups: expected it to divide the transposed weight's C_in = {w.shape[0]}, "
                f"got groups={groups}. Pass the layer's own groups."
            )
        channels = w.shape[1] * groups
    else:
        channels = w.shape[0]
    where = "axis 1 of the weight times groups" if transpose else "axis 0 of the weight"
    for name, t in (
        ("b", b),
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("gamma", gamma),
        ("beta", beta),
    ):
        _check_channel_vector(t, name, channels, where)
    check_eps(eps)

    dt = stat_dtype(w.device)

    def up(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dt)

    scale, shift = scale_shift(running_mean.to(dt), running_var.to(dt), eps, up(gamma), up(beta))
    w64 = w.to(dt)
    if transpose:
        # (C_in, C_out/g, *k) -> (g, C_in/g, C_out/g, *k), scale as (g, 1, C_out/g, 1, ...)
        grouped = w64.reshape(groups, w.shape[0] // groups, *w.shape[1:])
        s = scale.reshape(groups, 1, w.shape[1], *([1] * (w.ndim - 2)))
        w_new = (grouped * s).reshape(w.shape)
    else:
        w_new = w64 * scale.reshape(-1, *([1] * (w.ndim - 1)))  # (C_out, 1, ...)
    b_new = shift if b is None else b.to(dt) * scale + shift
    return w_new.to(w.dtype), b_new.to(w.dtype if b is None else b.dtype)


def _check_unfolded(unfolded: object) -> None:
    if unfolded not in ("warn", "ignore", "raise"):
        raise ValueError(
            f"unfolded: expected 'warn', 'ignore' or 'raise' (what to do about BNs that cannot "
            f"be folded), got {unfolded!r}."
        )


def fold_bn(
    model: ModuleT,
    *,
    method: Method = "auto",
    inplace: bool = False,
    unfolded: OnUnfolded = "warn",
) -> ModuleT:
    """Fold every eval-mode BN that directly follows a Conv/ConvTranspose/Linear into it.

    Returns an equivalent model (in prediction mode) in which each folded BN is replaced by
    ``nn.Identity`` and its layer carries ``W'``, ``b'`` from :func:`fold_bn_weights`.

    Args:
        model: any ``nn.Module``; BNs are :class:`bnlab.nn.BatchNorm`, ``torch.nn.BatchNorm*d``
            and :class:`bnlab.tools.FrozenBatchNorm`.
        method: how adjacency is found: "fx" traces forward(), "sequential" looks at
            consecutive ``nn.Sequential`` entries, "auto" (default) tries fx and falls back
            (:func:`bnlab.tools.find_foldable` lists what it finds and why the rest is left).
        inplace: False (default) works on a deep copy and leaves ``model`` untouched; True
            changes ``model``. Always use the returned module (a BN given as ``model`` itself is
            not folded: it has no layer before it).
        unfolded: BNs that cannot be folded stay as they are; "warn" (default) lists them in a
            ``RuntimeWarning``, "raise" raises ``ValueError``, "ignore" keeps quiet.

    Raises:
        ValueError: a BN to be folded uses batch statistics (training mode; call
            ``model.eval()``), has no running statistics (``track_running_stats=False``) or is
            still lazy.
    """
    check_module(model)
    _check_unfolded(unfolded)
    check_all_materialized(model)
    plan = find_foldable(model, method=method)
    for _, bn_name in plan.pairs:
        bn = model.get_submodule(bn_name)
        if not has_running_stats(bn):
            raise ValueError(
                f"{bn_name} ({type(bn).__name__}) has no running statistics "
                "(track_running_stats=False), so it always normalizes with the batch's own "
                "statistics and is not a fixed affine map; it cannot be folded. Build it with "
                "track_running_stats=True and train, or estimate them with bnlab.tools.precise_bn."
            )
        if uses_batch_statistics(bn):
            raise ValueError(
                f"{bn_name} ({type(bn).__name__}) is in training mode, where it normalizes with "
                "each batch's statistics; folding is exact only in prediction mode. Call "
                "model.eval() before fold_bn(model)."
            )
    if plan.skipped and unfolded != "ignore":
        message = (
            f"fold_bn (method={plan.method!r}) left {len(plan.skipped)} BN layer(s) unfolded: "
            f"{plan.describe_skipped()}."
        )
        if unfolded == "raise":
            raise ValueError(message + " Pass unfolded='warn' or 'ignore' to fold the rest.")
        warnings.warn(message, RuntimeWarning, stacklevel=2)

    out = working_copy(model, inplace)
    with torch.no_grad():
        for layer_name, bn_name in plan.pairs:
            layer = out.get_submodule(layer_name)
            bn = out.get_submodule(bn_name)
            weight, bias = tensor_attr(layer, "weight"), tensor_attr(layer, "bias")
            state = bn_state(bn)
            assert weight is not None and state.running_mean is not None
            assert state.running_var is not None  # checked above
            w_new, b_new = fold_bn_weights(
                weight,
                bias,
                state.running_mean,
                state.running_var,
                state.eps,
                state.weight,
                state.bias,
                transpose=is_transposed(layer),
                groups=int(getattr(layer, "groups", 1)),
            )
            layer.weight = nn.Parameter(w_new, requires_grad=weight.requires_grad)
            layer.bias = nn.Parameter(
                b_new, requires_grad=weight.requires_grad if bias is None else bias.requires_grad
            )
            parent_name, _, child = bn_name.rpartition(".")
            parent = out.get_submodule(parent_name) if parent_name else out
            identity = nn.Identity()
            identity.train(bn.training)
            parent._modules[child] = identity
    return out


__all__ = ["fold_bn", "fold_bn_weights"]
