"""Running bnlab on several processes with ``torch.distributed``: starting them
(:func:`launch` on one machine, :func:`init_from_env` under ``torchrun``) and the per-process
plan of data-parallel training (:func:`current_plan`: sharded batches, DDP, synchronized or
per-process BN, rank-0 bookkeeping), and :func:`sync_running_stats`, which makes per-process
BN's running statistics identical on every process.

Synchronized batch normalization itself is :class:`bnlab.nn.SyncBatchNorm`.
"""

from bnlab.distributed.launch import (
    DistributedRunError,
    RankOutcome,
    default_backend,
    find_free_port,
    init_from_env,
    is_distributed,
    is_main_process,
    launch,
)
from bnlab.distributed.parallel import DataParallel, SingleProcess, current_plan
from bnlab.distributed.stats import sync_running_stats

__all__ = [
    "DataParallel",
    "DistributedRunError",
    "RankOutcome",
    "SingleProcess",
    "current_plan",
    "default_backend",
    "find_free_port",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "launch",
    "sync_running_stats",
]
