"""Whitening batch normalization: full-covariance instead of per-channel variance.

Decorrelated Batch Normalization (Huang, Yang, Lang & Deng, CVPR 2018, arXiv:1804.08450) whitens
groups of G channels with ZCA; IterNorm (Huang, Zhou, Zhu, Liu & Shao, CVPR 2019,
arXiv:1904.03441) replaces the eigendecomposition by Newton–Schulz iterations. Per group, over
the m = N·H·W values of each channel (x_g is G × m):

    μ = mean(x_g),   Σ = (x_g - μ)(x_g - μ)ᵀ / m + ε·I                    (biased, as BN)
    ZCA:    Σ = D Λ Dᵀ,   W = D Λ^{-1/2} Dᵀ                               (W Σ W = I)
    IterNorm: Σ_N = Σ / tr(Σ),  P_0 = I,  P_k = ½ (3 P_{k-1} - P_{k-1}³ Σ_N),
              W = P_T / sqrt(tr(Σ))      (→ Σ^{-1/2} as T → ∞; computed in coupled form)
    y = γ ⊙ W (x_g - μ) + β

This is the matrix form of the core's scale/shift: ``A = diag(γ) W``, ``b = β - A μ``,
``y = A x + b`` (:func:`whitening_scale_shift`); with W diagonal it is batch norm's. The output
covariance is the identity within each group (IterNorm: approximately, closer with more
iterations), not across groups. Channels are grouped contiguously; the last group holds the
remainder when G does not divide C.

Prediction uses a running mean (C,) and a running whitening matrix (C, C), block diagonal, both
exponential averages of the batch values (DBN's and IterNorm's choice), with ``momentum`` the
weight on the new batch (PyTorch's meaning; None: cumulative average).

Cost per group: O(G²·m) for the covariance, O(G³) for eigh or T matrix products, memory O(G²).
The eigendecomposition runs in float64 (``torch.linalg.eigh``), whose backward has
1/(λ_i - λ_j) terms: nearly equal eigenvalues make ZCA's gradient unstable, which is what
IterNorm's plain matrix products avoid.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from bnlab.functional.batch_norm import get_convention
from bnlab.functional.checks import (
    check_dtype_device,
    check_enough_values,
    check_eps,
    check_input,
    check_momentum,
)
from bnlab.functional.core import accumulation_dtype, moments
from bnlab.functional.norms import check_affine, check_positive_int, keep_memory_format

WhiteningMethod = Literal["zca", "newton"]
WHITENING_METHODS: tuple[str, ...] = ("zca", "newton")


class WhiteningResult(NamedTuple):
    y: Tensor
    running_mean: Tensor | None
    running_whitening: Tensor | None


def check_square(cov: Tensor, name: str = "cov") -> None:
    if not isinstance(cov, Tensor) or not cov.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating-point torch.Tensor of shape (..., G, G), got "
            f"{type(cov).__name__ if not isinstance(cov, Tensor) else cov.dtype}."
        )
    if cov.ndim < 2 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(
            f"{name}: expected square matrices of shape (..., G, G), got {tuple(cov.shape)}."
        )


def zca_whitening_matrix(cov: Tensor, eps: float = 1e-5) -> Tensor:
    """ZCA whitening matrix W = D (Λ + εI)^{-1/2} Dᵀ of a covariance Σ = D Λ Dᵀ, batched over
    leading axes; the eigendecomposition is computed in float64 and W returned in ``cov``'s
    dtype. W is symmetric positive definite and W (Σ + εI) W = I."""
    check_square(cov)
    check_eps(eps)
    c64 = cov.to(torch.float64)
    eye = torch.eye(cov.shape[-1], dtype=torch.float64, device=cov.device)
    lam, d = torch.linalg.eigh(c64 + eps * eye)
    # eigenvalues below ε can only be rounding error (Σ is positive semi-definite)
    inv_sqrt = lam.clamp_min(eps).rsqrt()
    w = (d * inv_sqrt.unsqueeze(-2)) @ d.mT
    return w.to(cov.dtype)


def newton_schulz_whitening_matrix(cov: Tensor, eps: float = 1e-5, iterations: int = 5) -> Tensor:
    """IterNorm's whitening matrix: T Newton–Schulz steps towards (Σ + εI)^{-1/2}.

    Σ_N = (Σ + εI) / tr(Σ + εI) has eigenvalues in (0, 1], where the iteration
    P_k = ½ (3 P_{k-1} - P_{k-1}³ Σ_N) from P_0 = I converges to Σ_N^{-1/2}; slowly for
    eigenvalues much smaller than the trace (ill-conditioned Σ), which is IterNorm's intended
    "partial whitening" at small T. W = P_T / sqrt(tr(Σ + εI)).

    The iterates are computed in the coupled form (Higham, *Functions of Matrices*, §6.7),
    Z_0 = I, Y_0 = Σ_N, S = ½ (3I - Z Y), Z ← S Z, Y ← Y S, which gives Z_k = P_k and
    Y_k = Σ_N P_k in exact arithmetic at the same three matrix products per step; the uncoupled
    form amplifies rounding errors and diverges after convergence for ill-conditioned Σ
    (tens of steps). Only matrix products: the backward is stable.
    """
    check_square(cov)
    check_eps(eps)
    t = check_positive_int(iterations, "iterations", "IterNorm uses T=5.")
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    s = cov + eps * eye
    trace = s.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]  # (..., 1, 1)
    y = s / trace  # Y_0 = Σ_N
    z = eye.expand_as(s)  # Z_0 = P_0 = I
    for _ in range(t):
        step = 1.5 * eye - 0.5 * (z @ y)
        z, y = step @ z, y @ step
    return z * trace.rsqrt()


def whitening_scale_shift(
    mean: Tensor, whitening: Tensor, weight: Tensor | None = None, bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The matrix form of :func:`bnlab.functional.core.scale_shift`:
    ``A = diag(γ) W``, ``b = β - A μ``, so that ``y = A x + b``."""
    a = whitening if weight is None else weight[:, None] * whitening
    b = -(a @ mean)
    if bias is not None:
        b = b + bias
    return a, b


