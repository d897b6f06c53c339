"""The native C++ kernel (impl="native", and impl="auto", the default, where it is built) against
the reference path, torch's own batch norm, float64 math and autograd; its build, loading and
fallback.

`make test` builds the kernel first (`make setup` runs `bnlab build`); these tests use that
build and fail, rather than skip, where a C++ compiler exists but no build was made."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fast import cases, compare, make_input
from torch import Tensor

from bnlab.cli import main
from bnlab.functional import batch_norm
from bnlab.functional import native as native_mod
from bnlab.functional.batch_norm import EVAL_KERNELS, TRAIN_KERNELS, UPDATING_KERNELS
from bnlab.nn import BatchNorm


def _build_at_collection() -> str | None:
    """Why no build existed when the tests were collected (before any test could build one),
    or None if one did."""
    try:
        native_mod.find_build()
    except native_mod.NativeBuildError as e:
        return str(e)
    return None


MISSING_AT_START = _build_at_collection()
COMPILER = shutil.which(os.environ.get("CXX", "c++"))


@pytest.fixture(scope="module", autouse=True)
def built() -> Path:
    """The build directory of the kernel these tests use."""
    if COMPILER is None and MISSING_AT_START is not None:
        pytest.skip(f"no C++ compiler ({os.environ.get('CXX', 'c++')} not found): nothing to test")
    native_mod.build_native()
    load = native_mod.native_load()
    assert load is not None
    return load.path


def test_setup_built_the_kernel_and_it_is_the_default() -> None:
    """Where a compiler exists, `make setup` has built the kernel before the tests, and a fresh
    process's default BatchNorm runs it, loaded (not compiled), without a warning."""
    assert MISSING_AT_START is None, (
        f"a C++ compiler exists ({COMPILER}) but there was no build of the native kernel when "
        f"the tests started ({MISSING_AT_START}): `make setup` runs `bnlab build`; run it and "
        "read its error"
    )
    code = (
        "import warnings\n"
        "import torch\n"
        "from bnlab.nn import BatchNorm\n"
        "from bnlab.functional import native\n"
        "warnings.simplefilter('error', native.NativeKernelWarning)\n"
        "bn = BatchNorm(6)\n"
        "bn(torch.randn(8, 6, 5, 5, requires_grad=True)).sum().backward()\n"
        "load = native.native_load()\n"
        "print(load is not None and not load.compiled, int(bn.num_batches_tracked))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert out.stdout.split() == ["True", "1"], out.stdout + out.stderr


@pytest.fixture
def no_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty build directory and a process that has loaded no kernel yet (restored after)."""
    monkeypatch.setenv(native_mod.BUILD_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(native_mod, "_module", None)
    monkeypatch.setattr(native_mod, "_load", None)
    monkeypatch.setattr(native_mod, "_unavailable", None)
    return tmp_path


def test_without_a_build_the_default_warns_once_and_runs_the_eager_kernel(
    no_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.utils import cpp_extension

    def no_compiling(**_: object) -> None:
        raise AssertionError("the default kernel compiled")

    monkeypatch.setattr(cpp_extension, "load", no_compiling)
    x = make_input((8, 3, 4, 4), torch.float32, False, 60)
    layer, eager = BatchNorm(3), BatchNorm(3, impl="eager")
    with pytest.warns(native_mod.NativeKernelWarning, match=r"no build in .*`bnlab build`"):
        y = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: no second warning
        y2 = layer(x)
        y_fn = batch_norm(x, None, None, torch.zeros(3), torch.ones(3), training=True).y
    assert torch.equal(y, eager(x)) and torch.equal(y2, eager(x)) and torch.equal(y_fn, y)
    assert torch.equal(layer.running_var, eager.running_var)
    assert native_mod.native_load() is None and native_mod.load_native() is None


def _copy_build(build: Path, to: Path) -> Path:
    """The build directory ``build``, copied under the build root ``to``."""
    target = to / build.name
    shutil.copytree(build, target)
    return target


def test_a_build_for_another_torch_is_never_loaded(
    built: Path, no_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build whose record names another torch is refused before its library is opened."""
    directory = _copy_build(built, no_build)
    info_file = directory / native_mod.BUILD_INFO
    info = json.loads(info_file.read_text())
    info["torch"] = "2.0.0+cpu"
    info_file.write_text(json.dumps(info))
    opened: list[Path] = []
    monkeypatch.setattr(native_mod, "_import", lambda path: opened.append(path))
    with pytest.warns(native_mod.NativeKernelWarning, match=r"torch '2.0.0\+cpu'"):
        assert native_mod.load_native() is None
    assert opened == []
    with pytest.raises(native_mod.NativeBuildError, match="another setup"):
        native_mod.find_build()
    # and another torch looks for its build under another name
    name = native_mod.extension_name()
    monkeypatch.setattr(torch, "__version__", "2.0.0+cpu")
    assert native_mod.extension_name() != name


def test_a_matching_build_is_loaded_without_compiling(
    built: Path, no_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.utils import cpp_extension

    _copy_build(built, no_build)
    monkeypatch.setattr(cpp_extension, "load", lambda **_: pytest.fail("compiled"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = native_mod.load_native()
    load = native_mod.native_load()
    assert module is not None and load is not None and not load.compiled
    assert load.path == native_mod.build_dir() and load.path.parent == no_build


def test_build_command_reports_where_the_build_lives(
    built: Path, no_build: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["build", "--check"]) == 1
    assert "no usable C++ kernel" in capsys.readouterr().err
    directory = _copy_build(built, no_build)
    assert main(["build", "--check"]) == 0
    assert str(directory) in capsys.readouterr().out
    assert main(["build"]) == 0  # an existing build: nothing compiled
    out = capsys.readouterr().out
    assert "already built" in out and str(directory) in out


def test_build_failure_is_a_clear_error_and_a_failed_command(
    no_build: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from torch.utils import cpp_extension

    def broken(**_: object) -> None:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.raises(native_mod.NativeBuildError, match=r"no compiler here.*impl=.eager"):
        native_mod.build_native()
    assert main(["build"]) == 1
    err = capsys.readouterr().err
    assert "no compiler here" in err and "still works" in err
    assert not (native_mod.build_dir() / native_mod.BUILD_INFO).exists()


@settings(max_examples=60)
@given(cases())
def test_native_equals_reference(case: tuple) -> None:
    shape, dtype, affine, channels_last, seed = case
    compare("native", make_input(shape, dtype, channels_last, seed), affine, dtype)


@settings(max_examples=60)
@given(cases())
def test_default_equals_reference(case: tuple) -> None:
    """The default kernel (impl="auto": the C++ one, here) through the function."""
    shape, dtype, affine, channels_last, seed = case
    compare("auto", make_input(shape, dtype, channels_last, seed), affine, dtype)


def _layer_steps(layer: BatchNorm, xs: list[Tensor], seed: int) -> list[tuple[Tensor, ...]]:
    """Per training step: y and the gradients of x and the parameters present, then the
    running statistics and the batch count; finally eval's y on the last input."""
    out = []
    for i, x in enumerate(xs):
        xr = x.detach().clone().requires_grad_()
        y = layer(xr)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + i)).to(y.dtype)
        params = [p for p in (layer.weight, layer.bias) if p is not None and p.requires_grad]
        grads = torch.autograd.grad(y, [xr, *params], g.contiguous(memory_format=_format(x)))
        stats = (layer.running_mean, layer.running_var, layer.num_batches_tracked)
        out.append((y.detach(), *grads, *(t.clone() for t in stats if t is not None)))
    layer.eval()
    out.append((layer(xs[-1]).detach(),))
    layer.train()
    return out


@settings(max_examples=40, deadline=None)
@given(cases(), st.sampled_from([0.1, None]), st.sampled_from(["torch", "d2l"]))
def test_default_layer_equals_reference_layer(
    case: tuple, momentum: float | None, convention: str
) -> None:
    """The default BatchNorm (one C++ call per step, buffers updated in place) against the
    reference layer over two training steps and eval: outputs, gradients, running statistics
    and batch counts."""
    shape, dtype, affine, channels_last, seed = case
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    layers = [
        BatchNorm(shape[1], affine=affine, momentum=momentum, convention=convention,
                  impl=impl, dtype=pdt)
        for impl in ("auto", "reference")
    ]  # fmt: skip
    xs = [make_input(shape, dtype, channels_last, seed + k) for k in range(2)]
    got, expected = (_layer_steps(m, xs, seed) for m in layers)
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
    for step_got, step_expected in zip(got, expected, strict=True):
        assert len(step_got) == len(step_expected)
        for a, e in zip(step_got, step_expected, strict=True):
            assert a.dtype == e.dtype and a.shape == e.shape
            scale = max(1.0, e.double().abs().max().item())
            # ∂x cancels: compare relative to its terms (as test_fast.compare does), loosely
            assert (a.double() - e.double()).abs().max().item() <= tol[dtype] * 50 * scale


@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [
        ((256, 6, 24, 24), False),
        ((64, 16, 8, 8), True),
        ((300, 84), False),
        ((9, 5, 7), False),
        ((16, 8, 48, 48), False),  # 1.2 MB: y and ∂x come from the output cache
        ((16, 8, 48, 48), True),
    ],
)
def test_native_equals_reference_on_larger_shapes(
    shape: tuple[int, ...], channels_last: bool
) -> None:
    """Several partial-sum blocks and threads' worth of rows, both memory orders."""
    compare("native", make_input(shape, torch.float32, channels_last, 1), True, torch.float32)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(8, 4, 5, 5), (16, 6)])
