"""The probability-integral-transform layer (:mod:`bnlab.functional.pit`). Bookkeeping only."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from bnlab.functional.checks import check_momentum
from bnlab.functional.norms import check_positive_int
from bnlab.functional.pit import normal_scores, pit_norm, quantile_levels
from bnlab.nn.norms import ChannelNorm, LazyChannelNorm, LazyTensor, _batches_seen, _store


class PITNorm(ChannelNorm):
    """Each channel through the estimate of its CDF, then Φ⁻¹: y = γ·Φ⁻¹(F̂(x)) + β, with F̂
    from ``num_quantiles`` batch quantiles in training and their running average in prediction
    (:mod:`bnlab.functional.pit` for the definition, its gradient and its cost).

    Buffers: ``running_quantiles`` (C, M), starting at the normal scores Φ⁻¹(p_j) so that an
    untrained layer is the identity on standard-normal inputs, and ``num_batches_tracked``.
    """

    _lazy_variant: ClassVar[type | None]
    running_quantiles: Tensor | None
    num_batches_tracked: Tensor | None

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
        if track_running_stats:
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
            buffers: tuple[str, ...] = ("running_quantiles",)
        else:
            self.register_buffer("running_quantiles", None)
            self.register_buffer("num_batches_tracked", None)
            buffers = ()
        self._create_state(num_features, affine=affine, buffers=buffers, device=device, dtype=dtype)

    def state_shapes(self, num_features: int) -> dict[str, tuple[int, ...]]:
        c = (num_features,)
        return {"weight": c, "bias": c, "running_quantiles": (num_features, self.num_quantiles)}

    def reset_running_stats(self) -> None:
        """Running knots at the normal scores (T = identity), batch count 0."""
        q = self.running_quantiles
        if q is not None and not isinstance(q, LazyTensor):
            assert self.num_batches_tracked is not None
            q.copy_(normal_scores(self.num_quantiles, dtype=q.dtype, device=q.device).expand_as(q))
            self.num_batches_tracked.zero_()

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
            num_batches_tracked=_batches_seen(self, self.momentum),
        )
        if self.training and self.track_running_stats:
            _store(self, {"running_quantiles": new_q})
        return y


class LazyPITNorm(LazyChannelNorm, PITNorm):
    cls_to_become = PITNorm


PITNorm._lazy_variant = LazyPITNorm

__all__ = ["LazyPITNorm", "PITNorm"]
