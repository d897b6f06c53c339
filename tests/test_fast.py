"""The fast kernels against the reference path, float64 math, torch's own batch norm and autograd.

Tolerances per dtype (relative to the largest magnitude of the compared tensor, floor 1):
float64 1e-9, float32 1e-4, float16 1e-2, bfloat16 4e-2 (a few units in the last place of the
half formats; both paths accumulate in float32 and round once).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from bnlab.functional import batch_norm
from bnlab.functional import fast as fast_mod
from bnlab.functional.batch_norm import TRAIN_KERNELS
from bnlab.nn import BatchNorm

TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
FAST_IMPLS = ("eager", "compiled", "eager_then_compiled")


def assert_close(
    actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str, scale: float = 1.0
) -> None:
    """Max error <= TOL[dtype] · max(scale, |expected|, 1)."""
    assert actual.shape == expected.shape, what
    a, e = actual.double(), expected.double()
    scale = max(scale, 1.0, e.abs().max().item() if e.numel() else 0.0)
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype] * scale:.3g}"


def make_input(
    shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, seed: int, offset: float = 3.0
) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    # per-channel offsets and scales, so that centering and scaling both matter
    view = (1, c) + (1,) * (len(shape) - 2)
    loc = (torch.rand(c, generator=gen, dtype=torch.float64) * 2 - 1).mul(offset).view(view)
    spread = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).view(view)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * spread + loc).to(dtype)
    if channels_last:
        x = x.contiguous(
            memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d
        )
    return x


def run_train(
    impl: str,
    x: Tensor,
    affine: bool,
    grad_out: Tensor,
    dtype: torch.dtype,
) -> tuple[Tensor, list[Tensor | None], Tensor, Tensor]:
    """(y, [dx, dγ, dβ], new running mean, new running var) for one training call."""
    c = x.shape[1]
    gen = torch.Generator().manual_seed(1)
    xr = x.detach().clone().requires_grad_(True)
    w = b = None
    if affine:
        w = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()
        b = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    rm = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    rv = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    y, new_mean, new_var = batch_norm(xr, w, b, rm, rv, training=True, impl=impl)
    assert new_mean is not None and new_var is not None
    y.backward(grad_out)
    grads = [xr.grad, None if w is None else w.grad, None if b is None else b.grad]
    return y, grads, new_mean, new_var


def compare(impl: str, x: Tensor, affine: bool, dtype: torch.dtype) -> None:
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g = g.to(dtype).contiguous(memory_format=_format_of(x))
    y, grads, rm, rv = run_train(impl, x, affine, g, dtype)
    y_ref, grads_ref, rm_ref, rv_ref = run_train("reference", x, affine, g, dtype)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert _format_of(y) == _format_of(x), "memory format not kept"
    assert_close(y, y_ref, dtype, "y")
    # ∂x = s·(dy - mean(dy) - x̂·mean(dy·x̂)) cancels (exactly, for 2 values per channel):
    # its error is relative to the size of the terms, |s|·|dy|, not of the result
    dims = [0, *range(2, x.ndim)]
    invstd = (x.double().var(dim=dims, unbiased=False) + 1e-5).rsqrt().max().item()
    w_max = 1.5 if grads_ref[1] is not None else 1.0  # run_train draws γ in [0.5, 1.5)
    terms = invstd * w_max * g.double().abs().max().item()
    for name, a, e in zip(("dx", "dweight", "dbias"), grads, grads_ref, strict=True):
        assert (a is None) == (e is None), name
        if a is not None and e is not None:
            assert a.dtype == e.dtype, name
            assert_close(a, e, dtype, name, terms if name == "dx" else 1.0)
    assert_close(rm, rm_ref, dtype, "running_mean")
    assert_close(rv, rv_ref, dtype, "running_var")


def _format_of(t: Tensor) -> torch.memory_format:
    if t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if (
        t.ndim == 5
        and not t.is_contiguous()
        and t.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return torch.channels_last_3d
    return torch.contiguous_format


# --------------------------------------------------------------------------- equality


@st.composite
def cases(draw: st.DrawFn) -> tuple[tuple[int, ...], torch.dtype, bool, bool, int]:
    rank = draw(st.integers(2, 5))
    shape = (draw(st.integers(1, 6)), draw(st.integers(1, 5)))
    shape += tuple(draw(st.integers(1, 4)) for _ in range(rank - 2))
    if math.prod(shape) // shape[1] < 2:  # batch statistics need 2 values per channel
        shape = (shape[0] + 1, *shape[1:])
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
    channels_last = rank >= 4 and draw(st.booleans())
    return shape, dtype, draw(st.booleans()), channels_last, draw(st.integers(0, 2**16))


@settings(max_examples=60)
@given(cases())
def test_fast_equals_reference(case: tuple) -> None:
    shape, dtype, affine, channels_last, seed = case
    compare("eager", make_input(shape, dtype, channels_last, seed), affine, dtype)


@settings(max_examples=30)
@given(cases())
def test_fast_auto_equals_reference_and_a_short_run_never_compiles(case: tuple) -> None:
    shape, dtype, affine, channels_last, seed = case
    with fast_mod.fresh_kernel_cache():
        compare("eager_then_compiled", make_input(shape, dtype, channels_last, seed), affine, dtype)
        assert all(c.compile_s is None for c in fast_mod.kernel_cases()), "a short run compiled"


# A few compiled cases only: each compiles a forward and a backward kernel (seconds each).
COMPILED_CASES = [
    ((6, 3, 5, 4), torch.float32, True, False),  # ncl layout
    ((4, 5, 3, 3), torch.bfloat16, False, True),  # channels-last rows, half, no affine
    ((7, 4), torch.float64, True, False),  # (N, C) rows
    ((1024, 64), torch.float32, True, False),  # rows summed in 64 slabs (large enough)
]


@pytest.mark.parametrize(("shape", "dtype", "affine", "channels_last"), COMPILED_CASES)
def test_fast_compiled_equals_reference(
    shape: tuple[int, ...], dtype: torch.dtype, affine: bool, channels_last: bool
) -> None:
    with fast_mod.fresh_kernel_cache():
        compare("compiled", make_input(shape, dtype, channels_last, 0), affine, dtype)
        cases = fast_mod.kernel_cases()
        assert len(cases) == 2 and all(c.fn is not None for c in cases)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_matches_torch_batch_norm(impl: str) -> None:
    """An independent oracle: torch's module, outputs, gradients and running statistics."""
    x = make_input((8, 4, 5, 5), torch.float32, False, 3)
    layer, oracle = BatchNorm(4, impl=impl), torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        for m in (layer, oracle):
            m.weight.copy_(torch.linspace(0.5, 2.0, 4))
            m.bias.copy_(torch.linspace(-1.0, 1.0, 4))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with fast_mod.fresh_kernel_cache():
        layer(xa).backward(g)
    oracle(xb).backward(g)
    assert xa.grad is not None and xb.grad is not None
    torch.testing.assert_close(layer(x), oracle(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.weight.grad, oracle.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(layer.bias.grad, oracle.bias.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(layer.running_mean, oracle.running_mean)
    torch.testing.assert_close(layer.running_var, oracle.running_var)


def test_row_slabs_sum_the_same() -> None:
    """The slab-wise sums the compiled kernels use for large (M, C) inputs equal plain sums."""
    assert fast_mod._row_groups(6272, 256) == 64
    assert fast_mod._row_groups(256, 120) == 1  # small: one slab
    assert fast_mod._row_groups(65537, 2) == 1  # a prime M has no slabs of equal size
    assert fast_mod._row_groups(3 * 5 * 7 * 11, 64) == 55  # the largest divisor <= 64
    x = make_input((3000, 40), torch.float64, False, 4)
    w, b = torch.rand(40, dtype=torch.float64) + 0.5, torch.randn(40, dtype=torch.float64)
    g = torch.randn(3000, 40, dtype=torch.float64)
    groups = fast_mod._row_groups(3000, 40)
    assert groups == 60
    with torch.no_grad():
        one = fast_mod._forward_math(x, w, b, 1e-5, "rows", 1)
        slabs = fast_mod._forward_math(x, w, b, 1e-5, "rows", groups)
        for a, e in zip(slabs, one, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
        mean, invstd = one[1], one[3]
        back_one = fast_mod._backward_math(g, x, mean, invstd, w, "rows", 1)
        back_slabs = fast_mod._backward_math(g, x, mean, invstd, w, "rows", groups)
        for a, e in zip(back_slabs, back_one, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_hand_computed_case() -> None:
    # one channel, values 1, 2, 3, 4: mean 2.5, biased var 1.25
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64, requires_grad=True)
    y, mean, var = fast_mod.fast_train(x, None, None, 0.0)
    assert mean.item() == 2.5 and var.item() == 1.25
    expected = (torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64) - 2.5) / 1.25**0.5
    torch.testing.assert_close(y, expected)
    # Σy = 0 for any x: the gradient of Σy is zero; of y[0] it is (δ_i0 - 1/n - x̂_i x̂_0 / n)/σ
    y.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.zeros_like(x), atol=1e-15, rtol=0)


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize(
    ("impl", "shape", "channels_last"),
    [
        ("eager", (64, 3, 20, 20), False),
        ("eager", (64, 3, 20, 20), True),
        ("eager", (512, 3), False),
        ("compiled", (64, 3, 20, 20), False),  # one compiled layout: the same math
    ],
)
def test_no_cancellation_large_mean_tiny_spread(
    impl: str, shape: tuple[int, ...], channels_last: bool
) -> None:
    """Mean 1e4, std 1e-2 in float32: the variance of the float64 reference to 1e-3."""
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64) * 1e-2 + 1e4
    x = x64.float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dims = [0, *range(2, x.ndim)]
    var64 = x.double().var(dim=dims, unbiased=False)
    mean64 = x.double().mean(dim=dims)
    with fast_mod.fresh_kernel_cache():
        y, mean, var = TRAIN_KERNELS[impl](x, None, None, 1e-12)
    assert ((var.double() - var64).abs() / var64).max().item() < 1e-3
    ulp = torch.finfo(torch.float32).eps * 2**13  # spacing of float32 values in [8192, 16384)
    assert (mean.double() - mean64).abs().max().item() <= ulp  # as exact as float32 holds it
    y_ref = (x.double() - mean64.view(1, -1, *[1] * (x.ndim - 2))) / var64.sqrt().view(
        1, -1, *[1] * (x.ndim - 2)
    )
    assert (y.double() - y_ref).abs().max().item() < 1e-2


# --------------------------------------------------------------------------- autograd


@pytest.mark.parametrize(
    ("shape", "channels_last"), [((5, 3), False), ((3, 2, 3, 2), False), ((3, 2, 3, 2), True)]
)
def test_gradcheck_float64(shape: tuple[int, ...], channels_last: bool) -> None:
    x = make_input(shape, torch.float64, channels_last, 5).requires_grad_()
    w = torch.rand(shape[1], dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64).requires_grad_()

    def f(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return fast_mod._FastBatchNorm.apply(x, w, b, 1e-5, "eager")[0]

    assert torch.autograd.gradcheck(f, (x, w, b))
    # double backward: the backward is recomputed from x with differentiable operations
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_no_affine_gradcheck() -> None:
    x = make_input((4, 3, 2), torch.float64, False, 6).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: fast_mod._FastBatchNorm.apply(x, None, None, 1e-3, "eager")[0], (x,)
    )


@pytest.mark.parametrize("impl", ["eager", "native"])
def test_gradient_in_another_memory_format(impl: str) -> None:
    """dy need not share x's layout (a contiguous gradient for a channels-last x, and back)."""
    for channels_last in (True, False):
        x = make_input((4, 3, 5, 5), torch.float32, channels_last, 7)
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        g = g.contiguous(
            memory_format=torch.contiguous_format if channels_last else torch.channels_last
        )
        grads = []
        for kernel in (impl, "reference"):
            xr = x.clone().requires_grad_()
            batch_norm(xr, training=True, impl=kernel).y.backward(g)
            grads.append(xr.grad)
        assert grads[0] is not None and grads[1] is not None
        torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["eager", "native"])
