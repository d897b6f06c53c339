"""Running statistics under gradient accumulation: one update per optimizer step.

With gradient accumulation an optimizer step sums the gradients of k micro-batches. Each
micro-batch is normalized with its own statistics, as it must be, but a BN also updates its
running statistics once per micro-batch, from a batch k times smaller than the step's
(pytorch/pytorch#46516). Inside :func:`accumulate_bn` every BN keeps each micro-batch's
per-channel mean, biased variance and count instead, merges them exactly (count-weighted,
Chan, Golub & LeVeque, 1979; :class:`~bnlab.tools.PopulationStatistics`), and after k
micro-batches makes the one update that a forward of the concatenated batch would make:

    r ← (1 − w)·r + w·s,   s = the merged mean, and the merged variance (unbiased, M2/(n − 1),
                           with the whole group's count n, where the layer's convention is)

with the layer's own momentum and convention; ``num_batches_tracked`` grows by 1 per k.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.functional.batch_norm import channel_axis_index, get_convention, running_update
from bnlab.nn import BatchNorm
from bnlab.tools.common import (
    bn_axis,
    bn_call_input,
    bn_state,
    check_materialized,
    check_module,
    find_batch_norms,
    has_running_stats,
    input_moments,
    is_plain_batch_norm,
    sync_group,
    uses_batch_statistics,
)
from bnlab.tools.precise import PopulationStatistics, all_reduce_statistics

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class _Group:
    """One BN's micro-batches since its last update."""

    name: str
    stats: PopulationStatistics | None = None
    calls: int = 0
    # between the two hooks of a call: its moments, and the real buffers, set aside while the
    # layer updates copies (the real ones are never written, so no autograd graph that saved
    # them, as torch's BN does, sees them change)
    current: tuple[Tensor, Tensor, int] | None = None
    aside: dict[str, Tensor] = field(default_factory=dict)


