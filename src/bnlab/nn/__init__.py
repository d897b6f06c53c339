"""Modules: parameters, buffers and mode; the math they call lives in :mod:`bnlab.functional`."""

from bnlab.nn.batchnorm import BatchNorm, LazyBatchNorm

__all__ = ["BatchNorm", "LazyBatchNorm"]

from bnlab.nn.sync import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

__all__ += ["SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm"]
