"""The normalization layers: bookkeeping only (which state, which mode); the math is in
:mod:`bnlab.functional.norms`, :mod:`bnlab.functional.whitening` and
:mod:`bnlab.functional.pit`.

Every layer takes ``num_features`` (C) first; ``None`` builds its lazy variant, which infers C
from the first input and then becomes the plain class (as ``bnlab.nn.BatchNorm()`` does).
State-dict keys follow PyTorch (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``), so LayerNorm, GroupNorm and InstanceNorm checkpoints load into
``torch.nn.LayerNorm``/``GroupNorm``/``InstanceNorm2d`` and back, and BatchRenorm and
GhostBatchNorm ones into ``torch.nn.BatchNorm2d``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from bnlab.functional.batch_norm import (
    DEFAULT_MOMENTUM,
    MomentumArg,
    get_convention,
    resolve_momentum,
)
from bnlab.functional.checks import check_eps
from bnlab.functional.masked import refuse_mask
from bnlab.functional.norms import (
    batch_renorm,
    check_groups,
    check_renorm_clips,
    ghost_batch_norm,
    group_norm,
    instance_norm,
    layer_norm,
    renorm_limits,
)
from bnlab.nn.base import ChannelNorm, LazyChannelNorm
from bnlab.nn.batchnorm import BatchNorm

# ---------------------------------------------------------------------------------------------
# Layer, group, instance
# ---------------------------------------------------------------------------------------------


class LayerNorm(ChannelNorm):
    """Layer normalization over every non-batch axis (C, *spatial), per sample
    (:func:`bnlab.functional.layer_norm`).

    Affine convention:

    * default (``normalized_shape=None``): per-channel γ, β of shape (C,), the CNN convention;
      equals ``torch.nn.GroupNorm(1, C)``, works for any spatial size, and can be lazy.
    * ``normalized_shape=(C, H, W)``: elementwise γ, β of that shape, exactly
      ``torch.nn.LayerNorm((C, H, W))`` (state dicts interchangeable); inputs must then have
      ``x.shape[1:] == normalized_shape``.

    On (N, C) inputs both equal ``torch.nn.LayerNorm(C)``.
    """

    def __init__(
        self,
        num_features: int | None = None,
        *,
        eps: float = 1e-5,
        affine: bool = True,
        normalized_shape: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_eps(eps)
        self.eps = eps
        self.normalized_shape: tuple[int, ...] | None = None
        if normalized_shape is not None:
            shape = tuple(normalized_shape)
            if not shape or not all(isinstance(s, int) and s >= 1 for s in shape):
                raise ValueError(
                    f"normalized_shape: expected the input's (C, *spatial) shape as positive "
                    f"ints, e.g. (6, 28, 28), got {normalized_shape!r}."
                )
            if num_features is not None and num_features != shape[0]:
                raise ValueError(
                    f"num_features={num_features} and normalized_shape={shape}: expected "
                    f"normalized_shape[0] == num_features. Pass only normalized_shape."
                )
            self.normalized_shape = shape
            num_features = shape[0]
        self._create_state(num_features, affine=affine, device=device, dtype=dtype)

    def state_shapes(self, num_features: int) -> dict[str, tuple[int, ...]]:
        shape = self.normalized_shape or (num_features,)
        return {"weight": shape, "bias": shape}

    def extra_repr(self) -> str:
        shape = (
            "" if self.normalized_shape is None else f", normalized_shape={self.normalized_shape}"
        )
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}{shape}"

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.normalized_shape is not None and tuple(x.shape[1:]) != self.normalized_shape:
            raise ValueError(
                f"expected inputs of shape (N, {', '.join(map(str, self.normalized_shape))}) "
                f"(normalized_shape={self.normalized_shape}), got {tuple(x.shape)}. Build the "
                "layer without normalized_shape for per-channel γ, β and any spatial size."
            )
        return layer_norm(x, self.weight, self.bias, eps=self.eps)


class GroupNorm(ChannelNorm):
    """Group normalization (:func:`bnlab.functional.group_norm`): ``num_groups`` groups of C/G
    channels, per-channel γ, β. Equals ``torch.nn.GroupNorm(num_groups, C)``. The default 32
    groups is the paper's; it must divide C."""

    def __init__(
        self,
        num_features: int | None = None,
        *,
        num_groups: int = 32,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_eps(eps)
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups: expected a positive int, got {num_groups!r}.")
        self.num_groups = num_groups
        self.eps = eps
        self._create_state(num_features, affine=affine, device=device, dtype=dtype)

    def validate_features(self, num_features: int) -> None:
        check_groups(self.num_groups, num_features)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, "
            f"affine={self.affine}"
        )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return group_norm(x, self.num_groups, self.weight, self.bias, eps=self.eps)


