"""bnlab.func.stateless against the same models used in place, and torch.func against autograd."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, jvp, stack_module_state, vmap

from bnlab.func import stateless
from bnlab.models import lenet
from bnlab.nn import BatchNorm
from bnlab.tools import convert_norm

K = 3  # ensemble size


def _models(norm: str, momentum: float | None, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    options = {} if momentum == 0.1 else {"momentum": momentum}
    # 16x16 images keep the LeNet small; every model has its own weights
    return [lenet(norm, norm_options=options, image_size=16).double() for _ in range(K)]


def _batches(steps: int, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, 1, 16, 16, generator=g, dtype=torch.float64) * 2 + 0.5,
            torch.randint(0, 10, (8,), generator=g),
        )
        for _ in range(steps)
    ]


def _assert_buffers_equal(new: dict[str, Tensor], model: nn.Module, k: int | None = None) -> None:
    expected = dict(model.named_buffers())
    assert set(new) == set(expected)
    for name, value in expected.items():
        got = new[name] if k is None else new[name][k]
        torch.testing.assert_close(got, value, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize(("norm", "momentum"), [("bnlab", 0.1), ("bnlab", None), ("torch", 0.1)])
def test_vmap_ensemble_equals_models_used_in_place(norm: str, momentum: float | None) -> None:
    models = _models(norm, momentum)
    f = stateless(models[0])
    params, buffers = stack_module_state(models)  # copies: the models keep their own tensors
    ensemble = vmap(f, in_dims=(0, 0, None))
    for x, _ in _batches(3):  # three steps: the batch count and cumulative averages advance
        out, buffers = ensemble(params, buffers, x)
        for k, model in enumerate(models):
            torch.testing.assert_close(out[k], model(x), rtol=1e-12, atol=1e-12)
            _assert_buffers_equal(buffers, model, k)
    assert int(buffers["1.num_batches_tracked"][0]) == 3


def _loss(f, params, buffers, x, y):  # type: ignore[no-untyped-def]
    out, new_buffers = f(params, buffers, x)
    return nn.functional.cross_entropy(out, y), new_buffers


@pytest.mark.parametrize("momentum", [0.1, None])
def test_vmap_of_grad_trains_the_ensemble_as_autograd_trains_each_model(
    momentum: float | None,
) -> None:
    models = _models("bnlab", momentum)
    f = stateless(models[0])
    params, buffers = stack_module_state(models)
    step = vmap(grad(lambda p, b, x, y: _loss(f, p, b, x, y), has_aux=True), (0, 0, None, None))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in models]
    for x, y in _batches(2):
        grads, buffers = step(params, buffers, x, y)
        params = {name: p - 0.5 * grads[name] for name, p in params.items()}
        for model, opt in zip(models, optimizers, strict=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for k, model in enumerate(models):
        for name, p in model.named_parameters():
            torch.testing.assert_close(params[name][k], p.detach(), rtol=1e-10, atol=1e-12)
        _assert_buffers_equal(buffers, model, k)


@pytest.mark.parametrize("norm", ["bnlab", "torch"])
def test_grad_equals_autograd(norm: str) -> None:
    model = _models(norm, 0.1)[0]
    f = stateless(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    ((x, y),) = _batches(1)
    grads, new_buffers = grad(lambda p: _loss(f, p, buffers, x, y), has_aux=True)(params)
    nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-12)
    _assert_buffers_equal(new_buffers, model)


def _bn_with_affine(momentum: float | None) -> BatchNorm:
    torch.manual_seed(2)
    bn = BatchNorm(3, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    return bn


@pytest.mark.parametrize("momentum", [0.1, None])
def test_jacrev_and_jvp_equal_autograd_jacobians(momentum: float | None) -> None:
    bn = _bn_with_affine(momentum)
    f = stateless(bn)
    params = {n: p.detach().clone() for n, p in bn.named_parameters()}
    buffers = {n: b.clone() for n, b in bn.named_buffers()}
    x = torch.randn(4, 3, 2, dtype=torch.float64) * 3 + 1

    def out_of(x: Tensor, weight: Tensor) -> Tensor:
        return f({**params, "weight": weight}, buffers, x)[0]

    jx, jw = jacrev(out_of, argnums=(0, 1))(x, params["weight"])
    ref_x, ref_w = torch.autograd.functional.jacobian(
        lambda x, w: _affine_ref(bn, x, w), (x, params["weight"])
    )
    torch.testing.assert_close(jx, ref_x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jw, ref_w, rtol=1e-10, atol=1e-12)

    vx = torch.randn_like(x)
    vw = torch.randn_like(params["weight"])
    out, tangent = jvp(out_of, (x, params["weight"]), (vx, vw))
    expected = torch.einsum("abcijk,ijk->abc", ref_x, vx) + torch.einsum("abci,i->abc", ref_w, vw)
    torch.testing.assert_close(out, bn(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, expected, rtol=1e-10, atol=1e-12)


def _affine_ref(bn: BatchNorm, x: Tensor, weight: Tensor) -> Tensor:
    """Training-mode BN by its formula with differentiable operations (float64)."""
    mean = x.mean((0, 2), keepdim=True)
    var = x.var((0, 2), unbiased=False, keepdim=True)
    assert bn.bias is not None
    return (x - mean) / torch.sqrt(var + bn.eps) * weight.view(1, -1, 1) + bn.bias.detach().view(
        1, -1, 1
    )


def test_nothing_passed_in_changes_and_eval_mode_keeps_the_buffers() -> None:
    model = _models("bnlab", 0.1)[0]
    f = stateless(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    saved = {n: b.clone() for n, b in buffers.items()}
    ((x, _),) = _batches(1)
    _, new_buffers = f(params, buffers, x)
    for name, value in saved.items():
        assert torch.equal(buffers[name], value), name  # the caller's buffers are untouched
        assert torch.equal(dict(model.named_buffers())[name], value), name  # and the model's
    assert not torch.equal(new_buffers["1.running_mean"], saved["1.running_mean"])
    model.eval()
    out, kept = f(params, buffers, x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    for name, value in saved.items():
        assert torch.equal(kept[name], value), name


def test_torch_bn_with_cumulative_momentum_is_refused_with_the_conversion() -> None:
    torch_models = _models("torch", None)
    with pytest.raises(ValueError, match=r'convert_norm\(model, "bnlab"\)'):
        stateless(torch_models[0])
    converted = [convert_norm(m, "bnlab") for m in torch_models]
    f = stateless(converted[0])
    params, buffers = stack_module_state(converted)
    ((x, _),) = _batches(1)
    out, buffers = vmap(f, in_dims=(0, 0, None))(params, buffers, x)
    for k, model in enumerate(torch_models):  # the converted ensemble matches torch's layers
        torch.testing.assert_close(out[k], model(x), rtol=1e-12, atol=1e-12)
        _assert_buffers_equal(buffers, model, k)


def test_wrong_keys_and_lazy_models_are_refused() -> None:
    model = _models("bnlab", 0.1)[0]
    f = stateless(model)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    ((x, _),) = _batches(1)
    del params["0.weight"]
    with pytest.raises(ValueError, match=r"params: .*missing \['0.weight'\]"):
        f(params, buffers, x)
    with pytest.raises(ValueError, match=r"buffers: .*unknown \['extra'\]"):
        f(dict(model.named_parameters()), {**buffers, "extra": torch.zeros(1)}, x)
    with pytest.raises(TypeError, match="params: expected a dict"):
        f(list(model.parameters()), buffers, x)
    with pytest.raises(ValueError, match="lazy"):
        stateless(nn.Sequential(nn.Linear(3, 4), BatchNorm()))
    with pytest.raises(TypeError, match=r"model: expected a torch\.nn\.Module"):
        stateless(model.state_dict())  # type: ignore[arg-type]
