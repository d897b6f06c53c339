"""SyncBatchNorm against torch's BatchNorm on the concatenated batch, the converters, and the
failure behaviour of a distributed step.

Processes are started by bnlab.distributed.launch (gloo on 127.0.0.1, a free port, a bound on the
run); one run per world size holds many cases, since each process start costs seconds.
"""

from __future__ import annotations

import copy
import os
import signal
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnlab.distributed import DistributedRunError, launch
from bnlab.nn import BatchNorm, SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

RUN_BOUND_S = 240.0  # a hung run is ended and fails instead of blocking the suite


@dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]  # full batch, channels at `axis`
    splits: tuple[int, ...]  # samples per rank, summing to shape[0]
    momentum: float | None = 0.1
    axis: int = 1
    dtype: torch.dtype = torch.float64
    loc: float = 0.0  # mean of the inputs (a large one tests the variance's stability)
    spread: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("2d-equal", (12, 5), (4, 4, 4)),
    Case("2d-uneven", (10, 3), (1, 2, 7)),
    Case("2d-one-each", (3, 4), (1, 1, 1)),
    Case("4d-equal", (6, 3, 4, 5), (2, 2, 2)),
    Case("4d-uneven-cumulative", (7, 2, 3, 3), (3, 1, 3), momentum=None),
    Case("4d-empty-rank", (8, 3, 2, 3), (5, 0, 3)),
    Case("4d-empty-first-rank", (5, 2, 3, 2), (0, 4, 1)),
    Case("channels-last-axis", (6, 3, 4, 5), (1, 3, 2), axis=-1),
    Case("d2l-convention", (9, 4), (2, 3, 4), momentum=0.9, options={"convention": "d2l"}),
    Case("scale-only", (9, 4, 3), (4, 4, 1), options={"center": False}),
    Case("large-mean-float32", (12, 3, 4, 4), (3, 5, 4), dtype=torch.float32, loc=1e3, spread=0.1),
    Case("bfloat16", (8, 3, 4, 4), (2, 3, 3), dtype=torch.bfloat16),
]
STEPS = 2  # two steps: the running update starts from a non-trivial state


def case_data(case: Case, step: int) -> tuple[Tensor, Tensor]:
    """The full batch x and the upstream gradient g of one step (same in every process)."""
    gen = torch.Generator().manual_seed(1000 * CASES.index(case) + step)
    x = case.loc + case.spread * torch.randn(case.shape, generator=gen, dtype=torch.float64)
    g = torch.randn(case.shape, generator=gen, dtype=torch.float64)
    return x.to(case.dtype), g.to(case.dtype)


def case_affine(case: Case) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(7 + CASES.index(case))
    c = case.shape[case.axis]
    return 1 + 0.5 * torch.randn(c, generator=gen), 0.5 * torch.randn(c, generator=gen)


def _param_dtype(case: Case) -> torch.dtype:
    return torch.float64 if case.dtype == torch.float64 else torch.float32


def _make_sync(case: Case, **kw: Any) -> SyncBatchNorm:
    c = case.shape[case.axis]
    bn = SyncBatchNorm(
        c, momentum=case.momentum, axis=case.axis, dtype=_param_dtype(case), **case.options, **kw
    )
    w, b = case_affine(case)
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(w)
        if bn.bias is not None:
            bn.bias.copy_(b)
    return bn


def _rank_slice(case: Case, t: Tensor, rank: int) -> Tensor:
    start = sum(case.splits[:rank])
    return t[start : start + case.splits[rank]]


