"""The BatchNorm layer: bookkeeping only. The math is :func:`bnlab.functional.batch_norm`."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from bnlab.functional import native
from bnlab.functional.batch_norm import (
    DEFAULT_MOMENTUM,
    MomentumArg,
    batch_norm,
    channel_axis_index,
    check_impl,
    get_convention,
)
from bnlab.functional.checks import MismatchError, check_input


class BatchNorm(nn.Module):
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

    _version = 2  # same state-dict version as torch's _NormBase, so both load each other's

    num_features: int | None
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __new__(cls, *args: Any, **kwargs: Any) -> BatchNorm:
        # BatchNorm() / BatchNorm(None) is lazy: it becomes a plain BatchNorm after one forward.
        num_features = args[0] if args else kwargs.get("num_features")
        if cls is BatchNorm and num_features is None:
            cls = LazyBatchNorm
        return super().__new__(cls)

    def __getnewargs__(self) -> tuple[Any, ...]:
        return (self.num_features,)  # so copy/pickle rebuild the same (lazy or not) class

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
        if num_features is not None and (
            isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1
        ):
            raise ValueError(
                f"num_features: expected a positive int (the channel count C) or None to infer "
                f"it from the first input, got {num_features!r}."
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
        self.num_features = num_features
        self.num_dims = num_dims
        self.eps = eps
        self.scale = affine if scale is None else scale
        self.center = (affine and bias) if center is None else center
        self.affine = self.scale  # torch's attribute: γ exists (β too unless bias=False)
        self.fixed_affine = fixed_affine
        self.track_running_stats = track_running_stats
        self.use_global_stats = use_global_stats
        self.axis = axis
        self.skip_nonfinite = skip_nonfinite
        check_impl(impl)
        self.impl = impl
        self._warned_nonfinite = False
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        lazy = num_features is None

        def per_channel() -> Tensor:  # an uninitialized placeholder until C is known
            return UninitializedBuffer(**fk) if lazy else torch.empty(num_features or 0, **fk)

        for name, wanted in (("weight", self.scale), ("bias", self.center)):
            if not wanted:
                self.register_parameter(name, None)
            elif fixed_affine:
                self.register_buffer(name, per_channel())
            else:
                param = UninitializedParameter(**fk) if lazy else nn.Parameter(per_channel())
                self.register_parameter(name, cast(nn.Parameter, param))
        if track_running_stats:
            self.register_buffer("running_mean", per_channel())
            self.register_buffer("running_var", per_channel())
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        if not lazy:
            self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, batch count 0."""
        if self.track_running_stats and self.num_features is not None:
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """γ = 1, β = 0 (the chapter's initialization), and fresh running statistics."""
        self.reset_running_stats()
        if self.num_features is None:
            return
        with torch.no_grad():
            if self.weight is not None:
                self.weight.fill_(1)
            if self.bias is not None:
                self.bias.zero_()

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

    def _check_input(self, x: Tensor) -> int:
        """Validate ``x`` and return its channel axis as a non-negative index."""
        check_input(x)
        if self.num_dims is not None and x.ndim != self.num_dims:
            raise ValueError(
                f"expected a rank-{self.num_dims} input (num_dims={self.num_dims}), got shape "
                f"{tuple(x.shape)}. Build the layer with num_dims={x.ndim} or reshape the input."
            )
        axis = channel_axis_index(self.axis, x.ndim)
        if self.num_features is not None and x.shape[axis] != self.num_features:
            raise MismatchError(
                f"expected {self.num_features} channels on axis {self.axis} (num_features="
                f"{self.num_features}), got input shape {tuple(x.shape)} with {x.shape[axis]}. "
                "Check the previous layer's output channels, or build the layer with "
                f"num_features={x.shape[axis]} (or None to infer it)."
            )
        return axis

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

    def _store_running_stats(self, new_mean: Tensor, new_var: Tensor) -> None:
        """Keep the new running statistics and count the batch, unless ``skip_nonfinite`` and
        they are not finite (then warn once per layer). Subclasses that compute statistics
        their own way (sync, renorm, ghost) store them through here too."""
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        if self.skip_nonfinite and not bool(
            torch.isfinite(new_mean).all() & torch.isfinite(new_var).all()
        ):
            if not self._warned_nonfinite:
                warnings.warn(
                    f"{type(self).__name__}: a batch had non-finite statistics (NaN/Inf in "
                    "the input); the running statistics were left unchanged. This warning "
                    "is shown once per layer.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._warned_nonfinite = True
            return
        # buffers never require grad and the new values are detached: no no_grad() needed
        self.running_mean.copy_(new_mean)
        self.running_var.copy_(new_var)
        self.num_batches_tracked.add_(1)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        if self.track_running_stats:
            add_missing_batch_count(state_dict, prefix, local_metadata, self.num_batches_tracked)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def add_missing_batch_count(
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    current: Tensor | None = None,
) -> None:
    """A state dict without num_batches_tracked (old, version < 2, torch checkpoints; a partial
    dict loaded with strict=False) keeps the module's ``current`` count, as torch does; 0 where
    there is none (or it is on the meta device)."""
    key = prefix + "num_batches_tracked"
    if (local_metadata.get("version") or 0) < 2 and key not in state_dict:
        keep = current is not None and current.device.type != "meta"
        state_dict[key] = current if keep else torch.tensor(0, dtype=torch.long)


class LazyBatchNorm(LazyModuleMixin, BatchNorm):
    """BatchNorm whose C is inferred from the first input; becomes a :class:`BatchNorm`."""

    cls_to_become = BatchNorm

    def initialize_parameters(  # type: ignore[override]
        self, input: Tensor, mask: Tensor | None = None
    ) -> None:
        # called with forward's arguments; C comes from the input alone
        if self.num_features is None:  # also after a state dict materialized the tensors
            self.num_features = int(input.shape[self._check_input(input)])
        if not self.has_uninitialized_params():
            return
        with torch.no_grad():
            for t in (self.weight, self.bias, self.running_mean, self.running_var):
                if t is not None:
                    t.materialize((self.num_features,))  # type: ignore[attr-defined,union-attr]
            self.reset_parameters()
