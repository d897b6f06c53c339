"""Shifted test inputs made in code: Gaussian noise, contrast, brightness and blur, three
severities each, seeded, after the corruptions of Hendrycks & Dietterich ("Benchmarking Neural
Network Robustness to Common Corruptions and Perturbations", ICLR 2019, ImageNet-C).

On images x in [0, 1] (the result is clipped to [0, 1] and rounded back to uint8):

    gaussian_noise  x + σ·ε, ε ~ N(0, 1) per pixel    σ = 0.08, 0.12, 0.18 (ImageNet-C 1-3)
    contrast        m + c·(x − m), m the image mean    c = 0.4, 0.3, 0.2    (ImageNet-C 1-3)
    brightness      x + b                              b = 0.1, 0.2, 0.3    (ImageNet-C 1-3)
    blur            Gaussian filter of σ pixels        σ = 0.6, 0.9, 1.2    (for 28x28 images)

ImageNet-C's blur widths (1-6 pixels) are for 224-pixel images; the three here are chosen for
Fashion-MNIST's 28 pixels.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

CORRUPTIONS: Final[dict[str, tuple[float, float, float]]] = {
    "gaussian_noise": (0.08, 0.12, 0.18),
    "contrast": (0.4, 0.3, 0.2),
    "brightness": (0.1, 0.2, 0.3),
    "blur": (0.6, 0.9, 1.2),
}


def corrupt(images: Tensor, kind: str, severity: int, *, seed: int = 0) -> Tensor:
    """``images`` (uint8, (N, H, W), as :class:`FashionMNIST` holds them) under corruption
    ``kind`` at ``severity`` 1-3 (module docstring), as a new uint8 tensor of the same shape.

    Only ``"gaussian_noise"`` draws random numbers: from a generator seeded with ``seed``, so
    the same call gives the same images on every machine.
    """
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.ndim != 3:
        came = (
            f"dtype {images.dtype}, shape {tuple(images.shape)}"
            if isinstance(images, Tensor)
            else type(images).__name__
        )
        raise TypeError(
            f"images: expected a uint8 tensor (N, H, W) such as FashionMNIST.test_images, got "
            f"{came}. Corrupt the uint8 images, then convert with to_float_batches."
        )
    if kind not in CORRUPTIONS:
        raise ValueError(f"kind: expected one of {sorted(CORRUPTIONS)}, got {kind!r}.")
    if isinstance(severity, bool) or severity not in (1, 2, 3):
        raise ValueError(f"severity: expected 1, 2 or 3, got {severity!r}.")
    level = CORRUPTIONS[kind][severity - 1]
    x = images.to(torch.float64) / 255  # (N, H, W)
    if kind == "gaussian_noise":
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
        y = x + level * noise.to(x.device)
    elif kind == "contrast":
        mean = x.mean((1, 2), keepdim=True)
        y = mean + level * (x - mean)
    elif kind == "brightness":
        y = x + level
    else:  # blur: within each image only (no smoothing across the batch axis)
        blurred = ndimage.gaussian_filter(x.cpu().numpy(), sigma=(0, level, level), mode="nearest")
        y = torch.from_numpy(np.ascontiguousarray(blurred)).to(x.device)
    return y.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


__all__ = ["CORRUPTIONS", "corrupt"]
