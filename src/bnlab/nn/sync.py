"""Synchronized batch normalization: batch statistics over every process's samples.

With P processes holding n_p values per channel each (N = Σ n_p), every process normalizes with
the statistics of the concatenated batch, combined exactly from per-process (n_p, μ_p, M2_p),
M2_p = Σ (x - μ_p)² (Chan, Golub & LeVeque, 1979, "Updating formulae and a pairwise algorithm
for computing sample variances"):

    μ  = Σ n_p μ_p / N                  (as K + Σ n_p (μ_p - K) / N, K one process's mean)
    σ² = (Σ M2_p + Σ n_p (μ_p - μ)²) / N          (biased; no E[x²] - E[x]² cancellation)

The forward pass makes one all-gather of 2C + 1 numbers per process. Everything after the
statistics is bnlab's single path: ``scale_shift`` and ``apply_scale_shift``, the running update
of the layer's :class:`~bnlab.functional.batch_norm.Convention`. The backward pass of the
statistics all-reduces the 2C numbers (∂L/∂μ, ∂L/∂σ²), which are -scale·Σ dy and
-scale/(2·sqrt(σ² + ε))·Σ dy·x̂: the two channel sums of PyTorch's SyncBatchNorm, up to
per-channel factors that every process shares. Then

    ∂L/∂x_i = ∂L/∂μ / N + ∂L/∂σ² · 2 (x_i - μ) / N.

∂L/∂γ = Σ dy·x̂ and ∂L/∂β = Σ dy stay local sums, which DistributedDataParallel reduces with the
other parameter gradients.

Uneven batches are exact (counts weight every term) and a process with an empty batch still
joins both collectives: its output is empty and it contributes zeros. At world size 1, without an
initialized ``torch.distributed``, and in evaluation mode the layer is exactly
:class:`~bnlab.nn.BatchNorm`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from bnlab.functional.batch_norm import (
    DEFAULT_MOMENTUM,
    MomentumArg,
    get_convention,
    running_update,
)
from bnlab.functional.checks import check_dtype_device, check_enough_values
from bnlab.functional.core import (
    accumulation_dtype,
    apply_scale_shift,
    channel_view,
    moments,
    scale_shift,
)
from bnlab.functional.masked import check_enough_valid, check_mask, masked_moments
from bnlab.nn.batchnorm import BatchNorm, LazyBatchNorm

ProcessGroup = Any  # torch.distributed.ProcessGroup; Any keeps torch builds without it importable


def _all_gather(output: Tensor, local: Tensor, group: ProcessGroup) -> None:
    # all_gather_single is the current name; all_gather_into_tensor serves older torch (>= 2.3)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, local, group=group)


def _collective(what: str, op: Callable[..., Any], *args: Any, group: ProcessGroup) -> None:
    """Run one collective; turn a peer's failure or a timeout into an error that says so."""
    try:
        op(*args, group=group)
    except RuntimeError as e:  # DistBackendError and gloo/NCCL timeouts are RuntimeErrors
        world = dist.get_world_size(group)
        raise RuntimeError(
            f"SyncBatchNorm: the {what} across {world} processes failed on rank "
            f"{dist.get_rank()}: {e}. If another process raised, crashed or is stuck before "
            "reaching this layer, its own error is the cause to look at. Every process must run "
            "the same BatchNorm layers in the same order and mode (.train()/.eval() on all)."
        ) from e


