"""Folding BN into the previous layer, and removing the bias BN makes redundant (exercise 1).

The oracle is always the unfolded model itself (torch's own conv/linear and BN modules, or
bnlab's BN, which is pinned to torch's elsewhere); folded outputs must match it to 1e-5 relative
in float32 and 1e-10 in float64, relative to the largest output.
"""

from __future__ import annotations

import copy
import functools
import zlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from bnlab.nn import BatchNorm
from bnlab.tools import (
    FrozenBatchNorm,
    find_foldable,
    fold_bn,
    fold_bn_weights,
    remove_bias_before_bn,
)

REL_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def rel_err(got: Tensor, want: Tensor) -> float:
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def randomize_bn(bn: nn.Module, gen: torch.Generator) -> None:
    """Running statistics and affine parameters far from their 0/1 defaults."""
    with torch.no_grad():
        c = bn.running_mean.numel()
        bn.running_mean.copy_(torch.randn(c, generator=gen) * 2)
        bn.running_var.copy_(torch.rand(c, generator=gen) * 3 + 0.1)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(c, generator=gen))
        if bn.bias is not None:
            bn.bias.copy_(torch.randn(c, generator=gen))


# ---- a table of named cases: (layer factory, input shape, output rank) ----------------------

CASES: dict[str, tuple[Callable[[bool], nn.Module], tuple[int, ...]]] = {
    "linear": (lambda bias: nn.Linear(7, 5, bias=bias), (6, 7)),
    "conv1d": (lambda bias: nn.Conv1d(4, 6, 3, bias=bias), (3, 4, 9)),
    "conv2d_stride_pad": (
        lambda bias: nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=bias),
        (2, 3, 9, 9),
    ),
    "conv2d_groups": (lambda bias: nn.Conv2d(4, 6, 3, groups=2, bias=bias), (2, 4, 7, 7)),
    "conv2d_depthwise_reflect": (
        lambda bias: nn.Conv2d(4, 4, 3, groups=4, padding=1, padding_mode="reflect", bias=bias),
        (2, 4, 6, 6),
    ),
    "conv3d": (lambda bias: nn.Conv3d(2, 4, 2, bias=bias), (2, 2, 4, 4, 4)),
    "convT1d_groups_stride": (
        lambda bias: nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2, bias=bias),
        (3, 4, 5),
    ),
    "convT2d_groups_stride": (
        lambda bias: nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2, output_padding=1, bias=bias),
        (2, 6, 4, 4),
    ),
    "convT2d_groups3": (
        lambda bias: nn.ConvTranspose2d(3, 6, 2, groups=3, bias=bias),
        (2, 3, 4, 4),
    ),
    "convT3d": (lambda bias: nn.ConvTranspose3d(2, 4, 2, stride=2, bias=bias), (2, 2, 3, 3, 3)),
}
TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def make_bn(kind: str, channels: int, rank: int, affine: bool) -> nn.Module:
    if kind == "torch":
        return TORCH_BN[rank](channels, affine=affine)
    return BatchNorm(channels, num_dims=rank, affine=affine)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("bn_kind", ["bnlab", "torch"])
