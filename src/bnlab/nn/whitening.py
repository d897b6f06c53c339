"""Whitening layers (:mod:`bnlab.functional.whitening`): Decorrelated Batch Norm (ZCA) and
IterNorm (Newton–Schulz). Bookkeeping only."""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.functional.checks import check_eps, check_momentum
from bnlab.functional.norms import check_positive_int
from bnlab.functional.whitening import WhiteningMethod, whitening_norm
from bnlab.nn.base import ChannelNorm, LazyChannelNorm


class WhiteningNorm(ChannelNorm):
    """Whiten contiguous groups of ``group_size`` channels, then a per-channel γ, β.

    Buffers: ``running_mean`` (C,), ``running_whitening`` (C, C) block diagonal (identity at
    start), ``num_batches_tracked``; with ``track_running_stats=False`` prediction also uses
    batch statistics. ``momentum`` weights the new batch (PyTorch's meaning; None: cumulative).
    """

    running_stats = ("running_mean", "running_whitening")
    method: WhiteningMethod = "zca"
    running_whitening: Tensor | None

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
        self._create_state(num_features, affine=affine, device=device, dtype=dtype)

    def state_shapes(self, num_features: int) -> dict[str, tuple[int, ...]]:
        return {**super().state_shapes(num_features), "running_whitening": (num_features,) * 2}

    def _fill_running_stats(self) -> None:
        """Running mean 0, running whitening matrix I (the identity map)."""
        assert self.running_mean is not None and self.running_whitening is not None
        self.running_mean.zero_()
        self.running_whitening.copy_(torch.eye(self.running_whitening.shape[0]))

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
            num_batches_tracked=self._batches_seen(),
        )
        if self.training and self.track_running_stats and new_mean is not None:
            assert new_whitening is not None
            self._store_running_stats(new_mean, new_whitening)
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