class _GlobalMoments(torch.autograd.Function):
    """x (N, C, *) -> (μ, σ², N_total) over every process's batch; see the module docstring."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, mask: Tensor | None, group: ProcessGroup
    ) -> tuple[Tensor, Tensor, Tensor]:
        num_channels = x.shape[1]
        acc = accumulation_dtype(x.dtype)
        if mask is not None:  # the valid values only (bnlab.functional.masked)
            mean, var, count = masked_moments(x, mask)
            some = count > 0  # no valid value joins with count 0 (its moments are NaN)
            mean, m2 = torch.where(some, mean, 0), torch.where(some, var * count, 0)
            count = count.reshape(1)
        else:
            n = x.numel() // num_channels
            if n > 0:
                mean, var = moments(x, [0, *range(2, x.ndim)])  # (C,), (C,)
                m2 = var * n
            else:  # an empty batch joins with count 0 (moments of nothing would be NaN)
                mean = m2 = x.new_zeros(num_channels, dtype=acc)
            count = mean.new_full((1,), float(n))
        local = torch.cat([count, mean, m2])  # (2C + 1,)
        world = dist.get_world_size(group)
        gathered = local.new_empty(world * local.numel())  # flat: gloo wants no extra axis
        _collective("all-gather of batch statistics", _all_gather, gathered, local, group=group)
        gathered = gathered.view(world, local.numel())  # (P, 2C + 1)
        counts = gathered[:, :1]  # (P, 1)
        means, m2s = gathered[:, 1 : 1 + num_channels], gathered[:, 1 + num_channels :]
        total = counts.sum()
        # combine around the largest batch's mean K: Σ n_p (μ_p - K) has no large terms, so a
        # big common mean costs no precision (Σ n_p μ_p would round at the scale of N·μ)
        shift = means.index_select(0, counts.argmax().reshape(1))[0]  # (C,); no host sync
        delta = means - shift  # (P, C)
        offset = (counts * delta).sum(0) / total  # μ - K
        g_mean = shift + offset  # (C,)
        g_var = (m2s.sum(0) + (counts * (delta - offset) ** 2).sum(0)) / total
        ctx.group = group
        ctx.save_for_backward(x, g_mean, total, mask)
        ctx.mark_non_differentiable(total)
        return g_mean, g_var, total

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, grad_mean: Tensor, grad_var: Tensor, _grad_total: Tensor | None
    ) -> tuple[Tensor, None, None]:
        x, mean, total, mask = ctx.saved_tensors
        num_channels = mean.numel()
        # every process's loss depends on the shared μ, σ²: sum their gradients
        sums = torch.cat([grad_mean, grad_var]).contiguous()  # (2C,)
        _collective("all-reduce of gradient sums", dist.all_reduce, sums, group=ctx.group)
        g_mean = channel_view(sums[:num_channels] / total, x.ndim)
        g_var = channel_view(sums[num_channels:] * (2.0 / total), x.ndim)
        grad_x = torch.addcmul(g_mean, g_var, x.to(mean.dtype) - channel_view(mean, x.ndim))
        if mask is not None:  # padded values do not enter the statistics
            grad_x = torch.where(mask.unsqueeze(1), grad_x, 0)
        return grad_x.to(x.dtype), None, None


def sync_moments(
    x: Tensor, group: ProcessGroup = None, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and biased variance (C,) of ``x`` (N, C, *) over the batches of every process in
    ``group`` (default: all), and the total count per channel as a 0-d tensor; differentiable
    in ``x``. With ``mask`` (N, *) only the values where it is True count. Every process in the
    group must call it, with the same C (N may differ or be 0) and all with or all without a
    mask."""
    group = dist.group.WORLD if group is None else group
    mean, var, total = _GlobalMoments.apply(x, mask, group)
    return mean, var, total


