"""bnlab: batch normalization from scratch, exact against PyTorch, and a lab for its claims."""

from bnlab import functional, nn
from bnlab.functional import batch_norm
from bnlab.nn import BatchNorm

__version__ = "0.1.0"
__all__ = ["BatchNorm", "__version__", "batch_norm", "functional", "nn"]
