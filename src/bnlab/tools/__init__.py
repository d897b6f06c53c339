"""Tools around batch norm: folding into the previous layer, removing the bias BN makes
redundant, precise (whole-data) statistics, freezing, fixed γ/β, swapping implementations, and
adaptation to shifted inputs at test time.

Transforms that replace or rewrite modules (:func:`fold_bn`, :func:`remove_bias_before_bn`,
:func:`freeze_bn`, :func:`unfreeze_bn`, :func:`convert_norm`, :func:`tent`) return a deep copy
by default and leave their input untouched (``inplace=True`` changes it). :func:`precise_bn`,
:func:`adapt_bn` and :func:`fix_affine` only write values into existing tensors, like
``model.train()`` or ``requires_grad_()``, so they act in place and return the same model;
:func:`accumulate_bn` is a context manager that changes how training updates the running
statistics inside its block.
"""

from bnlab.tools.accumulate import accumulate_bn
from bnlab.tools.adapt import adapt_bn, tent
from bnlab.tools.adjacency import FoldPlan, find_foldable
from bnlab.tools.bias import remove_bias_before_bn
from bnlab.tools.convert import convert_norm
from bnlab.tools.fold import fold_bn, fold_bn_weights
from bnlab.tools.freeze import fix_affine, freeze_bn, unfreeze_bn
from bnlab.tools.frozen import FrozenBatchNorm
from bnlab.tools.precise import PopulationStatistics, precise_bn

__all__ = [
    "FoldPlan",
    "FrozenBatchNorm",
    "PopulationStatistics",
    "accumulate_bn",
    "adapt_bn",
    "convert_norm",
    "find_foldable",
    "fix_affine",
    "fold_bn",
    "fold_bn_weights",
    "freeze_bn",
    "precise_bn",
    "remove_bias_before_bn",
    "tent",
    "unfreeze_bn",
]
