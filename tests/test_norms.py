"""The normalization family: torch's own modules as oracles where they exist (layer, group,
instance, batch norm), invariants where not (renorm reduces to BN, ghost with the full batch is
BN, whitened covariance is I, PIT marginals are standard normal), and bad input."""

from __future__ import annotations

import copy
import inspect
import math
import pickle
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.functional.checks import MismatchError
from bnlab.functional.norms import (
    batch_renorm,
    ghost_batch_norm,
    group_norm,
    instance_norm,
    layer_norm,
    renorm_limits,
)
from bnlab.functional.pit import (
    channel_quantiles,
    normal_scores,
    pit_norm,
    pit_transform,
    quantile_levels,
)
from bnlab.functional.whitening import (
    channel_groups,
    newton_schulz_whitening_matrix,
    whitening_norm,
    zca_whitening_matrix,
)
from bnlab.nn.batchnorm import BatchNorm
from bnlab.nn.norms import BatchRenorm, GhostBatchNorm, GroupNorm, InstanceNorm, LayerNorm
from bnlab.nn.pit import PITNorm
from bnlab.nn.whitening import DecorrelatedBatchNorm, IterNorm

F64 = torch.float64
TOL = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-4, 1e-5)}


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * 2 + 0.5).to(dtype)


def close(a: Tensor | None, b: Tensor | None, dtype: torch.dtype = F64) -> None:
    assert a is not None and b is not None
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


def set_affine(*modules: nn.Module) -> None:
    """Non-trivial γ, β (same values in every module) so their gradients are exercised."""
    for m in modules:
        w, b = getattr(m, "weight", None), getattr(m, "bias", None)
        if w is not None and b is not None:
            with torch.no_grad():
                w.copy_(torch.linspace(0.5, 1.5, w.numel()).reshape(w.shape))
                b.copy_(torch.linspace(-1, 1, b.numel()).reshape(b.shape))


def compare_modules(ours: nn.Module, ref: nn.Module, xs: list[Tensor], dtype: torch.dtype) -> None:
    """Outputs and input/γ/β gradients equal for each input in turn, running buffers after
    each step, then outputs in eval mode."""
    for i, x in enumerate(xs):
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = ours(xo), ref(xr)
        close(yo, yr, dtype)
        assert yo.dtype == x.dtype and yo.shape == x.shape
        dy = rand(*x.shape, seed=100 + i, dtype=dtype)
        yo.backward(dy)
        yr.backward(dy)
        close(xo.grad, xr.grad, dtype)
        for name in ("weight", "bias"):
            po, pr = getattr(ours, name, None), getattr(ref, name, None)
            assert (po is None) == (pr is None)
            if po is not None:
                close(po.grad, pr.grad, dtype)
        for name in ("running_mean", "running_var"):
            bo, br = getattr(ours, name, None), getattr(ref, name, None)
            assert (bo is None) == (br is None)
            if bo is not None:
                close(bo, br, dtype)
        ours.zero_grad()
        ref.zero_grad()
    ours.eval()
    ref.eval()
    close(ours(xs[0] * 1.5), ref(xs[0] * 1.5), dtype)


# ---------------------------------------------------------------------------------------------
# Layer, group, instance: torch as the oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(4, 6), (3, 6, 5), (3, 6, 4, 5)])
def test_layer_norm_matches_torch_in_both_affine_conventions(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    c = shape[1]
    x = [rand(*shape, seed=s, dtype=dtype) for s in range(2)]
    per_channel, gn = LayerNorm(c, dtype=dtype), nn.GroupNorm(1, c, dtype=dtype)
    set_affine(per_channel, gn)
    compare_modules(per_channel, gn, x, dtype)
    elementwise = LayerNorm(normalized_shape=shape[1:], dtype=dtype)
    ln = nn.LayerNorm(shape[1:], dtype=dtype)
    set_affine(elementwise, ln)
    compare_modules(elementwise, ln, x, dtype)
    assert elementwise.weight is not None and tuple(elementwise.weight.shape) == shape[1:]
    if len(shape) == 2:  # (N, C): the two conventions coincide with nn.LayerNorm(C)
        close(per_channel(x[1]), ln(x[1]), dtype)


GROUP_CASES = [((4, 6), 1), ((4, 6), 2), ((4, 6), 3), ((3, 6, 4, 5), 1), ((3, 6, 4, 5), 3)]
GROUP_CASES += [((3, 6, 4, 5), 6), ((2, 4, 3), 2)]


@pytest.mark.parametrize(("shape", "num_groups"), GROUP_CASES)
def test_group_norm_matches_torch(shape: tuple[int, ...], num_groups: int) -> None:
    x = [rand(*shape, seed=s) for s in range(2)]
    ours, ref = (
        GroupNorm(shape[1], num_groups=num_groups, dtype=F64),
        nn.GroupNorm(num_groups, shape[1], dtype=F64),
    )
    set_affine(ours, ref)
    compare_modules(ours, ref, x, F64)


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("shape", [(3, 4, 5), (3, 4, 3, 5)])
def test_instance_norm_matches_torch(shape: tuple[int, ...], affine: bool, track: bool) -> None:
    ref_cls = nn.InstanceNorm1d if len(shape) == 3 else nn.InstanceNorm2d
    ours = InstanceNorm(shape[1], affine=affine, track_running_stats=track, dtype=F64)
    ref = ref_cls(shape[1], affine=affine, track_running_stats=track, dtype=F64)
    set_affine(ours, ref)
    compare_modules(ours, ref, [rand(*shape, seed=s) for s in range(3)], F64)
    if track:  # counted here; torch's InstanceNorm leaves num_batches_tracked at 0
        assert int(ours.num_batches_tracked) == 3


def test_instance_norm_cumulative_momentum_averages_every_batch() -> None:
    """momentum=None: the average of each batch's statistics (torch's InstanceNorm would treat
    None as 0 and never update), each one torch's own update with momentum 1."""
    ours = InstanceNorm(4, momentum=None, track_running_stats=True, dtype=F64)
    means, variances = [], []
    for seed in range(3):
        x = rand(3, 4, 3, 3, seed=seed)
        ours(x)
        rm, rv = torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)
        F.instance_norm(x, rm, rv, use_input_stats=True, momentum=1.0)
        means.append(rm)
        variances.append(rv)
    close(ours.running_mean, torch.stack(means).mean(0))
    close(ours.running_var, torch.stack(variances).mean(0))


