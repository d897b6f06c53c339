"""The bookkeeping every channel norm shares, written once (as torch's ``_NormBase`` /
``_LazyNormBase`` and Flax's normalization layers split it): C and its check, lazy construction,
per-channel state from :meth:`ChannelNorm.state_shapes`, ``reset_parameters`` /
``reset_running_stats``, the one running-statistics store, the input check. A norm says only
which state it has and what its forward computes.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, ClassVar, Self, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

from bnlab.functional.batch_norm import channel_axis_index
from bnlab.functional.checks import MismatchError, check_input


def check_num_features(num_features: object) -> None:
    """C must be a positive int, or None for a layer that infers it from its first input."""
    if num_features is not None and (
        isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1
    ):
        raise ValueError(
            f"num_features: expected a positive int (the channel count C) or None to infer it "
            f"from the first input, got {num_features!r}."
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


def _all_finite(tensors: tuple[Tensor, ...]) -> bool:
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())  # one host sync


class ChannelNorm(nn.Module):
    """A norm with C channels on ``axis`` (1), optional per-channel γ and β, and running
    statistics named by :attr:`running_stats`. ``Layer(None)`` / ``Layer()`` builds the class's
    lazy variant (``_lazy_variant``, looked up in the class's own ``__dict__`` so subclasses are
    not redirected), which infers C from the first input and then becomes ``Layer``."""

    _version = 2  # torch's _NormBase version: state dicts without num_batches_tracked are < 2

    #: the running-statistic buffers (besides num_batches_tracked), in state-dict order
    running_stats: ClassVar[tuple[str, ...]] = ()
    _lazy_variant: ClassVar[type | None] = None

    # defaults for the options only some norms take
    axis: int = 1
    num_dims: int | None = None
    skip_nonfinite: bool = False
    _warned_nonfinite: bool = False

    num_features: int | None
    affine: bool
    track_running_stats: bool
    weight: Tensor | None
    bias: Tensor | None
    # the norms with running statistics have these (and the batch-style ones running_mean/var)
    momentum: float | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        num_features = args[0] if args else kwargs.get("num_features")
        lazy = cls.__dict__.get("_lazy_variant")
        return super().__new__(lazy if num_features is None and lazy is not None else cls)

    def __getnewargs__(self) -> tuple[Any, ...]:
        return (self.num_features,)  # so copy/pickle rebuild the same (lazy or plain) class

    def _create_state(
        self,
        num_features: int | None,
        *,
        affine: bool,
        bias: bool | None = None,
        learn_affine: bool = True,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        """Check C, then register γ (``weight``, where ``affine``) and β (``bias``, where
        ``bias``, by default ``affine``) as parameters, or as buffers when not
        ``learn_affine``; and the :attr:`running_stats` buffers with ``num_batches_tracked``,
        all None unless ``self.track_running_stats``. Shapes come from :meth:`state_shapes`;
        while C is None every tensor is an uninitialized placeholder."""
        check_num_features(num_features)
        if num_features is not None:
            self.validate_features(num_features)
        self.num_features = num_features
        self.affine = affine  # torch's attribute: γ exists (β too unless bias=False)
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        lazy = num_features is None
        shapes = {} if num_features is None else self.state_shapes(num_features)

        def state(name: str, parameter: bool) -> Tensor:
            if lazy:
                return UninitializedParameter(**fk) if parameter else UninitializedBuffer(**fk)
            t = torch.empty(shapes[name], **fk)
            return nn.Parameter(t) if parameter else t

        for name, wanted in (("weight", affine), ("bias", affine if bias is None else bias)):
            if not wanted:
                self.register_parameter(name, None)
            elif learn_affine:
                self.register_parameter(name, cast(nn.Parameter, state(name, parameter=True)))
            else:
                self.register_buffer(name, state(name, parameter=False))
        if self.running_stats:
            track = self.track_running_stats
            for name in self.running_stats:
                self.register_buffer(name, state(name, parameter=False) if track else None)
            count = torch.tensor(0, dtype=torch.long, device=device)
            self.register_buffer("num_batches_tracked", count if track else None)
        if not lazy:
            self.reset_parameters()

    def state_shapes(self, num_features: int) -> dict[str, tuple[int, ...]]:
        """Shapes of ``weight``, ``bias`` and the running statistics for C channels: (C,) each
        unless a norm says otherwise."""
        return {name: (num_features,) for name in ("weight", "bias", *self.running_stats)}

    def validate_features(self, num_features: int) -> None:
        """Raise if the layer cannot take ``num_features`` channels (checked before any state is
        created, also for a lazy layer's first input)."""

    def _fill_running_stats(self) -> None:
        """Initial running statistics: mean 0, variance 1 (torch's)."""
        assert self.running_mean is not None and self.running_var is not None
        self.running_mean.zero_()
        self.running_var.fill_(1)

    def reset_running_stats(self) -> None:
        """Running statistics at their initial values, batch count 0."""
        if not self.running_stats or not self.track_running_stats:
            return
        count = self.num_batches_tracked
        if count is None or any(is_lazy(getattr(self, n)) for n in self.running_stats):
            return  # no buffers to reset, or C not known yet
        self._fill_running_stats()
        count.zero_()

    def reset_parameters(self) -> None:
        """γ = 1, β = 0 (the chapter's initialization), and fresh running statistics."""
        self.reset_running_stats()
        with torch.no_grad():
            if self.weight is not None and not is_lazy(self.weight):
                self.weight.fill_(1)
            if self.bias is not None and not is_lazy(self.bias):
                self.bias.zero_()

    def _check_input(self, x: Tensor) -> int:
        """Validate ``x`` (rank, and C on the channel axis once C is known) and return its
        channel axis as a non-negative index."""
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

    def _batches_seen(self) -> int:
        """Training batches averaged in so far, by which a cumulative average (momentum None)
        weighs the new batch; 0 otherwise."""
        count = self.num_batches_tracked
        return int(count) if (self.momentum is None and self.training and count is not None) else 0

    def _store_running_stats(self, *new: Tensor) -> None:
        """Keep one batch's new running statistics (in :attr:`running_stats` order) and count
        the batch, unless ``skip_nonfinite`` and they are not finite (then warn once per
        layer). Every norm's training step, and tools that update a layer's statistics,
        store through here."""
        if self.skip_nonfinite and not _all_finite(new):
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
        assert self.num_batches_tracked is not None
        for name, value in zip(self.running_stats, new, strict=True):
            getattr(self, name).copy_(value.detach())  # buffers stay out of the graph
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
        if self.running_stats and self.track_running_stats:
            add_missing_batch_count(state_dict, prefix, local_metadata, self.num_batches_tracked)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class LazyChannelNorm(LazyModuleMixin):
    """The lazy variant's one materializer: C from the first input (checked as the layer checks
    it, before any state changes), every placeholder shaped by ``state_shapes``, then fresh
    values; the layer then becomes its ``cls_to_become``."""

    def initialize_parameters(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        # called with forward's arguments, whatever their names; the first is the input
        norm = cast(ChannelNorm, self)
        input = next(iter(inspect.signature(norm.forward).bind(*args, **kwargs).arguments.values()))
        c = int(input.shape[norm._check_input(input)])
        norm.validate_features(c)
        norm.num_features = c
        if not self.has_uninitialized_params():  # type: ignore[misc]  # stateless, or loaded
            return
        with torch.no_grad():
            for name, shape in norm.state_shapes(c).items():
                t = getattr(norm, name, None)
                if t is not None and is_lazy(t):
                    t.materialize(shape)  # type: ignore[attr-defined]
            norm.reset_parameters()


__all__ = ["ChannelNorm", "LazyChannelNorm", "add_missing_batch_count", "check_num_features"]
