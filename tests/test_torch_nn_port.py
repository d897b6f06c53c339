"""The batch-norm tests of PyTorch's test/test_nn.py (and the BN cases of test/nn/
test_load_state_dict.py and test_lazy_modules.py), ported: each asks the question PyTorch's
test asks, of ``bnlab.nn.BatchNorm`` / ``bnlab.functional.batch_norm``, with torch's own
modules as the oracle. The last section pins the deliberate differences docs/conventions.md
lists."""

from __future__ import annotations

import copy
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.testing._internal.common_utils import gradcheck, gradgradcheck

from bnlab.functional import MismatchError, batch_norm
from bnlab.nn import BatchNorm

F64 = torch.float64
TORCH_BY_RANK: dict[int, type[nn.Module]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}
IMPLS = [pytest.param({}, id="default"), pytest.param({"impl": "eager"}, id="eager")]


def pair(c: int, rank: int, *args: object, **kwargs: object) -> tuple[nn.Module, nn.Module]:
    """(bnlab's layer, torch's layer of that rank), built from the same torch-style arguments."""
    return BatchNorm(c, *args, **kwargs), TORCH_BY_RANK[rank](c, *args, **kwargs)


def same_state(ours: nn.Module, ref: nn.Module) -> None:
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    for k in b:
        torch.testing.assert_close(a[k], b[k], msg=k)


def run_both(ours: nn.Module, ref: nn.Module, x: Tensor) -> None:
    """Forward and backward through both; outputs, gradients and state must agree."""
    xa, xb = (x.detach().clone().requires_grad_(True) for _ in range(2))
    ya, yb = ours(xa), ref(xb)
    torch.testing.assert_close(ya, yb)
    dy = torch.randn_like(yb)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad)
    for pa, pb in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad)
    same_state(ours, ref)


# ---------------------------------------------------------------- state dicts


def test_load_state_dict_keeps_or_takes_the_batch_count() -> None:
    """test_batchnorm_load_state_dict: a dict with num_batches_tracked sets it; a dict without
    it (strict=False) keeps the module's own; under the meta device it starts at 0."""
    for bn in (BatchNorm(3), nn.BatchNorm2d(3)):
        saved = bn.state_dict()
        assert int(saved["num_batches_tracked"]) == 0
        bn.num_batches_tracked = torch.tensor(10)  # a new tensor: `saved` holds the old one
        bn.load_state_dict(saved)
        assert int(bn.num_batches_tracked) == 0
        bn.num_batches_tracked = torch.tensor(10)
        bn.load_state_dict(OrderedDict(), strict=False)
        assert int(bn.num_batches_tracked) == 10
        partial = {k: v for k, v in saved.items() if k != "num_batches_tracked"}
        bn.load_state_dict(partial, strict=False)
        assert int(bn.num_batches_tracked) == 10
    for cls in (BatchNorm, nn.BatchNorm2d):
        with torch.device("meta"):
            meta = cls(3)
        meta.load_state_dict(OrderedDict(), assign=True, strict=False)
        assert meta.num_batches_tracked.device.type == "cpu"
        assert int(meta.num_batches_tracked) == 0


def test_version_1_checkpoint_without_count_loads_as_torch() -> None:
    """test_load_state_dict_BC: a version-1 BN state dict has no num_batches_tracked."""
    for bn in (BatchNorm(3), nn.BatchNorm2d(3)):
        state = bn.state_dict()
        del state["num_batches_tracked"]
        state._metadata[""]["version"] = 1  # type: ignore[attr-defined]
        bn.num_batches_tracked = torch.tensor(4)
        bn.load_state_dict(state)
        assert bn.num_batches_tracked.dtype == torch.long
        assert int(bn.num_batches_tracked) == 4


# ---------------------------------------------------------------- empty and tiny batches