class SyncBatchNorm(BatchNorm):
    """:class:`~bnlab.nn.BatchNorm` whose training-mode statistics span every process of a
    ``torch.distributed`` group (formulas in :mod:`bnlab.nn.sync`).

    Takes every argument of ``BatchNorm`` (``num_features`` is required) and has its state
    dict, plus ``process_group`` as in ``torch.nn.SyncBatchNorm`` (None: the default group).
    Works with gloo (CPU tensors) and NCCL (CUDA tensors). Outside training, with
    ``use_global_stats``, at world size 1 or without an initialized process group it runs
    ``BatchNorm``'s own path; ``impl`` selects that path's kernel, the synchronized path always
    uses the reference statistics.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: MomentumArg = DEFAULT_MOMENTUM,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: ProcessGroup = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        # torch.nn.SyncBatchNorm's positional order; the keyword options are BatchNorm's
        if num_features is None:
            raise ValueError(
                "num_features: SyncBatchNorm needs the channel count C, got None. Pass "
                "SyncBatchNorm(C), or run one forward pass through a lazy BatchNorm() and then "
                "convert the model with convert_sync_batchnorm(model)."
            )
        super().__init__(
            num_features,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            device=device,
            dtype=dtype,
            **kwargs,
        )
        self.process_group = process_group

    def _sync_group(self) -> ProcessGroup | None:
        """The group to synchronize over, or None for the local path."""
        batch_stats = self.training and not self.use_global_stats
        if not (batch_stats and dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD if self.process_group is None else self.process_group
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """As :meth:`BatchNorm.forward`; with ``mask``, the statistics of the valid values of
        every process (each process passes its own mask, or none of them does)."""
        x = input
        group = self._sync_group()
        if group is None:
            return super().forward(x) if mask is None else super().forward(x, mask=mask)
        axis = self._check_input(x)
        if mask is not None:
            mask = check_mask(x, mask, axis)  # its axes keep their order in xc below
        for name in ("weight", "bias", "running_mean", "running_var"):
            check_dtype_device(x, getattr(self, name), name)
        xc = x.movedim(axis, 1)  # (N, C, *): a view with channels on axis 1
        mean, var, total = sync_moments(xc, group, mask)
        world = dist.get_world_size(group)
        if mask is not None:  # any part may hold few valid values: read the total
            check_enough_valid(x, int(total), where=f"in the masks of {world} processes")
        elif xc.numel() // xc.shape[1] <= 1:  # only then can the total be <= 1: no host sync
            check_enough_values(x, int(total), f"every axis but {self.axis} on {world} processes")
        scale, shift = scale_shift(mean, var, self.eps, self.weight, self.bias)
        y = apply_scale_shift(xc, scale, shift).movedim(1, axis)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), total)
        return y

    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        # the statistics are the same on every process, so the skip decision is too
        assert self.running_mean is not None and self.running_var is not None
        new_mean, new_var = running_update(
            self.running_mean,
            self.running_var,
            mean,
            var,
            count,
            convention=get_convention(self.convention),
            momentum=self.momentum,
            num_batches_tracked=self._batches_seen(),
        )
        self._store_running_stats(new_mean, new_var)

    def extra_repr(self) -> str:
        group = "" if self.process_group is None else f", process_group={self.process_group}"
        return super().extra_repr() + group


def _take_state(new: nn.Module, old: nn.Module) -> nn.Module:
    """Move ``old``'s parameters and buffers (the same objects, so optimizers that hold them
    keep working) and its mode into ``new``."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            setattr(new, name, getattr(old, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(old, name))
    new.train(old.training)
    return new


def _bnlab_options(module: BatchNorm) -> dict[str, Any]:
    """Every option of ``BatchNorm.__init__`` that ``module`` stores under its own name (eps,
    momentum, convention, axis, ...), so a conversion keeps all of them. ``affine`` and
    ``bias`` are left out: ``scale`` and ``center`` say which of γ and β exist."""
    skip = ("self", "num_features", "device", "dtype", "affine", "bias")
    names = [p for p in inspect.signature(BatchNorm.__init__).parameters if p not in skip]
    return {name: getattr(module, name) for name in names if hasattr(module, name)}


def torch_num_dims(module: nn.Module) -> int | None:
    """The input rank a torch BN class insists on: 4 for ``BatchNorm2d``, 5 for
    ``BatchNorm3d`` (and their lazy forms); None for ``BatchNorm1d``, which takes (N, C) and
    (N, C, L), for ``SyncBatchNorm``, which takes any rank, and for anything else."""
    if isinstance(module, nn.BatchNorm2d | nn.LazyBatchNorm2d):
        return 4
    if isinstance(module, nn.BatchNorm3d | nn.LazyBatchNorm3d):
        return 5
    return None


def _uninitialized(module: nn.Module) -> bool:
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return any(is_lazy(t) for t in tensors)