def channel_groups(num_channels: int, group_size: int) -> list[tuple[int, int]]:
    """Contiguous channel ranges [start, stop) of ``group_size`` channels, the last one holding
    the remainder."""
    return [(s, min(s + group_size, num_channels)) for s in range(0, num_channels, group_size)]


def whitening_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_whitening: Tensor | None = None,
    *,
    training: bool,
    method: WhiteningMethod = "zca",
    group_size: int = 16,
    iterations: int = 5,
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    num_batches_tracked: int = 0,
) -> WhiteningResult:
    """Whiten groups of ``group_size`` channels (module docstring for the formulas).

    Args:
        x: (N, C, *spatial), rank >= 2; statistics per channel group over N and the spatial
            axes. Half inputs are computed in float32, the eigendecomposition in float64.
        weight, bias: per-channel γ, β (C,), applied after whitening, or None.
        running_mean, running_whitening: (C,) and (C, C) block diagonal, or both None to always
            use batch statistics.
        training: batch statistics (and updated running ones) if True, running ones if False.
        method: "zca" (eigendecomposition, DBN) or "newton" (Newton–Schulz, IterNorm).
        group_size: channels per group G (the last group holds the remainder).
        iterations: Newton–Schulz steps T (method="newton" only).
        eps: added to the covariance's diagonal.
        momentum: weight of the new batch in the running averages; None: cumulative average
            over ``num_batches_tracked + 1`` batches.
    """
    check_input(x)
    n, c = x.shape[:2]
    check_affine(x, weight, bias)
    if method not in WHITENING_METHODS:
        raise ValueError(
            f"method: expected one of {list(WHITENING_METHODS)} (eigendecomposition or "
            f"Newton–Schulz iterations), got {method!r}."
        )
    g = check_positive_int(group_size, "group_size", "DBN whitens groups of e.g. 16 channels.")
    check_positive_int(iterations, "iterations", "IterNorm uses T=5.")
    check_eps(eps)
    check_momentum(momentum)
    if (running_mean is None) != (running_whitening is None):
        raise ValueError(
            "running_mean and running_whitening: expected both tensors or both None, got "
            f"running_mean={'None' if running_mean is None else 'tensor'}, "
            f"running_whitening={'None' if running_whitening is None else 'tensor'}."
        )
    for name, t, shape in (
        ("running_mean", running_mean, (c,)),
        ("running_whitening", running_whitening, (c, c)),
    ):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(
                f"{name}: expected shape {shape} for an input with {c} channels, got "
                f"{tuple(t.shape)}. Build the layer with num_features={c}."
            )
        check_dtype_device(x, t, name)
    tracking = running_mean is not None and running_whitening is not None
    groups = channel_groups(c, g)
    acc = accumulation_dtype(x.dtype)
    xt = x.to(acc).transpose(0, 1).reshape(c, -1)  # (C, m), m = N·spatial

    if tracking and not training:
        assert running_mean is not None and running_whitening is not None
        mean, whitening = running_mean.to(acc), running_whitening.to(acc)
    else:
        m = xt.shape[1]
        check_enough_values(x, m, "N" if x.ndim == 2 else "N and the spatial axes")
        mean = moments(xt, dims=[1])[0]  # (C,)
        blocks = []
        for start, stop in groups:
            xc = xt[start:stop] - mean[start:stop, None]  # (G, m)
            cov = (xc @ xc.T) / m  # (G, G), biased as batch norm's variance
            if method == "zca":
                blocks.append(zca_whitening_matrix(cov, eps))
            else:
                blocks.append(newton_schulz_whitening_matrix(cov, eps, iterations))
        whitening = torch.block_diag(*blocks)  # (C, C)

    a, b = whitening_scale_shift(
        mean,
        whitening,
        None if weight is None else weight.to(acc),
        None if bias is None else bias.to(acc),
    )
    # y = A x + b, one block at a time (A is block diagonal)
    y = torch.cat([torch.addmm(b[s:e, None], a[s:e, s:e], xt[s:e]) for s, e in groups])  # (C, m)
    y = y.reshape(c, n, *x.shape[2:]).transpose(0, 1).to(x.dtype)
    y = keep_memory_format(y.contiguous(), x)
    if not (tracking and training):
        return WhiteningResult(y, running_mean, running_whitening)
    assert running_mean is not None and running_whitening is not None
    w = get_convention("torch").new_batch_weight(momentum, num_batches_tracked)
    with torch.no_grad():
        new_mean = (w * mean.detach() + (1 - w) * running_mean).to(running_mean.dtype)
        new_w = (w * whitening.detach() + (1 - w) * running_whitening).to(running_whitening.dtype)
    return WhiteningResult(y, new_mean, new_w)


__all__ = [
    "WHITENING_METHODS",
    "WhiteningResult",
    "channel_groups",
    "newton_schulz_whitening_matrix",
    "whitening_norm",
    "whitening_scale_shift",
    "zca_whitening_matrix",
]