def _run_case(case: Case, rank: int) -> dict[str, Any]:
    """One rank's side: STEPS training steps of SyncBatchNorm on its slice, then eval."""
    bn = _make_sync(case)
    out: dict[str, Any] = {"y": [], "grad_x": [], "grad_w_local": [], "grad_w": [], "grad_b": []}
    for step in range(STEPS):
        x, g = case_data(case, step)
        xs = _rank_slice(case, x, rank).clone().requires_grad_(True)
        bn.zero_grad()
        y = bn(xs)
        (y.double() * _rank_slice(case, g, rank).double()).sum().backward()
        out["y"].append(y.detach())
        out["grad_x"].append(xs.grad)
        for key, p in (("grad_w", bn.weight), ("grad_b", bn.bias)):
            grad = torch.zeros(0) if p is None or p.grad is None else p.grad.clone()
            if key == "grad_w":
                out["grad_w_local"].append(grad.clone())
            if p is not None:
                dist.all_reduce(grad)  # what DistributedDataParallel sums (then averages)
            out[key].append(grad)
    out["running_mean"], out["running_var"] = bn.running_mean, bn.running_var
    out["num_batches_tracked"] = bn.num_batches_tracked
    bn.eval()
    with torch.no_grad():
        out["y_eval"] = bn(_rank_slice(case, case_data(case, 0)[0], rank))
    return out


@dataclass(frozen=True)
class MaskedCase:
    name: str
    shape: tuple[int, ...]  # one rank's batch, channels at `axis`
    splits: tuple[int, ...]  # samples per rank
    axis: int = 1
    no_valid_on: int | None = None  # a rank whose mask is all False


MASKED_CASES = [
    MaskedCase("masked-sequence", (0, 3, 6), (3, 0, 2)),
    MaskedCase("masked-channels-last", (0, 3, 4, 2), (2, 1, 2), axis=-1),
    MaskedCase("masked-rank-without-valid", (0, 2, 5), (2, 3, 2), no_valid_on=1),
]


def masked_data(case: MaskedCase, rank: int, step: int) -> tuple[Tensor, Tensor, Tensor]:
    """One rank's padded batch, its mask (the shape less the channel axis) and upstream grad."""
    gen = torch.Generator().manual_seed(500 * MASKED_CASES.index(case) + 10 * step + rank)
    shape = (case.splits[rank], *case.shape[1:])
    x = 1 + 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    axis = case.axis % len(shape)
    mask = torch.rand((*shape[:axis], *shape[axis + 1 :]), generator=gen) < 0.6
    if rank == case.no_valid_on:
        mask[:] = False
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x, mask, g


def _packed(t: Tensor, mask: Tensor, axis: int) -> Tensor:
    return t.movedim(axis, -1)[mask]  # (M, C): the valid values, channels last


def _run_masked(case: MaskedCase, rank: int) -> dict[str, Any]:
    c = case.shape[case.axis]
    bn = SyncBatchNorm(c, axis=case.axis, dtype=torch.float64)
    axis = case.axis % len(case.shape)
    out: dict[str, Any] = {"y": [], "grad_x": [], "grad_w": [], "grad_b": []}
    for step in range(STEPS):
        x, mask, g = masked_data(case, rank, step)
        x.requires_grad_(True)
        bn.zero_grad()
        y = bn(x, mask)
        (_packed(y, mask, axis) * _packed(g, mask, axis)).sum().backward()
        assert x.grad is not None and bn.weight is not None and bn.bias is not None
        out["y"].append(_packed(y.detach(), mask, axis))
        out["grad_x"].append(_packed(x.grad, mask, axis))
        out["padded_grad_x"] = x.grad.movedim(axis, -1)[~mask]
        for key, p in (("grad_w", bn.weight), ("grad_b", bn.bias)):
            grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad)
            out[key].append(grad)
    out["running_mean"], out["running_var"] = bn.running_mean, bn.running_var
    return out


