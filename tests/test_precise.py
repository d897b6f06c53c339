"""Precise BN: population statistics over all batches, against statistics computed directly on
the concatenated data (float64), re-batching invariance, and restoration on failure."""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from bnlab.nn import BatchNorm
from bnlab.tools import PopulationStatistics, precise_bn


def direct_stats(h: Tensor, unbiased: bool = True) -> tuple[Tensor, Tensor]:
    """Per-channel (axis 1) mean and variance of one big tensor, by torch's two-pass var."""
    dims = [d for d in range(h.ndim) if d != 1]
    return h.mean(dims), h.var(dims, correction=1 if unbiased else 0)


def split_uneven(x: Tensor, sizes: list[int]) -> list[Tensor]:
    assert sum(sizes) == len(x)
    return list(x.split(sizes))


# ---- the estimator ----------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[40], [1, 39], [7, 13, 5, 15], [10, 10, 10, 10], [39, 1]])
def test_estimator_equals_concatenated_statistics(sizes: list[int]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, 2, dtype=torch.float64, generator=gen) * 3 + 1
    est = PopulationStatistics()
    for part in split_uneven(x, sizes):
        var, mean = torch.var_mean(part, dim=(0, 2), correction=0)
        est.update(mean, var, part.numel() // 3)
    mean, var = direct_stats(x)
    torch.testing.assert_close(est.mean, mean, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(est.variance(unbiased=True), var, rtol=1e-13, atol=1e-13)
    biased = direct_stats(x, unbiased=False)[1]
    torch.testing.assert_close(est.variance(unbiased=False), biased, rtol=1e-13, atol=1e-13)
    assert est.count == 80


def test_estimator_has_no_cancellation() -> None:
    # mean 1e6, spread 1e-3: E[x²] − E[x]² loses every digit in float64, the merge keeps them
    gen = torch.Generator().manual_seed(1)
    x = 1e6 + 1e-3 * torch.randn(600, 2, dtype=torch.float64, generator=gen)
    est = PopulationStatistics()
    for part in split_uneven(x, [100, 250, 17, 233]):
        var, mean = torch.var_mean(part, dim=0, correction=0)
        est.update(mean, var, len(part))
    want = direct_stats(x)[1]
    naive = (x.square().mean(0) - x.mean(0).square()) * 600 / 599
    assert float(((naive - want) / want).abs().max()) > 1e-2  # the case is a hard one
    torch.testing.assert_close(est.variance(unbiased=True), want, rtol=1e-7, atol=0)


def test_estimator_bad_input() -> None:
    est = PopulationStatistics()
    with pytest.raises(ValueError, match="no statistics yet"):
        _ = est.mean
    with pytest.raises(ValueError, match="n: expected the positive number of values"):
        est.update(torch.zeros(2), torch.ones(2), 0)
    with pytest.raises(ValueError, match="mean and var: expected the same per-channel shape"):
        est.update(torch.zeros(2), torch.ones(3), 4)
    est.update(torch.zeros(2), torch.zeros(2), 1)
    with pytest.raises(ValueError, match="unbiased variance needs at least 2 values"):
        est.variance(unbiased=True)
    with pytest.raises(ValueError, match=r"mean: expected shape \(2,\) as in earlier updates"):
        est.update(torch.zeros(3), torch.ones(3), 2)


# ---- precise_bn on a model --------------------------------------------------------------------


def make_model(seed: int = 0) -> nn.Sequential:
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> flatten -> linear -> BN, bnlab and torch mixed,
    float64, with running statistics far from the data's (as after a short training)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),  # 0
        BatchNorm(4, num_dims=4),  # 1
        nn.ReLU(),  # 2
        nn.Conv2d(4, 3, 3),  # 3
        nn.BatchNorm2d(3),  # 4
        nn.ReLU(),  # 5
        nn.Flatten(),  # 6
        nn.Linear(12, 5),  # 7
        BatchNorm(5, momentum=None),  # 8
    ).double()
    with torch.no_grad():
        for i in (1, 4, 8):
            model[i].running_mean.fill_(3.0)
            model[i].running_var.fill_(0.25)
            model[i].num_batches_tracked.fill_(17)
            model[i].weight.uniform_(0.5, 1.5)
            model[i].bias.uniform_(-1, 1)
    return model


BN_AT = (1, 4, 8)


def data(n: int = 45, seed: int = 2) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, dtype=torch.float64, generator=gen) * 2 + 0.5


