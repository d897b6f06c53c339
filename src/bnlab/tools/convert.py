"""Swap batch-norm implementations in a model, keeping every value and setting exactly.

``to="bnlab"``: ``torch.nn.BatchNorm1d/2d/3d`` -> :class:`bnlab.nn.BatchNorm` (convention
"torch": momentum is the weight on the new batch, running variance unbiased, as torch's).
``to="torch"``: :class:`bnlab.nn.BatchNorm` -> ``torch.nn.BatchNorm1d/2d/3d``.
``to=<name>``: both kinds -> ``bnlab.nn.registry.make_norm(name, C, kind=..., **options)``
(layer, group, instance, renorm, ghost, ...), carrying over what the new layer has room for.

Weights (with their ``requires_grad``), running statistics, ``num_batches_tracked``, eps,
momentum and the train/eval flag are copied exactly, so the state dict is unchanged and the
outputs agree in both modes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from bnlab.functional.batch_norm import channel_axis_index
from bnlab.nn import BatchNorm, SyncBatchNorm
from bnlab.nn.registry import NORMS, make_norm
from bnlab.nn.sync import torch_num_dims
from bnlab.tools.adjacency import preceding_layers
from bnlab.tools.common import (
    bn_state,
    check_materialized,
    check_module,
    is_plain_batch_norm,
    replace_modules,
    working_copy,
)

TORCH_BN: dict[int, type[nn.Module]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}
_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# Set by convert_norm from the source layer: options may not override them.
_COPIED = (
    "num_features",
    "num_dims",
    "eps",
    "momentum",
    "affine",
    "scale",
    "center",
    "track_running_stats",
    "convention",
    "axis",
    "device",
    "dtype",
)
# Remembered across a conversion so that a round trip gives back the same layers: the torch
# class a bnlab BN came from, and the num_dims of the bnlab BN a torch BN came from.
_SOURCE_ATTR = "_converted_from"
_NUM_DIMS_ATTR = "_bnlab_num_dims"


# The plain classes only (lazy forms included): a subclass (renorm, ghost) computes something
# else, and a synchronized BN stays synchronized.
def _is_torch_bn(m: nn.Module) -> bool:
    return (
        is_plain_batch_norm(m) and isinstance(m, _BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
    )


def _is_bnlab_bn(m: nn.Module) -> bool:
    return is_plain_batch_norm(m) and isinstance(m, BatchNorm) and not isinstance(m, SyncBatchNorm)


def _layer_rank(layer: nn.Module) -> int:
    if isinstance(layer, _ConvNd):
        return 2 + len(layer.kernel_size)
    return 2  # Linear: (N, features)


def _copy_state(src: nn.Module, dst: nn.Module, *, strict: bool) -> None:
    """Copy weights (keeping requires_grad) and buffers; with ``strict`` every tensor that
    exists on one side must exist with the same shape on the other."""
    with torch.no_grad():
        for name in _STATE:
            a: Tensor | None = getattr(src, name, None)
            b: Tensor | None = getattr(dst, name, None)
            if a is None or b is None or a.shape != b.shape:
                if strict and (a is not None or b is not None):
                    raise ValueError(
                        f"{name}: cannot carry it over from {type(src).__name__} to "
                        f"{type(dst).__name__} (shapes "
                        f"{None if a is None else tuple(a.shape)} and "
                        f"{None if b is None else tuple(b.shape)})."
                    )
                continue
            b.copy_(a)
            if isinstance(b, nn.Parameter):
                b.requires_grad_(a.requires_grad)


def _check_options(options: dict[str, Any], target: str) -> None:
    clash = sorted(set(options) & set(_COPIED))
    if clash:
        raise ValueError(
            f"convert_norm(to={target!r}): {clash} are copied from each source layer so that the "
            "converted model computes exactly what it did; they cannot be given as options. "
            "Convert first, then change them on the new layers if you mean to."
        )


def _to_bnlab(bn: nn.Module, options: dict[str, Any]) -> nn.Module:
    state = bn_state(bn)
    ref = state.reference()
    new = BatchNorm(
        state.num_features,
        num_dims=bn.__dict__.get(_NUM_DIMS_ATTR, torch_num_dims(bn)),
        eps=state.eps,
        momentum=state.momentum,
        scale=state.weight is not None,
        center=state.bias is not None,
        track_running_stats=bool(getattr(bn, "track_running_stats", True)),
        convention="torch",
        device=None if ref is None else ref.device,
        dtype=None if ref is None else ref.dtype,
        **options,
    )
    _copy_state(bn, new, strict=True)
    object.__setattr__(new, _SOURCE_ATTR, type(bn))
    return new


def _known_rank(bn: nn.Module, before: dict[int, nn.Module], input_rank: int | None) -> int | None:
    """The input rank of ``bn``: its own (bnlab ``num_dims``, torch BatchNorm2d/3d), the torch
    class it was converted from, a directly preceding Conv/Linear, ``input_rank``, or None."""
    fixed = bn.num_dims if isinstance(bn, BatchNorm) else torch_num_dims(bn)
    if fixed is not None:
        return int(fixed)
    source = bn.__dict__.get(_SOURCE_ATTR)
    if source is nn.BatchNorm2d or source is nn.BatchNorm3d:
        return 4 if source is nn.BatchNorm2d else 5
    if id(bn) in before:
        return _layer_rank(before[id(bn)])
    if source is nn.BatchNorm1d:
        return 2
    return input_rank


def _to_torch(name: str, bn: BatchNorm, rank: int | None) -> nn.Module:
    if rank is None:
        raise ValueError(
            f"{name or 'model'}: a BatchNorm with num_dims=None takes inputs of any rank, but "
            "torch has one class per rank (BatchNorm1d for (N, C) and (N, C, L), BatchNorm2d "
            "for (N, C, H, W), BatchNorm3d for (N, C, D, H, W)) and no directly preceding layer "
            "tells which. Pass input_rank=4 (or 2, 3, 5), or build the layer with num_dims."
        )
    problems = []
    if bn.convention != "torch":
        problems.append(
            f"convention={bn.convention!r} (torch's momentum weights the new batch and its "
            "running variance is unbiased)"
        )
    axis = bn.axis if bn.num_dims is None else channel_axis_index(bn.axis, bn.num_dims)
    if axis != 1:
        problems.append(f"axis={bn.axis} (torch normalizes axis 1)")
    if bn.center and not bn.scale:
        problems.append("center=True with scale=False (torch has no β without γ)")
    if bn.use_global_stats:
        problems.append("use_global_stats=True")
    if bn.skip_nonfinite:
        problems.append("skip_nonfinite=True")
    if rank not in TORCH_BN:
        problems.append(f"input rank {rank} (torch's BatchNorm1d/2d/3d take rank 2 to 5)")
    if problems:
        raise ValueError(
            f"{name or 'model'}: cannot convert to a torch BatchNorm exactly: "
            + "; ".join(problems)
            + ". Keep this layer as bnlab's, or rebuild it with torch's settings."
        )
    ref = bn.running_mean if bn.running_mean is not None else bn.weight
    cls = TORCH_BN[rank]
    new = cls(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.scale,
        track_running_stats=bn.track_running_stats,
        device=None if ref is None else ref.device,
        dtype=None if ref is None else ref.dtype,
        **({} if bn.center or not bn.scale else {"bias": False}),
    )
    _copy_state(bn, new, strict=True)  # fixed_affine buffers become params, requires_grad False
    if bn.num_dims is not None and bn.num_dims != torch_num_dims(new):
        object.__setattr__(new, _NUM_DIMS_ATTR, bn.num_dims)  # e.g. 2 for BatchNorm1d
    return new


def _registry_options(target: str) -> frozenset[str]:
    """The options ``make_norm(target, ...)`` accepts; a clear error for an unknown name."""
    if target not in NORMS:
        raise ValueError(
            f"to: expected 'bnlab', 'torch' or a norm name of bnlab.nn.registry "
            f"{sorted(NORMS)}, got {target!r}."
        )
    return frozenset(NORMS[target].options)


def _carried_settings(bn: nn.Module, accepted: frozenset[str]) -> dict[str, Any]:
    """The source's settings that the target layer takes as constructor options."""
    state = bn_state(bn)
    convention = str(getattr(bn, "convention", "torch"))
    fixed_rank = bn.num_dims if isinstance(bn, BatchNorm) else torch_num_dims(bn)
    axis = int(getattr(bn, "axis", 1))
    out: dict[str, Any] = {}
    if "eps" in accepted:
        out["eps"] = state.eps
    # momentum means the same only under the same convention; targets without a convention
    # option use torch's (weight on the new batch)
    if "convention" in accepted:
        out["convention"] = convention
        out["momentum"] = state.momentum
    elif "momentum" in accepted and convention == "torch":
        out["momentum"] = state.momentum
    if "track_running_stats" in accepted:
        out["track_running_stats"] = state.running_mean is not None
    if "scale" in accepted and "center" in accepted:
        out["scale"], out["center"] = state.weight is not None, state.bias is not None
    elif "affine" in accepted:
        out["affine"] = state.weight is not None or state.bias is not None
        if "bias" in accepted and state.weight is not None and state.bias is None:
            out["bias"] = False
    if "num_dims" in accepted and fixed_rank is not None:
        out["num_dims"] = fixed_rank
    if "axis" in accepted:
        out["axis"] = axis
    elif axis != 1 and not (fixed_rank and channel_axis_index(axis, fixed_rank) == 1):
        raise ValueError(
            f"{type(bn).__name__} normalizes axis {axis}, and the target layer has no axis "
            "option (it normalizes axis 1). Move the channels to axis 1 first."
        )
    return out