def _main_worker() -> dict[str, Any]:
    rank = dist.get_rank()
    results: dict[str, Any] = {case.name: _run_case(case, rank) for case in CASES}
    results.update({case.name: _run_masked(case, rank) for case in MASKED_CASES})

    # masks with one valid value in all: every rank raises the same error
    bn = SyncBatchNorm(3, dtype=torch.float64)
    mask = torch.tensor([rank == 0, False])
    try:
        bn(torch.randn(2, 3, dtype=torch.float64), mask)
        results["too-few-valid"] = "no error"
    except ValueError as e:
        results["too-few-valid"] = str(e)

    # a total of one value per channel over all ranks: every rank raises the same error
    bn = SyncBatchNorm(3, dtype=torch.float64)
    x = torch.randn(1 if rank == 0 else 0, 3, dtype=torch.float64)
    try:
        bn(x)
        results["too-few"] = "no error"
    except ValueError as e:
        results["too-few"] = str(e)

    # a process group of ranks 0 and 1: rank 2 takes no part
    group = dist.new_group([0, 1])
    case = CASES[1]
    if rank in (0, 1):
        sub = _make_sync(case, process_group=group)
        x, _ = case_data(case, 0)
        results["group"] = sub(_rank_slice(case, x, rank)).detach()
        results["group_running_var"] = sub.running_var
    return results


def _torch_reference(case: Case) -> dict[str, Any]:
    """torch.nn.BatchNorm on the whole batch, in float64: the independent oracle."""
    ndim = len(case.shape)
    c = case.shape[case.axis]
    ref_cls = nn.BatchNorm1d if ndim in (2, 3) else nn.BatchNorm2d
    ref = ref_cls(c, momentum=case.momentum, dtype=torch.float64)
    w, b = case_affine(case)
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(b)
        if not case.options.get("center", True):
            ref.bias.zero_()
            ref.bias.requires_grad_(False)
    conv = case.options.get("convention", "torch")
    if conv == "d2l":  # d2l: momentum decays the old value, running variance biased
        ref.momentum = 1 - case.momentum if case.momentum is not None else None
    out: dict[str, Any] = {"y": [], "grad_x": [], "grad_w": [], "grad_b": [], "biased_var": []}
    for step in range(STEPS):
        x, g = case_data(case, step)
        x64 = x.double().requires_grad_(True)
        ref.zero_grad()
        y = ref(x64.movedim(case.axis, 1)).movedim(1, case.axis)
        (y * g.double()).sum().backward()
        out["y"].append(y.detach())
        out["grad_x"].append(x64.grad)
        out["grad_w"].append(ref.weight.grad)
        out["grad_b"].append(ref.bias.grad)
        dims = [d for d in range(ndim) if d != case.axis % ndim]
        out["biased_var"].append(x.double().var(dim=dims, correction=0))
    out["running_mean"], out["running_var"] = ref.running_mean, ref.running_var
    if conv == "d2l":  # torch's running variance is unbiased: rebuild the biased one
        m = 1 - case.momentum if case.momentum is not None else 0.0
        rv = torch.ones(c, dtype=torch.float64)
        for v in out["biased_var"]:
            rv = (1 - m) * rv + m * v
        out["running_var"] = rv
        with torch.no_grad():
            ref.running_var.copy_(rv)
    ref.eval()
    with torch.no_grad():
        x0 = case_data(case, 0)[0].double()
        out["y_eval"] = ref(x0.movedim(case.axis, 1)).movedim(1, case.axis)
    return out


def _tolerance(case: Case) -> dict[str, float]:
    if case.dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-10}
    if case.dtype == torch.float32:
        # at mean 1e3 and std 0.1, x - μ keeps ~4 digits in float32 and y = x·scale + shift
        # cancels ~1e4-sized terms: the local BatchNorm on the whole batch is off as much
        # (5e-4 in y, 5e-3 in ∂x, 3e-2 in ∂γ)
        return {"rtol": 5e-3, "atol": 5e-2}
    return {"rtol": 2e-2, "atol": 6e-2}  # bfloat16 keeps 8 bits of mantissa


