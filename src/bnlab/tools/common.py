"""What every tool shares: which modules count as batch norm, their channel axis and mode, input
checks, and replacing a submodule by name."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from bnlab.functional.core import moments
from bnlab.nn import BatchNorm, SyncBatchNorm
from bnlab.nn.sync import PLAIN_BATCH_NORM_TYPES, ProcessGroup
from bnlab.tools.frozen import FrozenBatchNorm

ModuleT = TypeVar("ModuleT", bound=nn.Module)

# bnlab's layer and every torch BN (BatchNorm1d/2d/3d, their lazy forms, SyncBatchNorm).
BN_TYPES: tuple[type[nn.Module], ...] = (BatchNorm, _BatchNorm)


def is_batch_norm(module: nn.Module) -> bool:
    """True for :class:`bnlab.nn.BatchNorm` and ``torch.nn.BatchNorm1d/2d/3d`` (and subclasses):
    the trainable BNs that precise_bn, freeze_bn and convert_norm act on."""
    return isinstance(module, BN_TYPES)


def is_plain_batch_norm(module: nn.Module) -> bool:
    """Exactly a BN class (bnlab's or torch's, lazy and synchronized forms included), not a
    subclass that may compute something else (batch renorm, ghost BN)."""
    return type(module) in PLAIN_BATCH_NORM_TYPES


def is_foldable_norm(module: nn.Module) -> bool:
    """A trainable BN or a :class:`FrozenBatchNorm`: what fold_bn and bias removal act on."""
    return isinstance(module, (*BN_TYPES, FrozenBatchNorm))


def check_module(model: object, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{name}: expected a torch.nn.Module, got {type(model).__name__}. Pass the network "
            "itself (e.g. bnlab.models.lenet()), not its state_dict or a list of layers; wrap "
            "a list with nn.Sequential(*layers)."
        )
    return model


def check_inplace(inplace: object) -> bool:
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace: expected True or False, got {inplace!r}.")
    return inplace


def working_copy(model: ModuleT, inplace: bool) -> ModuleT:
    """The model itself (``inplace=True``) or a deep copy; the input is never half-changed."""
    if check_inplace(inplace):
        return model
    check_all_materialized(model)  # torch cannot deep-copy a lazy module
    return copy.deepcopy(model)


def check_all_materialized(model: nn.Module) -> None:
    for name, module in model.named_modules():
        check_materialized(module, name)


def bn_axis(bn: nn.Module) -> int:
    """The configured channel axis: torch's BNs use 1; bnlab's ``axis`` may be negative."""
    return int(getattr(bn, "axis", 1))


def uses_batch_statistics(bn: nn.Module) -> bool:
    """Whether ``bn`` normalizes with the batch's statistics in its current mode."""
    if isinstance(bn, FrozenBatchNorm) or getattr(bn, "use_global_stats", False):
        return False
    running = getattr(bn, "running_mean", None) is not None
    return bool(bn.training) or not running


def has_running_stats(bn: nn.Module) -> bool:
    return (
        getattr(bn, "running_mean", None) is not None
        and getattr(bn, "running_var", None) is not None
    )


def check_materialized(module: nn.Module, name: str) -> None:
    if any(is_lazy(t) for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))):
        raise ValueError(
            f"{name or 'model'} ({type(module).__name__}) still has uninitialized (lazy) "
            "parameters, so its number of channels is unknown. Run one forward pass with a "
            "sample input first, e.g. model(torch.zeros(2, 1, 28, 28))."
        )


