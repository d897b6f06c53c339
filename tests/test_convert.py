"""convert_norm: torch <-> bnlab BN (and to registry norms) with every value and setting kept;
torch's own modules are the oracle for outputs in both modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.nn import BatchNorm
from bnlab.tools import convert_norm


def torch_model() -> nn.Sequential:
    """Every torch BN class and input rank, with unusual settings, float64, trained a little."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(1, 2, 1),
        nn.BatchNorm3d(2, eps=1e-3, momentum=0.3),
        nn.Flatten(2),  # (N, 2, D*H*W)
        nn.Conv1d(2, 3, 1),
        nn.BatchNorm1d(3, momentum=None),  # cumulative average, on (N, C, L)
        nn.Unflatten(2, (2, 2, 2)),
        nn.Conv3d(3, 4, (2, 1, 1)),
        nn.Flatten(2),
        nn.Unflatten(2, (2, 2)),  # (N, 4, 2, 2)
        nn.BatchNorm2d(4, affine=False),
        nn.Flatten(),
        nn.Linear(16, 5),
        nn.BatchNorm1d(5, bias=False),  # γ without β
        nn.Linear(5, 3),
        nn.BatchNorm1d(3, track_running_stats=False),
    ).double()
    for _ in range(3):
        model(torch.randn(6, 1, 2, 2, 2, dtype=torch.float64))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.uniform_(-1, 1)
    model[1].weight.requires_grad_(False)
    return model


def x_batch(seed: int) -> Tensor:
    return torch.randn(
        7, 1, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def test_torch_to_bnlab_keeps_everything() -> None:
    model = torch_model()
    converted = convert_norm(model, "bnlab")
    bns = [m for m in converted.modules() if isinstance(m, BatchNorm)]
    assert len(bns) == 5 and not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules()
    )
    assert_same_state(model, converted)
    src = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for s, b in zip(src, bns, strict=True):
        assert (b.eps, b.momentum, b.track_running_stats) == (
            s.eps,
            s.momentum,
            s.track_running_stats,
        )
        assert b.convention == "torch" and b.training == s.training
        for name in ("weight", "bias"):
            ps, pb = getattr(s, name), getattr(b, name)
            assert (ps is None) == (pb is None)
            if ps is not None:
                assert isinstance(pb, nn.Parameter) and pb.requires_grad == ps.requires_grad
    assert [b.num_dims for b in bns] == [5, None, 4, None, None]
    # the input is untouched
    assert isinstance(model[1], nn.BatchNorm3d)


@pytest.mark.parametrize("direction", ["torch->bnlab", "bnlab->torch"])
def test_outputs_agree_in_training_and_prediction(direction: str) -> None:
    source = torch_model() if direction == "torch->bnlab" else convert_norm(torch_model(), "bnlab")
    target = convert_norm(source, "bnlab" if direction == "torch->bnlab" else "torch")
    for step in range(3):  # training: outputs, and the running statistics they leave behind
        x = x_batch(step)
        torch.testing.assert_close(target.train()(x), source.train()(x), rtol=1e-12, atol=1e-12)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=1e-12, atol=1e-12)
    x = x_batch(10)
    torch.testing.assert_close(target.eval()(x), source.eval()(x), rtol=1e-12, atol=1e-12)
    # gradients flow the same way
    source.train()
    target.train()
    for m in (source, target):
        m.zero_grad()
        F.mse_loss(m(x), torch.zeros(7, 3, dtype=torch.float64)).backward()
    for (name, p), q in zip(source.named_parameters(), target.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_round_trip_torch_bnlab_torch_gives_the_same_model() -> None:
    model = torch_model()
    back = convert_norm(convert_norm(model, "bnlab"), "torch")
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    assert_same_state(model, back)
    for a, b in zip(model.modules(), back.modules(), strict=True):
        if isinstance(a, nn.modules.batchnorm._BatchNorm):
            assert (a.eps, a.momentum, a.affine, a.track_running_stats, a.training) == (
                b.eps,
                b.momentum,
                b.affine,
                b.track_running_stats,
                b.training,
            )
            assert (a.bias is None) == (b.bias is None)
            if a.weight is not None:
                assert a.weight.requires_grad == b.weight.requires_grad


def test_round_trip_bnlab_torch_bnlab_and_lenet() -> None:
    from bnlab.models import lenet

    model = lenet("bnlab")
    model(torch.randn(4, 1, 28, 28))
    back = convert_norm(convert_norm(model, "torch"), "bnlab")
    assert_same_state(model, back)
    assert [m.num_dims for m in back.norm_layers()] == [4, 4, 2, 2]
    # the chapter's torch LeNet converts to bnlab's and computes the same
    t = lenet("torch")
    t(torch.randn(4, 1, 28, 28))
    b = convert_norm(t, "bnlab")
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(b.eval()(x), t.eval()(x), rtol=1e-5, atol=1e-6)


def test_rank_of_bnlab_layers_without_num_dims() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 1), BatchNorm(2), nn.Flatten(), BatchNorm(8))
    model(torch.randn(3, 1, 2, 2))
    with pytest.raises(ValueError, match=r"3: a BatchNorm with num_dims=None .* Pass input_rank"):
        convert_norm(model, "torch")
    converted = convert_norm(model, "torch", input_rank=2)  # only where nothing else tells
    assert isinstance(converted[1], nn.BatchNorm2d)  # from the preceding Conv2d
    assert isinstance(converted[3], nn.BatchNorm1d)


