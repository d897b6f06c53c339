"""Data-parallel training with synchronized batch normalization: what each process of a run
does differently from a single process, as one small object a training loop calls.

Every process draws the same seeded permutation and walks the same global batches of B
examples as a single process would. Process p of P takes the strided part ``batch[p::P]`` (over
an epoch, the shard ``perm[p::P]``, as ``DistributedSampler``); :class:`~bnlab.nn.SyncBatchNorm`
normalizes with the statistics of the whole global batch, and process p's loss is

    L_p = (P / B) · Σ_{i in part p} ℓ_i

so that DistributedDataParallel's gradient average (1/P) Σ_p ∇L_p = ∇ (1/B) Σ_i ℓ_i is the
single-process gradient, also when the parts are uneven (B not a multiple of P). The training
therefore equals single-process training on the full batch, up to float rounding.

A loop uses a plan (``plan = current_plan()``; :class:`SingleProcess` when not distributed,
where every method is the identity):

    net = plan.wrap(model)                    # SyncBatchNorm + DDP; eval and save use `model`
    plan.sync_running_stats(model)            # before evaluating or saving (per-process BN)
    idx = plan.shard(perm[a:b])               # this process's part of the global batch
    loss = plan.loss_fn(net(x[idx]), y[idx])  # scaled as above
    loss, acc = plan.reduce_epoch(loss, acc)  # epoch metrics of the whole batch, every process
    test_acc = plan.evaluate(evaluate, model, test_x, test_y)   # sharded, then summed
    if plan.is_main: ...                      # logs, metrics, checkpoints: rank 0 only
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from bnlab.distributed.stats import sync_running_stats
from bnlab.nn.sync import ProcessGroup, convert_sync_batchnorm

T = TypeVar("T")
LossFn = Callable[..., Tensor]  # (logits, target, reduction=...) -> loss, as F.cross_entropy
EvaluateFn = Callable[[nn.Module, Tensor, Tensor], float]  # accuracy of a model on (x, y)


def ddp(
    model: nn.Module, device: torch.device | str, *, process_group: ProcessGroup = None
) -> DistributedDataParallel:
    """``model`` in DistributedDataParallel on ``device`` (its GPU, or the CPU), without the
    per-forward broadcast of rank 0's buffers: with SyncBatchNorm every process computes the
    same running statistics itself."""
    device = torch.device(device)
    device_ids = None
    if device.type == "cuda":
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    # newer torch names the per-forward buffer broadcast forward_sync_buffers
    no_broadcast: dict[str, Any] = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(
        model, device_ids=device_ids, process_group=process_group, **no_broadcast
    )


class SingleProcess:
    """The plan of a run on one process: every step is the identity."""

    rank = 0
    world_size = 1
    is_main = True

    def __init__(self, loss: LossFn = F.cross_entropy) -> None:
        self.loss = loss

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def shard(self, batch_indices: Tensor) -> Tensor:
        return batch_indices

    def loss_fn(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.loss(logits, target)

    def reduce_epoch(self, loss: float, acc: float) -> tuple[float, float]:
        return loss, acc

    def evaluate(self, evaluate: EvaluateFn, model: nn.Module, x: Tensor, y: Tensor) -> float:
        return evaluate(model, x, y)

    def sync_running_stats(self, model: nn.Module) -> None:
        """Make the running statistics the same on every process (per-process BN only)."""

    def agree(self, value: T) -> T:
        """Rank 0's ``value`` on every process (e.g. a run directory name)."""
        return value


