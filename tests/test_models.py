"""BN-LeNet: the chapter's layer sequence, shapes, options, and bnlab vs torch BN as oracle."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bnlab.nn
from bnlab.models import LeNet, init_weights, lenet
from bnlab.nn import BatchNorm


def chapter_net(norm: str) -> nn.Sequential:
    """The chapter's network written out by hand (the concise version for "torch")."""

    def bn(c: int, dims: int) -> list[nn.Module]:
        if norm == "none":
            return []
        if norm == "torch":
            return [nn.BatchNorm2d(c) if dims == 4 else nn.BatchNorm1d(c)]
        return [BatchNorm(c, num_dims=dims)]

    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5), *bn(6, 4), nn.Sigmoid(),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), *bn(16, 4), nn.Sigmoid(),
        nn.MaxPool2d(kernel_size=2, stride=2), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120), *bn(120, 2), nn.Sigmoid(),
        nn.Linear(120, 84), *bn(84, 2), nn.Sigmoid(),
        nn.Linear(84, 10),
    )  # fmt: skip


def signature(net: nn.Module) -> list[tuple]:
    """Each layer's type and defining hyperparameters."""
    out: list[tuple] = []
    for m in net.children():
        if isinstance(m, nn.Conv2d):
            sig: tuple = (m.in_channels, m.out_channels, m.kernel_size, m.padding, m.bias is None)
        elif isinstance(m, nn.Linear):
            sig = (m.in_features, m.out_features, m.bias is None)
        elif isinstance(m, BatchNorm):
            sig = (m.num_features, m.num_dims, m.eps, m.momentum, m.convention)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            sig = (m.num_features, m.eps, m.momentum)
        elif isinstance(m, nn.MaxPool2d | nn.AvgPool2d):
            sig = (m.kernel_size, m.stride)
        elif isinstance(m, nn.Dropout):
            sig = (m.p,)
        else:
            sig = ()
        out.append((type(m), *sig))
    return out


@pytest.mark.parametrize("norm", ["bnlab", "torch", "none"])
def test_layer_sequence_is_the_chapters(norm: str) -> None:
    net = lenet(norm)
    assert isinstance(net, LeNet)
    assert signature(net) == signature(chapter_net(norm))
    expected_norms = () if norm == "none" else (1, 5, 10, 13)
    assert net.norm_indices == expected_norms
    assert [net[i] for i in expected_norms] == net.norm_layers()


@pytest.mark.parametrize("norm", ["bnlab", "torch", "none"])
def test_shapes_through_the_network(norm: str) -> None:
    net = lenet(norm)
    x = torch.rand(5, 1, 28, 28)
    shapes = []
    for layer in net:
        x = layer(x)
        shapes.append(tuple(x.shape[1:]))
    conv = [(6, 24, 24)] * (3 if norm != "none" else 2) + [(6, 12, 12)]
    conv += [(16, 8, 8)] * (3 if norm != "none" else 2) + [(16, 4, 4), (256,)]
    dense = [(120,)] * (3 if norm != "none" else 2) + [(84,)] * (3 if norm != "none" else 2)
    assert shapes == [*conv, *dense, (10,)]


def test_bnlab_and_torch_norm_agree_from_identical_weights() -> None:
    torch.manual_seed(0)
    ref = init_weights(lenet("torch"))
    ours = lenet("bnlab")
    ours.load_state_dict(ref.state_dict())  # same keys: the BN state dicts are interchangeable
    x = torch.rand(64, 1, 28, 28)
    y = torch.randint(0, 10, (64,))
    for net in (ref, ours):
        nn.functional.cross_entropy(net(x), y).backward()
    # float32: torch's own result is ~2e-6 from float64 here, so 1e-5 is the honest bound
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)  # training mode
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, b), (_, c) in zip(ours.named_buffers(), ref.named_buffers(), strict=True):
        torch.testing.assert_close(b, c, msg=name)  # running statistics after the same batches
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_activation_position_and_layers() -> None:
    net = lenet("torch", activation="relu", norm_position="after", norm_layers="0,3")
    types = [type(m) for m in net]
    assert types[:4] == [nn.Conv2d, nn.ReLU, nn.BatchNorm2d, nn.MaxPool2d]
    assert types[-4:] == [nn.Linear, nn.ReLU, nn.BatchNorm1d, nn.Linear]
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net) == 2
    assert not any(isinstance(m, nn.Sigmoid) for m in net)
    for group, widths in (
        ("conv", [6, 16]),
        ("dense", [120, 84]),
        ("none", []),
        ([1, 2], [16, 120]),
    ):
        got = [m.num_features for m in lenet("bnlab", norm_layers=group).norm_layers()]
        assert got == widths, group


def test_bias_before_norm_dropout_pool_padding() -> None:
    net = lenet("bnlab", bias_before_norm=False, norm_layers="conv")
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert all(c.bias is None for c in convs)  # followed by BN: bias dropped
    assert all(lin.bias is not None for lin in linears)  # no BN after them
    # with the norm after the activation the affine layer's bias is not redundant: kept
    after = lenet("bnlab", bias_before_norm=False, norm_position="after")
    assert all(m.bias is not None for m in after if isinstance(m, nn.Conv2d))

    net = lenet("none", dropout=0.3, dropout_layers="all", pool="avg", first_conv_padding=2)
    assert [m.p for m in net if isinstance(m, nn.Dropout)] == [0.3] * 4
    assert sum(isinstance(m, nn.AvgPool2d) for m in net) == 2
    assert net[-1].in_features == 84
    flat = next(m for m in net if isinstance(m, nn.Linear))
    assert flat.in_features == 16 * 5 * 5  # the LeNet chapter's 28 -> 28 -> 14 -> 10 -> 5
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert not any(isinstance(m, nn.Dropout) for m in lenet("none", dropout=0.0))


