"""Freezing BN (FrozenBatchNorm survives model.train()), unfreezing, and fixed γ/β (exercise 5)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.nn import BatchNorm
from bnlab.tools import FrozenBatchNorm, fix_affine, freeze_bn, unfreeze_bn


def make_model(norm: str) -> nn.Sequential:
    """A small conv + dense net, BNs with trained-looking statistics, in training mode."""
    torch.manual_seed(0)
    bn2d = BatchNorm(4, num_dims=4) if norm == "bnlab" else nn.BatchNorm2d(4)
    bn1d = BatchNorm(6) if norm == "bnlab" else nn.BatchNorm1d(6)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), bn2d, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6), bn1d
    )
    for _ in range(3):  # move the running statistics off 0/1
        model(torch.randn(8, 2, 6, 6))
    with torch.no_grad():
        for bn in (bn2d, bn1d):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
    return model


def rel_err(got: Tensor, want: Tensor) -> float:
    return float((got - want).detach().abs().max() / want.detach().abs().max())


@pytest.mark.parametrize("norm", ["bnlab", "torch"])
def test_frozen_model_ignores_train_mode(norm: str) -> None:
    model = make_model(norm)
    before = copy.deepcopy(model.state_dict())
    frozen = freeze_bn(model)
    assert all(
        not isinstance(m, BatchNorm | nn.BatchNorm2d | nn.BatchNorm1d) for m in frozen.modules()
    )
    assert isinstance(frozen[1], FrozenBatchNorm) and isinstance(frozen[5], FrozenBatchNorm)
    x = torch.randn(5, 2, 6, 6)
    want = model.eval()(x)  # prediction mode of the original
    frozen.train()
    got = frozen(x)
    assert rel_err(got, want) <= 1e-6
    # training-mode forwards do not move the statistics
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, before[key]), key
    # the input model is untouched (still its own BN classes)
    assert type(model[1]) is not FrozenBatchNorm


@pytest.mark.parametrize("norm", ["bnlab", "torch"])
def test_frozen_bn_has_no_trainable_state(norm: str) -> None:
    frozen = freeze_bn(make_model(norm))
    frozen.requires_grad_(True)  # does not revive anything: γ, β are buffers
    names = {name for name, _ in frozen.named_parameters()}
    assert names == {"0.weight", "0.bias", "4.weight", "4.bias"}
    frozen.train()
    F.cross_entropy(frozen(torch.randn(5, 2, 6, 6)), torch.randint(0, 6, (5,))).backward()
    assert frozen[0].weight.grad is not None and frozen[1].weight.grad is None


@pytest.mark.parametrize("norm", ["bnlab", "torch"])
def test_state_dict_loads_both_ways(norm: str) -> None:
    model = make_model(norm)
    frozen = freeze_bn(model)
    assert list(frozen.state_dict()) == list(model.state_dict())
    fresh_frozen = freeze_bn(make_model(norm))
    with torch.no_grad():
        fresh_frozen[1].running_mean.zero_()
    fresh_frozen.load_state_dict(model.state_dict())  # a BN checkpoint into a frozen model
    assert torch.equal(fresh_frozen[1].running_mean, model[1].running_mean)
    target = make_model(norm)
    target.load_state_dict(frozen.state_dict())  # and back
    for key, value in target.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


@pytest.mark.parametrize("norm", ["bnlab", "torch"])
def test_unfreeze_restores_class_values_flags_and_training_behaviour(norm: str) -> None:
    model = make_model(norm)
    model[5].weight.requires_grad_(False)
    frozen = freeze_bn(model)
    with torch.no_grad():
        frozen[1].running_mean.add_(0.5)  # a change made while frozen is kept
    back = unfreeze_bn(frozen)
    assert type(back[1]) is type(model[1]) and type(back[5]) is type(model[5])
    assert back[5].weight.requires_grad is False and back[1].weight.requires_grad is True
    assert torch.equal(back[1].running_mean, model[1].running_mean + 0.5)
    assert back[1].running_mean.data_ptr() != frozen[1].running_mean.data_ptr()
    # training mode uses batch statistics again, as the original
    with torch.no_grad():
        back[1].running_mean.sub_(0.5)
    x = torch.randn(6, 2, 6, 6)
    want, got = model.train()(x), back.train()(x)
    assert rel_err(got, want) <= 1e-6
    torch.testing.assert_close(back[1].running_mean, model[1].running_mean)


def test_unfreeze_follows_dtype_and_builds_bnlab_without_template() -> None:
    frozen = freeze_bn(make_model("torch")).double()
    back = unfreeze_bn(frozen)
    assert back[1].running_mean.dtype == torch.float64 and back[1].weight.dtype == torch.float64
    direct = FrozenBatchNorm(3, eps=1e-3, axis=-1)
    bn = direct.to_batch_norm()
    assert type(bn) is BatchNorm and bn.axis == -1 and bn.eps == 1e-3
    assert isinstance(bn.weight, nn.Parameter)


def test_frozen_bn_by_hand_and_channels_last() -> None:
    # scale = γ / sqrt(σ̂² + ε), shift = β − μ̂ · scale; with σ̂² = 4 − ε, γ = 2, β = 1, μ̂ = 3:
    # y = 2 (x − 3) / 2 + 1 = x − 2
    frozen = FrozenBatchNorm(1, eps=1e-5).double()
    with torch.no_grad():
        frozen.running_mean.fill_(3.0)
        frozen.running_var.fill_(4.0 - 1e-5)
        frozen.weight.fill_(2.0)
        frozen.bias.fill_(1.0)
    x = torch.tensor([[0.0], [5.0]], dtype=torch.float64)
    torch.testing.assert_close(frozen.train()(x), x - 2)
    # axis=-1: channels last, (N, H, W, C), against the channels-first result
    bn = BatchNorm(3, axis=-1)
    bn(torch.randn(4, 5, 5, 3))
    last = FrozenBatchNorm.from_batch_norm(bn)
    first = FrozenBatchNorm.from_batch_norm(BatchNorm(3))
    first.load_state_dict(last.state_dict())
    x = torch.randn(2, 5, 5, 3)
    torch.testing.assert_close(last(x), first(x.movedim(-1, 1)).movedim(1, -1))


def test_shared_bn_stays_shared() -> None:
    bn = nn.BatchNorm1d(3)
    model = nn.Sequential(nn.Linear(3, 3), bn, nn.Linear(3, 3), bn)
    frozen = freeze_bn(model)
    assert isinstance(frozen[1], FrozenBatchNorm) and frozen[1] is frozen[3]


def test_freeze_bad_input() -> None:
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module, got OrderedDict"):
        freeze_bn(make_model("torch").state_dict())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"track_running_stats=False"):
        freeze_bn(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)))
    with pytest.raises(ValueError, match="Run one forward pass"):
        freeze_bn(nn.Sequential(BatchNorm()))
    frozen = FrozenBatchNorm(3, num_dims=4)
    with pytest.raises(ValueError, match=r"expected a rank-4 input"):
        frozen(torch.randn(2, 3))
    with pytest.raises(ValueError, match="expected 3 channels on axis 1"):
        frozen(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match="num_features: expected a positive int"):
        FrozenBatchNorm(0)
    with pytest.raises(TypeError, match="inplace: expected True or False"):
        unfreeze_bn(frozen, inplace="yes")  # type: ignore[arg-type]


def test_freeze_inplace_and_bn_as_model() -> None:
    model = make_model("bnlab")
    assert freeze_bn(model, inplace=True) is model and isinstance(model[1], FrozenBatchNorm)
    single = freeze_bn(nn.BatchNorm2d(3))
    assert isinstance(single, FrozenBatchNorm)


# ---- fixed affine (exercise 5) -------------------------------------------------------------


@pytest.mark.parametrize("norm", ["bnlab", "torch"])
def test_fix_affine_is_not_learned_while_statistics_are(norm: str) -> None:
    model = make_model(norm)
    assert fix_affine(model, gamma=0.5, beta=0.25) is model
    for bn in (model[1], model[5]):
        assert torch.equal(bn.weight, torch.full_like(bn.weight, 0.5))
        assert torch.equal(bn.bias, torch.full_like(bn.bias, 0.25))
        assert not bn.weight.requires_grad and not bn.bias.requires_grad
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    conv_before, stats_before = model[0].weight.clone(), model[1].running_mean.clone()
    for _ in range(2):
        loss = F.cross_entropy(model(torch.randn(8, 2, 6, 6)), torch.randint(0, 6, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(model[1].weight, torch.full_like(model[1].weight, 0.5))
    assert torch.equal(model[5].bias, torch.full_like(model[5].bias, 0.25))
    assert not torch.equal(model[0].weight, conv_before)  # the rest learns
    assert not torch.equal(model[1].running_mean, stats_before)  # statistics still follow data


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fixed_unit_affine_computes_what_affine_false_does(mode: str) -> None:
    fixed = make_model("torch")
    fix_affine(fixed)
    plain = nn.BatchNorm2d(4, affine=False)
    plain.load_state_dict(
        {k: v for k, v in fixed[1].state_dict().items() if k not in ("weight", "bias")}
    )
    x = torch.randn(6, 4, 4, 4)
    torch.testing.assert_close(fixed[1].train(mode == "train")(x), plain.train(mode == "train")(x))
    # unlike affine=False, the parameters are still there and can be learned again
    assert "weight" in fixed[1].state_dict() and "weight" not in plain.state_dict()
    fixed[1].weight.requires_grad_(True)
    assert fixed[1].weight.requires_grad


def test_fix_affine_on_buffers_and_missing_parameters() -> None:
    buffers = BatchNorm(3, fixed_affine=True)
    fix_affine(buffers, gamma=2.0, beta=-1.0)
    assert torch.equal(buffers.weight, torch.full((3,), 2.0))
    no_affine = nn.BatchNorm1d(3, affine=False)
    fix_affine(no_affine)  # γ = 1, β = 0 is what it already computes
    with pytest.raises(ValueError, match=r"has no weight .built with affine=False.*pass gamma=1"):
        fix_affine(nn.Sequential(nn.BatchNorm1d(3), no_affine), gamma=2.0)
    with pytest.raises(TypeError, match="gamma: expected a finite real number"):
        fix_affine(no_affine, gamma=float("nan"))
    with pytest.raises(TypeError, match="beta: expected a finite real number"):
        fix_affine(no_affine, beta=True)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module"):
        fix_affine(None)  # type: ignore[arg-type]