def test_functional_norms_mutate_nothing_and_equal_torch_functionals() -> None:
    x, w, b = rand(3, 4, 3, 3), torch.rand(4, dtype=F64), torch.randn(4, dtype=F64)
    rm, rv = torch.randn(4, dtype=F64), torch.rand(4, dtype=F64) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    close(group_norm(x, 2, w, b), F.group_norm(x, 2, w, b))
    close(layer_norm(x, w, b), F.group_norm(x, 1, w, b))
    ws, bs = torch.rand(4, 3, 3, dtype=F64), torch.randn(4, 3, 3, dtype=F64)
    close(layer_norm(x, ws, bs), F.layer_norm(x, (4, 3, 3), ws, bs))
    y, nm, nv = instance_norm(x, w, b, rm, rv, training=True, momentum=0.3)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    y_ref = F.instance_norm(x, rm0, rv0, w, b, use_input_stats=True, momentum=0.3)  # mutates
    close(y, y_ref)
    close(nm, rm0)
    close(nv, rv0)
    y_eval = instance_norm(x, w, b, nm, nv, training=False).y
    close(y_eval, F.instance_norm(x, rm0, rv0, w, b, use_input_stats=False))


def test_channels_last_and_half_precision_are_kept() -> None:
    x = rand(2, 4, 3, 3).float().contiguous(memory_format=torch.channels_last)
    for fn in (
        lambda t: layer_norm(t),
        lambda t: group_norm(t, 2),
        lambda t: instance_norm(t, training=True).y,
        lambda t: ghost_batch_norm(t, virtual_batch_size=1, training=True).y,
    ):
        y = fn(x)
        assert y.is_contiguous(memory_format=torch.channels_last)
        close(y, fn(x.contiguous()), torch.float32)
        y16 = fn(x.half())
        assert y16.dtype == torch.float16
        torch.testing.assert_close(y16.float(), y, rtol=1e-2, atol=1e-2)


def test_state_dicts_load_into_torch_and_back() -> None:
    pairs: list[tuple[nn.Module, nn.Module]] = [
        (LayerNorm(normalized_shape=(4, 3, 3)), nn.LayerNorm((4, 3, 3))),
        (GroupNorm(4, num_groups=2), nn.GroupNorm(2, 4)),
        (InstanceNorm(4, affine=True, track_running_stats=True), nn.InstanceNorm2d(4, True)),
        (BatchRenorm(4), nn.BatchNorm2d(4)),
        (GhostBatchNorm(4), nn.BatchNorm2d(4)),
    ]
    for ours, ref in pairs:
        if isinstance(ref, nn.InstanceNorm2d):
            ref = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        ours.train()(rand(2, 4, 3, 3).float())
        ref.load_state_dict(ours.state_dict())
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(v, ours.state_dict()[k])
        ours.load_state_dict(ref.state_dict())


# ---------------------------------------------------------------------------------------------
# Lazy channel inference, copy and pickle
# ---------------------------------------------------------------------------------------------


LAZY_CASES: list[tuple[type, dict[str, object]]] = [
    (LayerNorm, {}),
    (GroupNorm, {"num_groups": 2}),
    (InstanceNorm, {"affine": True, "track_running_stats": True}),
    (BatchRenorm, {}),
    (GhostBatchNorm, {"virtual_batch_size": 2}),
    (DecorrelatedBatchNorm, {"group_size": 4}),
    (IterNorm, {"group_size": 4}),
    (PITNorm, {"num_quantiles": 4}),
]


@pytest.mark.parametrize(("plain", "kwargs"), LAZY_CASES, ids=[c[0].__name__ for c in LAZY_CASES])
def test_lazy_layers_infer_channels_then_become_plain(
    plain: type, kwargs: dict[str, object]
) -> None:
    lazy = plain(**kwargs)
    assert type(lazy) is not plain and isinstance(lazy, plain)
    x = rand(4, 6, 3, 3).float()
    y = lazy(x)
    assert type(lazy) is plain and lazy.num_features == 6 and y.shape == x.shape
    eager = plain(6, **kwargs)
    assert {k: v.shape for k, v in lazy.state_dict().items()} == {
        k: v.shape for k, v in eager.state_dict().items()
    }
    for clone in (copy.deepcopy(lazy), pickle.loads(pickle.dumps(lazy))):
        assert type(clone) is plain
        torch.testing.assert_close(clone.eval()(x), lazy.eval()(x))