class DataParallel(SingleProcess):
    """The plan of one process among ``world_size`` (see the module docstring).

    ``loss`` must accept ``reduction="sum"`` (as ``F.cross_entropy``); ``device`` is where the
    model lives (its index picks the GPU for DDP). ``sync_bn=False`` keeps the model's BNs
    per-process (each normalizes with its own part of the batch, as plain DDP) and
    :meth:`sync_running_stats` then combines their running statistics.
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        *,
        loss: LossFn = F.cross_entropy,
        process_group: ProcessGroup = None,
        sync_bn: bool = True,
    ) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "DataParallel: torch.distributed is not initialized. Start the processes with "
                "bnlab.distributed.launch(), or under torchrun call "
                "bnlab.distributed.init_from_env() first."
            )
        super().__init__(loss)
        self.device = torch.device(device)
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.is_main = self.rank == 0
        self.sync_bn = sync_bn
        self._batch_size: int | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        """Turn the model's batch norms into :class:`~bnlab.nn.SyncBatchNorm` (in place; not
        with ``sync_bn=False``) and return it inside DistributedDataParallel. Train through the
        returned module; evaluate and save ``model`` itself (its state dict has no ``module.``
        prefix and loads into a single-process model). DDP does not broadcast buffers: with
        SyncBatchNorm the running statistics are identical on every process by construction,
        with per-process BN :meth:`sync_running_stats` makes them so."""
        if not self.sync_bn:
            return ddp(model, self.device, process_group=self.group)
        synced = convert_sync_batchnorm(model, self.group)
        if synced is not model:
            raise TypeError(
                "DataParallel.wrap: expected a model that contains its batch norms, got a bare "
                f"{type(model).__name__}; wrap it in nn.Sequential first."
            )
        return ddp(model, self.device, process_group=self.group)

    def shard(self, batch_indices: Tensor) -> Tensor:
        """This process's part ``batch_indices[rank::world_size]`` of a global batch (it may be
        empty when the batch has fewer examples than processes)."""
        self._batch_size = batch_indices.numel()
        return batch_indices[self.rank :: self.world_size]

    def loss_fn(self, logits: Tensor, target: Tensor) -> Tensor:
        """``(P / B) · Σ ℓ_i`` over this process's part, B the size of the global batch last
        passed to :meth:`shard`."""
        if self._batch_size is None:
            raise RuntimeError(
                "DataParallel.loss_fn: call shard() on the global batch's indices first; the "
                "loss is scaled by the size of that batch."
            )
        return self.loss(logits, target, reduction="sum") * (self.world_size / self._batch_size)

    def _sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend(self.group) == "nccl" else torch.device("cpu")

    def reduce_epoch(self, loss: float, acc: float) -> tuple[float, float]:
        """Whole-batch epoch metrics from a loop that averaged :meth:`loss_fn` weighted by the
        global batch sizes and counted correct answers of its own part over the global count:
        the loss is the mean over processes, the accuracy the sum."""
        loss_sum, acc_sum = self._sum([loss, acc])
        return loss_sum / self.world_size, acc_sum

    def evaluate(self, evaluate: EvaluateFn, model: nn.Module, x: Tensor, y: Tensor) -> float:
        """Accuracy on (x, y) with each process evaluating its strided share (evaluation mode
        uses running statistics, the same everywhere, so sharding changes nothing)."""
        part_x, part_y = x[self.rank :: self.world_size], y[self.rank :: self.world_size]
        correct = round(evaluate(model, part_x, part_y) * part_x.shape[0]) if len(part_x) else 0
        (total_correct,) = self._sum([float(correct)])
        return total_correct / max(x.shape[0], 1)

    def sync_running_stats(self, model: nn.Module) -> None:
        """With per-process BN, give every process the combined running statistics
        (:func:`bnlab.distributed.sync_running_stats`); a loop calls it before every evaluation
        and checkpoint. With SyncBatchNorm they are identical already: nothing to do."""
        if not self.sync_bn:
            sync_running_stats(model, self.group)

    def agree(self, value: T) -> T:
        box: list[Any] = [value]
        dist.broadcast_object_list(
            box, src=dist.get_global_rank(self.group, 0) if self.group else 0
        )
        return box[0]


def current_plan(
    device: torch.device | str = "cpu", *, loss: LossFn = F.cross_entropy, sync_bn: bool = True
) -> SingleProcess:
    """:class:`DataParallel` (with ``sync_bn``) inside an initialized process group of more than
    one process, else :class:`SingleProcess`."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DataParallel(device, loss=loss, sync_bn=sync_bn)
    return SingleProcess(loss)


__all__ = ["DataParallel", "SingleProcess", "current_plan", "ddp"]
