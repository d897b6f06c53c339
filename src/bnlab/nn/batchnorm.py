"""The BatchNorm layer: bookkeeping only. The math is :func:`bnlab.functional.batch_norm`."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from bnlab.functional import native
from bnlab.functional.batch_norm import (
    DEFAULT_MOMENTUM,
    MomentumArg,
    batch_norm,
    check_impl,
    get_convention,
)
from bnlab.nn.base import ChannelNorm, LazyChannelNorm


class BatchNorm(ChannelNorm):
    """Batch normalization (Ioffe & Szegedy, 2015) over every axis but the channel axis, for
    inputs of any rank >= 2; :func:`bnlab.functional.batch_norm` holds the formulas and the
    momentum conventions, this class only keeps the state.

    A drop-in for ``torch.nn.BatchNorm1d/2d/3d``: the same arguments in the same order
    (``num_features, eps, momentum, affine, track_running_stats, device, dtype``, keyword-only
    ``bias``), attributes, ``forward(input)``, errors (a wrong size is a ``MismatchError``, both
    a ``ValueError`` and a ``RuntimeError``) and state dict (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``), which loads into torch's
    classes and back; docs/conventions.md lists the few deliberate differences.

    ``BatchNorm(num_features=None)`` infers C from the first input, like the chapter's
    built-in layer and ``torch.nn.LazyBatchNorm2d``; ``BatchNorm(C, num_dims=4)`` is the
    textbook's signature, where ``num_dims`` (2 or 4, or any rank) checks the input's rank.
    ``gamma`` and ``beta`` are the chapter's names for ``weight`` and ``bias``.

    Options other frameworks document (docs/conventions.md maps them):
        scale, center: learn γ / β separately (Keras ``scale``/``center``, Flax
            ``use_scale``/``use_bias``); both default to ``affine``.
        bias: False for no β, keeping γ (torch 2.13's ``bias=False``).
        fixed_affine: γ and β are buffers, not parameters: kept at their values (1 and 0 unless
            loaded or set) and never trained (the chapter's exercise 5; MXNet ``fix_gamma``).
        use_global_stats: normalize with the running statistics in training too, and do not
            update them (MXNet ``use_global_stats``, Flax ``use_running_average=True``).
        axis: the channel axis (1 as PyTorch; -1 as Keras/Flax for (N, H, W, C) data).
        skip_nonfinite: keep a batch whose statistics are NaN/Inf out of the running estimates
            (one warning per layer); the default, as PyTorch, updates regardless.

    ``impl`` picks the kernel (docs/speed.md): "auto" (default: "native" for CPU tensors where
    ``bnlab build`` has built it, else "eager"), "native" (fused C++ for CPU tensors, the
    fastest; a training step is one C++ call that also updates the running statistics in
    place), "eager" (analytic backward in eager PyTorch operations), "compiled" /
    "eager_then_compiled" (the same, compiled by inductor), or "reference" (the readable
    math). An unknown name fails here, listing the names.
    """

    running_stats = ("running_mean", "running_var")

    def __init__(
        self,
        num_features: int | None = None,
        eps: float = 1e-5,
        momentum: MomentumArg = DEFAULT_MOMENTUM,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        num_dims: int | None = None,
        convention: str = "torch",
        scale: bool | None = None,
        center: bool | None = None,
        fixed_affine: bool = False,
        use_global_stats: bool = False,
        axis: int = 1,
        skip_nonfinite: bool = False,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if type(eps) is int and eps >= 2:
            raise TypeError(
                f"BatchNorm({num_features}, {eps}): the second positional argument is eps, as "
                f"in torch.nn.BatchNorm2d(num_features, eps, momentum, ...), and eps={eps} is "
                f"surely not meant. For the input rank (the chapter's num_dims) write "
                f"BatchNorm({num_features}, num_dims={eps})."
            )
        if num_dims is not None and num_dims < 2:
            raise ValueError(
                f"num_dims: expected the input rank (2 for (N, C), 4 for "
                f"(N, C, H, W)), got {num_dims}."
            )
        if axis == 0:
            raise ValueError(
                "axis: expected the channel axis (1, or -1 for channels-last "
                "(N, H, W, C) data), got 0, which is the batch axis."
            )
        if use_global_stats and not track_running_stats:
            raise ValueError(
                "use_global_stats=True needs running statistics; got "
                "track_running_stats=False. Set track_running_stats=True."
            )
        if center and not bias:
            raise ValueError(
                "center=True and bias=False contradict each other: both say whether β is "
                "learned. Pass only one of them."
            )
        conv = get_convention(convention)
        self.convention = conv.name
        # eps and momentum are checked where they are used, in forward, as torch does
        self.momentum = conv.default_momentum if momentum is DEFAULT_MOMENTUM else momentum
        self.num_dims = num_dims
        self.eps = eps
        self.scale = affine if scale is None else scale
        self.center = (affine and bias) if center is None else center
        self.fixed_affine = fixed_affine
        self.track_running_stats = track_running_stats
        self.use_global_stats = use_global_stats
        self.axis = axis
        self.skip_nonfinite = skip_nonfinite
        check_impl(impl)
        self.impl = impl
        self._create_state(
            num_features,
            affine=self.scale,
            bias=self.center,
            learn_affine=not fixed_affine,
            device=device,
            dtype=dtype,
        )

    def extra_repr(self) -> str:
        extras = [
            f"{k}={v!r}"
            for k, v, default in (
                ("fixed_affine", self.fixed_affine, False),
                ("use_global_stats", self.use_global_stats, False),
                ("axis", self.axis, 1),
                ("skip_nonfinite", self.skip_nonfinite, False),
                ("num_dims", self.num_dims, None),
                ("impl", self.impl, "auto"),
            )
            if v != default
        ]
        return ", ".join(
            [
                f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, bias={self.bias is not None}, "
                f"track_running_stats={self.track_running_stats}, "
                f"convention={self.convention!r}",
                *extras,
            ]
        )

    # the chapter's names for γ and β: read and assigned as weight and bias (same tensors,
    # state-dict keys unchanged)
    _ALIASES: ClassVar[dict[str, str]] = {"gamma": "weight", "beta": "bias"}

    @property
    def gamma(self) -> Tensor | None:
        """γ, the chapter's name for ``weight``."""
        return self.weight

    @property
    def beta(self) -> Tensor | None:
        """β, the chapter's name for ``bias``."""
        return self.bias

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(self._ALIASES.get(name, name), value)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input``; ``mask`` (the input's shape less the channel axis, True at real
        values) keeps padded positions out of the statistics (:func:`batch_norm`'s ``mask``)."""
        if mask is None:
            y_native = native.layer_forward(self, input)  # one C++ call (checks, kernel, buffers)
            if y_native is not None:
                return y_native
        axis = self._check_input(input)
        batch_stats = self.training and not self.use_global_stats
        update = batch_stats and self.track_running_stats
        # as torch: in training, running statistics go in only when they are being tracked
        # (track_running_stats may be switched off after construction)
        keep = not batch_stats or self.track_running_stats
        # the count as a tensor: momentum=None then weights the batch 1/(k+1) without reading
        # k back to Python, which torch.compile, torch.export and torch.func cannot trace
        batches_seen = (
            self.num_batches_tracked
            if (update and self.momentum is None and self.num_batches_tracked is not None)
            else 0
        )
        y, new_mean, new_var = batch_norm(
            input,
            self.weight,
            self.bias,
            self.running_mean if keep else None,
            self.running_var if keep else None,
            training=batch_stats,
            momentum=self.momentum,
            eps=self.eps,
            convention=self.convention,
            num_batches_tracked=batches_seen,
            channel_axis=axis,
            impl=self.impl,
            mask=mask,
        )
        if update and new_mean is not None and new_var is not None:
            self._store_running_stats(new_mean, new_var)
        return y


class LazyBatchNorm(LazyChannelNorm, BatchNorm):
    """BatchNorm whose C is inferred from the first input; becomes a :class:`BatchNorm`."""

    cls_to_become = BatchNorm


BatchNorm._lazy_variant = LazyBatchNorm

__all__ = ["BatchNorm", "LazyBatchNorm"]