def test_lazy_group_norm_rejects_a_non_divisor_at_first_input_and_changes_nothing() -> None:
    gn = GroupNorm(num_groups=4)
    with pytest.raises(ValueError, match=r"num_groups: expected a divisor of the 6 input"):
        gn(torch.randn(2, 6, 3, 3))
    assert gn.num_features is None and type(gn) is not GroupNorm


# ---------------------------------------------------------------------------------------------
# One base for every channel norm: the same bookkeeping, BatchNorm's included
# ---------------------------------------------------------------------------------------------

ALL_CASES: list[tuple[type, dict[str, object]]] = [(BatchNorm, {}), *LAZY_CASES]
ALL_IDS = [c[0].__name__ for c in ALL_CASES]


def trained(plain: type, kwargs: dict[str, object]) -> nn.Module:
    """A 6-channel layer with non-trivial γ, β after one training step."""
    m = plain(6, **kwargs)
    set_affine(m)
    m(rand(4, 6, 3, 3, seed=1).float())
    return m


@pytest.mark.parametrize(("plain", "kwargs"), ALL_CASES, ids=ALL_IDS)
def test_a_lazy_layer_pickles_before_its_first_input_then_materializes_as_built(
    plain: type, kwargs: dict[str, object]
) -> None:
    """Pickled while lazy, the copy is still lazy; its first input (given by forward's own
    keyword) makes it the plain class, with the output and state of a layer built for C."""
    clone = pickle.loads(pickle.dumps(plain(**kwargs)))
    assert type(clone) is not plain and isinstance(clone, plain)
    assert clone.has_uninitialized_params()
    x = rand(4, 6, 3, 3).float()
    first = list(inspect.signature(plain.forward).parameters)[1]  # after self
    y = clone(**{first: x})
    assert type(clone) is plain and clone.num_features == 6
    built = plain(6, **kwargs)
    torch.testing.assert_close(y, built(x))
    for key, value in built.state_dict().items():
        torch.testing.assert_close(clone.state_dict()[key], value, msg=key)


@pytest.mark.parametrize(("plain", "kwargs"), ALL_CASES, ids=ALL_IDS)
def test_a_lazy_layer_takes_a_state_dict_before_its_first_input(
    plain: type, kwargs: dict[str, object]
) -> None:
    source = trained(plain, kwargs).eval()
    lazy = plain(**kwargs)
    lazy.load_state_dict(source.state_dict())
    x = rand(4, 6, 3, 3, seed=2).float()
    torch.testing.assert_close(lazy.eval()(x), source(x))
    assert type(lazy) is plain and lazy.num_features == 6


@pytest.mark.parametrize(("plain", "kwargs"), ALL_CASES, ids=ALL_IDS)
def test_reset_running_stats_and_reset_parameters_restore_a_fresh_layer(
    plain: type, kwargs: dict[str, object]
) -> None:
    m, fresh = trained(plain, kwargs), plain(6, **kwargs)
    trained_affine = {k: v.clone() for k, v in m.named_parameters()}
    m.reset_running_stats()  # the statistics only; γ and β keep their values
    for key, value in fresh.state_dict().items():
        expected = trained_affine.get(key, value)
        torch.testing.assert_close(m.state_dict()[key], expected, rtol=0, atol=0, msg=key)
    m(rand(4, 6, 3, 3, seed=3).float())
    m.reset_parameters()
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(m.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(("plain", "kwargs"), ALL_CASES, ids=ALL_IDS)
def test_every_norm_checks_num_features_and_channels_with_the_same_words(
    plain: type, kwargs: dict[str, object]
) -> None:
    for bad in (0, -2, 2.5, True, "6"):
        with pytest.raises(ValueError, match=r"num_features: expected a positive int"):
            plain(bad, **kwargs)
    m = plain(6, **kwargs)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    message = r"expected 6 channels on axis 1 \(num_features=6\), got input shape \(4, 4, 3, 3\)"
    with pytest.raises(MismatchError, match=message) as caught:
        m(rand(4, 4, 3, 3).float())
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, RuntimeError)
    for key, value in m.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_instance_norm_running_statistics_go_through_the_one_store() -> None:
    """skip_nonfinite as BatchNorm's: a batch with a NaN leaves the running statistics and the
    count as they were, with one warning per layer; without it the NaN goes in, as in torch's
    InstanceNorm2d."""
    x = rand(3, 4, 5, 5)
    bad = x.clone()
    bad[0, 1, 2, 2] = math.nan
    ours = InstanceNorm(4, track_running_stats=True, skip_nonfinite=True, dtype=F64)
    ours(x)
    after_one = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="InstanceNorm: a batch had non-finite statistics"):
        ours(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shown once per layer
        ours(bad)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, after_one[key]), key
    plain = InstanceNorm(4, track_running_stats=True, dtype=F64)
    ref = nn.InstanceNorm2d(4, track_running_stats=True, dtype=F64)
    plain(bad)
    ref(bad)
    assert bool(plain.running_mean.isnan().any())
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(plain, name), getattr(ref, name), equal_nan=True)
    assert int(plain.num_batches_tracked) == 1


