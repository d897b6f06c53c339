"""Noisy BN: BatchNorm followed by per-channel noise whose distribution changes at every step
(Santurkar et al., 2018, Section 2.1)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnlab.functional.core import apply_scale_shift
from bnlab.lab.controversy.config import ControversyConfig, _check_number
from bnlab.models import NormFactory, norm_factory
from bnlab.models.lenet import LayerKind


class NonstationaryNoise(nn.Module):
    """Per-channel noise whose distribution itself changes at every step, for "noisy BN"
    (Santurkar et al., Section 2.1): after BN, ``y = x · s + t`` with, at each
    :meth:`resample` (one per training step), for a = ``mean_bound``, b = ``std_bound``::

        μ_t ~ U(-a, a),  σ_t ~ U(0, b),   t_c ~ N(μ_t, σ_t²)          per-channel shift
        ν_t ~ U(-a, a),  τ_t ~ U(0, b),   log s_c ~ N(ν_t, τ_t²)      per-channel scale > 0

    so every layer's input distribution moves at every step, by more than BN removes. The
    paper draws the noise i.i.d. per activation and example; here one draw per channel is shared
    by the whole batch, so it is a pure shift of each unit's distribution between steps, which
    is what "covariate shift" names, rather than extra per-example noise. Training mode only:
    in eval mode it is the identity. The current sample is kept in (non-persistent)
    buffers, so repeated forwards between two resamples see the same noise.
    """

    scale: Tensor
    shift: Tensor

    def __init__(
        self,
        num_features: int,
        *,
        mean_bound: float = ControversyConfig.noise_mean,
        std_bound: float = ControversyConfig.noise_std,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                f"num_features: expected a positive int (the channel count C), got "
                f"{num_features!r}."
            )
        for name, value in (("mean_bound", mean_bound), ("std_bound", std_bound)):
            _check_number(value, name, low=0.0, inclusive=True, example="0.5")
        self.num_features = num_features
        self.mean_bound = float(mean_bound)
        self.std_bound = float(std_bound)
        self.generator = generator
        self.register_buffer("scale", torch.ones(num_features), persistent=False)
        self.register_buffer("shift", torch.zeros(num_features), persistent=False)
        self.resample()

    def extra_repr(self) -> str:
        return f"{self.num_features}, mean_bound={self.mean_bound}, std_bound={self.std_bound}"

    def _draw(self) -> Tensor:
        """One per-channel sample: N(μ, σ²) with μ ~ U(-a, a), σ ~ U(0, b); on the CPU, so
        a seed gives the same noise on every device."""
        a, b = self.mean_bound, self.std_bound
        mu_sigma = torch.rand(2, generator=self.generator, dtype=torch.float64)
        mu, sigma = (2 * mu_sigma[0] - 1) * a, mu_sigma[1] * b
        z = torch.randn(self.num_features, generator=self.generator, dtype=torch.float64)
        return mu + sigma * z  # (C,)

    @torch.no_grad()
    def resample(self) -> None:
        """Draw a new scale and shift (call once per training step)."""
        shift = self._draw()
        scale = self._draw().exp()
        self.shift.copy_(shift)
        self.scale.copy_(scale)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        return apply_scale_shift(x, self.scale, self.shift)  # (N, C, ...) per channel


def noisy_bn_factory(
    generator: torch.Generator | None = None,
    *,
    mean_bound: float = ControversyConfig.noise_mean,
    std_bound: float = ControversyConfig.noise_std,
) -> NormFactory:
    """A LeNet norm factory: :class:`bnlab.nn.BatchNorm` followed by
    :class:`NonstationaryNoise`, one shared generator for all layers."""
    make_bn = norm_factory("bnlab")
    assert make_bn is not None

    def make(num_features: int, kind: LayerKind) -> nn.Module:
        noise = NonstationaryNoise(
            num_features, mean_bound=mean_bound, std_bound=std_bound, generator=generator
        )
        return nn.Sequential(make_bn(num_features, kind), noise)

    return make


def noise_modules(model: nn.Module) -> list[NonstationaryNoise]:
    """The :class:`NonstationaryNoise` modules of ``model``, in order."""
    return [m for m in model.modules() if isinstance(m, NonstationaryNoise)]


__all__ = ["NonstationaryNoise", "noise_modules", "noisy_bn_factory"]
