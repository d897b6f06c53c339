"""Modules: parameters, buffers and mode; the math they call lives in :mod:`bnlab.functional`."""

from bnlab.nn.batchnorm import BatchNorm, LazyBatchNorm

__all__ = ["BatchNorm", "LazyBatchNorm"]

from bnlab.nn.sync import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

__all__ += ["SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm"]

from bnlab.nn.norms import BatchRenorm, GhostBatchNorm, GroupNorm, InstanceNorm, LayerNorm  # noqa: E402
from bnlab.nn.pit import PITNorm  # noqa: E402
from bnlab.nn.registry import NORMS, make_norm, register_norm  # noqa: E402
from bnlab.nn.whitening import DecorrelatedBatchNorm, IterNorm  # noqa: E402

__all__ += [
    "NORMS",
    "BatchRenorm",
    "DecorrelatedBatchNorm",
    "GhostBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "IterNorm",
    "LayerNorm",
    "PITNorm",
    "make_norm",
    "register_norm",
]