def test_module_matches_torch_over_steps(shape: tuple[int, ...], momentum: float | None) -> None:
    """An independent oracle: torch's module over three steps and then in eval mode."""
    c = shape[1]
    layer = BatchNorm(c, num_dims=len(shape), momentum=momentum, impl="native")
    oracle = (torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d)(
        c, momentum=momentum
    )
    with torch.no_grad():
        for m in (layer, oracle):
            m.weight.copy_(torch.linspace(0.5, 2.0, c))
            m.bias.copy_(torch.linspace(-1.0, 1.0, c))
    for step in range(3):
        x = make_input(shape, torch.float32, False, 20 + step)
        g = torch.randn(shape, generator=torch.Generator().manual_seed(step))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = layer(xa), oracle(xb)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.weight.grad, oracle.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(layer.bias.grad, oracle.bias.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(layer.running_mean, oracle.running_mean)
    torch.testing.assert_close(layer.running_var, oracle.running_var)
    assert int(layer.num_batches_tracked) == int(oracle.num_batches_tracked) == 3
    layer.eval()
    oracle.eval()
    x = make_input(shape, torch.float32, False, 30)
    torch.testing.assert_close(layer(x), oracle(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_eval_equals_reference(dtype: torch.dtype, channels_last: bool) -> None:
    x = make_input((6, 5, 4, 3), dtype, channels_last, 2)
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = torch.rand(5, dtype=pdt) + 0.5, torch.randn(5, dtype=pdt)
    rm, rv = torch.randn(5, dtype=pdt), torch.rand(5, dtype=pdt) + 0.5
    y = batch_norm(x, w, b, rm, rv, training=False, impl="native").y
    y_ref = batch_norm(x, w, b, rm, rv, training=False, impl="reference").y
    assert y.dtype == dtype and y.stride() == x.stride()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
    torch.testing.assert_close(y, y_ref, atol=tol[dtype] * 10, rtol=tol[dtype])
    assert EVAL_KERNELS["native"](x, rm, rv, None, None, 1e-5) is not None


def test_eval_with_gradient_uses_the_differentiable_path() -> None:
    """Fine-tuning with frozen statistics needs ∂x, ∂γ, ∂β through prediction mode."""
    x = make_input((6, 3, 4), torch.float64, False, 3).requires_grad_()
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64).requires_grad_()
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    assert EVAL_KERNELS["native"](x, rm, rv, w, b, 1e-5) is None  # declines: reference runs
    assert torch.autograd.gradcheck(
        lambda x, w, b: batch_norm(x, w, b, rm, rv, training=False, impl="native").y, (x, w, b)
    )


def test_no_cancellation_large_mean_tiny_spread() -> None:
    """Mean 1e4, std 1e-2 in float32: the variance of the float64 reference to 1e-3."""
    for channels_last in (False, True):
        x64 = torch.randn(64, 3, 20, 20, generator=torch.Generator().manual_seed(0)).double()
        x = (x64 * 1e-2 + 1e4).float()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        var64 = x.double().var(dim=(0, 2, 3), unbiased=False)
        mean64 = x.double().mean(dim=(0, 2, 3), keepdim=True)
        y, _, var = TRAIN_KERNELS["native"](x, None, None, 1e-12)
        assert ((var.double() - var64).abs() / var64).max().item() < 1e-3
        y64 = (x.double() - mean64) / var64.sqrt().view(1, -1, 1, 1)
        assert (y.double() - y64).abs().max().item() < 1e-2  # no x·s + (β - μ·s) cancellation


def test_backward_matches_float64_when_the_mean_dwarfs_the_spread() -> None:
    """Mean 100, std 0.1 in float32, with dy correlated with x (as a loss makes it): ∂x of the
    float64 math to 1e-3 of its scale."""
    gen = torch.Generator().manual_seed(3)
    x64 = torch.randn(32, 6, 12, 12, generator=gen, dtype=torch.float64) * 0.1 + 100
    x = x64.float()
    g = torch.randn(x.shape, generator=gen) + ((x64 - 100) / 0.1).float()
    for channels_last in (False, True):
        xs = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        xr = xs.clone().requires_grad_()
        TRAIN_KERNELS["native"](xr, None, None, 1e-5)[0].backward(g)
        xd = x.double().requires_grad_()
        F.batch_norm(xd, None, None, training=True, eps=1e-5).backward(g.double())
        assert xr.grad is not None and xd.grad is not None
        err = (xr.grad.double() - xd.grad).abs().max().item()
        assert err < 1e-3 * xd.grad.abs().max().item()


@pytest.mark.parametrize(
    ("shape", "channels_last"),
    [((5, 3), False), ((3, 2, 3, 2), False), ((3, 2, 3, 2), True), ((4, 3, 5), False)],
)
def test_gradcheck_and_double_backward(shape: tuple[int, ...], channels_last: bool) -> None:
    x = make_input(shape, torch.float64, channels_last, 5).requires_grad_()
    w = torch.rand(shape[1], dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64).requires_grad_()

    def f(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return native_mod.native_train(x, w, b, 1e-5)[0]

    assert torch.autograd.gradcheck(f, (x, w, b), check_batched_grad=True)  # vmap over dy
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    assert torch.autograd.gradcheck(lambda x: native_mod.native_train(x, None, None, 1e-3)[0], (x,))


def test_result_does_not_depend_on_the_thread_count() -> None:
    """Partial sums over fixed blocks: bitwise the same with 1 and 2 threads."""
    threads = torch.get_num_threads()
    outs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            for channels_last in (False, True):
                x = make_input((128, 8, 12, 12), torch.float32, channels_last, 4)
                xr = x.requires_grad_()
                y, mean, var = native_mod.native_train(xr, None, None, 1e-5)
                y.backward(torch.ones_like(y).mul_(torch.arange(12.0)))
                outs.append((y.detach(), mean, var, xr.grad))
        finally:
            torch.set_num_threads(threads)
    for a, b in zip(outs[:2], outs[2:], strict=True):
        for s, t in zip(a, b, strict=True):
            assert torch.equal(s, t)


def test_nonfinite_inputs_propagate_and_skip_nonfinite_keeps_the_statistics() -> None:
    layer = BatchNorm(3, impl="native", skip_nonfinite=True)
    x = torch.randn(4, 3, 2, 2)
    x[0, 1, 0, 0] = float("nan")
    before = layer.running_mean.clone()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        y = layer(x)
    assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, [0, 2]]).all()
    torch.testing.assert_close(layer.running_mean, before)


def test_torch_compile_falls_back_to_the_fast_kernel() -> None:
    """A model with the layer compiles in full; torch.func and forward-mode AD are tested with
    the fast kernel's (test_fast.py, parametrized over both)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), BatchNorm(3, impl="native"))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    inp = torch.randn(8, 4)
    torch.testing.assert_close(compiled(inp), model(inp))


def test_registered_and_cache_key_is_stable() -> None:
    assert TRAIN_KERNELS["native"] is native_mod.native_train
    assert UPDATING_KERNELS["native"] is native_mod.native_train_update
    assert native_mod.extension_name() == native_mod.extension_name()
    assert native_mod.extension_name().startswith("bnlab_native_")


@pytest.mark.parametrize(("has_w", "has_b"), [(False, True), (True, False)])
@pytest.mark.parametrize("w_grad", [True, False])
def test_only_one_affine_parameter(has_w: bool, has_b: bool, w_grad: bool) -> None:
    """γ without β and β without γ (BatchNorm's scale/center options), frozen or learned."""
    x = make_input((6, 3, 4), torch.float64, False, 12)
    grads = []
    for impl in ("native", "reference"):
        xr = x.clone().requires_grad_()
        w = (
            torch.linspace(0.5, 1.5, 3, dtype=torch.float64).requires_grad_(w_grad)
            if has_w
            else None
        )
        b = torch.linspace(-1, 1, 3, dtype=torch.float64).requires_grad_() if has_b else None
        y = batch_norm(xr, w, b, training=True, impl=impl).y
        y.pow(2).sum().backward()
        grads.append([xr.grad, None if w is None else w.grad, None if b is None else b.grad])
    for a, e in zip(*grads, strict=True):
        assert (a is None) == (e is None)
        if a is not None and e is not None:
            torch.testing.assert_close(a, e)


def test_lenet_training_steps_match_float64() -> None:
    """The chapter's BN-LeNet, five SGD steps at lr 1.0: the native kernel in float32 ends at the
    weights and running statistics of the reference path in float64, to float32 rounding, and so
    does eval. Average pooling, because max pooling over saturated sigmoids (exact ties at 1.0
    in float32) can route a gradient to another element: any float32 run, PyTorch's included,
    then jumps by ~1e-2 from the float64 one."""
    from bnlab.models import lenet

    torch.manual_seed(0)
    data = torch.rand(5, 32, 1, 28, 28)
    labels = torch.randint(0, 10, (5, 32))
    nets = []
    for impl, dtype in (("native", torch.float32), ("reference", torch.float64)):
        torch.manual_seed(1)
        net = lenet("bnlab", norm_options={"impl": impl}, pool="avg").to(dtype)
        opt = torch.optim.SGD(net.parameters(), lr=1.0)
        for x, t in zip(data, labels, strict=True):
            opt.zero_grad()
            F.cross_entropy(net(x.to(dtype)), t).backward()
            opt.step()
        nets.append(net)
    state_native, state_ref = nets[0].state_dict(), nets[1].state_dict()
    assert state_native.keys() == state_ref.keys()
    for key in state_native:
        expected = state_ref[key]
        if expected.is_floating_point():
            expected = expected.float()
        torch.testing.assert_close(state_native[key], expected, atol=3e-5, rtol=1e-4)
    for net in nets:
        net.eval()
    torch.testing.assert_close(
        nets[0](data[0]), nets[1](data[0].double()).float(), atol=3e-5, rtol=1e-4
    )


LARGE = (16, 8, 48, 48)  # 1.2 MB of float32, above the output cache's 1 MiB threshold


def _step(x: Tensor, seed: int) -> tuple[Tensor, ...]:
    """y, mean, var and the three gradients of one training step of the native kernel."""
    c = x.shape[1]
    w = (torch.rand(c, generator=torch.Generator().manual_seed(seed)) + 0.5).requires_grad_()
    b = torch.randn(c, generator=torch.Generator().manual_seed(seed + 1)).requires_grad_()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 2))
    x = x.detach().requires_grad_()
    y, mean, var = native_mod.native_train(x, w, b, 1e-5)
    grads = torch.autograd.grad(y, (x, w, b), g.contiguous(memory_format=_format(x)))
    return (y.detach(), mean, var, *grads)


