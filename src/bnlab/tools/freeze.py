"""Freezing BN (statistics and affine fixed) and fixing only γ, β (the chapter's exercise 5)."""

from __future__ import annotations

import math

import torch
from torch import nn

from bnlab.tools.common import (
    ModuleT,
    check_materialized,
    check_module,
    find_batch_norms,
    has_running_stats,
    is_batch_norm,
    replace_modules,
    working_copy,
)
from bnlab.tools.frozen import FrozenBatchNorm


def freeze_bn(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every BN (bnlab's and torch's) by a :class:`FrozenBatchNorm` with its values.

    A frozen BN always normalizes with its running statistics, ``y = x · scale + shift``, also
    after ``model.train()``, and its γ, β, μ̂, σ̂² are buffers: no gradient, not in
    ``model.parameters()`` (build the optimizer after freezing). The usual use is fine-tuning
    with small batches, where batch statistics would be noise (Detectron2, torchvision's
    detection backbones). A module shared at several places is replaced by one frozen module.

    Returns a deep copy (``inplace=False``, default) or ``model`` changed; always use the
    returned module (a BN passed as ``model`` comes back as a new FrozenBatchNorm).
    :func:`unfreeze_bn` undoes it.

    Raises:
        ValueError: a BN has no running statistics (``track_running_stats=False``) or is lazy.
    """
    check_module(model)
    for name, bn in find_batch_norms(model):
        check_materialized(bn, name)
        if not has_running_stats(bn):
            raise ValueError(
                f"{name or 'model'} ({type(bn).__name__}) has no running statistics "
                "(track_running_stats=False); freezing would have nothing to normalize with. "
                "Build it with track_running_stats=True, or estimate them with "
                "bnlab.tools.precise_bn, before freeze_bn."
            )
    out = working_copy(model, inplace)
    return replace_modules(
        out, lambda _, m: FrozenBatchNorm.from_batch_norm(m) if is_batch_norm(m) else None
    )


def unfreeze_bn(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Turn every :class:`FrozenBatchNorm` back into a trainable BN of the class it was frozen
    from (its options and ``requires_grad`` flags kept; a :class:`bnlab.nn.BatchNorm` if it was
    built directly), with the current values. Copy semantics as :func:`freeze_bn`."""
    check_module(model)
    out = working_copy(model, inplace)
    return replace_modules(
        out, lambda _, m: m.to_batch_norm() if isinstance(m, FrozenBatchNorm) else None
    )


def _check_constant(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(
            f"{name}: expected a finite real number (the constant to fix it at), got {value!r}."
        )
    return float(value)


def fix_affine(model: ModuleT, gamma: float = 1.0, beta: float = 0.0) -> ModuleT:
    """Fix every BN's γ and β at constants and stop learning them (the chapter's exercise 5).

    Sets ``weight`` to ``gamma`` and ``bias`` to ``beta`` and ``requires_grad=False`` on them,
    in place (it only writes values, like ``requires_grad_``); returns ``model``. Statistics
    still follow the batches as usual (use :func:`freeze_bn` to fix those too).

    Compared with ``affine=False``: at γ = 1, β = 0 the layer computes the same function, but the
    parameters still exist, so the state dict keeps its keys and loads into affine models, other
    constants are possible (e.g. γ = 0.5), and ``requires_grad_(True)`` on them learns them again.
    Optimizers skip parameters whose ``grad`` stays None, weight decay included. A later
    ``model.requires_grad_(True)`` revives them; :class:`bnlab.nn.BatchNorm` with
    ``fixed_affine=True`` keeps γ, β as buffers instead, which nothing revives.

    Raises:
        TypeError: ``gamma`` or ``beta`` is not a finite number.
        ValueError: a BN has no γ (``affine=False``/``scale=False``) and ``gamma != 1``, or no
            β and ``beta != 0``; such a layer cannot hold the constant.
    """
    check_module(model)
    g, b = _check_constant(gamma, "gamma"), _check_constant(beta, "beta")
    bns = find_batch_norms(model)
    for name, bn in bns:
        check_materialized(bn, name)
        for attr, value, neutral in (("weight", g, 1.0), ("bias", b, 0.0)):
            if getattr(bn, attr, None) is None and value != neutral:
                raise ValueError(
                    f"{name or 'model'} ({type(bn).__name__}) has no {attr} (built with "
                    f"affine=False), so it cannot be fixed at {value}; it is always {neutral}. "
                    f"Build it with affine=True, or pass {'gamma' if attr == 'weight' else 'beta'}"
                    f"={neutral}."
                )
    with torch.no_grad():
        for _, bn in bns:
            for attr, value in (("weight", g), ("bias", b)):
                t = getattr(bn, attr, None)
                if t is not None:
                    t.fill_(value)
                    t.requires_grad_(False)
    return model


__all__ = ["FrozenBatchNorm", "fix_affine", "freeze_bn", "unfreeze_bn"]
