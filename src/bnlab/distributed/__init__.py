"""Running bnlab on several processes with ``torch.distributed``: starting them
(:func:`launch` on one machine, :func:`init_from_env` under ``torchrun``).

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

__all__ = [
    "DistributedRunError",
    "RankOutcome",
    "default_backend",
    "find_free_port",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "launch",
]
