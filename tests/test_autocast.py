"""Mixed precision: under autocast bnlab's BatchNorm gives what torch's gives, the output dtype,
the values, the running statistics (kept in float32) and the gradients, for every kernel."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bnlab.functional  # noqa: F401  (registers every kernel)
from bnlab.functional.batch_norm import TRAIN_KERNELS
from bnlab.nn import BatchNorm

# (input layer, torch BN, memory format): rows (N, C), NCHW, channels-last NHWC
LAYOUTS = {
    "dense": (lambda: nn.Linear(7, 5), nn.BatchNorm1d, torch.contiguous_format, (64, 7)),
    "conv": (lambda: nn.Conv2d(2, 5, 3), nn.BatchNorm2d, torch.contiguous_format, (16, 2, 6, 6)),
    "conv_channels_last": (
        lambda: nn.Conv2d(2, 5, 3),
        nn.BatchNorm2d,
        torch.channels_last,
        (16, 2, 6, 6),
    ),
}


def _pair(layout: str, impl: str) -> tuple[nn.Module, nn.Module]:
    make_layer, torch_bn, fmt, _ = LAYOUTS[layout]
    torch.manual_seed(0)
    layer = make_layer()
    ours = nn.Sequential(layer, BatchNorm(5, impl=impl)).to(memory_format=fmt)
    theirs = nn.Sequential(copy.deepcopy(layer), torch_bn(5)).to(memory_format=fmt)
    return ours, theirs


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, **tolerances: float) -> None:
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}", **tolerances)


def _check_step(device: str, dtype: torch.dtype, layout: str, impl: str) -> None:
    ours, theirs = _pair(layout, impl)
    ours.to(device)
    theirs.to(device)
    _, _, fmt, shape = LAYOUTS[layout]
    x = (torch.randn(*shape, device=device) * 3 + 20).to(memory_format=fmt)
    for step in range(2):
        with torch.autocast(device, dtype=dtype):
            h_ours, h_theirs = ours[0](x), theirs[0](x)  # the layer before BN runs in `dtype`
            h_ours.retain_grad()
            h_theirs.retain_grad()
            y_ours, y_theirs = ours[1](h_ours), theirs[1](h_theirs)
        assert h_ours.dtype == y_ours.dtype == y_theirs.dtype == dtype
        _close(y_ours, y_theirs, f"output, step {step}")
        for name in ("running_mean", "running_var"):
            ours_stat, theirs_stat = getattr(ours[1], name), getattr(theirs[1], name)
            assert ours_stat.dtype == theirs_stat.dtype == torch.float32
            _close(
                ours_stat,
                theirs_stat,
                f"{name}, step {step}",
                rtol=1e-5,
                atol=1e-6,
            )
        # the backward outside autocast, as PyTorch recommends; BN's own gradients are
        # compared (the conv's weight gradient Σ ∂h·x cancels and rounds differently)
        g = torch.randn_like(y_ours, dtype=torch.float32).to(dtype)
        y_ours.backward(g)
        y_theirs.backward(g)
        assert h_ours.grad is not None and h_theirs.grad is not None
        assert h_ours.grad.dtype == h_theirs.grad.dtype == dtype
        # ∂h is a difference of terms as large as its largest entry: one ulp at that scale
        scale = float(h_theirs.grad.abs().max())
        _close(
            h_ours.grad,
            h_theirs.grad,
            f"input grad, step {step}",
            atol=torch.finfo(dtype).eps * scale,
            rtol=0,
        )
        for name in ("weight", "bias"):
            p_ours, p_theirs = getattr(ours[1], name), getattr(theirs[1], name)
            assert p_ours.grad.dtype == p_theirs.grad.dtype == torch.float32
            _close(
                p_ours.grad,
                p_theirs.grad,
                f"grad {name}, step {step}",
                rtol=1e-5,
                atol=1e-5,
            )
        ours.zero_grad()
        theirs.zero_grad()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("impl", sorted(TRAIN_KERNELS))
def test_cpu_bfloat16_autocast_matches_torch(layout: str, impl: str) -> None:
    _check_step("cpu", torch.bfloat16, layout, impl)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA float16 autocast needs a GPU")
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("impl", sorted(TRAIN_KERNELS))
def test_cuda_float16_autocast_matches_torch(layout: str, impl: str) -> None:
    _check_step("cuda", torch.float16, layout, impl)