def test_instance_norm_loads_a_version_1_checkpoint_without_a_count_as_torch() -> None:
    """torch's _NormBase rule, which its InstanceNorm shares: a version-1 dict has no
    num_batches_tracked, and the module keeps its own."""
    for m in (
        InstanceNorm(3, track_running_stats=True),
        nn.InstanceNorm2d(3, track_running_stats=True),
    ):
        state = m.state_dict()
        del state["num_batches_tracked"]
        state._metadata[""]["version"] = 1  # type: ignore[attr-defined]
        m.num_batches_tracked = torch.tensor(4)
        m.load_state_dict(state)
        assert int(m.num_batches_tracked) == 4


# ---------------------------------------------------------------------------------------------
# Batch renormalization
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 3, 5)])
def test_renorm_at_warmup_start_is_batch_norm(shape: tuple[int, ...]) -> None:
    """r = 1, d = 0 (rmax = 1, dmax = 0): torch's BatchNorm exactly, running stats included."""
    ours = BatchRenorm(shape[1], warmup_start=10, dtype=F64)
    ref = nn.BatchNorm2d(shape[1], dtype=F64) if len(shape) == 4 else nn.BatchNorm1d(3, dtype=F64)
    set_affine(ours, ref)
    assert ours.limits() == (1.0, 0.0)
    compare_modules(ours, ref, [rand(*shape, seed=s) * (s + 1) for s in range(3)], F64)


def test_renorm_by_hand() -> None:
    """x = [0, 2, 4, 6], running μ = 1, σ² = 1: μ_B = 3, σ²_B = 5, r = √5 clipped to 2,
    d = 2 clipped to 1; y = γ·((x - 3)/√5·2 + 1) + β; running: 0.9·1 + 0.1·3 and
    0.9·1 + 0.1·5·4/3 (unbiased)."""
    x = torch.tensor([[0.0], [2.0], [4.0], [6.0]], dtype=F64)
    eps = 1e-12
    gamma, beta = torch.tensor([2.0], dtype=F64), torch.tensor([0.5], dtype=F64)
    res = batch_renorm(
        x,
        gamma,
        beta,
        torch.ones(1, dtype=F64),
        torch.ones(1, dtype=F64),
        training=True,
        rmax=2.0,
        dmax=1.0,
        eps=eps,
    )
    expected = [2.0 * ((v - 3.0) / math.sqrt(5.0) * 2.0 + 1.0) + 0.5 for v in (0, 2, 4, 6)]
    close(res.y[:, 0], torch.tensor(expected, dtype=F64))
    close(res.r, torch.tensor([2.0], dtype=F64))
    close(res.d, torch.tensor([1.0], dtype=F64))
    close(res.running_mean, torch.tensor([0.9 + 0.3], dtype=F64))
    close(res.running_var, torch.tensor([0.9 + 0.1 * 5 * 4 / 3], dtype=F64))
    # unclipped: r = σ_B/σ and d = (μ_B - μ)/σ, and y = γ·((x - μ)/σ) + β exactly
    wide = batch_renorm(
        x,
        gamma,
        beta,
        torch.ones(1, dtype=F64),
        torch.ones(1, dtype=F64),
        training=True,
        rmax=10.0,
        dmax=10.0,
        eps=eps,
    )
    close(wide.r, torch.tensor([math.sqrt(5.0)], dtype=F64))
    close(wide.y, 2.0 * (x - 1.0) + 0.5)


def test_renorm_conv_statistics_are_over_n_h_w() -> None:
    x = rand(3, 2, 4, 5)
    rm, rv = torch.tensor([0.2, -0.4], dtype=F64), torch.tensor([0.5, 3.0], dtype=F64)
    res = batch_renorm(x, None, None, rm, rv, training=True, rmax=100.0, dmax=100.0, eps=1e-12)
    per_channel = x.transpose(0, 1).reshape(2, -1)  # (C, N·H·W)
    mu_b, sd_b = per_channel.mean(1), per_channel.std(1, correction=0)
    close(res.r, sd_b / rv.sqrt())
    close(res.d, (mu_b - rm) / rv.sqrt())


def test_renorm_gradient_treats_r_and_d_as_constants() -> None:
    """With r, d constants, y = r·BN(x) + d, so the input gradient for upstream g is torch
    BN's for upstream r·g (it would differ if r depended on σ_B in backprop)."""
    x = rand(6, 3, 2, 2)
    rm, rv = torch.tensor([1.0, -1.0, 0.0], dtype=F64), torch.tensor([0.3, 4.0, 2.0], dtype=F64)
    g = rand(6, 3, 2, 2, seed=5)
    xo = x.clone().requires_grad_()
    res = batch_renorm(xo, None, None, rm, rv, training=True, rmax=10.0, dmax=10.0)
    res.y.backward(g)
    assert res.r is not None and res.d is not None
    assert not torch.allclose(res.r, torch.ones(3, dtype=F64))  # the test has teeth
    xr = x.clone().requires_grad_()
    F.batch_norm(xr, None, None, training=True).backward(g * res.r.view(1, 3, 1, 1))
    close(xo.grad, xr.grad)
    # and γ's gradient is Σ g·(x̂·r + d)
    gamma = torch.ones(3, dtype=F64, requires_grad=True)
    batch_renorm(x, gamma, None, rm, rv, training=True, rmax=10.0, dmax=10.0).y.backward(g)
    xhat = F.batch_norm(x, None, None, training=True)
    expected = (g * (xhat * res.r.view(1, 3, 1, 1) + res.d.view(1, 3, 1, 1))).sum((0, 2, 3))
    close(gamma.grad, expected)


