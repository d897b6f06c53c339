"""adapt_bn against hand-computed mixtures; TENT against its definition."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

from bnlab.models import lenet
from bnlab.nn import BatchNorm
from bnlab.tools import adapt_bn, precise_bn, tent

SIZES = (5, 3, 4)  # uneven target batches: n = 12 examples


def _target(c: int = 3, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, 2, 2, generator=g, dtype=torch.float64) * 3 + 2 for b in SIZES]


def _source_bn(kind: str) -> nn.Module:
    bn = BatchNorm(3) if kind == "bnlab" else nn.BatchNorm2d(3)
    bn = bn.double().eval()
    bn.running_mean.copy_(torch.tensor([0.5, -1.0, 0.0]))
    bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25]))
    bn.num_batches_tracked.fill_(7)
    return bn


def _mixture(source: Tensor, target: Tensor, prior: float, n: int) -> Tensor:
    return (prior * source + n * target) / (prior + n)


@pytest.mark.parametrize("kind", ["bnlab", "torch"])
@pytest.mark.parametrize("prior", [0.0, 7, 100.0])
def test_one_bn_gets_the_mixture_of_source_and_target(kind: str, prior: float) -> None:
    bn = _source_bn(kind)
    source_mean, source_var = bn.running_mean.clone(), bn.running_var.clone()
    batches = _target()
    x = torch.cat(batches)  # (12, 3, 2, 2)
    target_mean = x.mean((0, 2, 3))
    target_var = x.var((0, 2, 3), unbiased=True)  # torch's stored (unbiased) form
    assert adapt_bn(bn, batches, prior=prior) is bn
    n = x.shape[0]
    torch.testing.assert_close(bn.running_mean, _mixture(source_mean, target_mean, prior, n))
    torch.testing.assert_close(bn.running_var, _mixture(source_var, target_var, prior, n))
    assert int(bn.num_batches_tracked) == 7


def test_a_biased_convention_mixes_the_biased_target_variance() -> None:
    bn = BatchNorm(3, convention="d2l", momentum=0.9).double().eval()
    bn.running_var.fill_(2.0)
    batches = _target()
    x = torch.cat(batches)
    adapt_bn(bn, batches, prior=12)
    expected = (12 * 2.0 + 12 * x.var((0, 2, 3), unbiased=False)) / 24
    torch.testing.assert_close(bn.running_var, expected)


def test_each_bn_sees_the_upstream_bns_already_adapted() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 3), BatchNorm(3), nn.Tanh(), nn.Linear(3, 2), nn.BatchNorm1d(2)
    ).double()
    for _ in range(3):
        model(torch.randn(16, 4, dtype=torch.float64))  # source statistics
    model.eval()
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(b, 4, generator=g, dtype=torch.float64) * 2 - 1 for b in (6, 10)]
    x = torch.cat(batches)
    prior = 5.0
    adapt_bn(model, batches, prior=prior)

    with torch.no_grad():  # by hand, layer by layer
        for index in (1, 4):
            bn = reference[index]
            h = reference[:index](x)  # the upstream BN is already mixed
            bn.running_mean.copy_(_mixture(bn.running_mean, h.mean(0), prior, len(x)))
            bn.running_var.copy_(_mixture(bn.running_var, h.var(0), prior, len(x)))
    for index in (1, 4):
        torch.testing.assert_close(model[index].running_mean, reference[index].running_mean)
        torch.testing.assert_close(model[index].running_var, reference[index].running_var)


def test_prior_zero_is_precise_bn_on_the_target() -> None:
    torch.manual_seed(0)
    model = lenet(image_size=16).double()
    model(torch.randn(32, 1, 16, 16, dtype=torch.float64))
    model.eval()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(b, 1, 16, 16, generator=g, dtype=torch.float64) for b in (9, 7)]
    adapted = adapt_bn(copy.deepcopy(model), batches, prior=0)
    precise = precise_bn(copy.deepcopy(model), batches)
    for name, value in precise.state_dict().items():
        if "num_batches_tracked" in name:
            continue  # precise_bn counts the batches; adaptation leaves the count alone
        torch.testing.assert_close(adapted.state_dict()[name], value, rtol=0, atol=0)


def test_prior_inf_leaves_the_model_as_it_was() -> None:
    bn = _source_bn("bnlab")
    before = copy.deepcopy(bn.state_dict())
    calls: list[int] = []
    bn.register_forward_pre_hook(lambda *_: calls.append(1))
    adapt_bn(bn, _target(), prior=float("inf"))
    for name, value in bn.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not calls  # nothing to measure


@pytest.mark.parametrize("prior", [-1, float("nan"), "16", True, None])
def test_a_bad_prior_is_refused_before_anything_runs(prior: object) -> None:
    bn = _source_bn("bnlab")
    before = copy.deepcopy(bn.state_dict())
    with pytest.raises(ValueError, match="prior: expected"):
        adapt_bn(bn, _target(), prior=prior)  # type: ignore[arg-type]
    for name, value in bn.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_bad_batches_are_refused() -> None:
    with pytest.raises(TypeError, match="batches: expected an iterable"):
        adapt_bn(_source_bn("bnlab"), torch.zeros(4, 3, 2, 2), prior=1.0)
    with pytest.raises(TypeError, match="batches: expected an iterable"):
        adapt_bn(_source_bn("bnlab"), torch.zeros(4, 3, 2, 2), prior=float("inf"))


# --------------------------------------------------------------------------- TENT


def _entropy(logits: Tensor) -> Tensor:  # the definition, written out
    p = logits.softmax(1)
    return -(p * p.log()).sum(1).mean()


def _classifier(norm: str) -> nn.Module:
    torch.manual_seed(0)
    model = lenet(norm, image_size=16)
    model.train()
    for _ in range(3):
        model(torch.randn(32, 1, 16, 16))
    return model.eval()


def _shifted(n: int, seed: int = 3) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 1, 16, 16, generator=g) * 1.5 + 0.5 for _ in range(n)]


@pytest.mark.parametrize("norm", ["bnlab", "torch"])
def test_tent_changes_only_gamma_and_beta_and_lowers_the_entropy(norm: str) -> None:
    model = _classifier(norm)
    original = copy.deepcopy(model.state_dict())
    (x,) = _shifted(1)
    with torch.no_grad():  # before: the same network normalizing with the batch's statistics
        before = _entropy(copy.deepcopy(model).train()(x))
    adapted = tent(model, [x] * 5, lr=1e-2)

    with torch.no_grad():
        after = _entropy(adapted(x))
    assert float(after) < float(before)
    assert not adapted.training  # the mode is kept
    state = adapted.state_dict()
    bn_names = {f"{i}." for i in model.norm_indices}
    for name, value in original.items():
        prefix = name[: name.index(".") + 1]
        if prefix in bn_names and name.endswith(("weight", "bias")):
            assert not torch.equal(state[name], value), f"{name} was not adapted"
        elif prefix in bn_names:
            assert name not in state  # running statistics removed: batch statistics only
        else:
            assert torch.equal(state[name], value), f"{name} changed"
    for name, value in model.state_dict().items():  # the input model is untouched
        assert torch.equal(value, original[name]), name
    assert all(p.requires_grad for p in adapted.parameters())  # flags back as they were


def test_one_sgd_step_is_the_entropy_gradient_step_on_gamma_and_beta() -> None:
    model = _classifier("torch")
    (x,) = _shifted(1)
    adapted = tent(model, [x], optimizer=lambda p: torch.optim.SGD(p, lr=0.1))

    reference = copy.deepcopy(model)  # by hand: batch statistics, entropy, gradient, step
    bns = [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)]
    for bn in bns:
        bn.track_running_stats = False
        bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    affine = [p for bn in bns for p in (bn.weight, bn.bias)]
    grads = torch.autograd.grad(_entropy(reference(x)), affine)
    with torch.no_grad():
        for p, g in zip(affine, grads, strict=True):
            p -= 0.1 * g
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(adapted.state_dict()[name], value, msg=name)


def test_tent_in_place_restores_the_model_when_a_batch_fails() -> None:
    model = _classifier("bnlab")
    before = copy.deepcopy(model.state_dict())
    (x,) = _shifted(1)
    with pytest.raises(RuntimeError):
        tent(model, [x, torch.zeros(4, 2, 16, 16)], inplace=True)  # 2 channels: conv fails
    assert model.state_dict().keys() == before.keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_tent_in_place_adapts_the_model_itself() -> None:
    model = _classifier("bnlab")
    assert tent(model, _shifted(1), inplace=True) is model
    assert model[1].running_mean is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"steps": 0}, ValueError, "steps: expected a positive int"),
        ({"lr": -1.0}, ValueError, "lr: expected a positive"),
        ({"lr": math.inf}, ValueError, "lr: expected a positive"),
        ({"lr": 1e-3, "optimizer": torch.optim.SGD}, ValueError, "expected one of them"),
        ({"optimizer": "adam"}, TypeError, "optimizer: expected a factory"),
        ({"optimizer": lambda p: p}, TypeError, "the factory returned list"),
    ],
)
def test_tent_refuses_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    model = _classifier("bnlab")
    with pytest.raises(error, match=match):
        tent(model, _shifted(1), inplace=True, **kwargs)
    assert model[1].running_mean is not None  # left as it was


def test_tent_needs_trainable_batch_norms_and_logits() -> None:
    with pytest.raises(ValueError, match="trainable"):
        tent(lenet("none"), _shifted(1))
    with pytest.raises(TypeError, match=r"logits of shape \(N, K\)"):
        tent(nn.Sequential(nn.Conv2d(1, 2, 3), BatchNorm(2)), _shifted(1))