def accumulate_bn(model: nn.Module, *, micro_batches: int) -> _AccumulateBN:
    """Inside the ``with`` block, update every BN's running statistics once per
    ``micro_batches`` training forwards, from the merged statistics of those micro-batches
    (module docstring): the update one forward of their concatenation would make.

    ::

        with accumulate_bn(model, micro_batches=8):
            for x, y in loader:                         # batches of 256
                optimizer.zero_grad()
                for xm, ym in zip(x.split(32), y.split(32)):
                    (loss_fn(model(xm), ym) / 8).backward()
                optimizer.step()

    Acts on bnlab's ``BatchNorm`` and ``SyncBatchNorm`` and torch's ``BatchNorm1d/2d/3d`` and
    ``SyncBatchNorm`` with running statistics, each counting its own training-mode calls (one
    forward of the model is one micro-batch; calls in eval mode, with ``use_global_stats`` or
    of a frozen BN change nothing and are not counted). A synchronized BN merges the
    micro-batches of every process (one all-reduce per BN and update). BN variants that
    compute something else (batch renorm, ghost BN) keep their per-call updates, with a
    warning. Forward outputs and gradients are exactly those without the block.

    At the end of the block an incomplete group (fewer than ``micro_batches`` calls since the
    last update) is applied from what it has, with a warning. If the block raises, the hooks
    are removed and the incomplete group is dropped.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: ``micro_batches`` is not a positive int; a BN is lazy.
    """
    check_module(model)
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(
            f"micro_batches: expected a positive int, the number of forwards per optimizer "
            f"step (e.g. 8 for a batch of 256 as 8 micro-batches of 32), got {micro_batches!r}."
        )
    bns: list[tuple[str, nn.Module]] = []
    for name, bn in find_batch_norms(model):
        if not has_running_stats(bn):
            continue
        check_materialized(bn, name)
        if is_plain_batch_norm(bn):
            bns.append((name, bn))
        else:
            warnings.warn(
                f"accumulate_bn: {name or 'model'} ({type(bn).__name__}) is a batch norm "
                "variant; it keeps updating its running statistics once per micro-batch.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _AccumulateBN(bns, micro_batches)


class _AccumulateBN:
    """The context manager :func:`accumulate_bn` returns."""

    def __init__(self, bns: list[tuple[str, nn.Module]], micro_batches: int) -> None:
        self._bns = bns
        self._k = micro_batches
        self._groups = {id(bn): _Group(name) for name, bn in bns}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> None:
        if self._handles:
            raise RuntimeError("accumulate_bn: this block is already active; do not nest it.")
        for _, bn in self._bns:
            self._handles.append(bn.register_forward_pre_hook(self._before, with_kwargs=True))
            self._handles.append(bn.register_forward_hook(self._after, with_kwargs=True))

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for _, bn in self._bns:  # a call that raised left its copies in place
            self._put_back(bn, self._groups[id(bn)])
        if exc_type is not None:  # the error propagates; half-accumulated groups are dropped
            for group in self._groups.values():
                group.stats, group.calls = None, 0
            return
        partial = [(bn, g) for _, bn in self._bns if (g := self._groups[id(bn)]).calls > 0]
        calls = sorted({g.calls for _, g in partial})
        for bn, group in partial:
            self._apply(bn, group)
        if partial:
            warnings.warn(
                f"accumulate_bn: the block ended after {'/'.join(map(str, calls))} of "
                f"{self._k} micro-batches of a group; the running statistics were updated from "
                "those. Make the number of forwards a multiple of micro_batches to avoid it.",
                RuntimeWarning,
                stacklevel=2,
            )

    @staticmethod
    def _put_back(bn: nn.Module, group: _Group) -> None:
        for name, t in group.aside.items():
            bn._buffers[name] = t
        group.aside = {}
        group.current = None

    def _before(self, bn: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        group = self._groups[id(bn)]
        self._put_back(bn, group)
        if not (bn.training and uses_batch_statistics(bn)):
            return  # this call does not update the running statistics
        x, mask = bn_call_input(args, kwargs)
        with torch.no_grad():
            group.current = input_moments(x, mask, channel_axis_index(bn_axis(bn), x.ndim))
        for name in _BUFFERS:
            t = bn._buffers.get(name)
            if t is not None:
                group.aside[name] = t
                bn._buffers[name] = t.clone()  # this call's own update goes to the copy

    def _after(
        self, bn: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        group = self._groups[id(bn)]
        if group.current is None:
            return
        mean, var, n = group.current
        self._put_back(bn, group)  # the call's own update is dropped with the copies
        if n > 0:
            if group.stats is None:
                group.stats = PopulationStatistics(mean.dtype)
            group.stats.update(mean, var, n)
        group.calls += 1
        if group.calls == self._k:
            self._apply(bn, group)

    def _apply(self, bn: nn.Module, group: _Group) -> None:
        """The group's one running update, as the concatenated batch would make it."""
        stats, group.stats, group.calls = group.stats, None, 0
        process_group = sync_group(bn)
        state = bn_state(bn)
        assert state.running_mean is not None and state.running_var is not None
        if process_group is not None:
            stats, _ = all_reduce_statistics(
                stats,
                state.running_mean.numel(),
                process_group,
                device=state.running_mean.device,
            )
        if stats is None or stats.count == 0:
            return
        _running_update(bn, stats)


def _running_update(bn: nn.Module, stats: PopulationStatistics) -> None:
    """One running update of ``bn`` from the batch whose statistics ``stats`` holds, with the
    layer's momentum and convention (bnlab's skip_nonfinite included)."""
    state = bn_state(bn)
    assert state.running_mean is not None and state.running_var is not None
    convention = get_convention(bn.convention if isinstance(bn, BatchNorm) else "torch")
    tracked = state.num_batches_tracked
    with torch.no_grad():
        new_mean, new_var = running_update(
            state.running_mean,
            state.running_var,
            stats.mean,
            stats.variance(unbiased=False),
            stats.count,
            convention=convention,
            momentum=state.momentum,
            num_batches_tracked=int(tracked) if tracked is not None else 0,
        )
        if isinstance(bn, BatchNorm):
            bn._store_running_stats(new_mean, new_var)
            return
        state.running_mean.copy_(new_mean)
        state.running_var.copy_(new_var)
        if tracked is not None:
            tracked.add_(1)


__all__ = ["accumulate_bn"]