@pytest.fixture(scope="module")
def world3() -> list[dict[str, Any]]:
    return launch(_main_worker, 3, backend="gloo", timeout_s=60, join_timeout_s=RUN_BOUND_S)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_sync_equals_torch_on_concatenated_batch(world3: list[dict[str, Any]], case: Case) -> None:
    ranks = [r[case.name] for r in world3]
    ref = _torch_reference(case)
    tol = _tolerance(case)
    for step in range(STEPS):
        for key in ("y", "grad_x"):
            got = torch.cat([r[key][step] for r in ranks]).double()
            torch.testing.assert_close(got, ref[key][step], **tol, msg=f"{key}, step {step}")
        for r in ranks:  # every rank sees the full-batch parameter gradient after the sum
            torch.testing.assert_close(r["grad_w"][step].double(), ref["grad_w"][step], **tol)
            if case.options.get("center", True):
                torch.testing.assert_close(r["grad_b"][step].double(), ref["grad_b"][step], **tol)
            else:
                assert r["grad_b"][step].numel() == 0
    for rank, r in enumerate(ranks):
        assert r["y"][0].shape[0] == case.splits[rank]
        if case.splits[rank] == 0:  # an empty batch contributes nothing to γ's gradient
            assert torch.equal(r["grad_w_local"][0], torch.zeros_like(r["grad_w_local"][0]))
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(r[key].double(), ref[key], **tol, msg=key)
        assert int(r["num_batches_tracked"]) == STEPS
        start = sum(case.splits[:rank])
        y_eval = ref["y_eval"][start : start + case.splits[rank]]
        torch.testing.assert_close(r["y_eval"].double(), y_eval, **tol, msg="eval")


@pytest.mark.parametrize("case", MASKED_CASES, ids=lambda c: c.name)
def test_masked_sync_equals_bn_on_the_concatenated_valid_values(
    world3: list[dict[str, Any]], case: MaskedCase
) -> None:
    """The oracle: torch's BatchNorm1d on every rank's packed valid values, concatenated."""
    ranks = [r[case.name] for r in world3]
    ref = nn.BatchNorm1d(case.shape[case.axis], dtype=torch.float64)
    axis = case.axis % len(case.shape)
    for step in range(STEPS):
        parts = [masked_data(case, rank, step) for rank in range(len(case.splits))]
        packed = torch.cat([_packed(x, m, axis) for x, m, _ in parts]).requires_grad_(True)
        g = torch.cat([_packed(g, m, axis) for _, m, g in parts])
        ref.zero_grad()
        y = ref(packed)
        (y * g).sum().backward()
        tol = {"rtol": 1e-10, "atol": 1e-10}
        torch.testing.assert_close(torch.cat([r["y"][step] for r in ranks]), y, **tol)
        torch.testing.assert_close(
            torch.cat([r["grad_x"][step] for r in ranks]), packed.grad, **tol
        )
        for r in ranks:
            torch.testing.assert_close(r["grad_w"][step], ref.weight.grad, **tol)
            torch.testing.assert_close(r["grad_b"][step], ref.bias.grad, **tol)
    for r in ranks:
        assert not r["padded_grad_x"].any()
        torch.testing.assert_close(r["running_mean"], ref.running_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r["running_var"], ref.running_var, rtol=1e-10, atol=1e-12)


def test_too_few_valid_values_raise_on_every_rank(world3: list[dict[str, Any]]) -> None:
    for r in world3:
        assert "got 1 True position in the masks of 3 processes" in r["too-few-valid"]


def test_large_mean_keeps_variance(world3: list[dict[str, Any]]) -> None:
    """mean 1e3, std 0.1 in float32: E[x²] - E[x]² would lose every digit of the variance."""
    case = next(c for c in CASES if c.name == "large-mean-float32")
    ref = _torch_reference(case)
    got = world3[0][case.name]["running_var"].double()
    torch.testing.assert_close(got, ref["running_var"], rtol=1e-5, atol=0.0)


def test_too_few_values_raise_on_every_rank(world3: list[dict[str, Any]]) -> None:
    for r in world3:
        assert "more than 1 value per channel" in r["too-few"]
        assert "3 processes" in r["too-few"]


