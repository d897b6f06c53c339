"""Identical running statistics on every process of a data-parallel run with per-process BN.

With plain (not synchronized) BN under DistributedDataParallel each process updates its running
statistics from its own part of every batch, so they drift apart, and whatever rank 0 saves is
one process's estimate (pytorch/pytorch#30718). :func:`sync_running_stats` replaces them, on
every process, by their combination over the P processes, treated as equal-sized samples:

    μ̂  = (1/P) Σ_p μ̂_p
    σ̂² = (1/P) Σ_p σ̂²_p + (1/P) Σ_p (μ̂_p − μ̂)²     (law of total variance)

``num_batches_tracked`` becomes the largest count. Computed in float64 from one all-gather of
every BN's statistics, in rank order, so the result is the same bit for bit on every process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from bnlab.nn.sync import ProcessGroup, _all_gather
from bnlab.tools.common import (
    ModuleT,
    bn_state,
    check_materialized,
    check_module,
    find_batch_norms,
    has_running_stats,
    stat_dtype,
)


def sync_running_stats(model: ModuleT, process_group: ProcessGroup = None) -> ModuleT:
    """Make every BN's running mean, variance and ``num_batches_tracked`` the same on all
    processes of ``process_group`` (default: all): the combination in the module docstring.

    Acts in place and returns ``model``. Every process of the group must call it with the
    same model. BNs are bnlab's and torch's (any subclass) with running statistics; a
    synchronized BN's statistics are already identical and stay so. Without an initialized
    ``torch.distributed``, or in a group of one process, it changes nothing.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: a BN is lazy, or the processes' models have different BNs (on every
            process, before anything is written).
    """
    check_module(model)
    if not (dist.is_available() and dist.is_initialized()):
        return model
    group = dist.group.WORLD if process_group is None else process_group
    world = dist.get_world_size(group)
    bns = [(name, bn) for name, bn in find_batch_norms(model) if has_running_stats(bn)]
    for name, bn in bns:
        check_materialized(bn, name)
    if world == 1:
        return model
    states = [bn_state(bn) for _, bn in bns]
    means = [s.running_mean for s in states]
    variances = [s.running_var for s in states]
    assert all(t is not None for t in means + variances)  # filtered above
    sizes = [t.numel() for t in means if t is not None]
    device = means[0].device if means and means[0] is not None else torch.device("cpu")
    comm = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    dtype = stat_dtype(device)
    # every process must hold the same BNs; compare (count, channels) before the gather
    shape = torch.tensor([len(sizes), sum(sizes)], dtype=torch.float64, device=comm)
    extremes = torch.cat([shape, -shape])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(extremes[:2], -extremes[2:]):
        raise ValueError(
            f"sync_running_stats: this process has {len(sizes)} BNs with {sum(sizes)} channels "
            "in all, another process a different set. Every process must pass the same model."
        )
    if not sizes:
        return model
    tracked = [
        float(s.num_batches_tracked) if s.num_batches_tracked is not None else 0.0 for s in states
    ]
    local = torch.cat(
        [
            *(t.detach().to(comm, dtype) for t in means if t is not None),
            *(t.detach().to(comm, dtype) for t in variances if t is not None),
            torch.tensor(tracked, dtype=dtype, device=comm),
        ]
    )
    gathered = local.new_empty(world * local.numel())
    _all_gather(gathered, local, group)
    table = gathered.view(world, local.numel()).to(device)  # (P, 2·ΣC + #BN), rank order
    total = sum(sizes)
    all_means, all_vars = table[:, :total], table[:, total : 2 * total]
    mean = all_means.mean(0)
    var = all_vars.mean(0) + (all_means - mean).square().mean(0)
    counts = table[:, 2 * total :].amax(0)
    with torch.no_grad():
        offset = 0
        for i, state in enumerate(states):
            assert state.running_mean is not None and state.running_var is not None
            size = sizes[i]
            _store(state.running_mean, mean[offset : offset + size])
            _store(state.running_var, var[offset : offset + size])
            if state.num_batches_tracked is not None:
                state.num_batches_tracked.fill_(int(counts[i]))
            offset += size
    return model


def _store(buffer: Tensor, value: Tensor) -> None:
    buffer.copy_(value.to(buffer.dtype))


__all__ = ["sync_running_stats"]