@pytest.mark.parametrize("kw", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 5), (0, 3, 2, 2), (2, 3, 0, 4), (0, 3, 2, 2, 2)])
def test_empty_batch(shape: tuple[int, ...], affine: bool, training: bool, kw: dict) -> None:
    """test_BatchNorm_empty: an empty output, zero γ/β gradients, running statistics as they
    were (and the batch counted, as torch counts it)."""
    ours, ref = BatchNorm(3, affine=affine, **kw), TORCH_BY_RANK[len(shape)](3, affine=affine)
    for m in (ours, ref):
        m.train(training)
    x = torch.randn(shape)
    run_both(ours, ref, x)
    if affine:
        assert torch.equal(ours.weight.grad, torch.zeros(3))
        assert torch.equal(ours.bias.grad, torch.zeros(3))
    assert torch.equal(ours.running_mean, torch.zeros(3))
    assert torch.equal(ours.running_var, torch.ones(3))


@pytest.mark.parametrize("shape", [(1, 10), (1, 10, 1), (1, 10, 1, 1), (1, 10, 1, 1, 1)])
def test_one_value_per_channel_is_refused_in_training(shape: tuple[int, ...]) -> None:
    """test_batchnorm_raises_error_if_less_than_one_value_per_channel."""
    ours, ref = pair(10, len(shape))
    x = torch.randn(shape)
    for m in (ours, ref):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            m(x)
        m.eval()
        m(x)  # prediction needs no batch statistics


# ---------------------------------------------------------------- wrong sizes


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("size", [9, 11])
def test_wrong_sized_per_channel_tensor_is_a_runtime_error(name: str, size: int) -> None:
    """test_batchnorm_raises_error_if_{running_mean,running_var,weight,bias}_is_not_same_size_as_input:
    torch raises RuntimeError; bnlab's MismatchError is one (and a ValueError)."""
    x = torch.rand(2, 10)
    tensors = {
        "running_mean": torch.rand(10),
        "running_var": torch.rand(10),
        "weight": torch.rand(10),
        "bias": torch.rand(10),
    }
    tensors[name] = torch.rand(size)
    rm, rv, w, b = (tensors[k] for k in ("running_mean", "running_var", "weight", "bias"))
    with pytest.raises(RuntimeError):
        F.batch_norm(x, rm, rv, w, b, training=True)
    with pytest.raises(RuntimeError, match=rf"{name}: expected one value per channel"):
        batch_norm(x, w, b, rm, rv, training=True)
    with pytest.raises(MismatchError):
        batch_norm(x, w, b, rm, rv, training=False)


def test_input_with_other_channels_is_a_runtime_error() -> None:
    for m in pair(3, 2):
        with pytest.raises(RuntimeError):
            m(torch.randn(4, 5))


# ---------------------------------------------------------------- running statistics


def test_switching_tracking_off_leaves_the_buffers_alone() -> None:
    """test_batchnorm_buffer_update_when_stats_are_not_tracked: with track_running_stats set
    to False after construction, training uses batch statistics and touches no buffer; eval
    still normalizes with the buffers, as torch's."""
    ours, ref = pair(5, 2)
    x = torch.randn(8, 5) * 2 + 1
    run_both(ours, ref, x)  # one tracked step: non-trivial buffers
    for m in (ours, ref):
        m.track_running_stats = False
    run_both(ours, ref, x * 3)
    assert int(ours.num_batches_tracked) == 1
    for m in (ours, ref):
        m.eval()
    run_both(ours, ref, x - 1)