@pytest.mark.parametrize("case", list(CASES))
def test_fold_matches_unfolded(
    case: str, bn_kind: str, bias: bool, affine: bool, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case}-{bn_kind}-{bias}-{affine}".encode()))
    factory, shape = CASES[case]
    layer = factory(bias)
    x = torch.randn(shape, generator=gen)
    out_shape = layer(x).shape
    bn = make_bn(bn_kind, out_shape[1], len(out_shape), affine)
    randomize_bn(bn, gen)
    model = nn.Sequential(layer, bn, nn.ReLU()).to(dtype).eval()
    before = copy.deepcopy(model.state_dict())

    folded = fold_bn(model)

    assert isinstance(folded[1], nn.Identity)
    assert folded[0].bias is not None
    x = x.to(dtype)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) <= REL_TOL[dtype]
    # the input model is untouched: same state, BN still there
    assert model[1] is bn
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_fold_bn_weights_formula_linear() -> None:
    # hand-computed: one output channel, W = [[2, -1]], b = 1, μ̂ = 3, σ̂² = 4 - ε, γ = 0.5, β = 1
    eps = 1e-5
    w = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    w2, b2 = fold_bn_weights(
        w,
        torch.tensor([1.0], dtype=torch.float64),
        torch.tensor([3.0], dtype=torch.float64),
        torch.tensor([4.0 - eps], dtype=torch.float64),
        eps,
        torch.tensor([0.5], dtype=torch.float64),
        torch.tensor([1.0], dtype=torch.float64),
    )
    # scale = 0.5 / 2 = 0.25; W' = [0.5, -0.25]; b' = 0.25 * (1 - 3) + 1 = 0.5
    torch.testing.assert_close(w2, torch.tensor([[0.5, -0.25]], dtype=torch.float64))
    torch.testing.assert_close(b2, torch.tensor([0.5], dtype=torch.float64))