def _format(x: Tensor) -> torch.memory_format:
    cl = x.dim() == 4 and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


@pytest.fixture
def cache_limit() -> Iterator[None]:
    """Restores the output cache's limit after a test that changes it."""
    before = native_mod.output_cache_info()["limit_bytes"]
    yield
    native_mod.set_output_cache_limit(before)


@pytest.mark.parametrize("channels_last", [False, True])
def test_output_cache_reuses_freed_blocks_without_changing_results(
    channels_last: bool, cache_limit: object
) -> None:
    """Outputs from reused (dirty) blocks are bitwise the outputs of fresh memory, and equal
    torch's."""
    x = make_input(LARGE, torch.float32, channels_last, 40)
    other = make_input(LARGE, torch.float32, channels_last, 41) * 7
    native_mod.set_output_cache_limit(0)
    fresh = _step(x, 1)
    assert native_mod.output_cache_info()["cached_bytes"] == 0
    native_mod.set_output_cache_limit(64 << 20)
    native_mod.empty_output_cache()
    _step(other, 2)  # its freed outputs fill the cache with another step's values
    filled = native_mod.output_cache_info()
    assert filled["cached_bytes"] >= 2 * x.numel() * 4, filled
    reused = _step(x, 1)
    after = native_mod.output_cache_info()
    assert after["hits"] >= filled["hits"] + 2, (filled, after)
    for a, b in zip(fresh, reused, strict=True):
        assert torch.equal(a, b)
    assert reused[0].stride() == x.stride() and reused[3].stride() == x.stride()
    # torch's batch norm on the same x, γ, β and dy (the seeds of _step(x, 1))
    xr = x.detach().requires_grad_()
    wt = torch.rand(8, generator=torch.Generator().manual_seed(1)) + 0.5
    bt = torch.randn(8, generator=torch.Generator().manual_seed(2))
    yt = F.batch_norm(xr, None, None, wt, bt, training=True)
    g = torch.randn(LARGE, generator=torch.Generator().manual_seed(3))
    dxt = torch.autograd.grad(yt, xr, g.contiguous(memory_format=_format(x)))[0]
    torch.testing.assert_close(reused[0], yt.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reused[3], dxt, atol=1e-5, rtol=1e-5)