def test_norm_options_reach_the_layers() -> None:
    net = lenet("bnlab", norm_options={"convention": "d2l", "momentum": 0.9, "eps": 1e-3})
    for m in net.norm_layers():
        assert (m.convention, m.momentum, m.eps) == ("d2l", 0.9, 1e-3)
    net = lenet("torch", norm_options={"momentum": 0.2})
    assert all(m.momentum == 0.2 for m in net.norm_layers())


def test_norm_factory_plugs_in_other_norms() -> None:
    calls: list[tuple[int, str]] = []

    def factory(c: int, kind: str) -> nn.Module:
        calls.append((c, kind))
        return nn.GroupNorm(2, c) if kind == "conv" else nn.LayerNorm(c)

    net = lenet(factory)
    assert calls == [(6, "conv"), (16, "conv"), (120, "dense"), (84, "dense")]
    assert [type(m) for m in net.norm_layers()] == [nn.GroupNorm] * 2 + [nn.LayerNorm] * 2
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_other_names_come_from_make_norm() -> None:
    net = lenet("layer", norm_options={"eps": 0.01})
    assert [type(m) for m in net.norm_layers()] == [bnlab.nn.LayerNorm] * 4
    assert all(m.eps == 0.01 for m in net.norm_layers())


def test_bnlab_is_the_registrys_batch_with_the_input_rank() -> None:
    """The names bnlab and batch are one path through the registry: the same layers, each
    checking the rank of the input it sees (4 after a conv, 2 after a dense layer)."""
    torch.manual_seed(0)
    a = lenet("bnlab")
    torch.manual_seed(0)
    b = lenet("batch")
    assert [type(m) for m in a.norm_layers()] == [bnlab.nn.BatchNorm] * 4
    assert [m.num_dims for m in a.norm_layers()] == [4, 4, 2, 2]
    assert [m.num_dims for m in b.norm_layers()] == [4, 4, 2, 2]
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(ValueError, match="rank"):
        a[1](torch.rand(4, 6, 24))  # a 3-D input to the conv block's BN


def test_unknown_norm_lists_every_accepted_name() -> None:
    with pytest.raises(ValueError, match="Did you mean 'batch'") as info:
        lenet("btach")
    names = {"bnlab", "torch", "none", *bnlab.nn.NORMS}
    assert all(repr(n) in str(info.value) for n in names)


def test_misspelt_norm_option_lists_the_accepted_ones() -> None:
    with pytest.raises(TypeError, match=r"norm='bnlab'.*\['momentu'\].*accepts:.*momentum"):
        lenet("bnlab", norm_options={"momentu": 0.9})


def test_the_norm_registry_by_name() -> None:
    """Names other than bnlab/torch/none build through bnlab.nn.make_norm with kind set."""
    net = lenet("group", norm_options={"num_groups": 2})
    assert [type(m) for m in net.norm_layers()] == [bnlab.nn.GroupNorm] * 4
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ValueError, match="instance"):
        lenet("instance")  # needs spatial axes: the dense layers cannot take it
    assert len(lenet("instance", norm_layers="conv").norm_layers()) == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"norm": 3}, TypeError, "norm: expected a name"),
        ({"norm_layers": "0,7"}, ValueError, "indices in 0-3"),
        ({"norm_layers": "convs"}, ValueError, "expected one of"),
        ({"norm_position": "middle"}, ValueError, "'before' or 'after'"),
        ({"activation": "swish2"}, ValueError, "activation: expected one of"),
        ({"pool": "min"}, ValueError, "pool: expected"),
        ({"dropout": 1.0}, ValueError, r"\[0, 1\)"),
        ({"image_size": 12}, ValueError, "image_size"),
        ({"norm": "none", "norm_options": {"eps": 1}}, ValueError, "takes no options"),
        ({"norm": "torch", "norm_options": {"convention": "d2l"}}, TypeError, "convention"),
    ],
)
def test_bad_arguments_say_what_was_expected(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        lenet(**kwargs)


def test_init_weights_is_xavier_uniform_and_leaves_the_rest() -> None:
    torch.manual_seed(1)
    net = lenet("bnlab")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert init_weights(net) is net
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    weights = {f"{i}.weight" for i, m in enumerate(net) if isinstance(m, nn.Conv2d | nn.Linear)}
    assert changed == weights  # biases, gamma, beta and running statistics untouched
    for m in net:
        if isinstance(m, nn.Conv2d | nn.Linear):
            w = m.weight.detach()
            receptive = w[0, 0].numel() if w.ndim == 4 else 1
            fan_in, fan_out = w.shape[1] * receptive, w.shape[0] * receptive
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            assert w.abs().max() <= bound
            assert w.abs().max() > 0.9 * bound  # uniform over the whole range
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.25)
    torch.manual_seed(1)
    again = init_weights(lenet("bnlab"))
    for k, v in net.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