def reference_eval(model: nn.Sequential, x: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Layer by layer on the concatenated data: each BN's input computed with every earlier BN
    already set to its population statistics (the prediction network)."""
    ref = copy.deepcopy(model).eval()
    out = []
    with torch.no_grad():
        for i in BN_AT:
            mean, var = direct_stats(ref[:i](x))
            ref[i].running_mean.copy_(mean)
            ref[i].running_var.copy_(var)
            out.append((mean, var))
    return out


def assert_stats(model: nn.Sequential, expected: list[tuple[Tensor, Tensor]]) -> None:
    for i, (mean, var) in zip(BN_AT, expected, strict=True):
        torch.testing.assert_close(model[i].running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model[i].running_var, var, rtol=1e-12, atol=1e-12)


def test_eval_mode_equals_direct_statistics_of_the_prediction_network() -> None:
    model, x = make_model(), data()
    expected = reference_eval(model, x)
    batches = split_uneven(x, [16, 16, 13])
    assert precise_bn(model, batches) is model
    assert_stats(model, expected)
    for i in BN_AT:
        assert int(model[i].num_batches_tracked) == 3
        assert model[i].training  # the mode it had
    assert model[8].momentum is None and model[4].momentum == 0.1


@pytest.mark.parametrize(
    "sizes", [[45], [1, 44], [20, 20, 5], [7, 3, 11, 9, 15], [2] * 22 + [1]], ids=str
)
def test_eval_mode_rebatching_gives_the_same_statistics(sizes: list[int]) -> None:
    x = data()
    model = make_model()
    precise_bn(model, split_uneven(x, sizes))
    assert_stats(model, reference_eval(make_model(), x))


def test_train_mode_equals_direct_statistics_of_training_features() -> None:
    # mode="train": upstream BNs normalize with each batch's statistics (fvcore's precise BN).
    model, x = make_model(), data()
    sizes = [16, 16, 13]
    feats: dict[int, list[Tensor]] = {i: [] for i in BN_AT}
    ref = copy.deepcopy(model).train()
    with torch.no_grad():
        for part in split_uneven(x, sizes):
            for i in BN_AT:
                feats[i].append(ref[:i](part))  # BN inputs as a training forward computes them
    precise_bn(model, split_uneven(x, sizes), mode="train")
    assert_stats(model, [direct_stats(torch.cat(feats[i])) for i in BN_AT])
    # the first BN sees no other BN: its statistics do not depend on the batching
    torch.testing.assert_close(
        model[1].running_var, direct_stats(model[0](x))[1], rtol=1e-12, atol=0
    )


def test_biased_convention_gets_the_biased_variance() -> None:
    x = torch.randn(30, 3, dtype=torch.float64)
    model = nn.Sequential(BatchNorm(3, convention="d2l"), BatchNorm(3)).double()
    precise_bn(model, x.split(7))
    torch.testing.assert_close(model[0].running_var, x.var(0, correction=0), rtol=1e-12, atol=0)
    # the second BN sees the first one's output in eval mode with the new statistics
    h = model[0].eval()(x)
    torch.testing.assert_close(model[1].running_var, h.var(0, correction=1), rtol=1e-12, atol=0)


def test_batches_forms_num_batches_and_one_shot_iterators() -> None:
    x = data()
    y = torch.zeros(len(x))
    parts = split_uneven(x, [10, 10, 10, 15])
    expected = reference_eval(make_model(), torch.cat(parts[:3]))  # num_batches=3: first three
    for batches in (
        [(p, y[: len(p)]) for p in parts],  # (x, y) tuples
        (p for p in parts),  # a generator: read once, kept for the later passes
        iter([[p] for p in parts]),  # one-element lists
    ):
        model = make_model()
        precise_bn(model, batches, num_batches=3)
        assert_stats(model, expected)
        assert int(model[1].num_batches_tracked) == 3


def test_only_bn_modes_change_and_other_layers_keep_theirs() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), BatchNorm(3)).double()
    model[1].eval()  # the user turned dropout off; precise_bn must not turn it on
    model[2].train()
    x = torch.randn(20, 3, dtype=torch.float64)
    precise_bn(model, x.split(6))
    assert not model[1].training and model[2].training
    torch.testing.assert_close(
        model[2].running_mean, model[0](x).mean(0).detach(), rtol=1e-12, atol=0
    )


def failing_batches(x: Tensor, fail_at: int) -> Iterator[Tensor]:
    for i, part in enumerate(x.split(10)):
        if i == fail_at:
            raise RuntimeError("disk went away")
        yield part


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("fail_at", [1, 3])
def test_everything_is_restored_when_a_batch_raises(mode: str, fail_at: int) -> None:
    model = make_model()
    model[4].eval()  # mixed flags must come back exactly
    flags = [m.training for m in model.modules()]
    momenta = [model[i].momentum for i in BN_AT]
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="disk went away"):
        precise_bn(model, failing_batches(data(), fail_at), mode=mode)  # type: ignore[arg-type]
    assert [m.training for m in model.modules()] == flags
    assert [model[i].momentum for i in BN_AT] == momenta
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_bad_batch_type_is_reported_and_state_restored() -> None:
    model = make_model()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="batch 1 is dict"):
        precise_bn(model, [data(4), {"x": data(4)}])
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_bn_never_called_warns_and_is_left_alone() -> None:
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.BatchNorm1d(2)
            self.unused = nn.BatchNorm1d(2)

        def forward(self, x: Tensor) -> Tensor:
            return self.used(x)

    model = Partial()
    with pytest.warns(RuntimeWarning, match=r"never called \['unused'\]"):
        precise_bn(model, [torch.randn(5, 2)])
    assert torch.equal(model.unused.running_mean, torch.zeros(2))


def test_precise_bn_bad_input() -> None:
    model = make_model()
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module, got str"):
        precise_bn("resnet", [data()])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"For one big tensor pass x\.split\(256\)"):
        precise_bn(model, data())
    with pytest.raises(TypeError, match="expected an iterable of batches"):
        precise_bn(model, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected at least one batch, got an empty iterable"):
        precise_bn(model, [])
    with pytest.raises(ValueError, match="num_batches: expected a positive int"):
        precise_bn(model, [data()], num_batches=0)
    with pytest.raises(ValueError, match="mode: expected 'eval'"):
        precise_bn(model, [data()], mode="test")  # type: ignore[arg-type]
    lazy = nn.Sequential(nn.Linear(2, 2), BatchNorm())
    with pytest.raises(ValueError, match=r"Run one forward pass"):
        precise_bn(lazy, [torch.randn(4, 2)])


# ---- traps a new user falls into ----------------------------------------------------------


def _dropout_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), BatchNorm(3)).double()


def test_dropout_left_in_training_mode_warns_and_changes_the_statistics() -> None:
    x = torch.randn(400, 4, dtype=torch.float64)
    model = _dropout_net().train()
    with pytest.warns(RuntimeWarning, match=r"1 \(Dropout\) is in training mode.*model\.eval\(\)"):
        precise_bn(model, x.split(100))
    noisy = model[2].running_var.clone()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about now
        precise_bn(model, x.split(100))
    want = direct_stats(model[0](x).detach())[1]
    torch.testing.assert_close(model[2].running_var, want, rtol=1e-12, atol=0)
    assert bool((noisy > 1.5 * want).all())  # dropout's scaling by 1/(1-p) inflated it


def test_other_training_dependent_modules_are_named() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 1),
        nn.InstanceNorm2d(2, track_running_stats=True),
        nn.RReLU(),
        nn.BatchNorm2d(2),
        nn.InstanceNorm2d(2),  # no running statistics: same in both modes
    )
    with pytest.warns(RuntimeWarning) as caught:
        precise_bn(model, [torch.randn(4, 1, 3, 3)])
    messages = [str(w.message) for w in caught]
    assert any("1 (InstanceNorm2d), 2 (RReLU) are in training" in m for m in messages)
    # its running statistics are not among those precise_bn recomputes, and it says so
    assert any("1 (InstanceNorm2d) keeps its moving averages" in m for m in messages)


def _buffers(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_norms_it_does_not_recompute_are_named_and_left_alone() -> None:
    """Whitening and PIT layers keep running statistics of their own (a covariance, quantiles),
    which precise_bn does not recompute: it says so rather than let them pass for precise."""
    from bnlab.nn.registry import make_norm

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 1), BatchNorm(4), nn.Conv2d(4, 4, 1), make_norm("iternorm", 4, kind="conv")
    ).eval()
    before = _buffers(model[3])
    x = torch.randn(32, 1, 3, 3) * 3 + 1
    with pytest.warns(RuntimeWarning, match=r"^precise_bn: 3 \(IterNorm\) keeps its moving "):
        precise_bn(model, x.split(8))
    assert all(torch.equal(v, before[k]) for k, v in model[3].state_dict().items())
    want = direct_stats(model[0](x).detach())[0]
    torch.testing.assert_close(model[1].running_mean, want.to(torch.float32))
    model[3].train()  # now it would update its own statistics during the passes
    with pytest.warns(RuntimeWarning) as caught:
        precise_bn(model, x.split(8))
    assert any("3 (IterNorm) is in training mode" in str(w.message) for w in caught)


@pytest.mark.parametrize("norm", ["whitening", "pit"])
def test_a_model_without_bn_says_nothing_changed(norm: str) -> None:
    from bnlab.nn.registry import make_norm
    from bnlab.tools import adapt_bn

    model = nn.Sequential(nn.Conv2d(1, 4, 1), make_norm(norm, 4, kind="conv")).eval()
    before = _buffers(model)
    for fn in (precise_bn, functools.partial(adapt_bn, prior=0)):
        name = getattr(fn, "func", fn).__name__
        said = rf"^{name}: Sequential has no BatchNorm .* nothing was changed\. 1 \(\w+\) "
        with pytest.warns(RuntimeWarning, match=said + "keeps its moving averages"):
            fn(model, [torch.randn(8, 1, 3, 3)])
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.warns(RuntimeWarning, match=r"has no BatchNorm .* nothing was changed\.$"):
        precise_bn(nn.Linear(2, 2), [torch.randn(4, 2)])


def test_a_bn_only_model_warns_nothing() -> None:
    model = make_model().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precise_bn(model, [data()])


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_batch_is_refused_by_index_and_nothing_changes(mode: str, bad: float) -> None:
    model = make_model()
    state = copy.deepcopy(model.state_dict())
    batches = split_uneven(data(), [16, 16, 13])
    batches[2] = batches[2].clone()
    batches[2][3, 1, 2, 2] = bad
    with pytest.raises(ValueError, match=r"batch 2 gives 1 \(BatchNorm\) non-finite statistics"):
        precise_bn(model, batches, mode=mode)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_a_process_group_needs_torch_distributed() -> None:
    with pytest.raises(ValueError, match=r"process_group: given, but torch\.distributed is not"):
        precise_bn(make_model(), [data()], process_group=object())