def test_process_group_limits_the_statistics(world3: list[dict[str, Any]]) -> None:
    case = CASES[1]
    x, _ = case_data(case, 0)
    n01 = case.splits[0] + case.splits[1]
    ref = nn.BatchNorm1d(case.shape[1], dtype=torch.float64)
    w, b = case_affine(case)
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(b)
        y = ref(x[:n01])
    torch.testing.assert_close(torch.cat([world3[0]["group"], world3[1]["group"]]), y)
    for rank in (0, 1):
        torch.testing.assert_close(world3[rank]["group_running_var"], ref.running_var)
    assert "group" not in world3[2]


def _failing_worker() -> None:
    """Two SyncBatchNorm layers; mid-step, rank 1 raises and rank 2 is killed (as by the OOM
    killer); rank 0 waits in the second layer's collective."""
    first, second = SyncBatchNorm(3), SyncBatchNorm(3)
    h = first(torch.randn(4, 3))
    if dist.get_rank() == 1:
        raise ValueError("rank 1 fails on purpose")
    if dist.get_rank() == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    second(h)


def test_a_failing_rank_makes_the_others_fail_not_hang() -> None:
    with pytest.raises(DistributedRunError) as info:
        launch(_failing_worker, 3, backend="gloo", timeout_s=10, join_timeout_s=RUN_BOUND_S)
    err = info.value
    assert err.first.rank == 1
    assert err.first.error_type == "ValueError"
    assert "rank 1 fails on purpose" in str(err)
    survivor, killed = err.outcomes[0], err.outcomes[2]
    # rank 0 raised on its own, with a message that points at its peers
    assert survivor.error_type == "RuntimeError", survivor.summary()
    assert "SyncBatchNorm: the all-gather of batch statistics" in survivor.error
    assert "another process raised, crashed or is stuck" in survivor.error
    assert "killed by SIGKILL" in killed.summary()


# ---- one process: no process group, or a group of one -------------------------------------


def _single_process_pair(**kw: Any) -> tuple[BatchNorm, SyncBatchNorm]:
    torch.manual_seed(0)
    local = BatchNorm(4, dtype=torch.float64, **kw)
    with torch.no_grad():
        if local.weight is not None:
            local.weight.uniform_(0.5, 1.5)
        if local.bias is not None:
            local.bias.uniform_(-0.5, 0.5)
    synced = convert_sync_batchnorm(copy.deepcopy(local))
    assert isinstance(synced, SyncBatchNorm)
    return local, synced


