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
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from bnlab.functional.batch_norm import (
    DEFAULT_MOMENTUM,
    MomentumArg,
    get_convention,
    resolve_momentum,
)
from bnlab.functional.checks import check_eps, check_input
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
from bnlab.nn.batchnorm import BatchNorm, LazyBatchNorm


def check_num_features(num_features: object) -> None:
    if num_features is not None and (
        isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1
    ):
        raise ValueError(
            f"num_features: expected a positive int (the channel count C) or None to infer it "
            f"from the first input, got {num_features!r}."
        )


class LazyByDefault:
    """``Layer(None)`` / ``Layer()`` builds ``Layer``'s lazy variant (set as ``_lazy_variant`` in
    the class's own ``__dict__``, so subclasses are not redirected)."""

    num_features: int | None

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        num_features = args[0] if args else kwargs.get("num_features")
        lazy = cls.__dict__.get("_lazy_variant")
        if num_features is None and lazy is not None:
            cls = lazy
        return super().__new__(cls)  # type: ignore[misc]

    def __getnewargs__(self) -> tuple[Any, ...]:
        return (self.num_features,)  # copy/pickle rebuild the same (lazy or plain) class


class ChannelNorm(LazyByDefault, nn.Module):
    """Shared bookkeeping: C (or lazy), optional per-channel γ and β, per-channel state created
    from :meth:`state_shapes`, ``reset_parameters`` / ``reset_running_stats`` as PyTorch's."""

    _lazy_variant: ClassVar[type | None]
    num_features: int | None
    affine: bool
    weight: Tensor | None
    bias: Tensor | None

    def _create_state(
        self,
        num_features: int | None,
        *,
        affine: bool,
        buffers: Sequence[str],
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        """Register ``weight``/``bias`` (if affine) and ``buffers``; shapes from
        :meth:`state_shapes`, or uninitialized until the first input when C is None."""
        check_num_features(num_features)
        self.num_features = num_features
        self.affine = affine
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        lazy = num_features is None
        shapes = {} if num_features is None else self.state_shapes(num_features)
        for name in ("weight", "bias"):
            if not affine:
                self.register_parameter(name, None)
            elif lazy:
                self.register_parameter(name, cast(nn.Parameter, UninitializedParameter(**fk)))
            else:
                self.register_parameter(name, nn.Parameter(torch.empty(shapes[name], **fk)))
        for name in buffers:
            self.register_buffer(
                name, UninitializedBuffer(**fk) if lazy else torch.empty(shapes[name], **fk)
            )
        if not lazy:
            self.reset_parameters()

    def state_shapes(self, num_features: int) -> dict[str, tuple[int, ...]]:
        """Shapes of ``weight``, ``bias`` and the per-channel buffers for C channels."""
        return {"weight": (num_features,), "bias": (num_features,)}

    def validate_features(self, num_features: int) -> None:
        """Raise if the layer cannot take ``num_features`` channels (checked before any state is
        created, also for a lazy layer's first input)."""

    def reset_running_stats(self) -> None:
        """Nothing to reset for layers without running statistics."""

    def reset_parameters(self) -> None:
        """γ = 1, β = 0, and fresh running statistics."""
        self.reset_running_stats()
        weight, bias = getattr(self, "weight", None), getattr(self, "bias", None)
        if self.affine and isinstance(weight, Tensor) and not isinstance(weight, LazyTensor):
            nn.init.ones_(weight)
            nn.init.zeros_(bias)  # type: ignore[arg-type]

    def _check_input(self, x: Tensor) -> None:
        check_input(x)
        if self.num_features is not None and x.shape[1] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels on axis 1 (num_features="
                f"{self.num_features}), got input shape {tuple(x.shape)} with {x.shape[1]}. "
                "Check the previous layer's output channels, or build the layer with "
                f"num_features={x.shape[1]} (or None to infer it)."
            )


LazyTensor = (UninitializedParameter, UninitializedBuffer)


class LazyChannelNorm(LazyModuleMixin):
    """Materialize every uninitialized parameter and buffer once the first input shows C."""

    def initialize_parameters(self, x: Tensor, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        norm: Any = self
        check_input(x)
        c = int(x.shape[1])
        norm.validate_features(c)  # before any state changes
        norm.num_features = c
        if not norm.has_uninitialized_params():  # stateless, or loaded from a state dict
            return
        with torch.no_grad():
            for name, shape in norm.state_shapes(c).items():
                t = getattr(norm, name, None)
                if isinstance(t, LazyTensor):
                    t.materialize(shape)
            norm.reset_parameters()


def _store(module: nn.Module, new: dict[str, Tensor | None]) -> None:
    """Copy the returned running statistics into the module's buffers; count one batch."""
    with torch.no_grad():
        for name, value in new.items():
            buf = getattr(module, name)
            if value is not None and buf is not None:
                buf.copy_(value)
        count = getattr(module, "num_batches_tracked", None)
        if count is not None:
            count.add_(1)


def _batches_seen(module: nn.Module, momentum: float | None) -> int:
    count = getattr(module, "num_batches_tracked", None)
    return int(count) if (momentum is None and module.training and count is not None) else 0


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
        self._create_state(num_features, affine=affine, buffers=(), device=device, dtype=dtype)

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
        if num_features is not None:
            check_num_features(num_features)
            self.validate_features(num_features)
        self._create_state(num_features, affine=affine, buffers=(), device=device, dtype=dtype)

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
    update and conventions as :class:`bnlab.nn.BatchNorm`)."""

    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(
        self,
        num_features: int | None = None,
        *,
        eps: float = 1e-5,
        momentum: MomentumArg = DEFAULT_MOMENTUM,
        affine: bool = False,
        track_running_stats: bool = False,
        convention: str = "torch",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_eps(eps)
        self.eps = eps
        self.convention = get_convention(convention).name
        self.momentum = resolve_momentum(momentum, get_convention(convention))
        self.track_running_stats = track_running_stats
        if track_running_stats:
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
            buffers: tuple[str, ...] = ("running_mean", "running_var")
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)
            buffers = ()
        self._create_state(num_features, affine=affine, buffers=buffers, device=device, dtype=dtype)

    def state_shapes(self, num_features: int) -> dict[str, tuple[int, ...]]:
        c = (num_features,)
        return {"weight": c, "bias": c, "running_mean": c, "running_var": c}

    def reset_running_stats(self) -> None:
        if self.running_mean is not None and not isinstance(self.running_mean, LazyTensor):
            assert self.running_var is not None and self.num_batches_tracked is not None
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, convention={self.convention!r}"
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
            num_batches_tracked=_batches_seen(self, self.momentum),
        )
        if self.training and self.track_running_stats:
            _store(self, {"running_mean": new_mean, "running_var": new_var})
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


class BatchRenorm(LazyByDefault, BatchNorm):
    """Batch renormalization (:func:`bnlab.functional.batch_renorm`; Ioffe, 2017).

    The clipping limits follow :func:`bnlab.functional.renorm_limits` at the step
    ``num_batches_tracked`` (training batches seen, saved in the state dict): batch norm until
    ``warmup_start``, then rmax rises linearly from 1 to ``rmax`` by ``rmax_warmup_end`` and dmax
    from 0 to ``dmax`` by ``dmax_warmup_end``. The defaults are the paper's ImageNet schedule;
    for short runs pass smaller step counts. Buffers and prediction are batch norm's, so the
    state dict loads into ``torch.nn.BatchNorm2d``.
    """

    _lazy_variant: ClassVar[type | None]
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
            num_batches_tracked=_batches_seen(self, self.momentum),
        )
        if self.training and res.running_mean is not None and res.running_var is not None:
            self._store_running_stats(res.running_mean, res.running_var)
        return res.y


class GhostBatchNorm(LazyByDefault, BatchNorm):
    """Ghost batch normalization (:func:`bnlab.functional.ghost_batch_norm`; Hoffer et al.,
    2017): training statistics per virtual batch of ``virtual_batch_size`` samples; running
    statistics and prediction as batch norm on the whole batch (one update per step). The
    default of 32 samples is smaller than the paper's 128, for this lab's batches of 128-256."""

    _lazy_variant: ClassVar[type | None]

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
            num_batches_tracked=_batches_seen(self, self.momentum),
            impl=self.impl,
        )
        if self.training and new_mean is not None and new_var is not None:
            self._store_running_stats(new_mean, new_var)
        return y


class LazyBatchRenorm(LazyBatchNorm, BatchRenorm):  # type: ignore[misc]
    cls_to_become = BatchRenorm  # type: ignore[assignment]


class LazyGhostBatchNorm(LazyBatchNorm, GhostBatchNorm):  # type: ignore[misc]
    cls_to_become = GhostBatchNorm  # type: ignore[assignment]


BatchRenorm._lazy_variant = LazyBatchRenorm
GhostBatchNorm._lazy_variant = LazyGhostBatchNorm


__all__ = [
    "BatchRenorm",
    "ChannelNorm",
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