def find_batch_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BN module with its qualified name ("" for the model itself), each object once."""
    return [(name, m) for name, m in model.named_modules() if is_batch_norm(m)]


def bn_call_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
    """The input and the mask of a BN call seen by a forward hook: ``bn(x)``, ``bn(x, mask)``,
    ``bn(input=x, mask=m)``."""
    x = args[0] if args else kwargs.get("input", kwargs.get("x"))
    mask = args[1] if len(args) > 1 else kwargs.get("mask")
    if not isinstance(x, Tensor):
        raise TypeError(f"expected the BN's input to be a tensor, got {type(x).__name__}.")
    return x, mask if isinstance(mask, Tensor) else None


def input_moments(x: Tensor, mask: Tensor | None, axis: int) -> tuple[Tensor, Tensor, int]:
    """Per-channel mean, biased variance and count of a BN input (channels on ``axis``) in the
    statistics dtype, over the values ``mask`` marks valid (all when None); zeros for a count
    of 0."""
    x = x.detach()
    dtype = stat_dtype(x.device)
    if mask is not None:  # (M, C): the valid values, channels last
        x = x.movedim(axis, -1)[mask.to(device=x.device, dtype=torch.bool)]
        axis = 1
    num_channels = x.shape[axis]
    n = x.numel() // max(num_channels, 1)
    if n == 0:
        zeros = torch.zeros(num_channels, dtype=dtype, device=x.device)
        return zeros, zeros.clone(), 0
    mean, var = moments(x.to(dtype), [d for d in range(x.ndim) if d != axis])
    return mean, var, n


def sync_group(bn: nn.Module) -> ProcessGroup | None:
    """The process group over which ``bn`` computes its batch statistics now (a synchronized BN
    in training, in a group of several processes), else None."""
    if isinstance(bn, SyncBatchNorm):
        return bn._sync_group()
    if not (
        isinstance(bn, nn.SyncBatchNorm)
        and bn.training
        and dist.is_available()
        and dist.is_initialized()
    ):
        return None
    group = dist.group.WORLD if bn.process_group is None else bn.process_group
    return group if dist.get_world_size(group) > 1 else None


def stat_dtype(device: torch.device) -> torch.dtype:
    """float64 for statistics and folded weights wherever the device has it (not MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or getattr(module, "_backward_pre_hooks", None)
    )


def replace_modules(
    root: nn.Module, make: Callable[[str, nn.Module], nn.Module | None]
) -> nn.Module:
    """Replace every module for which ``make(name, module)`` returns a new one and return the
    (possibly new) root. A module reachable under several names is replaced once, at every name,
    so sharing is kept. Hooks on a replaced module do not carry over, so they warn."""
    occurrences: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        occurrences.setdefault(id(module), []).append(name)
        modules[id(module)] = module
    new_root = root
    for key, names in occurrences.items():
        old = modules[key]
        new = make(names[0], old)
        if new is None:
            continue
        if has_hooks(old):
            warnings.warn(
                f"{names[0] or 'model'} ({type(old).__name__}) had hooks registered; its "
                f"replacement {type(new).__name__} does not carry them. Register them again.",
                RuntimeWarning,
                stacklevel=3,
            )
        new.train(old.training)
        for name in names:
            if not name:
                new_root = new
                continue
            parent_name, _, child = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            parent._modules[child] = new  # attributes and Sequential/ModuleList entries alike
    return new_root


class BNState(NamedTuple):
    """A BN's tensors and settings, typed (``nn.Module`` attributes are not)."""

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    eps: float
    momentum: float | None
    num_features: int | None

    def reference(self) -> Tensor | None:
        """A tensor whose device and dtype the layer's state has."""
        return self.running_mean if self.running_mean is not None else self.weight


def tensor_attr(module: nn.Module, name: str) -> Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, Tensor) else None


def bn_state(bn: nn.Module) -> BNState:
    momentum = getattr(bn, "momentum", None)
    num_features = getattr(bn, "num_features", None)
    return BNState(
        weight=tensor_attr(bn, "weight"),
        bias=tensor_attr(bn, "bias"),
        running_mean=tensor_attr(bn, "running_mean"),
        running_var=tensor_attr(bn, "running_var"),
        num_batches_tracked=tensor_attr(bn, "num_batches_tracked"),
        eps=float(getattr(bn, "eps", 1e-5)),
        momentum=None if momentum is None else float(momentum),
        num_features=None if num_features is None else int(num_features),
    )


__all__ = [
    "BN_TYPES",
    "BNState",
    "bn_axis",
    "bn_call_input",
    "bn_state",
    "check_all_materialized",
    "check_inplace",
    "check_materialized",
    "check_module",
    "find_batch_norms",
    "has_running_stats",
    "input_moments",
    "is_batch_norm",
    "is_foldable_norm",
    "is_plain_batch_norm",
    "replace_modules",
    "stat_dtype",
    "sync_group",
    "tensor_attr",
    "uses_batch_statistics",
    "working_copy",
]