def test_output_cache_respects_its_limit_and_empties(cache_limit: object) -> None:
    native_mod.set_output_cache_limit(3 << 20)  # room for one 2 MiB block, not two
    native_mod.empty_output_cache()
    _step(make_input(LARGE, torch.float32, False, 5), 6)
    info = native_mod.output_cache_info()
    assert 0 < info["cached_bytes"] <= 3 << 20, info
    native_mod.empty_output_cache()
    assert native_mod.output_cache_info()["cached_bytes"] == 0
    assert native_mod.output_cache_info()["limit_bytes"] == 3 << 20


def test_a_full_output_cache_makes_room_for_new_sizes(cache_limit: object) -> None:
    """Blocks of a size no longer in use give way to the newest size, which is then reused."""
    native_mod.set_output_cache_limit(4 << 20)
    native_mod.empty_output_cache()
    _step(make_input(LARGE, torch.float32, False, 9), 10)  # two 2 MiB blocks fill the cache
    assert native_mod.output_cache_info()["cached_bytes"] == 4 << 20
    other = make_input((16, 8, 80, 80), torch.float32, False, 11)  # 3.3 MB: 4 MiB blocks
    _step(other, 12)
    before = native_mod.output_cache_info()
    assert before["cached_bytes"] == 4 << 20, before
    _step(other, 12)
    after = native_mod.output_cache_info()
    assert after["hits"] >= before["hits"] + 1, (before, after)
    assert after["cached_bytes"] <= 4 << 20


