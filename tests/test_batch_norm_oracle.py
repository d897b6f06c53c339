"""bnlab's BatchNorm against torch's own BatchNorm1d/2d/3d as the oracle, over random cases."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from bnlab.functional import batch_norm
from bnlab.nn import BatchNorm

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol) per dtype: float64 is exact to rounding; half precision to its few digits
TOL = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (1e-1, 1e-1),
}
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def close(
    a: torch.Tensor | None, b: torch.Tensor | None, dtype: torch.dtype, scale: float = 1.0
) -> None:
    """Equal within the dtype's tolerance; ``scale`` is the natural size of the values, for
    quantities whose rounding error grows with it (input gradients grow as |dy| / σ)."""
    assert (a is None) == (b is None)
    if a is None or b is None:
        return
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol * max(1.0, scale))


def grad_scale(x: torch.Tensor, dy: torch.Tensor) -> float:
    """max |dy| / min σ over channels: the size of BN's input gradient terms, which cancel
    (exactly so for a batch of two), leaving rounding noise of this size times eps."""
    dims = [0, *range(2, x.ndim)]
    std = x.double().var(dim=dims, unbiased=False).add(1e-5).sqrt()
    return float(dy.double().abs().max() / std.min())


@st.composite
def cases(draw: st.DrawFn) -> dict:
    ndim = draw(st.integers(2, 5))
    n = draw(st.integers(2, 6))
    c = draw(st.integers(1, 5))
    spatial = [draw(st.integers(1, 4)) for _ in range(ndim - 2)]
    return {
        "shape": (n, c, *spatial),
        "dtype": draw(st.sampled_from(DTYPES)),
        "affine": draw(st.booleans()),
        "track": draw(st.booleans()),
        "momentum": draw(st.sampled_from([0.1, 0.0, 0.5, 1.0, None])),
        "channels_last": ndim in (4, 5) and draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def make_input(case: dict, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(case["seed"] * 7 + step)
    x = (torch.randn(case["shape"], generator=g, dtype=torch.float64) * 2 + 0.5).to(case["dtype"])
    if case["channels_last"]:
        fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


@given(cases())
def test_module_matches_torch_batchnorm(case: dict) -> None:
    """Outputs, all gradients, running statistics after several steps, and eval outputs.

    For float16/bfloat16 the oracle is torch's BN in float64 on the same (rounded) input:
    torch's own half kernels round differently, and where the exact gradient is ~0 (e.g. a
    batch of two, whose normalized output does not depend on x) both results are rounding
    noise, so only the float64 answer is a reference."""
    c, dtype = case["shape"][1], case["dtype"]
    ref_dtype = torch.float64 if dtype in (torch.float16, torch.bfloat16) else dtype
    kwargs = dict(
        momentum=case["momentum"],
        affine=case["affine"],
        track_running_stats=case["track"],
    )
    ours = BatchNorm(c, **kwargs, dtype=dtype)
    ref = TORCH_BN[len(case["shape"])](c, **kwargs, dtype=ref_dtype)
    if case["affine"]:  # non-trivial γ, β so their gradients are exercised
        with torch.no_grad():
            for m in (ours, ref):
                m.weight.copy_(torch.linspace(0.5, 1.5, c))
                m.bias.copy_(torch.linspace(-1, 1, c))
    for step in range(3):
        x = make_input(case, step)
        xo, xr = x.clone().requires_grad_(), x.to(ref_dtype).requires_grad_()
        yo, yr = ours(xo), ref(xr)
        close(yo, yr, dtype)
        assert yo.dtype == dtype
        if case["channels_last"]:
            fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
            assert yo.is_contiguous(memory_format=fmt)
        g = torch.Generator().manual_seed(step)
        dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
        yo.backward(dy)
        yr.backward(dy.to(ref_dtype))
        close(xo.grad, xr.grad, dtype, grad_scale(x, dy))
        if case["affine"]:
            close(ours.weight.grad, ref.weight.grad, dtype)
            close(ours.bias.grad, ref.bias.grad, dtype)
            ours.zero_grad()
            ref.zero_grad()
        close(ours.running_mean, ref.running_mean, dtype)
        close(ours.running_var, ref.running_var, dtype)
        if case["track"]:
            assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
    ours.eval()
    ref.eval()
    x = make_input(case, 99)
    close(ours(x), ref(x.to(ref_dtype)), dtype)


@given(cases(), st.booleans())
def test_functional_matches_torch_functional(case: dict, training: bool) -> None:
    """The pure function equals F.batch_norm, and mutates nothing it is given."""
    c, dtype = case["shape"][1], case["dtype"]
    x = make_input(case, 0)
    momentum = 0.1 if case["momentum"] is None else case["momentum"]
    w = torch.linspace(0.5, 1.5, c, dtype=dtype) if case["affine"] else None
    b = torch.linspace(-1, 1, c, dtype=dtype) if case["affine"] else None
    rm = torch.linspace(-0.5, 0.5, c, dtype=dtype) if case["track"] else None
    rv = torch.linspace(0.5, 2.0, c, dtype=dtype) if case["track"] else None
    before = [None if t is None else t.clone() for t in (rm, rv)]
    y, new_rm, new_rv = batch_norm(
        x, w, b, rm, rv, training=training, momentum=momentum, convention="torch"
    )
    for given_stat, original in zip((rm, rv), before, strict=True):
        assert given_stat is None or torch.equal(given_stat, original)  # nothing mutated
    # the oracle in float64 for half inputs (bnlab computes them in float32, as the module
    # test compares too): torch's own float16 path can be off by more than float16's tolerance
    ref_dtype = torch.float64 if dtype in (torch.float16, torch.bfloat16) else dtype

    def ref(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(ref_dtype)

    ref_rm, ref_rv = ref(rm), ref(rv)
    use_batch = training or rm is None
    y_ref = F.batch_norm(
        x.to(ref_dtype), ref_rm, ref_rv, ref(w), ref(b), training=use_batch, momentum=momentum
    )
    close(y, y_ref, dtype)
    close(new_rm, ref_rm, dtype)
    close(new_rv, ref_rv, dtype)


@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
def test_gradcheck_and_gradgradcheck(ndim: int) -> None:
    shape = (3, 2, 3, 2, 2)[:ndim]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return batch_norm(x, w, b, training=True).y

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_state_dict_round_trips_with_torch() -> None:
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4)
    for _ in range(3):
        ref(torch.randn(8, 4, 3, 3) * 3 + 1)
    ours = BatchNorm(4)
    ours.load_state_dict(ref.state_dict())
    back = nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k])
        assert torch.equal(v, back.state_dict()[k])
    x = torch.randn(5, 4, 3, 3)
    for m in (ours, ref, back):
        m.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)
    # a lazy layer materializes from a loaded state dict
    lazy = BatchNorm()
    lazy.load_state_dict(ref.state_dict())
    lazy.eval()
    torch.testing.assert_close(lazy(x), ref(x), rtol=0, atol=1e-6)


def test_copy_pickle_to_and_compile() -> None:
    import pickle

    torch.manual_seed(0)
    bn = BatchNorm(3)
    bn(torch.randn(6, 3, 4, 4))
    for clone in (copy.deepcopy(bn), pickle.loads(pickle.dumps(bn))):
        assert type(clone) is BatchNorm
        for k, v in bn.state_dict().items():
            assert torch.equal(v, clone.state_dict()[k])
    # torch cannot deepcopy uninitialized tensors (nor its own LazyBatchNorm2d); pickle works
    lazy_clone = pickle.loads(pickle.dumps(BatchNorm()))
    lazy_clone(torch.randn(4, 7))
    assert lazy_clone.num_features == 7 and type(lazy_clone) is BatchNorm
    double = copy.deepcopy(bn).to(torch.float64)
    assert double.weight.dtype == torch.float64 and double.running_var.dtype == torch.float64
    assert double.num_batches_tracked.dtype == torch.long

    model = nn.Sequential(nn.Conv2d(1, 3, 3), BatchNorm(3), nn.ReLU())
    ref = copy.deepcopy(model)
    compiled = torch.compile(model)
    x = torch.randn(4, 1, 6, 6)
    torch.testing.assert_close(compiled(x), ref(x))
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean)
