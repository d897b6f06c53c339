"""Whitening layers (:mod:`bnlab.functional.whitening`): Decorrelated Batch Norm (ZCA) and
IterNorm (Newton–Schulz). Bookkeeping only."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from bnlab.functional.checks import check_eps, check_momentum
from bnlab.functional.norms import check_positive_int
from bnlab.functional.whitening import WhiteningMethod, whitening_norm
from bnlab.nn.norms import ChannelNorm, LazyChannelNorm, LazyTensor, _batches_seen, _store


class WhiteningNorm(ChannelNorm):
    """Whiten contiguous groups of ``group_size`` channels, then a per-channel γ, β.

    Buffers: ``running_mean`` (C,), ``running_whitening`` (C, C) block diagonal (identity at
    start), ``num_batches_tracked``; with ``track_running_stats=False`` prediction also uses
    batch statistics. ``momentum`` weights the new batch (PyTorch's meaning; None: cumulative).
    """

    _lazy_variant: ClassVar[type | None]
    method: WhiteningMethod = "zca"
    running_mean: Tensor | None
    running_whitening: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(
        self,
        num_features: int | None = None,
        *,
        group_size: int = 16,
        iterations: int = 5,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_eps(eps)
        check_momentum(momentum)
        self.group_size = check_positive_int(
            group_size, "group_size", "DBN whitens groups of e.g. 16 channels."
        )
        self.iterations = check_positive_int(iterations, "iterations", "IterNorm uses T=5.")
        self.eps = eps
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        if track_running_stats:
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
            buffers: tuple[str, ...] = ("running_mean", "running_whitening")
        else:
            for name in ("running_mean", "running_whitening", "num_batches_tracked"):
                self.register_buffer(name, None)
            buffers = ()
        self._create_state(num_features, affine=affine, buffers=buffers, device=device, dtype=dtype)

    def state_shapes(self, num_features: int) -> dict[str, tuple[int, ...]]:
        c = (num_features,)
        return {
            "weight": c,
            "bias": c,
            "running_mean": c,
            "running_whitening": (num_features, num_features),
        }

    def reset_running_stats(self) -> None:
        """Running mean 0, running whitening matrix I (the identity map), batch count 0."""
        if self.running_mean is not None and not isinstance(self.running_mean, LazyTensor):
            assert self.running_whitening is not None and self.num_batches_tracked is not None
            self.running_mean.zero_()
            self.running_whitening.copy_(torch.eye(self.running_whitening.shape[0]))
            self.num_batches_tracked.zero_()

    def extra_repr(self) -> str:
        its = f", iterations={self.iterations}" if self.method == "newton" else ""
        return (
            f"{self.num_features}, group_size={self.group_size}{its}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        y, new_mean, new_whitening = whitening_norm(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_whitening,
            training=self.training,
            method=self.method,
            group_size=self.group_size,
            iterations=self.iterations,
            eps=self.eps,
            momentum=self.momentum,
            num_batches_tracked=_batches_seen(self, self.momentum),
        )
        if self.training and self.track_running_stats:
            _store(self, {"running_mean": new_mean, "running_whitening": new_whitening})
        return y


class DecorrelatedBatchNorm(WhiteningNorm):
    """Decorrelated Batch Normalization (Huang et al., 2018): ZCA whitening of channel groups by
    a float64 eigendecomposition; the output covariance within a group is I (up to ε)."""

    method: WhiteningMethod = "zca"


class IterNorm(WhiteningNorm):
    """IterNorm (Huang et al., 2019): whitening by ``iterations`` Newton–Schulz steps (T=5 as
    the paper); approximately white, with a stable backward."""

    method: WhiteningMethod = "newton"


class LazyDecorrelatedBatchNorm(LazyChannelNorm, DecorrelatedBatchNorm):
    cls_to_become = DecorrelatedBatchNorm


class LazyIterNorm(LazyChannelNorm, IterNorm):
    cls_to_become = IterNorm


DecorrelatedBatchNorm._lazy_variant = LazyDecorrelatedBatchNorm
IterNorm._lazy_variant = LazyIterNorm

__all__ = [
    "DecorrelatedBatchNorm",
    "IterNorm",
    "LazyDecorrelatedBatchNorm",
    "LazyIterNorm",
    "WhiteningNorm",
]