@given(
    groups=st.integers(1, 3),
    cin_per=st.integers(1, 3),
    cout_per=st.integers(1, 3),
    stride=st.integers(1, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_fold_bn_weights_transposed_groups(
    groups: int, cin_per: int, cout_per: int, stride: int, seed: int
) -> None:
    # float64 oracle: conv_transpose then per-channel BN, against conv_transpose with (W', b')
    gen = torch.Generator().manual_seed(seed)
    cin, cout = groups * cin_per, groups * cout_per
    w = torch.randn(cin, cout_per, 2, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(cout, generator=gen, dtype=torch.float64)
    mean = torch.randn(cout, generator=gen, dtype=torch.float64)
    var = torch.rand(cout, generator=gen, dtype=torch.float64) + 0.2
    gamma = torch.randn(cout, generator=gen, dtype=torch.float64)
    beta = torch.randn(cout, generator=gen, dtype=torch.float64)
    x = torch.randn(2, cin, 3, 4, generator=gen, dtype=torch.float64)
    z = F.conv_transpose2d(x, w, b, stride=stride, groups=groups)
    view = (1, -1, 1, 1)
    want = (z - mean.view(view)) / torch.sqrt(var.view(view) + 1e-5) * gamma.view(view) + beta.view(
        view
    )
    w2, b2 = fold_bn_weights(w, b, mean, var, 1e-5, gamma, beta, transpose=True, groups=groups)
    got = F.conv_transpose2d(x, w2, b2, stride=stride, groups=groups)
    assert rel_err(got, want) <= 1e-12


def test_fold_bn_weights_is_pure_and_keeps_dtype() -> None:
    w = torch.randn(4, 3, dtype=torch.float32)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    saved = [t.clone() for t in (w, rm, rv)]
    w2, b2 = fold_bn_weights(w, None, rm, rv, 1e-5, None, None)
    assert w2.dtype == b2.dtype == torch.float32
    for t, s in zip((w, rm, rv), saved, strict=True):
        assert torch.equal(t, s)


# ---- the chapter's LeNet, trained a few steps --------------------------------------------------


def build_lenet(norm: str) -> nn.Module:
    try:
        from bnlab.models import lenet
    except ImportError:  # the chapter's layers, built here if the models package is absent
        return nn.Sequential(
            nn.Conv2d(1, 6, 5),
            BatchNorm(6, num_dims=4) if norm == "bnlab" else nn.BatchNorm2d(6),
            nn.Sigmoid(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5),
            BatchNorm(16, num_dims=4) if norm == "bnlab" else nn.BatchNorm2d(16),
            nn.Sigmoid(),
            nn.MaxPool2d(2, 2),
            nn.Flatten(),
            nn.Linear(256, 120),
            BatchNorm(120, num_dims=2) if norm == "bnlab" else nn.BatchNorm1d(120),
            nn.Sigmoid(),
            nn.Linear(120, 84),
            BatchNorm(84, num_dims=2) if norm == "bnlab" else nn.BatchNorm1d(84),
            nn.Sigmoid(),
            nn.Linear(84, 10),
        )
    return lenet(norm)


@functools.cache
def _trained_lenet(norm: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_lenet(norm)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(4):  # a few steps move weights and running statistics off their init
        x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def trained_lenet(norm: str) -> nn.Module:
    """A LeNet trained a few steps on random data (a fresh copy per call)."""
    return copy.deepcopy(_trained_lenet(norm))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("norm", ["bnlab", "torch"])
@pytest.mark.parametrize("method", ["auto", "fx", "sequential"])
def test_fold_trained_lenet(norm: str, method: str, dtype: torch.dtype) -> None:
    model = trained_lenet(norm).to(dtype)
    folded = fold_bn(model, method=method, unfolded="raise")
    assert not any(
        isinstance(m, BatchNorm | nn.BatchNorm2d | nn.BatchNorm1d) for m in folded.modules()
    )
    x = torch.randn(64, 1, 28, 28, dtype=dtype)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) <= REL_TOL[dtype]


# ---- adjacency beyond Sequential --------------------------------------------------------------


class Block(nn.Module):
    """A residual block written in forward(): invisible to Sequential adjacency."""

    def __init__(self, reuse_pre_bn: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = BatchNorm(4)
        self.reuse_pre_bn = reuse_pre_bn

    def forward(self, x: Tensor) -> Tensor:
        z = self.conv1(x)
        h = torch.relu(self.bn1(z))
        out = self.bn2(self.conv2(h)) + x
        return out + z if self.reuse_pre_bn else out  # z used twice: bn1 cannot be folded


def test_fx_folds_forward_graphs_sequential_does_not() -> None:
    gen = torch.Generator().manual_seed(1)
    model = Block()
    for bn in (model.bn1, model.bn2):
        randomize_bn(bn, gen)
    model.eval()
    plan = find_foldable(model, method="fx")
    assert plan.pairs == [("conv1", "bn1"), ("conv2", "bn2")]
    seq_plan = find_foldable(model, method="sequential")
    assert seq_plan.pairs == [] and set(seq_plan.skipped) == {"bn1", "bn2"}
    folded = fold_bn(model)
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.Identity)
    x = torch.randn(2, 4, 5, 5, generator=gen)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) <= 1e-5


def test_output_used_twice_is_not_folded_and_is_reported() -> None:
    model = Block(reuse_pre_bn=True).eval()
    plan = find_foldable(model)
    assert plan.pairs == [("conv2", "bn2")]
    assert "also used elsewhere" in plan.skipped["bn1"]
    with pytest.warns(RuntimeWarning, match=r"left 1 BN layer\(s\) unfolded: bn1"):
        folded = fold_bn(model)
    assert isinstance(folded.bn1, nn.BatchNorm2d)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) <= 1e-5
    with pytest.raises(ValueError, match="unfolded: bn1"):
        fold_bn(model, unfolded="raise")


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3))

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # not traceable by torch.fx
            return self.body(x)
        return -self.body(x)


def test_untraceable_model_falls_back_to_sequential() -> None:
    model = DataDependent().eval()
    randomize_bn(model.body[1], torch.Generator().manual_seed(2))
    plan = find_foldable(model)
    assert plan.method == "sequential" and plan.pairs == [("body.0", "body.1")]
    x = torch.randn(2, 2, 3, 3)
    with torch.no_grad():
        assert rel_err(fold_bn(model)(x), model(x)) <= 1e-5
    with pytest.raises(ValueError, match=r"torch\.fx could not trace DataDependent\.forward"):
        fold_bn(model, method="fx")


