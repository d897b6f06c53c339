"""bnlab: batch normalization from scratch, exact against PyTorch, and a lab for its claims."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnlab import functional, nn
    from bnlab.functional import batch_norm
    from bnlab.nn import BatchNorm

__version__ = "0.1.0"
__all__ = ["BatchNorm", "__version__", "batch_norm", "functional", "nn"]

# Imported on first use, so that `bnlab --help` and `bnlab --version` do not load torch.
_LAZY = {
    "functional": ("bnlab.functional", None),
    "nn": ("bnlab.nn", None),
    "batch_norm": ("bnlab.functional", "batch_norm"),
    "BatchNorm": ("bnlab.nn", "BatchNorm"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'bnlab' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