def test_odd_strides_are_copied_not_mishandled(impl: str) -> None:
    x = make_input((4, 3, 6, 5), torch.float32, False, 8).transpose(2, 3)  # neither format
    compare(impl, x, True, torch.float32)


@pytest.mark.parametrize("impl", ["eager", "native"])
def test_half_input_with_float32_parameters(impl: str) -> None:
    x = make_input((6, 3, 4), torch.float16, False, 9).requires_grad_()
    w = torch.rand(3).add(0.5).requires_grad_()
    b = torch.randn(3).requires_grad_()
    y, mean, var = TRAIN_KERNELS[impl](x, w, b, 1e-5)
    assert y.dtype == torch.float16 and mean.dtype == var.dtype == torch.float32
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float16
    assert w.grad is not None and w.grad.dtype == torch.float32
    ref = F.batch_norm(x.detach().float(), None, None, w.detach(), b.detach(), training=True)
    torch.testing.assert_close(y.float(), ref, atol=1e-2, rtol=1e-2)


def test_statistics_and_no_grad_call() -> None:
    x = make_input((8, 3, 4), torch.float32, False, 10)
    with torch.no_grad():
        y, mean, var = fast_mod.fast_train(x, None, None, 1e-5)
    assert not y.requires_grad
    torch.testing.assert_close(mean, x.mean(dim=(0, 2)))
    torch.testing.assert_close(var, x.var(dim=(0, 2), unbiased=False))
    xr = x.clone().requires_grad_()
    y, mean, var = fast_mod.fast_train(xr, None, None, 1e-5)
    assert y.requires_grad and not mean.requires_grad and not var.requires_grad