class InstanceNorm(ChannelNorm):
    """Instance normalization (:func:`bnlab.functional.instance_norm`) for inputs with spatial
    axes (N, C, *spatial). Defaults as ``torch.nn.InstanceNorm2d``: no affine, no running
    statistics; ``track_running_stats=True`` keeps running mean/variance for prediction (same
    update, conventions and ``skip_nonfinite`` as :class:`bnlab.nn.BatchNorm`)."""

    running_stats = ("running_mean", "running_var")

    def __init__(
        self,
        num_features: int | None = None,
        *,
        eps: float = 1e-5,
        momentum: MomentumArg = DEFAULT_MOMENTUM,
        affine: bool = False,
        track_running_stats: bool = False,
        convention: str = "torch",
        skip_nonfinite: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_eps(eps)
        self.eps = eps
        self.convention = get_convention(convention).name
        self.momentum = resolve_momentum(momentum, get_convention(convention))
        self.track_running_stats = track_running_stats
        self.skip_nonfinite = skip_nonfinite
        self._create_state(num_features, affine=affine, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        skip = ", skip_nonfinite=True" if self.skip_nonfinite else ""
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, convention={self.convention!r}{skip}"
        )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        y, new_mean, new_var = instance_norm(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            convention=self.convention,
            num_batches_tracked=self._batches_seen(),
        )
        if (
            self.training
            and self.track_running_stats
            and new_mean is not None
            and new_var is not None
        ):
            self._store_running_stats(new_mean, new_var)
        return y


class LazyLayerNorm(LazyChannelNorm, LayerNorm):
    cls_to_become = LayerNorm


class LazyGroupNorm(LazyChannelNorm, GroupNorm):
    cls_to_become = GroupNorm


class LazyInstanceNorm(LazyChannelNorm, InstanceNorm):
    cls_to_become = InstanceNorm


LayerNorm._lazy_variant = LazyLayerNorm
GroupNorm._lazy_variant = LazyGroupNorm
InstanceNorm._lazy_variant = LazyInstanceNorm


# ---------------------------------------------------------------------------------------------
# Batch renormalization and ghost batch norm: batch norm's state, another training step
# ---------------------------------------------------------------------------------------------


class BatchRenorm(BatchNorm):
    """Batch renormalization (:func:`bnlab.functional.batch_renorm`; Ioffe, 2017).

    The clipping limits follow :func:`bnlab.functional.renorm_limits` at the step
    ``num_batches_tracked`` (training batches seen, saved in the state dict): batch norm until
    ``warmup_start``, then rmax rises linearly from 1 to ``rmax`` by ``rmax_warmup_end`` and dmax
    from 0 to ``dmax`` by ``dmax_warmup_end``. The defaults are the paper's ImageNet schedule;
    for short runs pass smaller step counts. Buffers and prediction are batch norm's, so the
    state dict loads into ``torch.nn.BatchNorm2d``.
    """

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        num_features: int | None = None,
        num_dims: int | None = None,
        *,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_start: int = 5000,
        rmax_warmup_end: int = 40000,
        dmax_warmup_end: int = 25000,
        eps: float = 1e-5,
        momentum: MomentumArg = DEFAULT_MOMENTUM,
        affine: bool = True,
        convention: str = "torch",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_renorm_clips(rmax, dmax)
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.warmup_start = warmup_start
        self.rmax_warmup_end = rmax_warmup_end
        self.dmax_warmup_end = dmax_warmup_end
        self.limits(0)  # validates the step counts before anything is built
        super().__init__(
            num_features,
            num_dims=num_dims,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=True,
            convention=convention,
            device=device,
            dtype=dtype,
        )

    def limits(self, step: int | None = None) -> tuple[float, float]:
        """(rmax, dmax) at ``step``; by default the next training step, num_batches_tracked."""
        return renorm_limits(
            int(self.num_batches_tracked) if step is None else step,
            rmax=self.rmax,
            dmax=self.dmax,
            warmup_start=self.warmup_start,
            rmax_warmup_end=self.rmax_warmup_end,
            dmax_warmup_end=self.dmax_warmup_end,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", rmax={self.rmax}, dmax={self.dmax}, warmup_start={self.warmup_start}, "
            f"rmax_warmup_end={self.rmax_warmup_end}, dmax_warmup_end={self.dmax_warmup_end}"
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        refuse_mask(self, mask)
        self._check_input(x)
        rmax, dmax = self.limits()
        res = batch_renorm(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            training=self.training,
            rmax=rmax,
            dmax=dmax,
            momentum=self.momentum,
            eps=self.eps,
            convention=self.convention,
            num_batches_tracked=self._batches_seen(),
        )
        if self.training and res.running_mean is not None and res.running_var is not None:
            self._store_running_stats(res.running_mean, res.running_var)
        return res.y


class GhostBatchNorm(BatchNorm):
    """Ghost batch normalization (:func:`bnlab.functional.ghost_batch_norm`; Hoffer et al.,
    2017): training statistics per virtual batch of ``virtual_batch_size`` samples; running
    statistics and prediction as batch norm on the whole batch (one update per step). The
    default of 32 samples is smaller than the paper's 128, for this lab's batches of 128-256."""

    def __init__(
        self,
        num_features: int | None = None,
        num_dims: int | None = None,
        *,
        virtual_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: MomentumArg = DEFAULT_MOMENTUM,
        affine: bool = True,
        track_running_stats: bool = True,
        convention: str = "torch",
        impl: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if (
            isinstance(virtual_batch_size, bool)
            or not isinstance(virtual_batch_size, int)
            or virtual_batch_size < 1
        ):
            raise ValueError(
                f"virtual_batch_size: expected a positive int (samples per virtual batch), got "
                f"{virtual_batch_size!r}."
            )
        self.virtual_batch_size = virtual_batch_size
        super().__init__(
            num_features,
            num_dims=num_dims,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
            convention=convention,
            impl=impl,
            device=device,
            dtype=dtype,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        refuse_mask(self, mask)
        self._check_input(x)
        y, new_mean, new_var = ghost_batch_norm(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            virtual_batch_size=self.virtual_batch_size,
            training=self.training,
            momentum=self.momentum,
            eps=self.eps,
            convention=self.convention,
            num_batches_tracked=self._batches_seen(),
            impl=self.impl,
        )
        if self.training and new_mean is not None and new_var is not None:
            self._store_running_stats(new_mean, new_var)
        return y


class LazyBatchRenorm(LazyChannelNorm, BatchRenorm):
    cls_to_become = BatchRenorm


class LazyGhostBatchNorm(LazyChannelNorm, GhostBatchNorm):
    cls_to_become = GhostBatchNorm


BatchRenorm._lazy_variant = LazyBatchRenorm
GhostBatchNorm._lazy_variant = LazyGhostBatchNorm


__all__ = [
    "BatchRenorm",
    "GhostBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "LazyBatchRenorm",
    "LazyGhostBatchNorm",
    "LazyGroupNorm",
    "LazyInstanceNorm",
    "LazyLayerNorm",
]
