"""Precise BN: population statistics from the whole data instead of a running average.

The chapter notes that after training the statistics should come from the whole dataset; the
exponential moving average that training keeps is biased toward the last batches and toward the
weights those batches saw. :func:`precise_bn` recomputes, for every BN, the mean and variance of
its input over all the given batches (Ioffe & Szegedy, 2015, Alg. 2, steps 8-10; fvcore's
``update_bn_stats``; Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021).

The per-batch statistics (mean m_b, biased variance v_b, count n_b per channel) are merged with
the parallel formula of Chan, Golub & LeVeque (1979), exact for uneven batches and free of the
E[x²] − E[x]² cancellation:

    n = n_a + n_b,   δ = m_b − m_a,   m = m_a + δ · n_b / n,
    M2 = M2_a + v_b · n_b + δ² · n_a · n_b / n,           var = M2 / n  (or M2 / (n − 1))

in float64 (float32 on MPS).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bnlab.functional.batch_norm import channel_axis_index, get_convention
from bnlab.functional.checks import check_float
from bnlab.functional.core import moments
from bnlab.nn import BatchNorm
from bnlab.tools.common import (
    ModuleT,
    bn_axis,
    bn_state,
    check_materialized,
    check_module,
    find_batch_norms,
    has_running_stats,
    stat_dtype,
    tensor_attr,
)

Mode = Literal["eval", "train"]


class PopulationStatistics:
    """Count-weighted per-channel mean and variance of a stream of batches (module docstring).

    ``update(mean, var, n)`` takes one batch's per-channel mean, *biased* variance and number of
    values per channel; :attr:`mean` and :meth:`variance` give the statistics of everything seen,
    equal (to rounding) to those of the concatenated data, however it was split.
    """

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self.count = 0
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None  # sum of squared deviations from the mean

    def update(self, mean: Tensor, var: Tensor, n: int) -> None:
        check_float(mean, "mean")
        check_float(var, "var")
        if mean.shape != var.shape:
            raise ValueError(
                f"mean and var: expected the same per-channel shape, got {tuple(mean.shape)} and "
                f"{tuple(var.shape)}."
            )
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(
                f"n: expected the positive number of values per channel in the batch, got {n!r}."
            )
        mean_b = mean.detach().to(self.dtype)
        m2_b = var.detach().to(self.dtype) * n
        if self._mean is None or self._m2 is None:
            self.count, self._mean, self._m2 = n, mean_b, m2_b
            return
        if mean_b.shape != self._mean.shape:
            raise ValueError(
                f"mean: expected shape {tuple(self._mean.shape)} as in earlier updates, got "
                f"{tuple(mean_b.shape)}."
            )
        total = self.count + n
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n / total)
        self._m2 = self._m2 + m2_b + delta.square() * (self.count * n / total)
        self.count = total

    @property
    def mean(self) -> Tensor:
        if self._mean is None:
            raise ValueError("no statistics yet: call update(mean, var, n) at least once.")
        return self._mean

    def variance(self, *, unbiased: bool) -> Tensor:
        """M2 / (n − 1) if ``unbiased`` (PyTorch's running variance), else M2 / n."""
        if self._m2 is None:
            raise ValueError("no statistics yet: call update(mean, var, n) at least once.")
        if unbiased and self.count < 2:
            raise ValueError(
                f"the unbiased variance needs at least 2 values per channel, got {self.count}. "
                "Give more data."
            )
        return self._m2 / (self.count - 1 if unbiased else self.count)


def _unbiased(bn: nn.Module) -> bool:
    """torch's BNs store the unbiased variance; bnlab's follow their named convention."""
    if isinstance(bn, BatchNorm):
        return get_convention(bn.convention).unbiased_running_var
    return True


def _batch_input(batch: Any, index: int) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, tuple | list) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(
        f"batches: expected each batch to be a tensor or an (x, y, ...) tuple/list whose first "
        f"element is the input tensor; batch {index} is {type(batch).__name__}. A DataLoader "
        "over a TensorDataset yields such tuples."
    )


def _check_args(batches: object, num_batches: object, mode: object) -> None:
    if isinstance(batches, Tensor) or not isinstance(batches, Iterable):
        raise TypeError(
            f"batches: expected an iterable of batches (a list, a DataLoader, a generator), got "
            f"{type(batches).__name__}. For one big tensor pass x.split(256), or [x]."
        )
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(
            f"num_batches: expected a positive int (use at most that many batches) or None (all "
            f"of them), got {num_batches!r}."
        )
    if mode not in ("eval", "train"):
        raise ValueError(
            f"mode: expected 'eval' (exact statistics of the prediction network) or 'train' "
            f"(upstream BNs use batch statistics, one pass), got {mode!r}."
        )