def test_nested_sequential_and_shared_modules() -> None:
    conv = nn.Conv2d(2, 3, 1)
    shared_bn = nn.BatchNorm2d(3)
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(2, 2, 1)),  # last of a nested Sequential ...
        nn.Sequential(nn.BatchNorm2d(2), conv),  # ... is adjacent to the first of the next
        shared_bn,
        nn.ReLU(),
        nn.Conv2d(3, 3, 1),
        shared_bn,  # registered twice: cannot be folded into either conv
    ).eval()
    plan = find_foldable(model, method="sequential")
    assert plan.pairs == [("0.0", "1.0")]
    assert "several places" in plan.skipped["2"]


def test_axis_and_rank_rules_for_linear() -> None:
    gen = torch.Generator().manual_seed(3)
    # Linear on the last axis of (N, L, F) with a channels-last BN (axis=-1): foldable
    good = nn.Sequential(nn.Linear(5, 4), BatchNorm(4, axis=-1)).eval()
    randomize_bn(good[1], gen)
    x = torch.randn(3, 7, 5, generator=gen)
    with torch.no_grad():
        assert rel_err(fold_bn(good, unfolded="raise")(x), good(x)) <= 1e-5
    # BN on axis 1 of a rank-3 input after a Linear: different axes, left alone
    bad = nn.Sequential(nn.Linear(4, 4), BatchNorm(4, num_dims=3)).eval()
    assert "the Linear writes the last axis" in find_foldable(bad).skipped["1"]
    # a conv followed by a channels-last BN
    conv_last = nn.Sequential(nn.Conv2d(3, 3, 1), BatchNorm(3, axis=-1)).eval()
    assert "channels on axis 1" in find_foldable(conv_last).skipped["1"]


def test_frozen_and_global_stats_bn_fold_in_training_mode() -> None:
    gen = torch.Generator().manual_seed(4)
    bn = nn.BatchNorm2d(3)
    randomize_bn(bn, gen)
    frozen = nn.Sequential(nn.Conv2d(2, 3, 1), FrozenBatchNorm.from_batch_norm(bn.eval()))
    glob = nn.Sequential(nn.Conv2d(2, 3, 1), BatchNorm(3, use_global_stats=True))
    randomize_bn(glob[1], gen)
    x = torch.randn(2, 2, 3, 3, generator=gen)
    for model in (frozen.train(), glob.train()):  # both use running statistics in training
        with torch.no_grad():
            assert rel_err(fold_bn(model, unfolded="raise")(x), model(x)) <= 1e-5


# ---- bad input ---------------------------------------------------------------------------------


def test_fold_refuses_training_mode_and_missing_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))  # training mode
    with pytest.raises(ValueError, match=r"training mode.*Call model.eval\(\)"):
        fold_bn(model)
    nostats = nn.Sequential(nn.Linear(2, 2), BatchNorm(2, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="has no running statistics"):
        fold_bn(nostats)
    lazy = nn.Sequential(nn.Linear(2, 2), BatchNorm()).eval()
    with pytest.raises(ValueError, match=r"uninitialized \(lazy\)"):
        fold_bn(lazy)


def test_fold_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module, got dict"):
        fold_bn({"0.weight": torch.zeros(1)})  # type: ignore[arg-type]
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()
    with pytest.raises(ValueError, match="method: expected one of"):
        fold_bn(model, method="graph")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module, got tuple"):
        find_foldable((nn.Linear(2, 2), nn.BatchNorm1d(2)))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"w: expected a torch\.Tensor, got list"):
        fold_bn_weights([[1.0]], None, torch.zeros(1), torch.ones(1), 1e-5, None, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unfolded: expected 'warn', 'ignore' or 'raise'"):
        fold_bn(model, unfolded="skip")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="inplace: expected True or False"):
        fold_bn(model, inplace=1)  # type: ignore[arg-type]
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"running_mean: expected shape \(4,\)"):
        fold_bn_weights(w, None, torch.zeros(3), torch.ones(4), 1e-5, None, None)
    with pytest.raises(ValueError, match="groups: expected it to divide"):
        fold_bn_weights(
            torch.randn(3, 2, 1),
            None,
            torch.zeros(4),
            torch.ones(4),
            1e-5,
            None,
            None,
            transpose=True,
            groups=2,
        )
    with pytest.raises(ValueError, match="w: expected a layer weight of rank >= 2"):
        fold_bn_weights(torch.randn(4), None, torch.zeros(4), torch.ones(4), 1e-5, None, None)
    with pytest.raises(ValueError, match="eps: expected a positive float"):
        fold_bn_weights(w, None, torch.zeros(4), torch.ones(4), 0.0, None, None)