def test_renorm_warmup_schedule_and_module_steps() -> None:
    kw = dict(rmax=3.0, dmax=5.0, warmup_start=10, rmax_warmup_end=30, dmax_warmup_end=20)
    assert renorm_limits(0, **kw) == (1.0, 0.0)
    assert renorm_limits(10, **kw) == (1.0, 0.0)
    assert renorm_limits(15, **kw) == pytest.approx((1.5, 2.5))
    assert renorm_limits(20, **kw) == pytest.approx((2.0, 5.0))
    assert renorm_limits(1000, **kw) == (3.0, 5.0)
    m = BatchRenorm(2, rmax=2.0, dmax=1.0, warmup_start=0, rmax_warmup_end=2, dmax_warmup_end=2)
    seen = []
    for _ in range(3):
        seen.append(m.limits())
        m(rand(4, 2))
    assert seen == [(1.0, 0.0), (1.5, 0.5), (2.0, 1.0)]
    m.eval()  # prediction: batch norm with the running statistics
    x = rand(5, 2, seed=9)
    ref = F.batch_norm(x.float(), m.running_mean, m.running_var, m.weight, m.bias, eps=m.eps)
    close(m(x.float()), ref, torch.float32)


# ---------------------------------------------------------------------------------------------
# Ghost batch norm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 2, 3)])
def test_ghost_with_the_full_batch_is_batch_norm(shape: tuple[int, ...]) -> None:
    ours = GhostBatchNorm(shape[1], virtual_batch_size=shape[0], dtype=F64)
    ref = nn.BatchNorm2d(3, dtype=F64) if len(shape) == 4 else nn.BatchNorm1d(3, dtype=F64)
    set_affine(ours, ref)
    compare_modules(ours, ref, [rand(*shape, seed=s) for s in range(3)], F64)


def test_ghost_normalizes_each_virtual_batch_and_tracks_the_whole_batch() -> None:
    x = rand(7, 3, 2, 2) + torch.arange(7, dtype=F64).view(7, 1, 1, 1)  # batches differ
    w, b = torch.rand(3, dtype=F64), torch.randn(3, dtype=F64)
    rm, rv = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    y, new_mean, new_var = ghost_batch_norm(x, w, b, rm, rv, virtual_batch_size=3, training=True)
    chunks = [F.batch_norm(c, None, None, w, b, training=True) for c in x.split(3)]
    close(y, torch.cat(chunks))  # virtual batches of 3, 3 and 1·(2·2) values
    ref_mean, ref_var = rm.clone(), rv.clone()
    F.batch_norm(x, ref_mean, ref_var, training=True)  # the whole batch's update
    close(new_mean, ref_mean)
    close(new_var, ref_var)
    assert not torch.allclose(y, F.batch_norm(x, None, None, w, b, training=True))


# ---------------------------------------------------------------------------------------------
# Whitening: ZCA and IterNorm
# ---------------------------------------------------------------------------------------------