def precise_bn(
    model: ModuleT,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    mode: Mode = "eval",
) -> ModuleT:
    """Set every BN's running mean and variance to its input's statistics over ``batches``.

    Acts in place (it only writes values, like ``model.train()``) and returns ``model``. Runs
    under ``torch.no_grad()``; whatever happens, the BNs' training flags come back and the hooks
    are removed, and if a batch raises every running buffer is restored as it was.

    Args:
        model: calls ``model(x)`` for each batch. BNs are :class:`bnlab.nn.BatchNorm` and
            ``torch.nn.BatchNorm*d`` with running statistics; others (and
            :class:`bnlab.tools.FrozenBatchNorm`) are left alone. Only the BNs' mode is
            changed: put the rest in the mode you want first (``model.eval()`` turns dropout
            off, usually what you want).
        batches: tensors, or tuples/lists whose first element is the input (a DataLoader over
            ``(x, y)``), on the model's device. Uneven batch sizes are exact.
        num_batches: use at most the first ``num_batches`` batches (default: all).
        mode: "eval" (default): the statistics the prediction network sees. Every upstream BN
            normalizes with its *new* population statistics, so BNs are done one per pass in
            the order forward() calls them (one pass over the batches per BN; a one-shot
            iterable such as a DataLoader is kept in memory after the first pass; a list or
            tuple is re-read). The result does not depend on how the data is batched.
            "train": one pass with the BNs in training mode, so upstream BNs normalize with
            each batch's statistics, as during training (fvcore's precise BN); then the
            statistics of a deep BN depend on the batch size.

    The new running variance is unbiased, M2 / (n − 1), as PyTorch stores it (bnlab BNs with a
    biased convention such as "d2l" or "flax" get M2 / n). ``num_batches_tracked`` becomes the
    number of batches averaged, as if they had been fed with ``momentum=None`` (cumulative
    average), so continuing that way weights the next batch 1 / (k + 1).

    Raises:
        TypeError: ``model`` is not a module, ``batches`` is not an iterable of batches.
        ValueError: ``batches`` is empty, ``num_batches`` is not a positive int, a BN is lazy.
    """
    check_module(model)
    _check_args(batches, num_batches, mode)
    bns = [(name, bn) for name, bn in find_batch_norms(model) if has_running_stats(bn)]
    for name, bn in bns:
        check_materialized(bn, name)
    if not bns:
        return model
    names = {id(bn): name for name, bn in bns}
    flags = [(bn, bn.training) for _, bn in bns]
    buffers = [
        t
        for _, bn in bns
        for t in (
            tensor_attr(bn, "running_mean"),
            tensor_attr(bn, "running_var"),
            tensor_attr(bn, "num_batches_tracked"),
        )
        if t is not None
    ]
    snapshot = [t.clone() for t in buffers]
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        with torch.no_grad():
            for bn, _ in flags:
                bn.train(mode == "train")
            _run(model, bns, batches, num_batches, mode, handles, names)
    except BaseException:
        with torch.no_grad():
            for t, saved in zip(buffers, snapshot, strict=True):
                t.copy_(saved)
        raise
    finally:
        for handle in handles:
            handle.remove()
        for bn, was_training in flags:
            bn.train(was_training)
    return model


def _run(
    model: nn.Module,
    bns: list[tuple[str, nn.Module]],
    batches: Iterable[Any],
    num_batches: int | None,
    mode: Mode,
    handles: list[torch.utils.hooks.RemovableHandle],
    names: dict[int, str],
) -> None:
    stats: dict[int, PopulationStatistics] = {}
    order: list[nn.Module] = []  # BNs in the order forward() first calls them
    measuring: set[int] = set()  # ids of the BNs measured in the current pass
    first_pass = True

    def hook(bn: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if first_pass and all(b is not bn for b in order):
            order.append(bn)
            if mode == "eval" and len(order) == 1:
                measuring.add(id(bn))  # eval mode, pass 1: only the first BN is exact
        if id(bn) not in measuring:
            return
        x = args[0] if args else next(iter(kwargs.values()))  # bn(x) or bn(input=x)
        axis = channel_axis_index(bn_axis(bn), x.ndim)
        n = x.numel() // max(x.shape[axis], 1)
        if n == 0:
            return
        mean, var = moments(x, [d for d in range(x.ndim) if d != axis])
        stats.setdefault(id(bn), PopulationStatistics(stat_dtype(x.device))).update(mean, var, n)

    for _, bn in bns:
        handles.append(bn.register_forward_pre_hook(hook, with_kwargs=True))

    reread = isinstance(batches, Sequence)
    cache: list[Tensor] = []

    def one_pass() -> int:
        source: Iterable[Any] = batches if (first_pass or reread) else cache
        count = 0
        iterator: Iterator[Any] = iter(source)
        while num_batches is None or count < num_batches:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            x = _batch_input(batch, count) if (first_pass or reread) else batch
            if first_pass and not reread and mode == "eval" and len(bns) > 1:
                cache.append(x)
            model(x)
            count += 1
        if count == 0:
            raise ValueError(
                "batches: expected at least one batch, got an empty iterable. Pass the training "
                "data, e.g. a DataLoader or a list of input tensors."
            )
        return count

    if mode == "train":
        measuring.update(id(bn) for _, bn in bns)
        count = one_pass()
        for bn in order:
            if id(bn) in stats:
                _store(bn, stats[id(bn)], count)
    else:
        count = one_pass()
        first_pass = False
        pending = list(order)
        while pending:
            target = pending.pop(0)
            if id(target) not in stats:  # passes 2, 3, ...: measure the next BN in call order
                measuring.clear()
                measuring.add(id(target))
                one_pass()
            if id(target) in stats:  # else it saw only empty batches: left as it was
                _store(target, stats[id(target)], count)
    missed = [names[id(bn)] for _, bn in bns if all(b is not bn for b in order)]
    if missed:
        warnings.warn(
            f"precise_bn: forward() never called {missed}; their running statistics are unchanged.",
            RuntimeWarning,
            stacklevel=3,
        )


def _store(bn: nn.Module, stats: PopulationStatistics, count: int) -> None:
    state = bn_state(bn)
    assert state.running_mean is not None and state.running_var is not None  # filtered before
    state.running_mean.copy_(stats.mean.to(state.running_mean.dtype))
    variance = stats.variance(unbiased=_unbiased(bn))
    state.running_var.copy_(variance.to(state.running_var.dtype))
    tracked = state.num_batches_tracked
    if tracked is not None:
        tracked.fill_(count)


__all__ = ["PopulationStatistics", "precise_bn"]