def test_fold_inplace_changes_the_model() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).eval()
    out = fold_bn(model, inplace=True)
    assert out is model and isinstance(model[1], nn.Identity)


# ---- bias before BN (exercise 1, first half) ---------------------------------------------------


@pytest.mark.parametrize("norm", ["bnlab", "torch"])
def test_remove_bias_keeps_eval_outputs(norm: str) -> None:
    model = trained_lenet(norm).double()
    slim = remove_bias_before_bn(model)
    biased = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    kept = [m for m in slim.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    # the four hidden layers lose their bias; the output layer (no BN after it) keeps it
    assert [m.bias is None for m in kept] == [True, True, True, True, False]
    removed = sum(m.bias.numel() for m in biased[:4])
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in slim.parameters()) == n_params - removed
    x = torch.randn(32, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(slim(x), model(x)) <= 1e-12


@pytest.mark.parametrize("norm", ["bnlab", "torch"])
def test_bias_before_bn_cancels_in_training_mode(norm: str) -> None:
    # BN subtracts the batch mean, which contains b: the output and the loss do not depend on b
    gen = torch.Generator().manual_seed(5)
    bn = BatchNorm(3, num_dims=4) if norm == "bnlab" else nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), bn).double().train()
    x = torch.randn(4, 2, 6, 6, generator=gen, dtype=torch.float64)
    outputs = []
    for shift in (0.0, 5.0, -300.0):
        with torch.no_grad():
            model[0].bias.fill_(shift)
        outputs.append(model(x))
    for y in outputs[1:]:
        assert rel_err(y, outputs[0]) <= 1e-10
    # and the bias gets no gradient (up to rounding, next to the weight's), whatever the loss
    model.zero_grad()
    (model(x) * torch.randn(outputs[0].shape, generator=gen, dtype=torch.float64)).sum().backward()
    grad_b, grad_w = model[0].bias.grad, model[0].weight.grad
    assert float(grad_b.abs().max()) <= 1e-10 * float(grad_w.abs().max())


def test_remove_bias_then_training_keeps_models_equivalent() -> None:
    # with μ̂' = μ̂ − b, a training step keeps the invariant: eval outputs still agree afterwards
    gen = torch.Generator().manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 3), BatchNorm(3)).double()
    with torch.no_grad():
        model[0].bias.copy_(torch.randn(3, generator=gen, dtype=torch.float64) * 3)
    slim = remove_bias_before_bn(model)
    x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    assert rel_err(slim.train()(x), model.train()(x)) <= 1e-12
    x2 = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(slim.eval()(x2), model.eval()(x2)) <= 1e-12


def test_remove_bias_bad_input() -> None:
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module, got list"):
        remove_bias_before_bn([nn.Linear(2, 2)])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["BatchRenorm", "GhostBatchNorm", "SyncBatchNorm"])
def test_fold_bnlab_bn_variants_that_predict_like_bn(name: str) -> None:
    import bnlab.nn

    cls = getattr(bnlab.nn, name)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), cls(3)).double()
    gen = torch.Generator().manual_seed(7)
    for _ in range(3):  # training steps move the running statistics
        model(torch.randn(8, 2, 5, 5, generator=gen, dtype=torch.float64) * 3 + 1)
    model.eval()
    x = torch.randn(4, 2, 5, 5, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(fold_bn(model, unfolded="raise")(x), model(x)) <= 1e-10