def test_cached_output_is_an_ordinary_resizable_tensor(cache_limit: object) -> None:
    native_mod.set_output_cache_limit(64 << 20)
    x = make_input(LARGE, torch.float32, False, 8)
    rm, rv = torch.zeros(8), torch.ones(8)
    with torch.no_grad():
        y = native_mod.native_eval(x, rm, rv, None, None, 1e-5)
    assert y is not None
    expected = F.batch_norm(x, rm, rv, training=False)
    torch.testing.assert_close(y, expected)
    buffer = io.BytesIO()
    torch.save(y, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), y)
    with torch.no_grad():
        shared = native_mod.native_eval(x, rm, rv, None, None, 1e-5)  # another cached output
    assert shared is not None
    shared.share_memory_()  # moves its storage into shared memory, freeing the cached block
    assert shared.is_shared() and torch.equal(shared, y)
    y.resize_(2 * y.numel())  # grows through the cache's allocator, keeping the values
    torch.testing.assert_close(y[: x.numel()], expected.reshape(-1))


def test_output_cache_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native_mod.CACHE_ENV, raising=False)
    assert native_mod._cache_limit_from_env() == native_mod.DEFAULT_CACHE_MB << 20
    monkeypatch.setenv(native_mod.CACHE_ENV, "64")
    assert native_mod._cache_limit_from_env() == 64 << 20
    for bad in ("lots", "-1", "1.5"):
        monkeypatch.setenv(native_mod.CACHE_ENV, bad)
        with pytest.raises(ValueError, match=r"BNLAB_NATIVE_CACHE_MB=.*whole number of MiB"):
            native_mod._cache_limit_from_env()
    from torch.utils import cpp_extension

    def no_build(**_: object) -> None:
        raise AssertionError("compiled before checking the setting")

    monkeypatch.setattr(cpp_extension, "load", no_build)
    with pytest.raises(ValueError, match="BNLAB_NATIVE_CACHE_MB"):  # before any compiling
        native_mod.build_native(force=True)
    for bad_limit in (-1, 1.5, True):
        with pytest.raises(ValueError, match="byte count"):
            native_mod.set_output_cache_limit(bad_limit)  # type: ignore[arg-type]


