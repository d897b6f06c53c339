"""Masked BN for padded batches, against the oracle of torch's BatchNorm1d on the packed valid
values (the input moved to channels-last and indexed by the mask), in float64: outputs at valid
positions, gradients w.r.t. input, weight and bias, running statistics; every kernel."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from bnlab.functional import batch_norm
from bnlab.nn import BatchNorm, BatchRenorm
from bnlab.tools import accumulate_bn, precise_bn


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    axis: int = 1
    options: dict[str, Any] | None = None


CASES = [
    Case("dense", (9, 3)),
    Case("sequence", (4, 3, 7)),
    Case("image", (3, 2, 4, 5)),
    Case("channels-last", (3, 4, 5, 2), axis=-1),
    Case("cumulative", (4, 3, 6), options={"momentum": None}),
    Case("d2l", (4, 3, 6), options={"convention": "d2l", "momentum": 0.9}),
]
IMPLS = ["auto", "eager", "reference"]


def _mask_shape(case: Case) -> tuple[int, ...]:
    axis = case.axis % len(case.shape)
    return case.shape[:axis] + case.shape[axis + 1 :]


def _data(case: Case, step: int) -> tuple[Tensor, Tensor]:
    """x with garbage (but finite) padding, and a mask with about 70 % valid positions."""
    gen = torch.Generator().manual_seed(100 * CASES.index(case) + step)
    x = 2 + 3 * torch.randn(case.shape, generator=gen, dtype=torch.float64)
    mask = torch.rand(_mask_shape(case), generator=gen) < 0.7
    mask.view(-1)[:2] = True  # at least two valid values
    axis = case.axis % len(case.shape)
    padding = (~mask).unsqueeze(axis).expand_as(x)
    return torch.where(padding, torch.full_like(x, 1e6), x), mask


def _packed(t: Tensor, mask: Tensor, axis: int) -> Tensor:
    """(M, C): the valid values, channels last."""
    return t.movedim(axis, -1)[mask]


def _layer(case: Case, impl: str) -> BatchNorm:
    c = case.shape[case.axis]
    bn = BatchNorm(c, axis=case.axis, impl=impl, dtype=torch.float64, **(case.options or {}))
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, c, dtype=torch.float64))
        bn.bias.copy_(torch.linspace(-1, 1, c, dtype=torch.float64))
    return bn


def _oracle(case: Case, bn: BatchNorm) -> nn.Module:
    """torch's BatchNorm1d with the same parameters; for a decay-style convention, a bnlab BN
    on the packed values (itself tested against torch)."""
    if (case.options or {}).get("convention"):
        oracle: nn.Module = copy.deepcopy(bn)
        oracle.axis = 1
        oracle.impl = "reference"
        return oracle
    oracle = nn.BatchNorm1d(bn.num_features, momentum=bn.momentum, dtype=torch.float64)
    oracle.load_state_dict(bn.state_dict())
    return oracle


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_masked_bn_equals_bn_on_the_packed_valid_values(case: Case, impl: str) -> None:
    bn = _layer(case, impl)
    oracle = _oracle(case, bn)
    axis = case.axis % len(case.shape)
    for step in range(2):
        x, mask = _data(case, step)
        x.requires_grad_(True)
        y = bn(x, mask)
        assert torch.isfinite(y).all()  # every position is normalized, padding included
        packed = _packed(x.detach(), mask, axis).requires_grad_(True)
        want = oracle(packed)
        torch.testing.assert_close(_packed(y, mask, axis), want, rtol=1e-12, atol=1e-12)
        g = torch.randn(
            want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(step)
        )
        bn.zero_grad()
        oracle.zero_grad()
        (_packed(y, mask, axis) * g).sum().backward()  # the loss sees the valid outputs only
        (want * g).sum().backward()
        assert x.grad is not None and packed.grad is not None
        torch.testing.assert_close(_packed(x.grad, mask, axis), packed.grad, rtol=1e-10, atol=1e-12)
        assert not x.grad.movedim(axis, -1)[~mask].any()  # padding: only its own output's
        for name in ("weight", "bias"):
            torch.testing.assert_close(
                getattr(bn, name).grad, getattr(oracle, name).grad, rtol=1e-10, atol=1e-12
            )
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(
                getattr(bn, name), getattr(oracle, name), rtol=1e-12, atol=1e-12, msg=name
            )
        assert int(bn.num_batches_tracked) == int(oracle.num_batches_tracked) == step + 1


def test_the_padding_does_not_matter_and_stays_out_even_as_nan() -> None:
    case = CASES[1]
    x, mask = _data(case, 0)
    other = torch.where(mask.unsqueeze(1), x, torch.full_like(x, float("nan")))
    a, b = _layer(case, "auto"), _layer(case, "auto")
    ya, yb = a(x, mask), b(other, mask)
    valid = mask.unsqueeze(1).expand_as(x)
    assert torch.equal(ya[valid], yb[valid])
    assert torch.equal(a.running_var, b.running_var) and torch.isfinite(b.running_var).all()


def test_all_valid_equals_no_mask() -> None:
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    a, b = BatchNorm(3, dtype=torch.float64), BatchNorm(3, dtype=torch.float64)
    ya, yb = a(x, torch.ones(6, 5, dtype=torch.bool)), b(x)
    torch.testing.assert_close(ya, yb, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-13, atol=1e-13)


def test_the_function_returns_new_statistics_and_mutates_nothing() -> None:
    case = CASES[2]
    x, mask = _data(case, 0)
    mean, var = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    y, new_mean, new_var = batch_norm(x, None, None, mean, var, training=True, mask=mask)
    assert torch.equal(mean, torch.zeros(2)) and torch.equal(var, torch.ones(2))
    packed = _packed(x, mask, 1)
    torch.testing.assert_close(new_mean, 0.1 * packed.mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(new_var, 0.9 + 0.1 * packed.var(0), rtol=1e-12, atol=0)
    # without running statistics: batch statistics of the valid values
    y2, _, _ = batch_norm(x, training=False, mask=mask)
    torch.testing.assert_close(y2, y, rtol=1e-13, atol=1e-13)


def test_a_lazy_layer_infers_its_channels_from_a_masked_call() -> None:
    x, mask = _data(CASES[1], 0)
    for call in (lambda bn: bn(x, mask), lambda bn: bn(x, mask=mask)):
        lazy, fixed = BatchNorm(dtype=torch.float64), BatchNorm(3, dtype=torch.float64)
        assert torch.equal(call(lazy), call(fixed))
        assert type(lazy) is BatchNorm and torch.equal(lazy.running_var, fixed.running_var)


def test_eval_mode_uses_the_running_statistics_everywhere() -> None:
    case = CASES[1]
    x, mask = _data(case, 0)
    bn = _layer(case, "auto").eval()
    assert torch.equal(bn(x, mask), bn(x))


@pytest.mark.parametrize("valid", [0, 1])
def test_fewer_than_two_valid_values_raise_and_change_nothing(valid: int) -> None:
    bn = BatchNorm(3, dtype=torch.float64)
    state = copy.deepcopy(bn.state_dict())
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[0, :valid] = True
    with pytest.raises(
        ValueError, match=f"more than 1 valid value per channel.*got {valid} True position"
    ):
        bn(torch.randn(4, 3, 5, dtype=torch.float64), mask)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_a_bad_mask_is_explained_before_anything_changes() -> None:
    bn = BatchNorm(3)
    state = copy.deepcopy(bn.state_dict())
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match=r"mask: expected shape \(4, 5\) \(the input's shape"):
        bn(x, torch.ones(4, 3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask: expected dtype torch\.bool.*mask\.bool\(\)"):
        bn(x, torch.ones(4, 5))
    with pytest.raises(TypeError, match="mask: expected a boolean tensor of shape"):
        bn(x, [[True] * 5] * 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected shape \(4, 5, 3\)"):
        BatchNorm(3, axis=1)(torch.randn(4, 3, 5, 3), torch.ones(4, 3, 5, dtype=torch.bool))
    for key, value in bn.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(TypeError, match="BatchRenorm has no masked statistics"):
        BatchRenorm(3)(x, torch.ones(4, 5, dtype=torch.bool))


class _ZeroPadded(nn.Module):
    """A sequence model whose batches are zero-padded: it finds the mask in its input, as
    padded-batch code does, and passes it to BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 1)
        self.bn = BatchNorm(3)

    def forward(self, x: Tensor) -> Tensor:
        mask = (x != 0).any(dim=1)  # (N, L): a position is real unless all its features are 0
        return self.bn(self.conv(x), mask=mask)