# exactly these classes: a subclass (batch renorm, ghost BN, timm's BN + activation) computes
# something else, which a plain SyncBatchNorm would silently replace
_BNLAB_PLAIN = (BatchNorm, LazyBatchNorm, SyncBatchNorm)
_TORCH_PLAIN = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
    nn.SyncBatchNorm,
)
#: the batch norms that compute exactly BN (bnlab's and torch's plain classes, lazy and
#: synchronized forms included); a subclass may compute something else
PLAIN_BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = (*_BNLAB_PLAIN, *_TORCH_PLAIN)


def _to_sync(module: nn.Module, process_group: ProcessGroup) -> nn.Module | None:
    if isinstance(module, BatchNorm | _BatchNorm) and type(module) not in PLAIN_BATCH_NORM_TYPES:
        warnings.warn(
            f"convert_sync_batchnorm: {type(module).__name__} is a batch norm variant, not a "
            "plain BatchNorm; it is left unconverted and keeps per-process statistics.",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    if isinstance(module, BatchNorm):
        if module.num_features is None or _uninitialized(module):
            raise ValueError(
                f"convert_sync_batchnorm: {type(module).__name__} has not inferred its channel "
                "count yet (lazy BatchNorm()). Run one forward pass with a sample batch first, "
                "then convert."
            )
        return _take_state(
            SyncBatchNorm(
                module.num_features,
                process_group=process_group,
                device="meta",  # placeholders only: the original tensors are moved in
                **_bnlab_options(module),
            ),
            module,
        )
    if isinstance(module, _BatchNorm):
        if _uninitialized(module):
            raise ValueError(
                f"convert_sync_batchnorm: {type(module).__name__} is lazy and has not seen an "
                "input yet. Run one forward pass with a sample batch first, then convert."
            )
        return _take_state(
            SyncBatchNorm(
                module.num_features,
                num_dims=torch_num_dims(module),
                eps=module.eps,
                momentum=module.momentum,
                scale=module.weight is not None,
                center=module.bias is not None,  # torch's BatchNorm*d(bias=False)
                track_running_stats=module.track_running_stats,
                convention="torch",
                process_group=process_group,
                device="meta",
            ),
            module,
        )
    return None


def _to_local(module: nn.Module) -> nn.Module | None:
    if not isinstance(module, SyncBatchNorm):
        return None
    return _take_state(
        BatchNorm(module.num_features, device="meta", **_bnlab_options(module)),
        module,
    )


def _replace(module: nn.Module, make: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    new = make(module)
    if new is not None:
        return new
    for name, child in list(module.named_children()):
        module.add_module(name, _replace(child, make))
    return module


def convert_sync_batchnorm(module: nn.Module, process_group: ProcessGroup = None) -> nn.Module:
    """Replace every bnlab ``BatchNorm`` and ``torch.nn.BatchNorm1d/2d/3d`` (and torch's
    ``SyncBatchNorm``) in ``module`` by a bnlab :class:`SyncBatchNorm` over ``process_group``.
    Subclasses that compute something else (batch renorm, ghost batch norm, ...) are left as
    they are, with a warning.

    The new layers hold the original parameter and buffer objects (weights, running statistics,
    ``num_batches_tracked``), and keep eps, momentum, affine, track_running_stats, convention
    and the train/eval mode. Like PyTorch's converter it edits ``module`` in place and returns
    it (or the new layer when ``module`` itself is a batch norm).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"module: expected a torch.nn.Module, got {type(module).__name__}. Pass the model."
        )
    return _replace(module, lambda m: _to_sync(m, process_group))


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every bnlab :class:`SyncBatchNorm` in ``module`` by a plain bnlab ``BatchNorm``
    holding the same parameters, buffers and settings (e.g. to evaluate or export on one
    process). Edits ``module`` in place and returns it, or the new layer."""
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"module: expected a torch.nn.Module, got {type(module).__name__}. Pass the model."
        )
    return _replace(module, _to_local)


__all__ = [
    "PLAIN_BATCH_NORM_TYPES",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
    "sync_moments",
    "torch_num_dims",
]
