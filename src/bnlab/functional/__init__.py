"""Pure math: functions that take tensors and return tensors, mutating nothing."""

from bnlab.functional.batch_norm import (
    CONVENTIONS,
    DEFAULT_MOMENTUM,
    BatchNormResult,
    Convention,
    batch_norm,
    get_convention,
    register_train_kernel,
)
from bnlab.functional.checks import MismatchError
from bnlab.functional.core import apply_scale_shift, moments, scale_shift

__all__ = [
    "CONVENTIONS",
    "DEFAULT_MOMENTUM",
    "BatchNormResult",
    "Convention",
    "MismatchError",
    "apply_scale_shift",
    "batch_norm",
    "get_convention",
    "moments",
    "register_train_kernel",
    "scale_shift",
]

from bnlab.functional import fast as fast  # registers impl="eager", "compiled", ...
from bnlab.functional import native as native  # registers impl="native" and "auto"
from bnlab.functional.norms import (
    batch_renorm,
    ghost_batch_norm,
    group_norm,
    instance_norm,
    layer_norm,
    renorm_limits,
)
from bnlab.functional.pit import pit_norm
from bnlab.functional.whitening import whitening_norm

__all__ += [
    "batch_renorm",
    "ghost_batch_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "pit_norm",
    "renorm_limits",
    "whitening_norm",
]