def correlated(n: int, c: int, seed: int = 0) -> Tensor:
    """(n, c) samples with a dense, well-conditioned covariance and non-zero means."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(c, dtype=F64) + 0.4 * torch.randn(c, c, generator=g, dtype=F64)
    return torch.randn(n, c, generator=g, dtype=F64) @ mix.T + torch.arange(c, dtype=F64)


def group_covariances(y: Tensor, group_size: int) -> list[Tensor]:
    yt = y.transpose(0, 1).reshape(y.shape[1], -1)
    yt = yt - yt.mean(1, keepdim=True)
    cov = yt @ yt.T / yt.shape[1]
    return [cov[s:e, s:e] for s, e in channel_groups(y.shape[1], group_size)]


def test_zca_matrix_is_the_symmetric_inverse_square_root() -> None:
    cov = torch.cov(correlated(200, 5).T, correction=0)
    eps = 1e-3
    w = zca_whitening_matrix(cov, eps)
    close(w, w.T)
    close(w @ (cov + eps * torch.eye(5, dtype=F64)) @ w, torch.eye(5, dtype=F64))
    assert bool((torch.linalg.eigvalsh(w) > 0).all())
    close(zca_whitening_matrix(cov.float(), eps), w, torch.float32)  # float64 eigh inside


def test_newton_schulz_converges_to_zca() -> None:
    cov = torch.cov(correlated(200, 4).T, correction=0)
    zca = zca_whitening_matrix(cov, 1e-5)
    errors = [
        (newton_schulz_whitening_matrix(cov, 1e-5, t) - zca).abs().max().item() for t in (1, 3, 8)
    ]
    assert errors[0] > errors[1] > errors[2]
    close(newton_schulz_whitening_matrix(cov, 1e-5, 40), zca)


@pytest.mark.parametrize("method", ["zca", "newton"])
@pytest.mark.parametrize(("shape", "group_size"), [((64, 6), 3), ((8, 5, 4, 4), 2)])
def test_whitened_output_covariance_is_identity_within_groups(
    method: str, shape: tuple[int, ...], group_size: int
) -> None:
    n, c = shape[0], shape[1]
    flat = correlated(n * math.prod(shape[2:]), c)  # (m, C)
    x = flat.reshape(n, *shape[2:], c).movedim(-1, 1).contiguous()
    y = whitening_norm(
        x, training=True, method=method, group_size=group_size, iterations=60, eps=1e-9
    ).y
    for cov in group_covariances(y, group_size):
        torch.testing.assert_close(cov, torch.eye(cov.shape[0], dtype=F64), atol=1e-6, rtol=0)
    x_covs = group_covariances(x, group_size)
    assert max((cv - torch.diag(cv.diagonal())).abs().max().item() for cv in x_covs) > 0.1
    close(y.mean((0, *range(2, y.ndim))), torch.zeros(c, dtype=F64))


def test_iternorm_at_t5_partially_whitens() -> None:
    """T = 5 leaves an ill-conditioned covariance partly unwhitened, more steps finish it."""
    x = correlated(256, 4)
    before = group_covariances(x, 4)[0]
    before = before / before.diagonal().mean()  # the scale is not what is being whitened
    eye = torch.eye(4, dtype=F64)
    dist = []
    for t in (1, 5, 20):
        y = whitening_norm(
            x, training=True, method="newton", group_size=4, iterations=t, eps=1e-9
        ).y
        dist.append((group_covariances(y, 4)[0] - eye).norm().item())
    assert (before - eye).norm().item() > dist[0] > dist[1] > 0.1 > 1e-3 > dist[2]


@pytest.mark.parametrize("cls", [DecorrelatedBatchNorm, IterNorm])
def test_whitening_running_state_and_prediction(cls: type) -> None:
    m = cls(5, group_size=2, momentum=1.0, dtype=F64)  # running := this batch's statistics
    set_affine(m)
    x = correlated(40, 5)
    y_train = m(x)
    assert int(m.num_batches_tracked) == 1
    assert torch.equal(m.running_whitening[:2, 2:], torch.zeros(2, 3, dtype=F64))  # blocks
    m.eval()
    close(m(x), y_train)  # prediction with the running (= batch) statistics
    close(m.running_mean, x.mean(0))
    m.reset_running_stats()
    close(m.running_whitening, torch.eye(5, dtype=F64))
    close(m(x), affine_only(m, x))  # identity whitening: γ·(x - 0) + β


def affine_only(m: nn.Module, x: Tensor) -> Tensor:
    return x * m.weight + m.bias


@pytest.mark.parametrize("method", ["zca", "newton"])
def test_whitening_gradients_match_finite_differences(method: str) -> None:
    x = correlated(6, 3).requires_grad_()
    w = torch.rand(3, dtype=F64, requires_grad=True)
    b = torch.randn(3, dtype=F64, requires_grad=True)

    def f(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return whitening_norm(x, w, b, training=True, method=method, group_size=2).y

    assert torch.autograd.gradcheck(f, (x, w, b))


# ---------------------------------------------------------------------------------------------
# Probability integral transform
# ---------------------------------------------------------------------------------------------


def ks_to_normal(z: Tensor) -> Tensor:
    """Kolmogorov–Smirnov distance of each channel's values (columns of (n, C)) to Φ."""
    zs = z.double().sort(0).values
    n = zs.shape[0]
    cdf = torch.special.ndtr(zs)
    hi = (torch.arange(1, n + 1, dtype=F64) / n)[:, None]
    return torch.maximum((cdf - hi + 1 / n).abs(), (cdf - hi).abs()).max(0).values


