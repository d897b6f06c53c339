"""Running bnlab on several processes with ``torch.distributed``: starting them
(:func:`launch` on one machine, :func:`init_from_env` under ``torchrun``) and the per-process
plan of data-parallel training (:func:`current_plan`: sharded batches, DDP, synchronized BN,
rank-0 bookkeeping).

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
]