@pytest.mark.parametrize("kw", IMPLS)
@pytest.mark.parametrize("momentum", [0.1, 0.8, 0.0, 1.0, None])
@pytest.mark.parametrize("shape", [(6, 4), (5, 4, 7), (3, 4, 5, 6), (2, 4, 3, 3, 3)])
def test_running_statistics_over_steps_and_eval(
    shape: tuple[int, ...], momentum: float | None, kw: dict
) -> None:
    """test_batchnorm_update_stats / _simple_average / _eval: several training steps (a
    cumulative average for momentum=None), then eval, which changes nothing, then a reset."""
    ours, ref = BatchNorm(4, 1e-5, momentum, **kw), TORCH_BY_RANK[len(shape)](4, 1e-5, momentum)
    torch.manual_seed(1)
    for step in range(4):
        run_both(ours, ref, torch.randn(shape) * (step + 1) + step)
    assert int(ours.num_batches_tracked) == 4
    for m in (ours, ref):
        m.eval()
    before = copy.deepcopy(ours.state_dict())
    run_both(ours, ref, torch.randn(shape) * 5)
    for k, v in before.items():
        assert torch.equal(ours.state_dict()[k], v)
    for m in (ours, ref):
        m.reset_running_stats()
        m.train()
    run_both(ours, ref, torch.randn(shape))


def test_eval_without_running_statistics_uses_the_batch() -> None:
    """_test_batchnorm_eval with track_running_stats=False: batch statistics in both modes."""
    ours, ref = pair(3, 4, track_running_stats=False)
    x = torch.randn(4, 3, 2, 2) * 3 + 2
    for m in (ours, ref):
        m.eval()
    run_both(ours, ref, x)
    assert ours.running_mean is None and ours.num_batches_tracked is None


def test_affine_false_equals_unit_gamma_and_zero_beta() -> None:
    """_test_batchnorm_affine."""
    x = torch.randn(6, 4, 3, 3)
    plain, unit = BatchNorm(4, affine=False), BatchNorm(4)
    xa, xb = (x.clone().requires_grad_(True) for _ in range(2))
    ya, yb = plain(xa), unit(xb)
    torch.testing.assert_close(ya, yb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_and_gradgradcheck_of_the_function(training: bool) -> None:
    """_test_batchnorm_grad: torch's values (aranges), eps 1e-4, through the testing gradcheck
    (which also checks the backward under vmap)."""
    n, c, length = 4, 5, 6
    x = torch.arange(n * c * length, dtype=F64).view(n, c, length).requires_grad_(True)
    w = torch.arange(1, c + 1, dtype=F64).requires_grad_(True)
    b = torch.arange(c, dtype=F64).requires_grad_(True)
    rm = 1 - torch.arange(c, dtype=F64)
    rv = 2 * torch.arange(c, dtype=F64)

    def fn(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return batch_norm(x, w, b, rm, rv, training=training, momentum=0.1, eps=1e-4).y

    assert gradcheck(fn, (x, w, b))
    assert gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("kw", IMPLS)
@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (4, 3, 2, 3), (2, 3, 2, 2, 2)])
def test_batched_gradients_match_torch(shape: tuple[int, ...], kw: dict) -> None:
    """torch.autograd.grad(..., is_grads_batched=True), the vmap over the backward that
    gradcheck's check_batched_grad and torch.func.jacrev-style code use."""
    ours, ref = BatchNorm(3, **kw).double(), TORCH_BY_RANK[len(shape)](3).double()
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    v = torch.randn(5, *shape, dtype=F64)
    (g_ours,) = torch.autograd.grad(ours(x), x, v, is_grads_batched=True)
    (g_ref,) = torch.autograd.grad(ref(x), x, v, is_grads_batched=True)
    torch.testing.assert_close(g_ours, g_ref)


# ---------------------------------------------------------------- layouts and dtypes


@pytest.mark.parametrize("kw", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    ("shape", "fmt"),
    [((4, 8, 5, 3), torch.channels_last), ((2, 8, 3, 4, 2), torch.channels_last_3d)],
)
def test_channels_last_and_non_contiguous_inputs(
    shape: tuple[int, ...], fmt: torch.memory_format, training: bool, kw: dict
) -> None:
    """test_batchnorm_nhwc_cpu / test_batchnorm_non_contig_cpu: channels-last and sliced
    inputs give torch's outputs and gradients, in the input's memory format."""
    ours, ref = BatchNorm(8, **kw), TORCH_BY_RANK[len(shape)](8)
    for m in (ours, ref):
        m.train(training)
    x = torch.randn(shape).to(memory_format=fmt)
    xa, xb = (x.detach().clone(memory_format=fmt).requires_grad_(True) for _ in range(2))
    ya, yb = ours(xa), ref(xb)
    torch.testing.assert_close(ya, yb)
    assert ya.is_contiguous(memory_format=fmt)
    dy = torch.randn_like(yb)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad)
    assert xa.grad.is_contiguous(memory_format=fmt)
    sliced = torch.randn(shape[0], 16, *shape[2:])[:, ::2]  # every second channel: strided
    assert not sliced.is_contiguous()
    run_both(ours, ref, sliced)


