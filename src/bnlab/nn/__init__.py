"""Modules: parameters, buffers and mode; the math they call lives in :mod:`bnlab.functional`."""

from bnlab.nn.batchnorm import BatchNorm, LazyBatchNorm

__all__ = ["BatchNorm", "LazyBatchNorm"]