def _to_registry(
    name: str, bn: nn.Module, target: str, rank: int | None, options: dict[str, Any]
) -> nn.Module:
    accepted = _registry_options(target)
    kwargs = dict(options)
    kind = kwargs.pop("kind", None)
    if kind is None:
        if rank is None and isinstance(bn, BatchNorm):
            raise ValueError(
                f"{name or 'model'}: cannot tell whether this BatchNorm (num_dims=None) sees "
                "(N, C) or (N, C, H, W) inputs. Pass kind='dense' or kind='conv' (or "
                "input_rank=2/4)."
            )
        kind = "conv" if (rank or 2) >= 3 else "dense"  # a lone BatchNorm1d: (N, C)
    state = bn_state(bn)
    kwargs.update(_carried_settings(bn, accepted))
    new: nn.Module = make_norm(target, state.num_features, kind=kind, **kwargs)
    ref = state.reference()
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype)
    _copy_state(bn, new, strict=False)  # only what the new layer has room for
    return new


def convert_norm(
    model: nn.Module, to: str = "bnlab", *, inplace: bool = False, **options: Any
) -> nn.Module:
    """Replace batch norms by another implementation with the same values (module docstring).

    Args:
        model: any ``nn.Module``; a BN passed as the model itself comes back converted.
        to: "bnlab" (torch's ``BatchNorm1d/2d/3d`` become :class:`bnlab.nn.BatchNorm`),
            "torch" (bnlab's ``BatchNorm`` become torch's), or a name of
            ``bnlab.nn.registry.make_norm`` (both kinds become that norm).
        inplace: False (default) converts a deep copy and leaves ``model`` as it was, as
            :func:`bnlab.tools.fold_bn`; True changes ``model``. Always use the returned module.
        **options: to "bnlab": more :class:`bnlab.nn.BatchNorm` arguments (``impl``,
            ``skip_nonfinite``, ...; those copied from the source, such as ``eps`` or
            ``momentum``, are refused). To "torch": ``input_rank`` for bnlab layers built with
            ``num_dims=None`` whose rank cannot be told (it is taken from ``num_dims``, then
            from the torch class the layer was converted from, then from a directly preceding
            Conv1d/2d/3d (rank 3/4/5) or Linear (2)). To a registry name: ``make_norm``'s
            options, plus ``kind`` ("conv" or "dense"; by default from the rank as above).

    Only the exact classes convert (``torch.nn.SyncBatchNorm``, bnlab's SyncBatchNorm,
    BatchRenorm and GhostBatchNorm compute something else in training and stay as they are).
    A module shared at several places is converted once and stays shared.

    Raises:
        TypeError: ``model`` is not a module, or ``to`` is not a string.
        ValueError: a layer cannot be converted exactly (e.g. bnlab's ``convention="d2l"`` or
            ``axis=-1`` to torch), a BN is lazy, an option clashes with a copied setting, or
            ``to`` names no norm.
    """
    check_module(model)
    if not isinstance(to, str):
        raise TypeError(
            f"to: expected 'bnlab', 'torch' or a norm name of bnlab.nn.registry, got "
            f"{type(to).__name__}."
        )
    opts = dict(options)
    input_rank = opts.pop("input_rank", None) if to != "bnlab" else None
    if input_rank is not None and input_rank not in TORCH_BN:
        raise ValueError(f"input_rank: expected 2, 3, 4 or 5, got {input_rank!r}.")
    if to == "torch" and opts:
        raise TypeError(
            f"convert_norm(to='torch'): unexpected options {sorted(opts)}; only input_rank is "
            "accepted (torch's layers take their settings from the bnlab layers)."
        )
    _check_options(opts, to)
    if to == "bnlab":
        sources = [(n, m) for n, m in model.named_modules() if _is_torch_bn(m)]
    elif to == "torch":
        sources = [(n, m) for n, m in model.named_modules() if _is_bnlab_bn(m)]
    else:
        sources = [(n, m) for n, m in model.named_modules() if _is_torch_bn(m) or _is_bnlab_bn(m)]
    for n, m in sources:
        check_materialized(m, n)
    if to not in ("bnlab", "torch"):
        _registry_options(to)  # a bad target fails even on a model without BN
    # Build every new layer first, so that a layer that cannot be converted raises before the
    # model (inplace=True) is touched.
    before = preceding_layers(model) if to != "bnlab" and sources else {}
    new_by_name: dict[str, nn.Module] = {}
    for name, m in sources:
        if to == "bnlab":
            new_by_name[name] = _to_bnlab(m, opts)
        elif to == "torch":
            assert isinstance(m, BatchNorm)
            new_by_name[name] = _to_torch(name, m, _known_rank(m, before, input_rank))
        else:
            new_by_name[name] = _to_registry(name, m, to, _known_rank(m, before, input_rank), opts)
    out = working_copy(model, inplace)
    return replace_modules(out, lambda name, _: new_by_name.get(name))


__all__ = ["convert_norm"]