@pytest.mark.parametrize("kw", IMPLS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(16, 8), (4, 8, 5, 5), (2, 8, 3, 3, 3)])
def test_half_input_with_float32_parameters(
    shape: tuple[int, ...], dtype: torch.dtype, training: bool, kw: dict
) -> None:
    """test_batchnorm_{2D,3D}_{train,inference}_..._mixed_{bfloat16,float16}: half-precision
    input, float32 parameters and buffers; output in the input's dtype."""
    ours, ref = BatchNorm(8, **kw), TORCH_BY_RANK[len(shape)](8)
    for m in (ours, ref):
        m.train(training)
    x = (torch.randn(shape) * 2 + 1).to(dtype)
    ya, yb = ours(x), ref(x)
    assert ya.dtype == yb.dtype == dtype
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 2e-3, "rtol": 2e-3}
    torch.testing.assert_close(ya, yb, **tol)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, atol=1e-3, rtol=1e-3, msg=k)


# ---------------------------------------------------------------- lazy modules


@pytest.mark.parametrize(
    "kwargs", [{}, {"affine": False}, {"track_running_stats": False}, {"bias": False}]
)
@pytest.mark.parametrize("shape", [(16, 3), (16, 3, 6), (16, 3, 6, 6), (8, 3, 4, 4, 4)])
def test_lazy_batch_norm_becomes_the_plain_layer(shape: tuple[int, ...], kwargs: dict) -> None:
    """test_lazy_batchnorm{1,2,3}d (test_lazy_modules.py), with the input given by keyword as
    its dict-input checks do."""
    torch_lazy = {2: nn.LazyBatchNorm1d, 3: nn.LazyBatchNorm1d, 4: nn.LazyBatchNorm2d}
    ref = torch_lazy.get(len(shape), nn.LazyBatchNorm3d)(**kwargs)
    ours = BatchNorm(**kwargs)
    assert ours.has_uninitialized_params() == ref.has_uninitialized_params()
    x = torch.randn(shape)
    torch.testing.assert_close(ours(input=x), ref(input=x))
    assert type(ours) is BatchNorm and ours.num_features == ref.num_features == 3
    same_state(ours, ref)
    restored = pickle.loads(pickle.dumps(ours))
    torch.testing.assert_close(restored.eval()(x), ref.eval()(x))


def test_lazy_batch_norm_loads_a_state_dict_before_its_first_input() -> None:
    """_check_lazy_batchnorm_state: a lazy layer takes an initialized layer's state dict."""
    source = nn.BatchNorm1d(10)
    source(torch.randn(8, 10) * 3)
    ours, ref = BatchNorm(), nn.LazyBatchNorm1d()
    ours.load_state_dict(source.state_dict())
    ref.load_state_dict(source.state_dict())
    assert not ours.has_uninitialized_params()
    x = torch.randn(8, 10)
    torch.testing.assert_close(ours(x), ref(x))
    same_state(ours, ref)
    assert ours.num_features == 10  # (torch's stays 0 on this path)


# ---------------------------------------------------------------- torch's argument names


def test_torch_signature_positional_and_keyword() -> None:
    args = (6, 1e-3, 0.3, True, False, "cpu", F64)
    ours, ref = BatchNorm(*args, bias=False), nn.BatchNorm2d(*args, bias=False)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert ours.bias is None and ours.weight.dtype == F64
    x = torch.randn(4, 6, 3, 3, dtype=F64)
    torch.testing.assert_close(ours(input=x), ref(input=x))


