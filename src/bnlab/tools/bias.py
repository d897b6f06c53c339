"""Drop the bias that a following batch norm makes redundant (the chapter's exercise 1).

With z = W x + b feeding BN, training-mode BN subtracts the batch mean, and the mean of
z is mean(W x) + b, so

    BN(W x + b) = γ (W x + b − mean(W x) − b) / sqrt(var(W x) + ε) + β = BN(W x):

b cancels exactly and never receives a gradient; the function class is the same without it.
In prediction mode BN subtracts the running mean μ̂ instead, which has absorbed b during
training; moving b into it, μ̂' = μ̂ − b, keeps the eval-mode output unchanged as well:
(W x + b − μ̂) = (W x − μ̂').
"""

from __future__ import annotations

import torch

from bnlab.tools.adjacency import Method, find_foldable
from bnlab.tools.common import (
    ModuleT,
    check_all_materialized,
    check_module,
    tensor_attr,
    working_copy,
)


def remove_bias_before_bn(
    model: ModuleT, *, method: Method = "auto", inplace: bool = False
) -> ModuleT:
    """Remove the bias of every Conv/ConvTranspose/Linear that directly feeds a BN, moving it
    into the BN's running mean (μ̂ ← μ̂ − b) so both modes compute what they did before.

    Pairs are found as in :func:`bnlab.tools.fold_bn` (:func:`bnlab.tools.find_foldable`; BNs
    in either mode qualify, and BNs without running statistics too, since they always subtract
    the batch mean). ``inplace=False`` (default) returns a changed deep copy; the layer's
    ``bias`` becomes None (its parameter is gone from ``state_dict`` and from new optimizers).
    Use :func:`bnlab.models.lenet` with ``bias_before_norm=False`` to build a LeNet without it.
    """
    check_module(model)
    check_all_materialized(model)
    plan = find_foldable(model, method=method)
    out = working_copy(model, inplace)
    with torch.no_grad():
        for layer_name, bn_name in plan.pairs:
            layer = out.get_submodule(layer_name)
            bias = tensor_attr(layer, "bias")
            if bias is None:
                continue
            running_mean = tensor_attr(out.get_submodule(bn_name), "running_mean")
            if running_mean is not None:
                running_mean.sub_(bias.to(running_mean.dtype))
            layer.register_parameter("bias", None)  # as if built with bias=False
    return out


__all__ = ["remove_bias_before_bn"]
