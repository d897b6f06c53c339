"""The probability-integral-transform layer (:mod:`bnlab.functional.pit`). Bookkeeping only."""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab.functional.checks import check_momentum
from bnlab.functional.norms import check_positive_int
from bnlab.functional.pit import normal_scores, pit_norm, quantile_levels
from bnlab.nn.base import ChannelNorm, LazyChannelNorm


class PITNorm(ChannelNorm):
    """Each channel through the estimate of its CDF, then Φ⁻¹: y = γ·Φ⁻¹(F̂(x)) + β, with F̂
    from ``num_quantiles`` batch quantiles in training and their running average in prediction
    (:mod:`bnlab.functional.pit` for the definition, its gradient and its cost).

    Buffers: ``running_quantiles`` (C, M), starting at the normal scores Φ⁻¹(p_j) so that an
    untrained layer is the identity on standard-normal inputs, and ``num_batches_tracked``.
    """

    running_stats = ("running_quantiles",)
    running_quantiles: Tensor | None

    def __init__(
        self,
        num_features: int | None = None,
        *,
        num_quantiles: int = 32,
        max_samples: int | None = 4096,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_momentum(momentum)
        self.num_quantiles = quantile_levels(num_quantiles).numel()  # validates
        if max_samples is not None:
            check_positive_int(max_samples, "max_samples", "Use e.g. 4096, or None for all.")
        self.max_samples = max_samples
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        self._create_state(num_features, affine=affine, device=device, dtype=dtype)

    def state_shapes(self, num_features: int) -> dict[str, tuple[int, ...]]:
        shapes = super().state_shapes(num_features)
        return {**shapes, "running_quantiles": (num_features, self.num_quantiles)}

    def _fill_running_stats(self) -> None:
        """Running knots at the normal scores (T = identity)."""
        q = self.running_quantiles
        assert q is not None
        q.copy_(normal_scores(self.num_quantiles, dtype=q.dtype, device=q.device).expand_as(q))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_quantiles={self.num_quantiles}, "
            f"max_samples={self.max_samples}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        y, new_q = pit_norm(
            x,
            self.weight,
            self.bias,
            self.running_quantiles,
            training=self.training,
            num_quantiles=self.num_quantiles,
            max_samples=self.max_samples,
            momentum=self.momentum,
            num_batches_tracked=self._batches_seen(),
        )
        if self.training and self.track_running_stats and new_q is not None:
            self._store_running_stats(new_q)
        return y


class LazyPITNorm(LazyChannelNorm, PITNorm):
    cls_to_become = PITNorm


PITNorm._lazy_variant = LazyPITNorm

__all__ = ["LazyPITNorm", "PITNorm"]
