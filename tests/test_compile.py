"""torch.compile(fullgraph=True) of BatchNorm equals eager, for every kernel and convention.

Compiling is slow on a small machine, so one network holds one layer per case and is compiled
once for training (forward and backward) and once for prediction; each case is then its own
test over the shared run. float64, so "equal" means equal up to the rounding of fused sums.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import bnlab.functional  # noqa: F401  (registers every kernel)
from bnlab.functional.batch_norm import CONVENTIONS, TRAIN_KERNELS
from bnlab.nn import BatchNorm

C = 3
STEPS = 3  # the batch count and the cumulative average advance under the compiled graph
CASES: dict[str, dict[str, Any]] = {
    **{f"impl={impl}": {"impl": impl} for impl in sorted(TRAIN_KERNELS)},
    **{f"convention={name}": {"convention": name} for name in sorted(CONVENTIONS)},
    "momentum=None": {"momentum": None},
    "momentum=None,convention=d2l": {"momentum": None, "convention": "d2l"},
}
TOL = {"rtol": 1e-10, "atol": 1e-12}


def _network() -> nn.Sequential:
    torch.manual_seed(0)
    layers = [BatchNorm(C, **options).double() for options in CASES.values()]
    with torch.no_grad():
        for layer in layers:  # distinct γ, β so that each layer's gradients differ
            assert layer.weight is not None and layer.bias is not None
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_()
    return nn.Sequential(*layers)


def _batches(n: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(5, C, 4, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(n)]


@pytest.fixture(scope="module")
def runs() -> dict[str, Any]:
    """The same steps eager and compiled: outputs, input gradients, final modules."""
    torch._dynamo.reset()
    eager = _network()
    compiled = copy.deepcopy(eager)
    step = torch.compile(compiled, fullgraph=True)
    result: dict[str, Any] = {"eager": eager, "compiled": compiled, "train": [], "eval": []}
    for x in _batches(STEPS):
        pair = []
        for run in (eager, step):
            xi = x.clone().requires_grad_()
            y = run(xi)
            y.pow(3).sum().backward()
            pair.append((y.detach(), xi.grad))
        result["train"].append(pair)
    eager.eval()
    compiled.eval()
    for x in _batches(2):
        result["eval"].append((eager(x), step(x)))
    return result


def test_training_outputs_and_input_gradients_equal_eager(runs: dict[str, Any]) -> None:
    for (y_eager, dx_eager), (y_compiled, dx_compiled) in runs["train"]:
        torch.testing.assert_close(y_compiled, y_eager, **TOL)
        torch.testing.assert_close(dx_compiled, dx_eager, **TOL)


@pytest.mark.parametrize("index", range(len(CASES)), ids=list(CASES))
def test_each_layer_trains_as_eager(runs: dict[str, Any], index: int) -> None:
    eager, compiled = runs["eager"][index], runs["compiled"][index]
    assert int(compiled.num_batches_tracked) == int(eager.num_batches_tracked) == STEPS
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), **TOL)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(compiled, name).grad, getattr(eager, name).grad, **TOL)


def test_prediction_equals_eager(runs: dict[str, Any]) -> None:
    for y_eager, y_compiled in runs["eval"]:
        torch.testing.assert_close(y_compiled, y_eager, **TOL)


def test_momentum_none_is_the_cumulative_average(runs: dict[str, Any]) -> None:
    """Against the formula: after k batches the running mean is the plain average of the k
    batch means of that layer's input."""
    index = list(CASES).index("momentum=None")
    network = _network()
    inputs: list[Tensor] = []
    network[index].register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach()))
    for x in _batches(STEPS):
        network(x)
    expected = torch.stack([x.mean((0, 2)) for x in inputs]).mean(0)
    torch.testing.assert_close(runs["compiled"][index].running_mean, expected, **TOL)
