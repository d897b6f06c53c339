"""torch.export and ONNX export (run in onnxruntime) of the BN-LeNet give the eager outputs,
with bnlab's BatchNorm and with FrozenBatchNorm, in prediction and training mode."""

from __future__ import annotations

import copy
from collections.abc import Callable

import onnxruntime
import pytest
import torch
from torch import Tensor, nn

from bnlab.models import lenet
from bnlab.tools import freeze_bn

BATCH = torch.export.Dim("batch", min=2)  # one graph for every batch size


def _trained(momentum: float | None = 0.1) -> nn.Module:
    """A BN-LeNet whose running statistics are not the initial 0 and 1."""
    torch.manual_seed(0)
    options = {} if momentum == 0.1 else {"momentum": momentum}
    model = lenet(norm_options=options)
    for x in _batches(2, seed=5):
        model(x)
    return model


def _batches(n: int, seed: int = 1, size: int = 8) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 1, 28, 28, generator=g) for _ in range(n)]


MODELS: dict[str, Callable[[], nn.Module]] = {
    "bnlab": _trained,
    "bnlab_momentum_none": lambda: _trained(None),
    "frozen": lambda: freeze_bn(_trained()),
}


@pytest.mark.parametrize("kind", ["bnlab", "frozen"])
def test_torch_export_in_eval_mode_gives_the_eager_outputs(kind: str) -> None:
    model = MODELS[kind]().eval()
    program = torch.export.export(model, (_batches(1)[0],), dynamic_shapes=({0: BATCH},))
    exported = program.module()
    for size in (8, 5):
        (x,) = _batches(1, seed=size, size=size)
        torch.testing.assert_close(exported(x), model(x))
    assert not program.graph_signature.buffers_to_mutate  # prediction changes no state


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_torch_export_in_train_mode_updates_the_running_statistics_as_eager(kind: str) -> None:
    model = MODELS[kind]().train()
    program = torch.export.export(
        copy.deepcopy(model), (_batches(1)[0],), dynamic_shapes=({0: BATCH},)
    )
    exported = program.module()
    for x in _batches(3, seed=2) + _batches(1, seed=3, size=5):
        torch.testing.assert_close(exported(x), model(x))
    expected = model.state_dict()
    state = exported.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, msg=lambda m, name=name: f"{name}: {m}")
    mutated = set(program.run_decompositions().graph_signature.buffers_to_mutate.values())
    if kind == "frozen":
        assert not mutated
    else:
        assert mutated == {n for n in expected if n.rsplit(".", 1)[-1] in _RUNNING}


_RUNNING = {"running_mean", "running_var", "num_batches_tracked"}


def _onnx_session(model: nn.Module) -> onnxruntime.InferenceSession:
    program = torch.onnx.export(
        model, (_batches(1)[0],), dynamo=True, dynamic_shapes=({0: "batch"},), verbose=False
    )
    assert program is not None
    return onnxruntime.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )


def _run(session: onnxruntime.InferenceSession, x: Tensor) -> Tensor:
    (name,) = (i.name for i in session.get_inputs())
    outputs = session.run(None, {name: x.numpy()})
    assert len(outputs) == 1  # the logits: ONNX graphs hold no state to update
    return torch.from_numpy(outputs[0])


@pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode")
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("kind", ["bnlab", "frozen"])
def test_onnx_export_runs_in_onnxruntime_with_the_eager_outputs(kind: str, mode: str) -> None:
    model = MODELS[kind]().train(mode == "train")
    session = _onnx_session(copy.deepcopy(model))
    for size in (8, 5):
        (x,) = _batches(1, seed=size, size=size)
        with torch.no_grad():
            expected = copy.deepcopy(model)(x)  # a copy: training mode would update the stats
        torch.testing.assert_close(_run(session, x), expected, rtol=1e-5, atol=1e-5)
