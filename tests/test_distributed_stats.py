"""Statistics across processes: precise_bn over every rank's share of the data equals precise_bn
on all of it in one process; sync_running_stats gives every rank the law-of-total-variance
combination; accumulate_bn with SyncBatchNorm equals BN on every rank's micro-batches
concatenated. 3 gloo processes on 127.0.0.1, one run for every case, bounded in time."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnlab.distributed import launch, sync_running_stats
from bnlab.nn import BatchNorm, SyncBatchNorm
from bnlab.tools import accumulate_bn, precise_bn

RUN_BOUND_S = 240.0
WORLD = 3
SHARES = ([0, 1, 2], [3], [])  # batch indices per rank: uneven, and rank 2 has none
BATCH_SIZES = [9, 4, 11, 6]


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        BatchNorm(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12, 4),
        nn.BatchNorm1d(4),
    ).double()
    with torch.no_grad():
        for i in (1, 5):
            model[i].running_mean.fill_(2.0)
            model[i].running_var.fill_(0.5)
            model[i].weight.uniform_(0.5, 1.5)
            model[i].bias.uniform_(-1, 1)
    return model


def _batches() -> list[Tensor]:
    gen = torch.Generator().manual_seed(4)
    return [torch.randn(n, 2, 4, 4, generator=gen, dtype=torch.float64) + 1 for n in BATCH_SIZES]


def _precise(rank: int, mode: str) -> dict[str, Tensor]:
    batches = _batches()
    model = _model()
    precise_bn(model, [batches[i] for i in SHARES[rank]], mode=mode)  # type: ignore[arg-type]
    return model.state_dict()


def _precise_nan(rank: int) -> dict[str, Any]:
    batches = _batches()
    mine = [batches[i] for i in SHARES[rank]]
    if rank == 1:
        mine[0] = mine[0].clone()
        mine[0][0, 0, 0, 0] = float("nan")
    model = _model()
    before = copy.deepcopy(model.state_dict())
    try:
        precise_bn(model, mine)
        error = "no error"
    except (ValueError, RuntimeError) as e:
        error = f"{type(e).__name__}: {e}"
    same = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    return {"error": error, "restored": same}


def _stats_model() -> nn.Sequential:
    return nn.Sequential(BatchNorm(3), nn.BatchNorm1d(2), BatchNorm(4, convention="d2l"))


def _rank_stats(rank: int) -> dict[str, Tensor]:
    """Per-rank running statistics as per-process BN would have drifted them apart."""
    model = _stats_model()
    gen = torch.Generator().manual_seed(100 + rank)
    with torch.no_grad():
        for i, bn in enumerate(model):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 3)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.1)
            bn.num_batches_tracked.fill_(10 * rank + i)
    return model.state_dict()


def _sync(rank: int) -> dict[str, Any]:
    model = _stats_model()
    model.load_state_dict(_rank_stats(rank))
    assert sync_running_stats(model) is model
    out: dict[str, Any] = {"synced": model.state_dict()}
    other = _stats_model() if rank != 2 else nn.Sequential(*_stats_model(), nn.BatchNorm1d(5))
    try:
        sync_running_stats(other)
        out["mismatch"] = "no error"
    except ValueError as e:
        out["mismatch"] = str(e)
    return out


ACC_SIZES = ((4, 0), (2, 5), (3, 3))  # per rank, the two micro-batches of a group


def _micro(step: int, rank: int, j: int) -> Tensor:
    gen = torch.Generator().manual_seed(1000 * step + 10 * rank + j)
    return 2 + torch.randn(ACC_SIZES[rank][j], 3, 2, generator=gen, dtype=torch.float64)


def _accumulate(rank: int) -> dict[str, Tensor]:
    bn = SyncBatchNorm(3, dtype=torch.float64)
    with accumulate_bn(bn, micro_batches=2):
        for step in range(2):
            for j in range(2):
                bn(_micro(step, rank, j)).sum().backward()
    return bn.state_dict()


def _worker() -> dict[str, Any]:
    rank = dist.get_rank()
    return {
        "eval": _precise(rank, "eval"),
        "train": _precise(rank, "train"),
        "nan": _precise_nan(rank),
        "sync": _sync(rank),
        "accumulate": _accumulate(rank),
    }


@pytest.fixture(scope="module")
def world() -> list[dict[str, Any]]:
    return launch(_worker, WORLD, backend="gloo", timeout_s=60, join_timeout_s=RUN_BOUND_S)


def _assert_states(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-12, msg=key)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_precise_bn_over_processes_equals_one_process_on_all_data(
    world: list[dict[str, Any]], mode: str
) -> None:
    reference = _model()
    precise_bn(reference, _batches(), mode=mode)  # type: ignore[arg-type]
    want = reference.state_dict()
    assert int(want["1.num_batches_tracked"]) == len(BATCH_SIZES)
    for rank in range(WORLD):
        _assert_states(world[rank][mode], want)
    for key in want:  # bit for bit the same on every rank
        assert all(torch.equal(world[r][mode][key], world[0][mode][key]) for r in range(WORLD))


def test_a_non_finite_batch_on_one_rank_stops_every_rank_and_restores(
    world: list[dict[str, Any]],
) -> None:
    errors = [world[r]["nan"]["error"] for r in range(WORLD)]
    assert errors[1].startswith("ValueError: precise_bn: batch 0 on rank 1 gives 1 (BatchNorm)")
    for r in (0, 2):
        assert errors[r].startswith("RuntimeError: precise_bn: process 1 of the group failed")
    assert all(world[r]["nan"]["restored"] for r in range(WORLD))


def test_sync_running_stats_is_the_law_of_total_variance(world: list[dict[str, Any]]) -> None:
    before = [_rank_stats(r) for r in range(WORLD)]
    for i in range(3):
        means = torch.stack([b[f"{i}.running_mean"].double() for b in before])  # (P, C)
        variances = torch.stack([b[f"{i}.running_var"].double() for b in before])
        mean = means.sum(0) / WORLD
        var = variances.sum(0) / WORLD + ((means - mean) ** 2).sum(0) / WORLD
        for r in range(WORLD):
            got = world[r]["sync"]["synced"]
            torch.testing.assert_close(got[f"{i}.running_mean"].double(), mean, rtol=1e-6, atol=0)
            torch.testing.assert_close(got[f"{i}.running_var"].double(), var, rtol=1e-6, atol=0)
            assert int(got[f"{i}.num_batches_tracked"]) == 10 * (WORLD - 1) + i  # the largest
            for key, value in got.items():
                assert torch.equal(value, world[0]["sync"]["synced"][key]), key


def test_sync_running_stats_refuses_different_models(world: list[dict[str, Any]]) -> None:
    for r in range(WORLD):
        assert "another process a different set" in world[r]["sync"]["mismatch"]


def test_sync_running_stats_without_torch_distributed_changes_nothing() -> None:
    model = _stats_model()
    state = copy.deepcopy(model.state_dict())
    assert sync_running_stats(model) is model
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module"):
        sync_running_stats([model])  # type: ignore[type-var]


def test_accumulate_bn_with_sync_batchnorm_merges_every_rank(world: list[dict[str, Any]]) -> None:
    reference = nn.BatchNorm1d(3, dtype=torch.float64)
    for step in range(2):
        group = [_micro(step, r, j) for r in range(WORLD) for j in range(2)]
        reference(torch.cat(group))
    for r in range(WORLD):
        _assert_states(world[r]["accumulate"], reference.state_dict())
