"""The test-time corruptions against their definitions, measured on synthetic images."""

from __future__ import annotations

import pytest
import torch

from bnlab.data.corrupt import CORRUPTIONS, corrupt


def _images(n: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(40, 216, (n, 28, 28), generator=g, dtype=torch.uint8)  # no clipping


@pytest.mark.parametrize("severity", [1, 2, 3])
def test_gaussian_noise_has_the_severity_s_spread_and_is_seeded(severity: int) -> None:
    gray = torch.full((64, 28, 28), 128, dtype=torch.uint8)  # far from 0 and 255
    noisy = corrupt(gray, "gaussian_noise", severity, seed=3)
    sigma = CORRUPTIONS["gaussian_noise"][severity - 1]
    measured = (noisy.double() / 255).std().item()
    # 50,176 values: the sample std is within 1% of σ; the uint8 rounding adds (1/255)²/12
    assert measured == pytest.approx((sigma**2 + (1 / 255) ** 2 / 12) ** 0.5, rel=0.01)
    assert torch.equal(noisy, corrupt(gray, "gaussian_noise", severity, seed=3))
    assert not torch.equal(noisy, corrupt(gray, "gaussian_noise", severity, seed=4))


@pytest.mark.parametrize("severity", [1, 2, 3])
def test_contrast_keeps_each_image_mean_and_scales_its_spread(severity: int) -> None:
    images = _images()
    out = corrupt(images, "contrast", severity).double() / 255
    x = images.double() / 255
    c = CORRUPTIONS["contrast"][severity - 1]
    half_step = 0.5 / 255  # the uint8 rounding
    assert torch.allclose(out.mean((1, 2)), x.mean((1, 2)), atol=half_step)
    assert torch.allclose(out.std((1, 2)), c * x.std((1, 2)), atol=half_step)


def test_brightness_adds_the_offset_and_saturates() -> None:
    images = torch.tensor([[[0, 100, 250]]], dtype=torch.uint8)
    out = corrupt(images, "brightness", 2)  # + 0.2 = + 51
    assert out.tolist() == [[[51, 151, 255]]]


@pytest.mark.parametrize("severity", [1, 2, 3])
def test_blur_spreads_an_impulse_into_a_gaussian_of_the_severity_s_width(severity: int) -> None:
    impulse = torch.zeros(2, 28, 28, dtype=torch.uint8)
    impulse[:, 14, 14] = 255
    out = corrupt(impulse, "blur", severity).double()
    sigma = CORRUPTIONS["blur"][severity - 1]
    weights = out[0] / out[0].sum()
    rows = torch.arange(28, dtype=torch.float64) - 14
    variance = (weights.sum(1) * rows**2).sum()  # the blurred impulse's second moment
    assert variance.item() == pytest.approx(sigma**2, rel=0.15)  # uint8 rounding of the tails
    assert out[0].sum().item() == pytest.approx(255, rel=0.05)  # the total intensity stays
    assert torch.equal(out[0], out[1])  # each image on its own


def test_the_input_is_not_changed_and_the_output_is_uint8() -> None:
    images = _images()
    before = images.clone()
    for kind in CORRUPTIONS:
        out = corrupt(images, kind, 1)
        assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(images, before)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((_images().float(), "contrast", 1), TypeError, "expected a uint8 tensor"),
        ((_images()[0], "contrast", 1), TypeError, r"\(N, H, W\)"),
        ((_images(), "fog", 1), ValueError, "kind: expected one of"),
        ((_images(), "blur", 4), ValueError, "severity: expected 1, 2 or 3"),
        ((_images(), "blur", True), ValueError, "severity: expected 1, 2 or 3"),
    ],
)
def test_bad_arguments_are_refused(args: tuple, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        corrupt(*args)