def skewed(n: int, seed: int) -> Tensor:
    """(n, 3): exponential, uniform and a shifted, scaled normal channel."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack(
        [
            -torch.rand(n, generator=g, dtype=F64).log(),
            torch.rand(n, generator=g, dtype=F64) * 4 - 1,
            torch.randn(n, generator=g, dtype=F64) * 3 + 5,
        ],
        1,
    )


def test_channel_quantiles_equal_numpy_hazen() -> None:
    x = skewed(101, 0)
    q = channel_quantiles(x, 8)
    ref = np.quantile(x.numpy(), quantile_levels(8, dtype=F64).numpy(), axis=0, method="hazen")
    np.testing.assert_allclose(q.numpy(), ref.T, rtol=1e-12)
    close(
        normal_scores(4),
        torch.tensor(
            [-1.1503493803760079, -0.3186393639643752, 0.3186393639643752, 1.1503493803760079]
        ).float(),
    )


def test_channel_quantiles_of_a_bounded_subsample_are_accurate() -> None:
    """A conv channel's N·H·W = 16384 values, quantiles from 4096 drawn at random: within a few
    standard errors sqrt(p(1-p)/4096) <= 0.008 of the true levels, in probability."""
    x = torch.randn(64, 2, 16, 16, generator=torch.Generator().manual_seed(0), dtype=F64)
    g = torch.Generator().manual_seed(1)
    q = channel_quantiles(x, 16, max_samples=4096, generator=g)
    levels = quantile_levels(16, dtype=F64).expand(2, -1)
    torch.testing.assert_close(torch.special.ndtr(q), levels, atol=0.03, rtol=0)
    again = channel_quantiles(x, 16, max_samples=4096, generator=torch.Generator().manual_seed(1))
    assert torch.equal(q, again)
    assert not torch.equal(q, channel_quantiles(x, 16))  # it did subsample


def test_pit_output_marginals_are_standard_normal_and_monotone() -> None:
    x = skewed(2048, 1)
    z = pit_norm(x, training=True, num_quantiles=32).y
    torch.testing.assert_close(z.mean(0), torch.zeros(3, dtype=F64), atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(3, dtype=F64), atol=0.03, rtol=0)
    assert bool((ks_to_normal(z) < 0.015).all())
    # raw exponential/uniform data is far from normal: the bound has teeth
    bn = F.batch_norm(x, None, None, training=True)
    assert bool((ks_to_normal(bn)[:2] > 0.05).all())
    order = x.argsort(0)
    zs = z.gather(0, order)
    assert bool((zs.diff(dim=0) >= 0).all())  # monotone per channel


def test_pit_prediction_uses_running_quantiles() -> None:
    m = PITNorm(3, num_quantiles=16, momentum=None, dtype=F64)  # cumulative average
    xs = [skewed(512, s) for s in range(4)]
    for x in xs:
        m(x)
    assert int(m.num_batches_tracked) == 4
    close(m.running_quantiles, torch.stack([channel_quantiles(x, 16) for x in xs]).mean(0))
    m.eval()
    fresh = skewed(4096, 99)  # unseen data: marginals still close to N(0, 1)
    z = m(fresh)
    assert bool((ks_to_normal(z) < 0.04).all())
    ramp = torch.linspace(-10, 20, 301, dtype=F64)[:, None].expand(-1, 3)
    assert bool((m(ramp).diff(dim=0) >= 0).all())  # monotone outside the data range too
    # momentum 1: the running knots are the batch's, so prediction equals training
    one = PITNorm(3, num_quantiles=16, momentum=1.0, dtype=F64)
    y_train = one(xs[0])
    close(one.eval()(xs[0]), y_train)


def test_pit_conv_input_ties_and_gradient() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(8, 2, 6, 6, generator=g, dtype=F64))  # half the values are 0
    x.requires_grad_()
    w = torch.ones(2, dtype=F64, requires_grad=True)
    y = pit_norm(x, w, None, training=True, num_quantiles=8).y
    assert y.shape == x.shape and bool(torch.isfinite(y).all())
    zeros = y.detach()[x.detach() == 0]
    assert bool((zeros == zeros[0]).all())  # tied values share one score
    positive = y.detach().transpose(0, 1)[x.detach().transpose(0, 1) > 0]
    assert bool((positive > zeros[0]).all())
    (y * torch.randn(y.shape, generator=g, dtype=F64)).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert x.grad.abs().sum() > 0 and w.grad is not None


def test_pit_gradient_is_the_local_slope_for_fixed_knots() -> None:
    """With knots held fixed, dT/dx = (z_{j+1} - z_j)/(q_{j+1} - q_j) on segment j."""
    q = torch.tensor([[-1.0, 0.0, 2.0, 3.0]], dtype=F64)
    z = normal_scores(4, dtype=F64)
    x = torch.tensor([[-2.0], [-0.5], [1.0], [2.5], [4.0]], dtype=F64, requires_grad=True)
    y = pit_transform(x, q)
    slopes = (z.diff() / q[0].diff()).tolist()
    expected_slope = torch.tensor([[slopes[i]] for i in (0, 0, 1, 2, 2)], dtype=F64)
    y.sum().backward()
    close(x.grad, expected_slope)
    close(y[2], z[1:2] + slopes[1] * 1.0)
    close(y[0], z[0:1] - slopes[0] * 1.0)  # linear extension below the first knot


# ---------------------------------------------------------------------------------------------
# Bad input: each public function, its message checked
# ---------------------------------------------------------------------------------------------

X = torch.randn(4, 6, 3, 3)
X2 = torch.randn(4, 6)
C6 = torch.zeros(6)
O6 = torch.ones(6)

BAD: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("gn-int", lambda: group_norm(X.long(), 2), TypeError, "floating-point"),
    ("gn-rank", lambda: group_norm(torch.randn(6), 2), ValueError, "rank >= 2"),
    ("gn-groups", lambda: group_norm(X, 4), ValueError, r"divisor of the 6 input.*\[1, 2, 3, 6\]"),
    ("gn-groups-type", lambda: group_norm(X, 2.0), TypeError, "num_groups: expected a positive"),
    ("gn-one-value", lambda: group_norm(X2, 6), ValueError, "more than 1 value per"),
    (
        "gn-weight",
        lambda: group_norm(X, 2, torch.ones(5)),
        ValueError,
        r"weight: expected shape \(6,\)",
    ),
    ("gn-eps", lambda: group_norm(X, 2, eps=0.0), ValueError, "eps: expected a positive"),
    (
        "ln-shape",
        lambda: layer_norm(X, torch.ones(3, 3)),
        ValueError,
        r"shape \(6,\) \(per channel\) or \(6, 3, 3\)",
    ),
    ("ln-one", lambda: layer_norm(torch.randn(3, 1)), ValueError, "more than 1 value per sample"),
    ("in-dense", lambda: instance_norm(X2, training=True), ValueError, "spatial"),
    (
        "in-running",
        lambda: instance_norm(X, running_mean=C6, training=True),
        ValueError,
        "both tensors or both None",
    ),
    (
        "in-momentum",
        lambda: instance_norm(
            X, None, None, torch.zeros(6), torch.ones(6), training=True, momentum=2.0
        ),
        ValueError,
        "momentum: expected a value in",
    ),
    (
        "rn-none",
        lambda: batch_renorm(X, None, None, None, O6, training=True, rmax=3, dmax=5),
        ValueError,
        "running_mean: batch renormalization needs",
    ),
    (
        "rn-rmax",
        lambda: batch_renorm(X, None, None, C6, O6, training=True, rmax=0.5, dmax=5),
        ValueError,
        "rmax: expected a float >= 1",
    ),
    (
        "rn-dmax",
        lambda: batch_renorm(X, None, None, C6, O6, training=True, rmax=3, dmax=-1),
        ValueError,
        "dmax: expected a float >= 0",
    ),
    (
        "rn-batch",
        lambda: batch_renorm(X2[:1], None, None, C6, O6, training=True, rmax=3, dmax=5),
        ValueError,
        "more than 1 value per channel",
    ),
    ("lim-step", lambda: renorm_limits(-1), ValueError, "step: expected a non-negative int"),
    (
        "lim-order",
        lambda: renorm_limits(0, warmup_start=10, rmax_warmup_end=5),
        ValueError,
        "rmax_warmup_end: expected a step >= warmup_start=10",
    ),
    (
        "gh-size",
        lambda: ghost_batch_norm(X, virtual_batch_size=0, training=True),
        ValueError,
        "virtual_batch_size: expected a positive",
    ),
    (
        "gh-last",
        lambda: ghost_batch_norm(torch.randn(5, 6), virtual_batch_size=2, training=True),
        ValueError,
        "multiple of virtual_batch_size",
    ),
    (
        "gh-impl",
        lambda: ghost_batch_norm(X, virtual_batch_size=2, training=True, impl="nope"),
        ValueError,
        "impl: expected one of",
    ),
    (
        "wh-method",
        lambda: whitening_norm(X, training=True, method="pca"),
        ValueError,
        r"method: expected one of \['zca', 'newton'\]",
    ),
    (
        "wh-group",
        lambda: whitening_norm(X, training=True, group_size=0),
        ValueError,
        "group_size: expected a positive",
    ),
    (
        "wh-running",
        lambda: whitening_norm(X, None, None, C6, torch.eye(5), training=True),
        ValueError,
        r"running_whitening: expected shape \(6, 6\)",
    ),
    (
        "wh-pair",
        lambda: whitening_norm(X, None, None, C6, None, training=True),
        ValueError,
        "both tensors or both None",
    ),
    (
        "wh-one",
        lambda: whitening_norm(X2[:1], training=True),
        ValueError,
        "more than 1 value per channel",
    ),
    (
        "zca-square",
        lambda: zca_whitening_matrix(torch.ones(2, 3)),
        ValueError,
        r"square matrices.*\(2, 3\)",
    ),
    ("zca-int", lambda: zca_whitening_matrix(torch.eye(2).long()), TypeError, "floating-point"),
    (
        "ns-iters",
        lambda: newton_schulz_whitening_matrix(torch.eye(2), 1e-5, 0),
        ValueError,
        "iterations: expected a positive int",
    ),
    ("pit-levels", lambda: quantile_levels(1), ValueError, "num_quantiles: expected at least 2"),
    (
        "pit-samples",
        lambda: channel_quantiles(X, 8, max_samples=0),
        ValueError,
        "max_samples: expected a positive",
    ),
    (
        "pit-running",
        lambda: pit_norm(X, running_quantiles=torch.zeros(6, 4), training=True),
        ValueError,
        r"running_quantiles: expected shape \(6, 32\)",
    ),
    (
        "pit-one",
        lambda: pit_norm(X2[:1], training=True),
        ValueError,
        "more than 1 value per channel",
    ),
    (
        "pit-knots",
        lambda: pit_transform(X, torch.zeros(5, 4)),
        ValueError,
        r"quantiles: expected a \(C, M\) tensor with C=6",
    ),
    (
        "pit-momentum",
        lambda: pit_norm(X, training=True, momentum=-0.1),
        ValueError,
        "momentum: expected a value in",
    ),
    (
        "m-features",
        lambda: GroupNorm(0, num_groups=1),
        ValueError,
        "num_features: expected a positive int",
    ),
    ("m-groups", lambda: GroupNorm(6, num_groups=4), ValueError, "divisor of the 6 input"),
    (
        "m-shape",
        lambda: LayerNorm(5, normalized_shape=(6, 3, 3)),
        ValueError,
        r"normalized_shape\[0\] == num_features",
    ),
    (
        "m-ln-input",
        lambda: LayerNorm(normalized_shape=(6, 2, 2))(X),
        ValueError,
        r"expected inputs of shape \(N, 6, 2, 2\)",
    ),
    (
        "m-channels",
        lambda: GroupNorm(4, num_groups=2)(X),
        ValueError,
        "expected 4 channels on axis 1",
    ),
    ("m-renorm", lambda: BatchRenorm(6, rmax=0.9), ValueError, "rmax: expected a float >= 1"),
    (
        "m-renorm-steps",
        lambda: BatchRenorm(6, warmup_start=5, dmax_warmup_end=1),
        ValueError,
        "dmax_warmup_end: expected a step",
    ),
    (
        "m-ghost",
        lambda: GhostBatchNorm(6, virtual_batch_size=0),
        ValueError,
        "virtual_batch_size: expected a positive",
    ),
    (
        "m-white",
        lambda: IterNorm(6, iterations=0),
        ValueError,
        "iterations: expected a positive int",
    ),
    (
        "m-pit",
        lambda: PITNorm(6, num_quantiles=1),
        ValueError,
        "num_quantiles: expected at least 2",
    ),
]


@pytest.mark.parametrize(("case", "call", "error", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_a_clear_error(
    case: str, call: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        call()


def test_bad_input_changes_no_module_state() -> None:
    m = InstanceNorm(6, track_running_stats=True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="spatial"):
        m(X2)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
