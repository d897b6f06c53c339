"""Hand-computed cases, conventions, numerics, options and bad input for batch_norm/BatchNorm."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from bnlab.functional import CONVENTIONS, batch_norm, moments
from bnlab.functional.checks import MismatchError, check_enough_values
from bnlab.nn import BatchNorm

EPS = 1e-5


# ---- the chapter's two settings, by hand ------------------------------------------------------


def test_fully_connected_case_by_hand() -> None:
    # per feature over the batch: feature 0 is {1, 3}, feature 1 is {2, 6}
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.float64)
    y, rm, rv = batch_norm(
        x,
        None,
        None,
        torch.zeros(2, dtype=torch.float64),
        torch.ones(2, dtype=torch.float64),
        training=True,
        eps=EPS,
    )
    # means (2, 4), biased variances (1, 4)
    expected = torch.tensor(
        [
            [-1 / (1 + EPS) ** 0.5, -2 / (4 + EPS) ** 0.5],
            [1 / (1 + EPS) ** 0.5, 2 / (4 + EPS) ** 0.5],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    # torch convention: 0.9 * old + 0.1 * new, variance unbiased (n/(n-1) = 2): (2, 8)
    torch.testing.assert_close(rm, torch.tensor([0.2, 0.4], dtype=torch.float64))
    torch.testing.assert_close(rv, torch.tensor([0.9 + 0.2, 0.9 + 0.8], dtype=torch.float64))


def test_convolutional_case_by_hand() -> None:
    # per channel over N·H·W: channel 0 holds 0..7, channel 1 holds 10 everywhere
    x = torch.zeros(2, 2, 2, 2, dtype=torch.float64)
    x[:, 0] = torch.arange(8, dtype=torch.float64).reshape(2, 2, 2)
    x[:, 1] = 10.0
    w = torch.tensor([2.0, 1.0], dtype=torch.float64)
    b = torch.tensor([0.5, -1.0], dtype=torch.float64)
    y, rm, rv = batch_norm(
        x,
        w,
        b,
        torch.zeros(2, dtype=torch.float64),
        torch.ones(2, dtype=torch.float64),
        training=True,
        eps=EPS,
    )
    mean0, var0 = 3.5, 5.25  # mean of 0..7; biased variance (sum of squares 42 / 8)
    torch.testing.assert_close(y[:, 0], 2 * (x[:, 0] - mean0) / (var0 + EPS) ** 0.5 + 0.5)
    torch.testing.assert_close(y[:, 1], torch.full((2, 2, 2), -1.0, dtype=torch.float64))
    torch.testing.assert_close(rm, torch.tensor([0.35, 1.0], dtype=torch.float64))
    torch.testing.assert_close(rv, torch.tensor([0.9 + 0.1 * 6.0, 0.9], dtype=torch.float64))


def _two_steps(convention: str, momentum: float | None) -> list[tuple[list[float], list[float]]]:
    # one feature; batch 1 = {0, 2} (mean 1, biased var 1), batch 2 = {4, 8} (mean 6, var 4)
    rm, rv = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    out = []
    for k, batch in enumerate(([0.0, 2.0], [4.0, 8.0])):
        x = torch.tensor(batch, dtype=torch.float64)[:, None]
        _, rm, rv = batch_norm(
            x,
            None,
            None,
            rm,
            rv,
            training=True,
            convention=convention,
            momentum=momentum,
            num_batches_tracked=k,
        )
        out.append((rm.tolist(), rv.tolist()))
    return out


@pytest.mark.parametrize(
    ("convention", "momentum", "expected"),
    [
        # torch: w = 0.1, unbiased variances 2 and 8
        ("torch", 0.1, [([0.1], [0.9 + 0.2]), ([0.09 + 0.6], [0.9 * 1.1 + 0.8])]),
        # the chapter / MXNet: decay 0.9, so w = 0.1; biased variances 1 and 4
        ("d2l", 0.9, [([0.1], [1.0]), ([0.09 + 0.6], [0.9 + 0.4])]),
        ("mxnet", 0.9, [([0.1], [1.0]), ([0.09 + 0.6], [0.9 + 0.4])]),
        # Keras / Flax: decay 0.99, so w = 0.01
        ("keras", 0.99, [([0.01], [1.0]), ([0.0099 + 0.06], [0.99 + 0.04])]),
        ("flax", 0.99, [([0.01], [1.0]), ([0.0099 + 0.06], [0.99 + 0.04])]),
        # cumulative average: batch 1 alone, then the mean of both batches' estimates
        ("torch", None, [([1.0], [2.0]), ([3.5], [5.0])]),
        ("flax", None, [([1.0], [1.0]), ([3.5], [2.5])]),
    ],
)
def test_running_stats_after_one_and_two_steps(
    convention: str, momentum: float | None, expected: list
) -> None:
    got = _two_steps(convention, momentum)
    for (gm, gv), (em, ev) in zip(got, expected, strict=True):
        assert gm == pytest.approx(em, abs=1e-12)
        assert gv == pytest.approx(ev, abs=1e-12)


def test_convention_defaults_and_module_cumulative_matches_torch() -> None:
    assert {n: c.default_momentum for n, c in CONVENTIONS.items()} == {
        "torch": 0.1,
        "d2l": 0.9,
        "mxnet": 0.9,
        "keras": 0.99,
        "flax": 0.99,
    }
    assert BatchNorm(2, convention="flax").momentum == 0.99
    ours, ref = BatchNorm(3, momentum=None), nn.BatchNorm1d(3, momentum=None)
    for step in range(4):
        x = torch.randn(5, 3) * (step + 1) + step
        ours(x), ref(x)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)


# ---- numerics ----------------------------------------------------------------------------------


def test_large_mean_small_spread_has_no_cancellation() -> None:
    g = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(512, 3, 4, 4, generator=g, dtype=torch.float64)).float()
    ref_var = x.double().var(dim=(0, 2, 3), unbiased=False)
    _, var = moments(x, (0, 2, 3))
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-3, atol=0)
    naive = (x * x).mean((0, 2, 3)) - x.mean((0, 2, 3)) ** 2  # what E[x²]-E[x]² would give
    assert not torch.allclose(naive.double(), ref_var, rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32_and_returns_its_dtype(dtype: torch.dtype) -> None:
    x64 = torch.randn(64, 4, 8, 8, dtype=torch.float64) * 3 + 20
    x = x64.to(dtype)
    y, rm, rv = batch_norm(x, None, None, torch.zeros(4), torch.ones(4), training=True)
    assert y.dtype == dtype and rm is not None and rv is not None
    assert rm.dtype == rv.dtype == torch.float32  # the running stats keep their own dtype
    ref = (x.double() - x.double().mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        x.double().var((0, 2, 3), unbiased=False, keepdim=True) + EPS
    )
    torch.testing.assert_close(
        y.double(), ref, rtol=0, atol=0.05 if dtype == torch.bfloat16 else 0.01
    )


# ---- mode, options and the module's bookkeeping ----------------------------------------------


def test_mode_comes_from_training_flag_not_grad_state() -> None:
    bn = BatchNorm(2)
    x = torch.randn(8, 2) * 5 + 3
    with torch.no_grad():
        y = bn(x)  # training mode under no_grad: batch statistics, running stats updated
    torch.testing.assert_close(y.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    assert int(bn.num_batches_tracked) == 1
    bn.eval()
    with torch.enable_grad():
        y = bn(x)  # eval mode with grad: running statistics, nothing updated
    expected = (x - bn.running_mean) / torch.sqrt(bn.running_var + EPS)
    torch.testing.assert_close(y, expected)
    assert int(bn.num_batches_tracked) == 1


def test_lazy_infers_features_and_textbook_signature_checks_rank() -> None:
    bn = BatchNorm()
    bn(torch.randn(4, 6, 3, 3))
    assert type(bn) is BatchNorm and bn.num_features == 6 and bn.weight.shape == (6,)
    assert torch.equal(bn.weight.detach(), torch.ones(6))
    textbook = BatchNorm(6, num_dims=4)
    textbook(torch.randn(4, 6, 3, 3))
    with pytest.raises(ValueError, match="rank-4 input"):
        textbook(torch.randn(4, 6))


def test_channel_axis_last_equals_torch_on_permuted_input() -> None:
    x = torch.randn(4, 5, 5, 3)
    ours, ref = BatchNorm(axis=-1), nn.BatchNorm2d(3)
    y = ours(x)
    torch.testing.assert_close(y, ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_fixed_affine_scale_center_and_global_stats() -> None:
    fixed = BatchNorm(3, fixed_affine=True)
    assert list(fixed.parameters()) == []
    assert set(fixed.state_dict()) >= {"weight", "bias"}
    only_scale = BatchNorm(3, center=False)
    assert only_scale.bias is None and isinstance(only_scale.weight, nn.Parameter)
    glob = BatchNorm(3, use_global_stats=True)
    x = torch.randn(6, 3) + 4
    torch.testing.assert_close(glob(x), x / (1 + EPS) ** 0.5)  # running stats 0 / 1
    assert int(glob.num_batches_tracked) == 0 and torch.equal(glob.running_mean, torch.zeros(3))


def test_nonfinite_batch_is_skipped_only_when_asked() -> None:
    x = torch.randn(8, 2)
    x[0, 1] = float("nan")
    guarded = BatchNorm(2, skip_nonfinite=True)
    guarded(torch.randn(8, 2))
    before = guarded.running_var.clone()
    with pytest.warns(RuntimeWarning, match="left unchanged"):
        guarded(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per layer: the second bad batch is silent
        guarded(x)
    assert torch.equal(guarded.running_var, before)
    assert int(guarded.num_batches_tracked) == 1
    default = BatchNorm(2)
    default(x)
    assert torch.isnan(default.running_var[1])  # PyTorch's behaviour: the update happens


def test_reset_running_stats_and_parameters() -> None:
    bn = BatchNorm(2)
    bn(torch.randn(5, 2) * 3 + 1)
    with torch.no_grad():
        bn.weight.fill_(3)
    bn.reset_running_stats()
    assert torch.equal(bn.running_mean, torch.zeros(2)) and int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.weight.detach(), torch.full((2,), 3.0))
    bn.reset_parameters()
    assert torch.equal(bn.weight.detach(), torch.ones(2))


# ---- bad input: a clear error, nothing changed -----------------------------------------------

BAD_MODULE_INPUTS = [
    (torch.randn(5), ValueError, r"rank >= 2.*got shape \(5,\).*unsqueeze"),
    (torch.randn(4, 7), ValueError, r"expected 3 channels.*with 7"),
    (torch.randn(1, 3), ValueError, r"more than 1 value per channel.*batch of at least 2"),
    (torch.randn(1, 3, 1, 1), ValueError, r"more than 1 value per channel"),
    (torch.ones(4, 3, dtype=torch.long), TypeError, r"floating-point.*torch.int64.*\.float\(\)"),
    (torch.ones(4, 3, dtype=torch.complex64), TypeError, r"floating-point.*complex64"),
]


@pytest.mark.parametrize(("x", "error", "message"), BAD_MODULE_INPUTS)
def test_bad_input_raises_clearly_and_changes_nothing(
    x: torch.Tensor, error: type[Exception], message: str
) -> None:
    bn = BatchNorm(3)
    bn(torch.randn(8, 3) * 2 + 1)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(error, match=message):
        bn(x)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_batch_of_one_is_fine_in_eval() -> None:
    bn = BatchNorm(3).eval()
    assert bn(torch.randn(1, 3)).shape == (1, 3)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"convention": "caffe"}, ValueError, r"convention: expected one of"),
        ({"num_features": 0}, ValueError, r"num_features: expected a positive int"),
        ({"axis": 0}, ValueError, r"batch axis"),
        ({"center": True, "bias": False}, ValueError, r"contradict"),
    ],
)
def test_bad_module_arguments(kwargs: dict, error: type[Exception], message: str) -> None:
    kwargs = {"num_features": 3, **kwargs}
    with pytest.raises(error, match=message):
        BatchNorm(**kwargs)


def test_textbook_rank_given_positionally_is_refused_with_the_keyword_advice() -> None:
    # the second positional argument is eps, as in torch.nn.BatchNorm2d
    with pytest.raises(TypeError, match=r"second positional argument is eps.*num_dims=4"):
        BatchNorm(6, 4)
    assert BatchNorm(6, 1e-3).eps == 1e-3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"momentum": 1.5}, r"momentum: expected a value in \[0, 1\], got 1.5"),
        ({"momentum": -0.1}, r"momentum: expected a value in \[0, 1\]"),
        ({"eps": 0.0}, r"eps must be positive"),
        ({"eps": -1e-5}, r"eps must be positive"),
    ],
)
def test_momentum_and_eps_are_checked_where_used(kwargs: dict, message: str) -> None:
    bn = BatchNorm(3, **kwargs)  # built as torch builds it; the first training step refuses
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        bn(torch.randn(4, 3))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("weight", r"weight: expected one value per channel.*\(3,\).*got shape \(4,\).*ones\(3\)"),
        ("bias", r"bias: expected one value per channel.*\(3,\).*zeros\(3\)"),
        ("running_mean", r"running_mean: expected one value per channel.*\(3,\).*zeros\(3\)"),
        ("running_var", r"running_var: expected one value per channel.*\(3,\).*ones\(3\)"),
    ],
)
def test_functional_rejects_mismatched_per_channel_shapes(name: str, message: str) -> None:
    args = {
        "weight": torch.ones(3),
        "bias": torch.zeros(3),
        "running_mean": torch.zeros(3),
        "running_var": torch.ones(3),
    }
    args[name] = torch.ones(4)
    before = {k: v.clone() for k, v in args.items()}
    with pytest.raises(MismatchError, match=message):  # a ValueError and a RuntimeError
        batch_norm(
            torch.randn(4, 3),
            args["weight"],
            args["bias"],
            args["running_mean"],
            args["running_var"],
            training=True,
        )
    for k, v in args.items():
        assert torch.equal(v, before[k])


def test_functional_rejects_half_given_running_stats_and_bad_kernel() -> None:
    with pytest.raises(ValueError, match="both tensors or both None"):
        batch_norm(torch.randn(4, 3), running_mean=torch.zeros(3), training=True)
    with pytest.raises(ValueError, match="impl: expected one of"):
        batch_norm(torch.randn(4, 3), training=True, impl="nope")
    with pytest.raises(ValueError, match="momentum: expected a value in"):
        batch_norm(torch.randn(4, 3), None, None, torch.zeros(3), torch.ones(3), training=True,
                   momentum=2.0)  # fmt: skip


def test_messages_advise_only_what_is_true_for_the_case() -> None:
    with pytest.raises(ValueError, match="more than 1 value per channel") as tracked:
        BatchNorm(3)(torch.randn(1, 3))
    assert ".eval()" in str(tracked.value)  # there are running statistics to fall back on
    with pytest.raises(ValueError, match="more than 1 value per channel") as untracked:
        BatchNorm(3, track_running_stats=False)(torch.randn(1, 3))
    assert "no running statistics" in str(untracked.value)
    assert ".eval()" not in str(untracked.value)
    with pytest.raises(ValueError, match="empty input") as empty:
        check_enough_values(torch.empty(0, 3), 0, "N")
    assert "With one value" not in str(empty.value)
    bn = BatchNorm(6)
    bn.running_mean = torch.zeros(5)  # a buffer of the wrong size, e.g. assigned by hand
    with pytest.raises(MismatchError, match=r"running_mean: .*got shape \(5,\)") as wrong:
        bn(torch.randn(4, 6))
    assert "torch.zeros(6)" in str(wrong.value) and "5 channels" not in str(wrong.value)
    with pytest.raises(MismatchError, match=r"weight: .*\(1, 6, 1, 1\) as the chapter") as fn:
        batch_norm(torch.randn(4, 6, 2, 2), torch.ones(5), None, training=True)
    assert "num_features" not in str(fn.value)  # a function call has no layer to rebuild