@pytest.mark.parametrize("impl", ["eager", "native"])
def test_torch_func_and_forward_ad_fall_back_to_reference(impl: str) -> None:
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    x = make_input((6, 3), torch.float32, False, 11)

    def loss(x: Tensor, impl: str) -> Tensor:
        return batch_norm(x, w, b, training=True, impl=impl).y.pow(3).sum()

    torch.testing.assert_close(
        torch.func.grad(loss)(x, impl), torch.func.grad(loss)(x, "reference")
    )
    batched = torch.func.vmap(lambda x: batch_norm(x, w, b, training=True, impl=impl).y)
    xs = torch.stack([x, x * 2])
    torch.testing.assert_close(batched(xs)[1], batch_norm(x * 2, w, b, training=True).y)
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    _, jvp_fast = torch.func.jvp(lambda x: batch_norm(x, w, b, training=True, impl=impl).y,
                                 (x,), (tangent,))  # fmt: skip
    _, jvp_ref = torch.func.jvp(lambda x: batch_norm(x, w, b, training=True).y, (x,), (tangent,))
    torch.testing.assert_close(jvp_fast, jvp_ref)


def test_torch_compile_of_a_model() -> None:
    """TorchDynamo traces the autograd.Function (forward and backward) into the model's graph."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), BatchNorm(4, impl="eager"), torch.nn.Sigmoid(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5), BatchNorm(5, impl="eager"),
    )  # fmt: skip
    ref = copy.deepcopy(net)
    for m in ref:
        if isinstance(m, BatchNorm):
            m.impl = "reference"
    x = torch.randn(8, 1, 8, 8)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    y_ref = ref(x)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(net[1], name), getattr(ref[1], name))


# --------------------------------------------------------------------------- compile policy


def test_policy_compiles_once_eager_time_reaches_the_estimate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[int] = []

    def fake_compile(fn, args):  # type: ignore[no-untyped-def]
        built.append(len(args))
        return fn  # the eager math itself stands in for a compiled kernel

    monkeypatch.setattr(fast_mod, "_compile", fake_compile)
    monkeypatch.setattr(fast_mod, "INITIAL_COMPILE_ESTIMATE_S", 0.05)
    x = make_input((16, 3, 8), torch.float32, False, 12)
    with fast_mod.fresh_kernel_cache():
        fast_mod.fast_auto_train(x, None, None, 1e-5)
        (case,) = fast_mod.kernel_cases()
        assert case.fn is None and case.eager_s > 0  # one call: far below the estimate
        while case.eager_s < 0.05:
            fast_mod.fast_auto_train(x, None, None, 1e-5)
        assert case.fn is None
        fast_mod.fast_auto_train(x, None, None, 1e-5)  # reaches the estimate: compiles now
        assert built == [1] and case.fn is not None and case.compile_s is not None
        assert fast_mod.compile_estimate_s() == case.compile_s  # measured, replaces the guess
        eager_s = case.eager_s
        y, _, _ = fast_mod.fast_auto_train(x, None, None, 1e-5)
        assert case.eager_s == eager_s  # the kernel ran, not the eager path
        torch.testing.assert_close(y, batch_norm(x, training=True).y)
    assert fast_mod.kernel_cases() == [] or all(
        c.key != case.key for c in fast_mod.kernel_cases()
    )  # the fresh cache is gone afterwards


def test_fast_never_compiles(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(fn, args):  # type: ignore[no-untyped-def]
        raise AssertionError("impl='eager' compiled")

    monkeypatch.setattr(fast_mod, "_compile", fail)
    monkeypatch.setattr(fast_mod, "INITIAL_COMPILE_ESTIMATE_S", 0.0)
    with fast_mod.fresh_kernel_cache():
        xr = make_input((8, 3), torch.float32, False, 13).requires_grad_()
        fast_mod.fast_train(xr, None, None, 1e-5)[0].sum().backward()
        # nor uses a kernel that another policy compiled for the same case
        calls: list[int] = []

        def counting(fn, args):  # type: ignore[no-untyped-def]
            return lambda *a: calls.append(1) or fn(*a)

        monkeypatch.setattr(fast_mod, "_compile", counting)
        fast_mod.fast_compiled_train(xr, None, None, 1e-5)[0].sum().backward()
        assert len(calls) == 2  # the forward and the backward kernel
        fast_mod.fast_train(xr, None, None, 1e-5)[0].sum().backward()
        assert len(calls) == 2


def test_compile_failure_warns_once_and_stays_correct(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn, args):  # type: ignore[no-untyped-def]
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fast_mod, "_compile", broken)
    monkeypatch.setattr(fast_mod, "_warned_compile", False)
    x = make_input((8, 3, 4), torch.float32, False, 14)
    with fast_mod.fresh_kernel_cache():
        with pytest.warns(RuntimeWarning, match="compiling a kernel failed"):
            y, _, _ = fast_mod.fast_compiled_train(x, None, None, 1e-5)
        torch.testing.assert_close(y, batch_norm(x, training=True).y)
        assert all(c.failed and c.fn is None for c in fast_mod.kernel_cases())


def test_kernels_are_registered() -> None:
    for name in (*FAST_IMPLS, "reference"):
        assert name in TRAIN_KERNELS


def test_impl_is_checked_at_construction_and_in_every_mode() -> None:
    """A misspelt kernel fails when the layer is built, naming the kernels that exist; an
    earlier name says the current one; the function checks it in prediction mode too."""
    names = r"\['auto', 'compiled', 'eager', 'eager_then_compiled', 'native', 'reference'"
    with pytest.raises(ValueError, match=rf"impl: expected one of {names}.*got 'nativ'"):
        BatchNorm(3, impl="nativ")
    with pytest.raises(ValueError, match=r"impl='fast' is now called 'eager'"):
        BatchNorm(3, impl="fast")
    x, rm, rv = torch.randn(4, 3), torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="got 'nativ'"):
        batch_norm(x, None, None, rm, rv, training=False, impl="nativ")
    assert BatchNorm(3).impl == "auto"