def test_gamma_and_beta_are_the_chapters_names_for_weight_and_bias() -> None:
    bn = BatchNorm(3)
    assert bn.gamma is bn.weight and bn.beta is bn.bias
    bn.gamma = nn.Parameter(torch.full((3,), 2.0))
    bn.beta = nn.Parameter(torch.full((3,), -1.0))
    assert torch.equal(bn.weight, torch.full((3,), 2.0)) and bn.beta is bn.bias
    assert list(bn.state_dict()) == list(nn.BatchNorm2d(3).state_dict())
    assert bn(torch.randn(8, 3)).mean().item() == pytest.approx(-1.0, abs=1e-5)


# ---------------------------------------------------------------- deliberate differences
# docs/conventions.md, "Where bnlab differs from torch.nn.BatchNorm*d", lists each with its
# reason; each test shows torch's behaviour and bnlab's.


def test_difference_one_class_for_every_rank() -> None:
    x = torch.randn(2, 3, 4, 4, 4)
    with pytest.raises(ValueError, match="expected 4D input"):
        nn.BatchNorm2d(3)(x)
    assert BatchNorm(3)(x).shape == x.shape  # any rank >= 2
    with pytest.raises(ValueError, match="rank-4 input"):
        BatchNorm(3, num_dims=4)(x)  # the rank check, asked for


def test_difference_channel_count_is_checked_without_per_channel_state() -> None:
    x = torch.randn(4, 5)
    nn.BatchNorm1d(3, affine=False, track_running_stats=False)(x)  # torch: 5 channels pass
    with pytest.raises(MismatchError, match="expected 3 channels"):
        BatchNorm(3, affine=False, track_running_stats=False)(x)


def test_difference_momentum_outside_0_1_is_refused_when_it_would_be_used() -> None:
    x = torch.randn(4, 3)
    ref = nn.BatchNorm1d(3, momentum=1.5)
    ref(x)  # torch extrapolates past the batch statistics
    ours = BatchNorm(3, momentum=1.5)
    ours.eval()(x)  # unused in prediction: accepted, as torch
    with pytest.raises(ValueError, match=r"momentum: expected a value in \[0, 1\], got 1.5"):
        ours.train()(x)
    with pytest.raises(TypeError, match="momentum"):
        BatchNorm(3, momentum="0.1")(x)  # type: ignore[arg-type]


def test_difference_zero_features_and_integer_rank_as_eps_are_refused_at_construction() -> None:
    nn.BatchNorm1d(0)  # torch builds it; its first forward fails with an IndexError
    with pytest.raises(ValueError, match="num_features: expected a positive int"):
        BatchNorm(0)
    nn.BatchNorm2d(6, 4)  # torch: eps=4
    with pytest.raises(TypeError, match="num_dims=4"):
        BatchNorm(6, 4)


@pytest.mark.parametrize("dtype", [torch.long, torch.complex64])
def test_difference_non_float_input_is_a_type_error(dtype: torch.dtype) -> None:
    x = torch.ones(4, 3, dtype=dtype)
    with pytest.raises((NotImplementedError, RuntimeError)):
        nn.BatchNorm1d(3)(x)
    with pytest.raises(TypeError, match="floating-point"):
        BatchNorm(3)(x)


def test_difference_float_dtypes_may_mix_integer_statistics_may_not() -> None:
    x = torch.randn(4, 3)
    rm, rv = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    with pytest.raises(RuntimeError, match="mixed dtype"):
        F.batch_norm(x, rm.clone(), rv.clone(), training=True)
    y, new_mean, new_var = batch_norm(x, None, None, rm, rv, training=True)
    assert y.dtype == torch.float32 and new_mean.dtype == new_var.dtype == F64
    ref_rm, ref_rv = torch.zeros(3), torch.ones(3)
    F.batch_norm(x, ref_rm, ref_rv, training=True)
    torch.testing.assert_close(new_mean.float(), ref_rm)
    torch.testing.assert_close(new_var.float(), ref_rv)
    long_rm, long_rv = torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)
    with pytest.raises(RuntimeError, match="mixed dtype"):
        F.batch_norm(x, long_rm, long_rv, training=True)
    with pytest.raises(TypeError, match=r"running_mean: expected a floating-point.*\.float\(\)"):
        batch_norm(x, None, None, long_rm, long_rv, training=True)


