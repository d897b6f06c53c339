"""A batch norm whose statistics and affine parameters are constants, in every mode."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from bnlab.functional.batch_norm import channel_axis_index
from bnlab.functional.checks import check_eps, check_input
from bnlab.functional.core import accumulation_dtype, apply_scale_shift, scale_shift
from bnlab.nn.base import add_missing_batch_count, check_num_features
from bnlab.nn.sync import torch_num_dims


class FrozenBatchNorm(nn.Module):
    """Prediction-mode batch norm, frozen (as torchvision's/timm's ``FrozenBatchNorm2d``):

        y = x · scale + shift,   scale = γ / sqrt(σ̂² + ε),   shift = β − μ̂ · scale

    in training *and* evaluation mode, so ``model.train()`` does not bring batch statistics
    back. γ, β, μ̂, σ̂² are buffers, not parameters: they get no gradient, no optimizer sees them
    and ``model.requires_grad_(True)`` does not revive them, yet they travel with
    ``state_dict`` under BN's own keys (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``), so BN checkpoints load into it and back.

    Build one with :meth:`from_batch_norm` (or :func:`bnlab.tools.freeze_bn` for a whole
    model); :meth:`to_batch_norm` gives back a trainable layer of the original class.
    """

    _version = 2  # BN's state-dict version, so checkpoints load both ways

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        axis: int = 1,
        num_dims: int | None = None,
        weight: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_features is None:  # frozen statistics come from a trained layer: C is known
            raise ValueError(
                "num_features: expected a positive int (the channel count C), got None; a "
                "frozen layer cannot infer C. Build it with FrozenBatchNorm.from_batch_norm(bn)."
            )
        check_num_features(num_features)
        check_eps(eps)
        self.num_features = num_features
        self.eps = eps
        self.axis = axis
        self.num_dims = num_dims
        fk: dict[str, Any] = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **fk) if weight else None)
        self.register_buffer("bias", torch.zeros(num_features, **fk) if bias else None)
        self.register_buffer("running_mean", torch.zeros(num_features, **fk))
        self.register_buffer("running_var", torch.ones(num_features, **fk))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )
        # The layer this one was frozen from, on the meta device (no memory), for to_batch_norm.
        self._template: nn.Module | None = None

    @classmethod
    def from_batch_norm(cls, bn: nn.Module) -> FrozenBatchNorm:
        """A frozen copy of ``bn`` (bnlab's or torch's BN, with running statistics)."""
        if any(is_lazy(t) for t in (*bn.parameters(recurse=False), *bn.buffers(recurse=False))):
            raise ValueError(
                f"{type(bn).__name__} is still lazy (channel count unknown). Run one forward "
                "pass with a sample input before freezing it."
            )
        mean, var = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
        if mean is None or var is None:
            raise ValueError(
                f"{type(bn).__name__} has no running statistics (track_running_stats=False), "
                "so there is nothing to freeze them at. Build it with track_running_stats=True "
                "(and train, or run bnlab.tools.precise_bn) first."
            )
        weight, bias = getattr(bn, "weight", None), getattr(bn, "bias", None)
        frozen = cls(
            int(mean.numel()),
            eps=float(getattr(bn, "eps", 1e-5)),
            axis=int(getattr(bn, "axis", 1)),
            num_dims=getattr(bn, "num_dims", None) or torch_num_dims(bn),
            weight=weight is not None,
            bias=bias is not None,
            device=mean.device,
            dtype=mean.dtype,
        )
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                src, dst = getattr(bn, name, None), getattr(frozen, name)
                if src is not None and dst is not None:
                    setattr(frozen, name, src.detach().clone())
        # object.__setattr__: a template, not a submodule (kept out of state_dict and modules())
        object.__setattr__(frozen, "_template", copy.deepcopy(bn).to(device="meta"))
        frozen.train(bn.training)
        return frozen

    def to_batch_norm(self) -> nn.Module:
        """A trainable BN with this layer's values: the class it was frozen from (with its
        options and ``requires_grad`` flags), else a :class:`bnlab.nn.BatchNorm`."""
        if self._template is None:
            from bnlab.nn import BatchNorm

            bn: nn.Module = BatchNorm(
                self.num_features,
                num_dims=self.num_dims,
                eps=self.eps,
                axis=self.axis,
                scale=self.weight is not None,
                center=self.bias is not None,
                device=self.running_mean.device,
                dtype=self.running_mean.dtype,
            )
        else:
            bn = copy.deepcopy(self._template).to_empty(device=self.running_mean.device)
            bn.to(dtype=self.running_mean.dtype)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                src, dst = getattr(self, name), getattr(bn, name, None)
                if (src is None) != (dst is None):
                    raise ValueError(
                        f"cannot unfreeze: {name} is {'absent' if src is None else 'present'} "
                        f"here but {'absent' if dst is None else 'present'} in "
                        f"{type(bn).__name__}; load the values into a matching layer by hand."
                    )
                if src is not None and dst is not None:
                    dst.copy_(src)
        bn.train(self.training)
        return bn

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, axis={self.axis}"

    def forward(self, x: Tensor) -> Tensor:
        check_input(x)
        if self.num_dims is not None and x.ndim != self.num_dims:
            raise ValueError(
                f"expected a rank-{self.num_dims} input (as the layer this was frozen from), got "
                f"shape {tuple(x.shape)}."
            )
        axis = channel_axis_index(self.axis, x.ndim)
        if x.shape[axis] != self.num_features:
            raise ValueError(
                f"expected {self.num_features} channels on axis {self.axis}, got input shape "
                f"{tuple(x.shape)} with {x.shape[axis]}. Check the previous layer's output."
            )
        acc = accumulation_dtype(x.dtype)

        def up(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(acc)

        scale, shift = scale_shift(
            self.running_mean.to(acc),
            self.running_var.to(acc),
            self.eps,
            up(self.weight),
            up(self.bias),
        )
        return apply_scale_shift(x, scale, shift, channel_axis=axis)

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
        add_missing_batch_count(state_dict, prefix, local_metadata)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


__all__ = ["FrozenBatchNorm"]
