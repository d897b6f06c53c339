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

in float64 (float32 on MPS). Under ``torch.distributed`` each process measures its own share of
the data and the per-process (n, mean, M2) are merged the same way (one all-reduce per BN), so
every process ends with the statistics of the union of their data.

A batch that gives a BN non-finite statistics (NaN or Inf in its input) is refused with its
index, and every running statistic is restored; modules other than BN that behave differently in
training (dropout, RReLU, norms with running statistics) left in training mode get a warning,
since they change what the BNs see.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnlab.functional.batch_norm import channel_axis_index, get_convention
from bnlab.functional.checks import check_float
from bnlab.nn import BatchNorm
from bnlab.nn.sync import ProcessGroup
from bnlab.tools.common import (
    ModuleT,
    bn_axis,
    bn_call_input,
    bn_state,
    check_materialized,
    check_module,
    find_batch_norms,
    has_running_stats,
    input_moments,
    is_batch_norm,
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
        self._add(mean.detach().to(self.dtype), var.detach().to(self.dtype) * n, n)

    def _add(self, mean_b: Tensor, m2_b: Tensor, n: int) -> None:
        """Merge a part given by its mean, sum of squared deviations M2 and count n >= 1."""
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


def all_reduce_statistics(
    stats: PopulationStatistics | None,
    num_channels: int,
    group: ProcessGroup,
    *,
    batches: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[PopulationStatistics, int]:
    """The statistics of every process's data merged, and the sum of their ``batches``: the
    same result, bit for bit, on every process of ``group``, which must all call it.

    One all-reduce (a sum) of a (P, 2C + 2) table in which each process fills its own row with
    (count, batches, mean, M2); every process then merges the rows in rank order with the
    count-weighted formula (module docstring), so uneven and empty parts (``stats`` None or
    without data) are exact. ``device`` is where the statistics live (NCCL needs it)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    dtype = stats.dtype if stats is not None else stat_dtype(torch.device(device))
    comm = torch.device(device) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    table = torch.zeros(world, 2 + 2 * num_channels, dtype=dtype, device=comm)
    table[rank, 1] = batches
    if stats is not None and stats.count > 0:
        assert stats._mean is not None and stats._m2 is not None
        if stats._mean.shape != (num_channels,):
            raise ValueError(
                f"statistics of shape {tuple(stats._mean.shape)} for {num_channels} channels."
            )
        table[rank, 0] = stats.count
        table[rank, 2 : 2 + num_channels] = stats._mean
        table[rank, 2 + num_channels :] = stats._m2
    dist.all_reduce(table, group=group)
    merged = PopulationStatistics(dtype)
    for row in table.to(device):
        count = int(row[0])
        if count > 0:
            merged._add(row[2 : 2 + num_channels], row[2 + num_channels :], count)
    return merged, int(table[:, 1].sum())


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
    process_group: ProcessGroup = None,
) -> ModuleT:
    """Set every BN's running mean and variance to its input's statistics over ``batches``.

    Acts in place (it only writes values, like ``model.train()``) and returns ``model``. Runs
    under ``torch.no_grad()``; whatever happens, the BNs' training flags come back and the hooks
    are removed, and if a batch raises every running buffer is restored as it was.

    Args:
        model: calls ``model(x)`` for each batch. BNs are :class:`bnlab.nn.BatchNorm` and
            ``torch.nn.BatchNorm*d`` with running statistics; others (and
            :class:`bnlab.tools.FrozenBatchNorm`) are left alone, and a warning names the
            norms among them that keep running statistics of their own (whitening, PIT,
            InstanceNorm with ``track_running_stats``), or says that the model has no BN and
            nothing changed. Only the BNs' mode is
            changed: put the rest in the mode you want first (``model.eval()`` turns dropout
            off, usually what you want; a module that behaves differently in training, such
            as dropout, left in training mode gets a warning).
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
        process_group: when ``torch.distributed`` is initialized, the statistics are merged
            over every process of this group (default: all), each passing its own share of the
            data: every process ends with the statistics of the union of their batches (one
            all-reduce per BN; uneven and empty shares are exact). Every process of the group
            must call precise_bn with the same model and mode. (A SyncBatchNorm in
            ``mode="train"`` makes each forward a collective too: then every process must feed
            the same number of batches.)

    The new running variance is unbiased, M2 / (n − 1), as PyTorch stores it (bnlab BNs with a
    biased convention such as "d2l" or "flax" get M2 / n). ``num_batches_tracked`` becomes the
    number of batches averaged (over all processes), as if they had been fed with
    ``momentum=None`` (cumulative average), so continuing that way weights the next batch
    1 / (k + 1).

    Raises:
        TypeError: ``model`` is not a module, ``batches`` is not an iterable of batches.
        ValueError: ``batches`` is empty, ``num_batches`` is not a positive int, a BN is lazy, a
            batch gives a BN non-finite statistics (NaN or Inf; the error names the batch).
        RuntimeError: another process of the group failed (its error is in the message).
    """
    return _precise(
        model,
        batches,
        num_batches=num_batches,
        mode=mode,
        process_group=process_group,
        store=_store,
        caller="precise_bn",
    )


StoreFn = Callable[[nn.Module, "PopulationStatistics", int], None]  # (bn, stats, batches)


def _precise(
    model: ModuleT,
    batches: Iterable[Any],
    *,
    num_batches: int | None,
    mode: Mode,
    process_group: ProcessGroup,
    store: StoreFn,
    caller: str,
) -> ModuleT:
    """precise_bn with the step that writes each BN's measured statistics given as ``store``
    (precise_bn's own sets the running statistics to them); ``caller`` names the public
    function in warnings."""
    check_module(model)
    _check_args(batches, num_batches, mode)
    group = _merge_group(process_group)
    bns = [(name, bn) for name, bn in find_batch_norms(model) if has_running_stats(bn)]
    for name, bn in bns:
        check_materialized(bn, name)
    _warn_other_norms(model, caller, found_bn=bool(bns))
    if not bns:
        return model
    _warn_training_modules(model, caller)
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
    run = _Run(model, bns, batches, num_batches, mode, group, store)
    try:
        with torch.no_grad():
            for bn, _ in flags:
                bn.train(mode == "train")
            run.run()
    except BaseException:
        with torch.no_grad():
            for t, saved in zip(buffers, snapshot, strict=True):
                t.copy_(saved)
        raise
    finally:
        run.remove_hooks()
        for bn, was_training in flags:
            bn.train(was_training)
    return model


def _merge_group(process_group: ProcessGroup) -> ProcessGroup | None:
    """The group to merge statistics over, or None for this process's batches alone."""
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError(
                "process_group: given, but torch.distributed is not initialized. Call "
                "torch.distributed.init_process_group() (or bnlab.distributed.init_from_env() "
                "under torchrun) first, or leave process_group out for one process."
            )
        return None
    group = dist.group.WORLD if process_group is None else process_group
    return group if dist.get_world_size(group) > 1 else None


def _behaves_differently_in_training(module: nn.Module) -> bool:
    """Dropout (any kind), RReLU, and norms with running statistics: what ``model.eval()``
    changes besides the BNs."""
    if isinstance(module, nn.modules.dropout._DropoutNd | nn.RReLU):
        return True
    return _keeps_running_stats(module)


def _keeps_running_stats(module: nn.Module) -> bool:
    """A norm that tracks running statistics of any kind: a BN's mean and variance, or the
    buffers a bnlab norm names in ``running_stats`` (a whitening matrix, quantiles)."""
    if not getattr(module, "track_running_stats", False):
        return False
    names = getattr(module, "running_stats", None)
    if not isinstance(names, tuple):
        return has_running_stats(module)
    return any(getattr(module, name, None) is not None for name in names)


def _warn_other_norms(model: nn.Module, caller: str, *, found_bn: bool) -> None:
    """Say what is left as it was: norms that keep running statistics but are not BNs (the
    whitening and PIT layers, InstanceNorm with track_running_stats), and, when the model has
    no BN with running statistics at all, that nothing changes."""
    others = [
        f"{name or 'model'} ({type(m).__name__})"
        for name, m in model.named_modules()
        if not is_batch_norm(m) and _keeps_running_stats(m)
    ]
    kept = (
        f" {', '.join(others)} {'keeps its' if len(others) == 1 else 'keep their'} moving "
        f"averages: {caller} acts on BatchNorm layers only."
        if others
        else ""
    )
    if not found_bn:
        warnings.warn(
            f"{caller}: {type(model).__name__} has no BatchNorm with running statistics "
            "(bnlab.nn.BatchNorm or torch.nn.BatchNorm*d with track_running_stats=True), so "
            f"nothing was changed.{kept}",
            RuntimeWarning,
            stacklevel=4,  # the caller of the public function
        )
    elif others:
        warnings.warn(f"{caller}:{kept}", RuntimeWarning, stacklevel=4)


def _warn_training_modules(model: nn.Module, caller: str) -> None:
    found = [
        f"{name or 'model'} ({type(m).__name__})"
        for name, m in model.named_modules()
        if m.training and not is_batch_norm(m) and _behaves_differently_in_training(m)
    ]
    if found:
        one = len(found) == 1
        warnings.warn(
            f"{caller}: {', '.join(found)} {'is' if one else 'are'} in training mode, where "
            f"{'it behaves' if one else 'they behave'} differently than in prediction (dropout "
            "drops values, a norm with running statistics uses and updates batch statistics), "
            "so the BN statistics measured now are not those the prediction network sees. Call "
            f"model.eval() first; {caller} sets the BNs' own mode itself.",
            RuntimeWarning,
            stacklevel=4,  # the caller of precise_bn
        )


class _Run:
    """The passes of one precise_bn call: hooks that measure BN inputs, then the merges."""

    def __init__(
        self,
        model: nn.Module,
        bns: list[tuple[str, nn.Module]],
        batches: Iterable[Any],
        num_batches: int | None,
        mode: Mode,
        group: ProcessGroup | None,
        store: StoreFn,
    ) -> None:
        self.model, self.bns, self.batches = model, bns, batches
        self.num_batches, self.mode, self.group, self.store = num_batches, mode, group, store
        self.names = {id(bn): name for name, bn in bns}
        self.stats: dict[int, PopulationStatistics] = {}
        self.order: list[nn.Module] = []  # BNs in the order forward() first calls them
        self.measuring: set[int] = set()  # ids of the BNs measured in the current pass
        self.first_pass = True
        self.batch_index = 0
        self.reread = isinstance(batches, Sequence)
        self.cache: list[Tensor] = []
        self.handles = [bn.register_forward_pre_hook(self.hook, with_kwargs=True) for _, bn in bns]

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()

    def hook(self, bn: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.first_pass and all(b is not bn for b in self.order):
            self.order.append(bn)
            if self.mode == "eval" and len(self.order) == 1:
                self.measuring.add(id(bn))  # eval mode, pass 1: only the first BN is exact
        if id(bn) not in self.measuring:
            return
        x, mask = bn_call_input(args, kwargs)
        mean, var, n = input_moments(x, mask, channel_axis_index(bn_axis(bn), x.ndim))
        if n == 0:
            return
        if not bool(torch.isfinite(mean).all() & torch.isfinite(var).all()):
            where = "" if self.group is None else f" on rank {dist.get_rank()}"
            raise ValueError(
                f"precise_bn: batch {self.batch_index}{where} gives "
                f"{self.names[id(bn)] or 'model'} ({type(bn).__name__}) non-finite statistics: "
                "its input has NaN or Inf values. The running statistics were left as they "
                "were. Leave that batch out (torch.isfinite(x).all() checks the data); if the "
                "data are finite, the network itself produces them before this layer."
            )
        self.stats.setdefault(id(bn), PopulationStatistics(mean.dtype)).update(mean, var, n)

    def one_pass(self) -> int:
        """Feed the batches once; return how many this process fed."""
        fresh = self.first_pass or self.reread
        source: Iterable[Any] = self.batches if fresh else self.cache
        count = 0
        iterator: Iterator[Any] = iter(source)
        while self.num_batches is None or count < self.num_batches:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            x = _batch_input(batch, count) if fresh else batch
            if self.first_pass and not self.reread and self.mode == "eval" and len(self.bns) > 1:
                self.cache.append(x)
            self.batch_index = count
            self.model(x)
            count += 1
        return count

    def agreed_pass(self) -> int:
        """One pass, then (with several processes) agree on its outcome: every process raises
        when one failed, and all take the same BN order. Returns the batches fed by all."""
        if self.group is None:
            count = self.one_pass()
            if count == 0:
                raise ValueError(
                    "batches: expected at least one batch, got an empty iterable. Pass the "
                    "training data, e.g. a DataLoader or a list of input tensors."
                )
            return count
        error: Exception | None = None
        count = 0
        try:
            count = self.one_pass()
        except Exception as e:  # reported to the peers below, then raised
            error = e
        order = [self.names[id(bn)] for bn in self.order] if self.first_pass else []
        mine = (f"{type(error).__name__}: {error}" if error else None, count, order)
        outcomes: list[Any] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(outcomes, mine, group=self.group)
        if error is not None:
            raise error
        failed = [(rank, e) for rank, (e, _, _) in enumerate(outcomes) if e is not None]
        if failed:
            rank, message = failed[0]
            raise RuntimeError(
                f"precise_bn: process {rank} of the group failed ({message}); every process "
                "restored its running statistics."
            )
        total = sum(c for _, c, _ in outcomes)
        if total == 0:
            raise ValueError(
                "batches: expected at least one batch on some process, got empty iterables on "
                "all of them. Pass each process its share of the training data."
            )
        if self.first_pass:
            orders = [o for _, _, o in outcomes if o]
            if any(o != orders[0] for o in orders):
                raise RuntimeError(
                    f"precise_bn: the processes called their BNs in different orders "
                    f"({orders}); every process must run the same model."
                )
            by_name = {name: bn for name, bn in self.bns}
            self.order = [by_name[name] for name in (orders[0] if orders else [])]
        return total

    def merged(self, bn: nn.Module) -> PopulationStatistics | None:
        """``bn``'s statistics over this pass's batches of every process, or None if empty."""
        local = self.stats.get(id(bn))
        if self.group is not None:
            running_mean = bn_state(bn).running_mean
            assert running_mean is not None  # filtered before
            local, _ = all_reduce_statistics(
                local, running_mean.numel(), self.group, device=running_mean.device
            )
        return local if local is not None and local.count > 0 else None

    def run(self) -> None:
        if self.mode == "train":
            self.measuring.update(id(bn) for _, bn in self.bns)
            count = self.agreed_pass()
            for bn in self.order:
                stats = self.merged(bn)
                if stats is not None:
                    self.store(bn, stats, count)
        else:
            count = self.agreed_pass()  # also measures the first BN
            self.first_pass = False
            for i, target in enumerate(self.order):
                if i > 0:  # passes 2, 3, ...: measure the next BN in call order
                    self.measuring = {id(target)}
                    self.agreed_pass()
                stats = self.merged(target)
                if stats is not None:  # else it saw only empty batches: left as it was
                    self.store(target, stats, count)
        missed = [self.names[id(bn)] for _, bn in self.bns if all(b is not bn for b in self.order)]
        if missed:
            warnings.warn(
                f"precise_bn: forward() never called {missed}; their running statistics are "
                "unchanged.",
                RuntimeWarning,
                stacklevel=4,
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


__all__ = ["PopulationStatistics", "all_reduce_statistics", "precise_bn"]
