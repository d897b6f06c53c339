"""make_norm / NORMS: every name builds the right layer for conv and dense inputs, options pass
through, and misuse fails with a message that lists what is valid."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnlab.nn import registry
from bnlab.nn.batchnorm import BatchNorm
from bnlab.nn.norms import BatchRenorm, GhostBatchNorm, GroupNorm, InstanceNorm, LayerNorm
from bnlab.nn.pit import PITNorm
from bnlab.nn.registry import NORMS, NormBuilder, from_class, make_norm, register_norm
from bnlab.nn.whitening import DecorrelatedBatchNorm, IterNorm

EXPECTED: dict[str, dict[str, type]] = {
    "batch": {"conv": BatchNorm, "dense": BatchNorm},
    "torch-batch": {"conv": nn.BatchNorm2d, "dense": nn.BatchNorm1d},
    "layer": {"conv": LayerNorm, "dense": LayerNorm},
    "group": {"conv": GroupNorm, "dense": GroupNorm},
    "instance": {"conv": InstanceNorm},
    "renorm": {"conv": BatchRenorm, "dense": BatchRenorm},
    "ghost": {"conv": GhostBatchNorm, "dense": GhostBatchNorm},
    "whitening": {"conv": DecorrelatedBatchNorm, "dense": DecorrelatedBatchNorm},
    "iternorm": {"conv": IterNorm, "dense": IterNorm},
    "pit": {"conv": PITNorm, "dense": PITNorm},
    "none": {"conv": nn.Identity, "dense": nn.Identity},
}
INPUTS = {"conv": (8, 6, 4, 4), "dense": (8, 6)}
OPTIONS = {"group": {"num_groups": 3}}  # the paper's default of 32 does not divide 6
CASES = [(name, kind) for name, kinds in EXPECTED.items() for kind in kinds]


def test_the_required_names_are_registered() -> None:
    assert set(EXPECTED) <= set(NORMS)
    assert all(isinstance(b, NormBuilder) for b in NORMS.values())


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize(("name", "kind"), CASES)
def test_every_name_builds_its_layer_and_runs(name: str, kind: str, lazy: bool) -> None:
    m = make_norm(name, None if lazy else 6, kind=kind, **OPTIONS.get(name, {}))
    x = torch.randn(INPUTS[kind])
    y = m(x)
    assert isinstance(m, EXPECTED[name][kind]) and y.shape == x.shape
    if name != "none":
        assert getattr(m, "num_features", 6) == 6  # inferred when lazy
        m.eval()
        assert m(x).shape == x.shape


def test_builders_are_callable_directly_and_options_reach_the_layer() -> None:
    m = NORMS["group"](8, num_groups=4, eps=1e-3)
    assert isinstance(m, GroupNorm) and m.num_groups == 4 and m.eps == 1e-3
    ghost = make_norm("ghost", 6, virtual_batch_size=16, momentum=0.2)
    assert isinstance(ghost, GhostBatchNorm) and ghost.virtual_batch_size == 16
    assert ghost.momentum == 0.2
    renorm = make_norm("renorm", 6, kind="dense", rmax=2.0, warmup_start=0, rmax_warmup_end=0)
    assert isinstance(renorm, BatchRenorm) and renorm.limits() == (2.0, 0.0)
    torch_bn = make_norm("torch-batch", 6, kind="dense", momentum=0.3, affine=False)
    assert isinstance(torch_bn, nn.BatchNorm1d) and torch_bn.momentum == 0.3
    assert not torch_bn.affine
    assert isinstance(make_norm("torch-batch"), nn.LazyBatchNorm2d)
    dbn = make_norm("whitening", 6, group_size=3)
    assert isinstance(dbn, DecorrelatedBatchNorm) and dbn.group_size == 3
    ln = make_norm("layer", normalized_shape=(6, 4, 4))
    assert isinstance(ln, LayerNorm) and ln.weight is not None
    assert tuple(ln.weight.shape) == (6, 4, 4)


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"name: expected one of \['batch', .*'whitening'\]"):
        make_norm("batchnorm", 6)


def test_options_that_do_not_apply_are_rejected_with_the_valid_ones() -> None:
    with pytest.raises(TypeError, match=r"make_norm\('group'\): unexpected option\(s\) \['rmax'\]"):
        make_norm("group", 6, num_groups=3, rmax=3.0)
    with pytest.raises(TypeError, match=r"'layer' accepts: affine, device, dtype, eps"):
        make_norm("layer", 6, num_groups=2)
    with pytest.raises(TypeError, match=r"'none' accepts: none"):
        make_norm("none", 6, eps=1e-5)
    with pytest.raises(TypeError, match=r"\['virtual_batch_size'\]"):
        make_norm("batch", 6, virtual_batch_size=4)


def test_bad_kind_and_unsupported_kind() -> None:
    with pytest.raises(ValueError, match=r"kind: expected 'conv' .* or 'dense' .*, got 'linear'"):
        make_norm("batch", 6, kind="linear")
    with pytest.raises(ValueError, match=r"make_norm\('instance'\): kind='dense' is not supported"):
        make_norm("instance", 6, kind="dense")


def test_bad_values_are_reported_by_the_layer() -> None:
    with pytest.raises(ValueError, match=r"num_groups: expected a divisor of the 6 input"):
        make_norm("group", 6, num_groups=4)
    with pytest.raises(ValueError, match=r"num_features: expected a positive int"):
        make_norm("none", 0)


def test_register_norm_adds_a_name_and_guards_existing_ones() -> None:
    builder = from_class(GroupNorm, "group norm with two groups")
    with pytest.raises(ValueError, match=r"'group' is already registered. Pass replace=True"):
        register_norm("group", builder)
    with pytest.raises(TypeError, match=r"builder: expected a NormBuilder"):
        register_norm("pairs", GroupNorm)
    register_norm("test-pairs", builder)
    try:
        m = make_norm("test-pairs", 4, num_groups=2)
        assert isinstance(m, GroupNorm) and m.num_groups == 2
    finally:
        registry._NORMS.pop("test-pairs")  # leave the registry as it was
    with pytest.raises(TypeError):
        NORMS["x"] = builder  # read-only view


@pytest.mark.parametrize(
    ("name", "torch_layer", "sizes"),
    [
        ("group", nn.GroupNorm(3, 6), {"num_groups": 3, "num_channels": 6}),
        ("layer", nn.LayerNorm((6, 4, 4)), {"normalized_shape": (6, 4, 4)}),
        ("torch-batch", nn.BatchNorm2d(6), {"num_features": 6}),
        ("batch", nn.BatchNorm2d(6), {"num_features": 6}),
        ("instance", nn.InstanceNorm2d(6), {"num_features": 6}),
    ],
)
def test_torch_argument_names_build_the_same_layer(
    name: str, torch_layer: nn.Module, sizes: dict
) -> None:
    m = make_norm(name, **sizes)
    x = torch.randn(INPUTS["conv"])
    torch.testing.assert_close(m(x), torch_layer(x))


def test_a_size_given_twice_must_agree() -> None:
    assert make_norm("group", 6, num_groups=3, num_channels=6).num_features == 6
    with pytest.raises(TypeError, match=r"num_features=6 and num_channels=8 .* differ"):
        make_norm("group", 6, num_groups=2, num_channels=8)