def test_scale_only_and_fixed_affine_to_torch() -> None:
    scale_only = BatchNorm(3, num_dims=2, center=False)
    t = convert_norm(scale_only, "torch")
    assert isinstance(t, nn.BatchNorm1d) and t.weight is not None and t.bias is None
    fixed = BatchNorm(3, num_dims=4, fixed_affine=True)
    with torch.no_grad():
        fixed.weight.fill_(0.5)
    t = convert_norm(fixed, "torch")
    assert isinstance(t.weight, nn.Parameter) and not t.weight.requires_grad
    assert torch.equal(t.weight, torch.full((3,), 0.5))


def test_what_cannot_convert_exactly_is_refused() -> None:
    cases = [
        (BatchNorm(3, num_dims=2, convention="d2l"), "convention='d2l'"),
        (BatchNorm(3, num_dims=4, axis=-1), "axis=-1"),
        (BatchNorm(3, num_dims=2, scale=False, center=True), "no β without γ"),
        (BatchNorm(3, num_dims=2, use_global_stats=True), "use_global_stats"),
        (BatchNorm(3, num_dims=7), "input rank 7"),
    ]
    for bn, message in cases:
        with pytest.raises(ValueError, match=message):
            convert_norm(nn.Sequential(nn.ReLU(), bn), "torch")


def test_inplace_shared_and_unconverted_classes() -> None:
    bn = nn.BatchNorm1d(3)
    sync = nn.SyncBatchNorm(3)
    model = nn.Sequential(bn, nn.ReLU(), bn, sync)
    out = convert_norm(model, "bnlab", inplace=True)
    assert out is model and isinstance(model[0], BatchNorm) and model[0] is model[2]
    assert model[3] is sync  # torch's SyncBatchNorm computes something else in training
    assert isinstance(convert_norm(nn.BatchNorm2d(2), "bnlab"), BatchNorm)


def test_convert_bad_input() -> None:
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module, got int"):
        convert_norm(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="to: expected 'bnlab', 'torch' or a norm name"):
        convert_norm(nn.BatchNorm1d(2), to=BatchNorm)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"to: expected 'bnlab', 'torch' or a norm name .*'mean'"):
        convert_norm(nn.ReLU(), to="mean")
    with pytest.raises(ValueError, match=r"\['eps'\] are copied from each source layer"):
        convert_norm(nn.BatchNorm1d(2), "bnlab", eps=1e-3)
    with pytest.raises(TypeError, match=r"unexpected options \['impl'\]"):
        convert_norm(BatchNorm(2, num_dims=2), "torch", impl="reference")
    with pytest.raises(ValueError, match="input_rank: expected 2, 3, 4 or 5"):
        convert_norm(BatchNorm(2), "torch", input_rank=1)
    with pytest.raises(ValueError, match="Run one forward pass"):
        convert_norm(nn.Sequential(nn.LazyBatchNorm1d()), "bnlab")


# ---- to the norms of bnlab.nn.registry -----------------------------------------------------


@pytest.mark.parametrize("target", ["batch", "torch-batch", "renorm", "ghost"])
def test_to_batch_like_registry_norms_keeps_prediction(target: str) -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 3, 1),
        nn.BatchNorm2d(3, eps=1e-3),
        nn.Flatten(),
        nn.Linear(12, 4),
        BatchNorm(4, num_dims=2),
    ).double()
    for _ in range(2):
        model(torch.randn(5, 1, 2, 2, dtype=torch.float64))
    converted = convert_norm(model, target)
    assert converted[1].eps == 1e-3
    for i in (1, 4):
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(converted[i], name), getattr(model[i], name)), (i, name)
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(converted.eval()(x), model.eval()(x), rtol=1e-12, atol=1e-12)


def test_to_group_and_layer_norm_carries_the_affine_parameters() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    for target, options in (("group", {"num_groups": 2}), ("layer", {})):
        converted = convert_norm(model, target, **options)
        assert torch.equal(converted[1].weight, model[1].weight), target
    with pytest.raises(ValueError, match="kind='dense' is not supported"):
        convert_norm(nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4)), "instance")
    conv_kind = convert_norm(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4)), "instance", kind="conv")
    assert type(conv_kind[1]).__name__ == "InstanceNorm"
    with pytest.raises(ValueError, match="Pass kind='dense' or kind='conv'"):
        convert_norm(nn.Sequential(nn.ReLU(), BatchNorm(4)), "layer")
