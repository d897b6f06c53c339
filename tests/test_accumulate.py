"""accumulate_bn: one running update per k micro-batches, equal to the update of one forward of
their concatenation (the same layer, or torch's BatchNorm, fed torch.cat; float64), with the
outputs and gradients of each micro-batch unchanged."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from bnlab.nn import BatchNorm, GhostBatchNorm
from bnlab.tools import accumulate_bn

SIZES = [5, 3, 8, 4]  # one group of k = 4 uneven micro-batches

LAYERS: dict[str, Callable[[], nn.Module]] = {
    "bnlab-conv": lambda: BatchNorm(3),
    "bnlab-cumulative": lambda: BatchNorm(3, momentum=None),
    "bnlab-d2l": lambda: BatchNorm(3, convention="d2l", momentum=0.9),
    "bnlab-channels-last": lambda: BatchNorm(3, axis=-1),
    "torch-2d": lambda: nn.BatchNorm2d(3, momentum=0.3),
    "torch-1d-cumulative": lambda: nn.BatchNorm1d(3, momentum=None),
}
SHAPES = {"torch-1d-cumulative": (3, 7), "bnlab-channels-last": (4, 5, 3)}  # per sample


def _layer(name: str) -> nn.Module:
    layer = LAYERS[name]().double()
    with torch.no_grad():  # a non-trivial starting state
        layer.running_mean.fill_(0.5)
        layer.running_var.fill_(2.0)
    return layer


def _micro_batches(name: str, sizes: list[int], seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = SHAPES.get(name, (3, 4, 2))
    return [3 + 2 * torch.randn(n, *shape, generator=gen, dtype=torch.float64) for n in sizes]


def _assert_same_stats(got: nn.Module, want: nn.Module) -> None:
    torch.testing.assert_close(got.running_mean, want.running_mean, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(got.running_var, want.running_var, rtol=1e-13, atol=1e-13)
    assert int(got.num_batches_tracked) == int(want.num_batches_tracked)


@pytest.mark.parametrize("name", list(LAYERS))
def test_one_update_per_group_equals_the_concatenated_batch(name: str) -> None:
    layer = _layer(name).train()
    reference = copy.deepcopy(layer)  # the same layer, fed each group concatenated
    plain = copy.deepcopy(layer)  # the same layer, fed the micro-batches without the block
    with accumulate_bn(layer, micro_batches=len(SIZES)):
        for step in range(3):
            group = _micro_batches(name, SIZES, seed=step)
            for i, xm in enumerate(group):
                x = xm.clone().requires_grad_(True)
                y = layer(x)
                xp = xm.clone().requires_grad_(True)
                yp = plain(xp)
                assert torch.equal(y, yp)  # normalized with its own statistics, as usual
                g = torch.randn_like(y)
                y.backward(g)
                yp.backward(g)
                assert x.grad is not None and torch.equal(x.grad, xp.grad)
                if i < len(SIZES) - 1:
                    assert int(layer.num_batches_tracked) == step  # nothing until the group ends
            reference(torch.cat(group))
            _assert_same_stats(layer, reference)
    assert torch.equal(layer.weight.grad, plain.weight.grad)
    assert int(plain.num_batches_tracked) == 3 * len(SIZES)


def test_torch_batchnorm_on_the_concatenation_is_the_oracle() -> None:
    bn = BatchNorm(3, dtype=torch.float64)
    oracle = nn.BatchNorm2d(3, dtype=torch.float64)
    with accumulate_bn(bn, micro_batches=4):
        for step in range(2):
            group = _micro_batches("bnlab-conv", SIZES, seed=10 + step)
            for xm in group:
                bn(xm)
            oracle(torch.cat(group))
    _assert_same_stats(bn, oracle)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),  # 0
        BatchNorm(3),  # 1
        nn.ReLU(),  # 2
        nn.Flatten(),  # 3
        nn.Linear(12, 4),  # 4
        nn.BatchNorm1d(4),  # 5
    ).double()


def test_in_a_training_loop_every_bn_gets_the_statistics_of_its_inputs() -> None:
    # gradient accumulation: 2 optimizer steps of 3 micro-batches each
    model, plain = _net(), _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(3)
    expected = {1: copy.deepcopy(model[1]), 5: copy.deepcopy(model[5])}
    with accumulate_bn(model, micro_batches=3):
        for _ in range(2):
            opt.zero_grad()
            opt_plain.zero_grad()
            group = [torch.randn(n, 2, 4, 4, generator=gen, dtype=torch.float64) for n in (6, 4, 5)]
            inputs: dict[int, list[Tensor]] = {1: [], 5: []}
            probe = copy.deepcopy(plain)  # the same weights as `model`, outside the block
            for xm in group:
                with torch.no_grad():  # what each BN sees: upstream BNs use micro-batch stats
                    inputs[1].append(probe[:1](xm))
                    inputs[5].append(probe[:5](xm))
                model(xm).square().mean().div(3).backward()
                plain(xm).square().mean().div(3).backward()
            for i in (1, 5):
                expected[i](torch.cat(inputs[i]))
            opt.step()
            opt_plain.step()
    for i in (1, 5):
        _assert_same_stats(model[i], expected[i])
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)  # the training itself is unchanged


def test_a_partial_group_is_applied_with_a_warning() -> None:
    layer, reference = _layer("bnlab-conv"), _layer("bnlab-conv")
    group = _micro_batches("bnlab-conv", SIZES, seed=5)
    with (
        pytest.warns(RuntimeWarning, match="after 2 of 4 micro-batches"),
        accumulate_bn(layer, micro_batches=4),
    ):
        for xm in group[:2]:
            layer(xm)
    reference(torch.cat(group[:2]))
    _assert_same_stats(layer, reference)
    assert not layer._forward_pre_hooks and not layer._forward_hooks


def test_eval_calls_are_not_counted_and_change_nothing() -> None:
    layer, reference = _layer("torch-2d"), _layer("torch-2d")
    group = _micro_batches("torch-2d", SIZES, seed=6)
    with accumulate_bn(layer, micro_batches=4):
        for xm in group:
            layer.eval()
            layer(xm)  # an evaluation between micro-batches
            layer.train()
            layer(xm)
    reference(torch.cat(group))
    _assert_same_stats(layer, reference)


def test_an_error_in_the_block_drops_the_partial_group() -> None:
    layer = _layer("bnlab-conv")
    group = _micro_batches("bnlab-conv", SIZES, seed=7)
    with (
        pytest.raises(RuntimeError, match="data loader died"),
        accumulate_bn(layer, micro_batches=2),
    ):
        layer(group[0])
        layer(group[1])  # a full group: applied
        after_group = copy.deepcopy(layer.state_dict())
        layer(group[2])
        raise RuntimeError("data loader died")
    for key, value in layer.state_dict().items():
        assert torch.equal(value, after_group[key]), key
    assert not layer._forward_pre_hooks and not layer._forward_hooks
    block = accumulate_bn(layer, micro_batches=2)
    with pytest.raises(RuntimeError, match="again"), block:
        layer(group[3])
        raise RuntimeError("again")
    with block:  # entered again: the dropped micro-batch is not in the next group
        layer(group[0])
        layer(group[1])
    reference = copy.deepcopy(layer)
    reference.load_state_dict(after_group)
    reference(torch.cat(group[:2]))
    _assert_same_stats(layer, reference)


def test_a_failing_micro_batch_leaves_the_buffers_alone() -> None:
    layer = _layer("bnlab-conv")
    state = copy.deepcopy(layer.state_dict())
    with accumulate_bn(layer, micro_batches=2):
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            layer(torch.randn(1, 3, dtype=torch.float64))
        for key, value in layer.state_dict().items():
            assert torch.equal(value, state[key]), key
        xs = _micro_batches("bnlab-conv", [4, 4], seed=8)
        for xm in xs:
            layer(xm)
    reference = _layer("bnlab-conv")
    reference(torch.cat(xs))
    _assert_same_stats(layer, reference)


def test_variants_keep_their_own_updates_with_a_warning() -> None:
    model = nn.Sequential(GhostBatchNorm(3, virtual_batch_size=2), BatchNorm(3)).double()
    with pytest.warns(RuntimeWarning, match=r"0 \(GhostBatchNorm\) is a batch norm variant"):
        block = accumulate_bn(model, micro_batches=2)
    with block:
        model(torch.randn(4, 3, dtype=torch.float64))
        assert int(model[0].num_batches_tracked) == 1 and int(model[1].num_batches_tracked) == 0
        model(torch.randn(4, 3, dtype=torch.float64))
    assert int(model[0].num_batches_tracked) == 2 and int(model[1].num_batches_tracked) == 1


def test_bad_input_is_explained() -> None:
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module"):
        accumulate_bn("model", micro_batches=2)  # type: ignore[arg-type]
    for bad in (0, -1, 2.0, True, "8"):
        with pytest.raises(ValueError, match="micro_batches: expected a positive int"):
            accumulate_bn(BatchNorm(3), micro_batches=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Run one forward pass"):
        accumulate_bn(nn.Sequential(BatchNorm()), micro_batches=2)
    block = accumulate_bn(BatchNorm(3), micro_batches=2)
    with block, pytest.raises(RuntimeError, match="already active"), block:
        pass