def _assert_same_steps(local: nn.Module, synced: nn.Module, shape: tuple[int, ...]) -> None:
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = local(xa), synced(xb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        assert torch.equal(ya, yb)
        assert xa.grad is not None and xb.grad is not None
        assert torch.equal(xa.grad, xb.grad)
    for (name, a), (_, b) in zip(
        local.state_dict().items(), synced.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(local.named_parameters(), synced.named_parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        assert torch.equal(a.grad, b.grad), name


@pytest.mark.parametrize(
    "kw",
    [{}, {"momentum": None}, {"axis": -1}, {"use_global_stats": True}, {"convention": "keras"}],
    ids=["default", "cumulative", "channels-last", "global-stats", "keras"],
)
def test_without_process_group_equals_batchnorm_exactly(kw: dict[str, Any]) -> None:
    assert not dist.is_initialized()
    local, synced = _single_process_pair(**kw)
    shape = (6, 5, 3, 4) if kw.get("axis") == -1 else (6, 4, 3, 5)
    _assert_same_steps(local, synced, shape)


def test_world_size_one_equals_batchnorm_exactly() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        local, synced = _single_process_pair()
        _assert_same_steps(local, synced, (5, 4, 2, 3))
    finally:
        dist.destroy_process_group()


# ---- converters -----------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(2, 3, 3),
            nn.BatchNorm2d(3, eps=1e-3, momentum=0.2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, 5),
            nn.BatchNorm1d(5, momentum=None, affine=False),
        )
        self.head = BatchNorm(5, convention="flax", momentum=0.95, skip_nonfinite=True)
        self.tail = nn.BatchNorm3d(2, bias=False)


def test_convert_keeps_state_and_settings() -> None:
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():
        net.body(torch.randn(8, 2, 6, 6))  # give the torch layers non-trivial running stats
        net.head(torch.randn(8, 5))
        net.tail(torch.randn(3, 2, 2, 2, 2))
    reference = copy.deepcopy(net)
    net.eval()
    reference.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = dict(net.named_parameters())
    converted = convert_sync_batchnorm(net)
    assert converted is net
    bn2d, bn1d, head, tail = net.body[1], net.body[5], net.head, net.tail
    for layer in (bn2d, bn1d, head, tail):
        assert type(layer) is SyncBatchNorm
        assert not layer.training
    assert (bn2d.eps, bn2d.momentum, bn2d.num_dims, bn2d.affine) == (1e-3, 0.2, 4, True)
    assert (bn1d.momentum, bn1d.affine, bn1d.weight, bn1d.num_dims) == (None, False, None, None)
    assert (head.convention, head.momentum, head.skip_nonfinite) == ("flax", 0.95, True)
    assert (tail.scale, tail.center, tail.num_dims) == (True, False, 5)
    assert net.state_dict().keys() == before.keys()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, p in net.named_parameters():  # the same objects: an optimizer keeps working
        assert p is params[k], k
    x = torch.randn(4, 2, 6, 6)
    torch.testing.assert_close(net.body(x), reference.body(x), rtol=1e-6, atol=1e-6)
    x3 = torch.randn(2, 2, 2, 2, 2)
    torch.testing.assert_close(net.tail(x3), reference.tail(x3), rtol=1e-6, atol=1e-6)

    reverted = revert_sync_batchnorm(net)
    assert reverted is net
    for layer in (net.body[1], net.body[5], net.head, net.tail):
        assert type(layer) is BatchNorm
    assert (net.head.convention, net.head.momentum) == ("flax", 0.95)
    for k, p in net.named_parameters():
        assert p is params[k], k
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_convert_a_bare_layer_and_the_sync_layer_loads_torch_state() -> None:
    bn = nn.BatchNorm2d(3).train()
    sync = convert_sync_batchnorm(bn)
    assert isinstance(sync, SyncBatchNorm) and sync.training
    fresh = nn.BatchNorm2d(3)
    fresh.load_state_dict(sync.state_dict())
    assert isinstance(revert_sync_batchnorm(sync), BatchNorm)


def test_variants_are_left_alone_with_a_warning() -> None:
    class Variant(BatchNorm):  # e.g. batch renorm: its own statistics, not plain BN's
        pass

    class TorchVariant(nn.BatchNorm2d):
        pass

    model = nn.Sequential(Variant(3), TorchVariant(3), BatchNorm(3))
    with pytest.warns(RuntimeWarning, match="left unconverted"):
        convert_sync_batchnorm(model)
    assert [type(m) for m in model] == [Variant, TorchVariant, SyncBatchNorm]


def test_bad_input_is_explained() -> None:
    with pytest.raises(ValueError, match="Run one forward pass"):
        convert_sync_batchnorm(nn.Sequential(BatchNorm()))
    with pytest.raises(ValueError, match="lazy"):
        convert_sync_batchnorm(nn.LazyBatchNorm2d())
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        convert_sync_batchnorm("model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        revert_sync_batchnorm(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_features"):
        SyncBatchNorm(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="channels on axis 1"):
        SyncBatchNorm(3)(torch.randn(4, 2))


def test_positional_arguments_follow_torch_sync_batchnorm() -> None:
    # torch.nn.SyncBatchNorm(num_features, eps, momentum, affine, track_running_stats,
    # process_group, device, dtype)
    args = (3, 1e-3, 0.2, False, False, None, "cpu", torch.float64)
    ours, theirs = SyncBatchNorm(*args), nn.SyncBatchNorm(*args)
    for name in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.process_group is None and ours.weight is None and ours.running_mean is None
    assert SyncBatchNorm(4, dtype=torch.float64, num_dims=3).num_dims == 3
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)