def test_difference_prediction_is_differentiable_in_the_running_statistics() -> None:
    """bnlab's batch_norm is a pure function of its inputs, running statistics included:
    forward-mode AD through prediction gives ∂y/∂μ̂ = -γ/√(σ̂² + ε)."""
    x, rv, w = torch.randn(4, 3, dtype=F64), torch.full((3,), 2.0, dtype=F64), torch.ones(3)
    with forward_ad.dual_level():
        rm = forward_ad.make_dual(torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64))
        y = batch_norm(x, w.double(), None, rm, rv, training=False, eps=0.0).y
        tangent = forward_ad.unpack_dual(y).tangent
    torch.testing.assert_close(tangent, torch.full((4, 3), -(2.0**-0.5), dtype=F64))


def test_difference_the_function_warns_on_a_decay_like_momentum() -> None:
    x, rm, rv = torch.randn(4, 3), torch.zeros(3), torch.ones(3)
    with pytest.warns(UserWarning, match=r"momentum=0.9 is read in PyTorch's convention"):
        batch_norm(x, None, None, rm, rv, training=True, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named conventions, prediction, the layer: silent
        batch_norm(x, None, None, rm, rv, training=True, momentum=0.9, convention="torch")
        batch_norm(x, None, None, rm, rv, training=True, momentum=0.9, convention="d2l")
        batch_norm(x, None, None, rm, rv, training=False, momentum=0.9)
        BatchNorm(3, momentum=0.9)(x)


CHAPTER_SHAPES: list[tuple[tuple[int, ...], Callable[[int], tuple[int, ...]]]] = [
    ((8, 6), lambda c: (1, c)),
    ((8, 6, 5, 5), lambda c: (1, c, 1, 1)),
]


@pytest.mark.parametrize(("x_shape", "stat_shape"), CHAPTER_SHAPES)
def test_difference_the_function_takes_the_chapters_shapes(
    x_shape: tuple[int, ...], stat_shape: Callable[[int], tuple[int, ...]]
) -> None:
    """The chapter keeps γ, β and the moving statistics as (1, C) / (1, C, 1, 1); bnlab's
    function takes them and returns the new moving statistics in that shape."""
    c, shape = x_shape[1], stat_shape(x_shape[1])
    x = torch.randn(x_shape) * 2 + 1
    gamma, beta = torch.rand(shape) + 0.5, torch.randn(shape)
    mm, mv = torch.zeros(shape), torch.ones(shape)
    y, new_mm, new_mv = batch_norm(
        x, gamma, beta, mm, mv, training=True, momentum=0.9, convention="d2l"
    )
    assert new_mm.shape == new_mv.shape == shape
    ref = TORCH_BY_RANK[len(x_shape)](c, momentum=0.1)  # the same average in torch's terms
    with torch.no_grad():
        ref.weight.copy_(gamma.flatten())
        ref.bias.copy_(beta.flatten())
    torch.testing.assert_close(y, ref(x))
    torch.testing.assert_close(new_mm.flatten(), ref.running_mean)
    n = x.numel() // c  # the chapter's variance is biased, torch's running one unbiased
    torch.testing.assert_close(new_mv.flatten() - 0.9, (ref.running_var - 0.9) * (n - 1) / n)
    with pytest.raises(MismatchError, match=r"\(1, 6.*as the chapter's code has it"):
        batch_norm(x, gamma.expand(2, *shape[1:]), beta, mm, mv, training=True)