def _padded_batches() -> list[Tensor]:
    gen = torch.Generator().manual_seed(9)
    out = []
    for n, length in ((3, 6), (4, 5), (2, 7)):
        x = torch.randn(n, 2, length, generator=gen, dtype=torch.float64)
        lengths = torch.randint(2, length + 1, (n,), generator=gen)
        out.append(x * (torch.arange(length) < lengths[:, None]).unsqueeze(1))
    return out


def test_precise_and_accumulate_count_the_valid_values_only() -> None:
    torch.manual_seed(0)
    model = _ZeroPadded().double()
    batches = _padded_batches()
    with torch.no_grad():
        features = torch.cat([_packed(model.conv(x), (x != 0).any(1), 1) for x in batches])
    assert len(features) < sum(x.shape[0] * x.shape[2] for x in batches)  # some padding
    precise_bn(model, batches)
    torch.testing.assert_close(model.bn.running_mean, features.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.bn.running_var, features.var(0), rtol=1e-12, atol=0)
    oracle = nn.BatchNorm1d(3, dtype=torch.float64)
    oracle.load_state_dict(model.bn.state_dict())
    with accumulate_bn(model, micro_batches=3):
        for x in batches:
            model(x)
    oracle(features)
    torch.testing.assert_close(model.bn.running_var, oracle.running_var, rtol=1e-12, atol=0)
    assert int(model.bn.num_batches_tracked) == int(oracle.num_batches_tracked)