@pytest.mark.parametrize("channels_last", [False, True])
def test_outputs_larger_than_the_cache_are_streamed_correctly(channels_last: bool) -> None:
    """51 MB float32 outputs are written with non-temporal stores; runs of an odd length (223²)
    give them unaligned heads and tails. Training and eval equal torch's in float64 (torch's own
    float32 channels-last kernel is 8e-5 off on this shape, ours 1e-6)."""
    shape = (4, 64, 223, 223)
    x = make_input(shape, torch.float32, channels_last, 50)
    y, mean, var, dx, dw, db = _step(x, 4)
    xr = x.detach().double().requires_grad_()
    wt = (torch.rand(64, generator=torch.Generator().manual_seed(4)) + 0.5).double()
    bt = torch.randn(64, generator=torch.Generator().manual_seed(5)).double()
    wt.requires_grad_()
    bt.requires_grad_()
    yt = F.batch_norm(xr, None, None, wt, bt, training=True)
    g = torch.randn(shape, generator=torch.Generator().manual_seed(6)).double()
    expected = torch.autograd.grad(yt, (xr, wt, bt), g)
    torch.testing.assert_close(y, yt.detach().float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, expected[0].float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, expected[1].float(), atol=1e-2, rtol=1e-4)  # sums of 200k
    torch.testing.assert_close(db, expected[2].float(), atol=1e-2, rtol=1e-4)
    torch.testing.assert_close(mean, xr.detach().mean((0, 2, 3)).float(), atol=1e-5, rtol=1e-5)
    expected_var = xr.detach().var((0, 2, 3), unbiased=False).float()
    torch.testing.assert_close(var, expected_var, atol=1e-5, rtol=1e-5)
    rm, rv = torch.randn(64), torch.rand(64) + 0.5
    with torch.no_grad():
        y_eval = native_mod.native_eval(x, rm, rv, wt.float(), bt.float(), 1e-5)
        expected_eval = F.batch_norm(x.double(), rm.double(), rv.double(), wt, bt, training=False)
    assert y_eval is not None and y_eval.stride() == x.stride()
    torch.testing.assert_close(y_eval, expected_eval.float(), atol=1e-5, rtol=1e-5)
