"""Datasets held in memory as tensors: Fashion-MNIST, loaded from gzipped IDX files, and
corrupted copies of images for test-time shifts (:mod:`bnlab.data.corrupt`)."""

from bnlab.data.corrupt import CORRUPTIONS, corrupt
from bnlab.data.fashion_mnist import (
    CLASS_NAMES,
    DATA_DIR_ENV,
    FASHION_MNIST_SPEC,
    FashionMNIST,
    cache_dir,
    load_fashion_mnist,
    resolve_data_dir,
    to_float_batches,
)
from bnlab.data.idx import DataError

__all__ = [
    "CLASS_NAMES",
    "CORRUPTIONS",
    "DATA_DIR_ENV",
    "FASHION_MNIST_SPEC",
    "DataError",
    "FashionMNIST",
    "cache_dir",
    "corrupt",
    "load_fashion_mnist",
    "resolve_data_dir",
    "to_float_batches",
]
