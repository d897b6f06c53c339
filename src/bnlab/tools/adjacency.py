"""Which batch norms directly follow a convolution or a linear layer.

A BN "directly follows" a layer when the layer's output feeds the BN and nothing else, so a
per-channel affine map after the layer can be moved into its weights. Two ways to find pairs:

* ``"sequential"``: consecutive entries of an ``nn.Sequential`` (searched recursively; the last
  layer of a nested Sequential counts as adjacent to the first layer of the next entry). Works
  for any model, sees only Sequential adjacency.
* ``"fx"``: ``torch.fx.symbolic_trace`` of the model's forward; a pair is a BN call whose only
  input is a layer call whose output has no other user. Finds pairs in arbitrary forward()
  code (residual blocks, ``self.bn(self.conv(x))``) but needs a traceable forward (no
  data-dependent Python control flow).

``"auto"`` tries fx and falls back to sequential when the model cannot be traced.

A pair is kept only if folding it is exact: the layer is a plain ``Conv1d/2d/3d``,
``ConvTranspose1d/2d/3d`` or ``Linear`` (forward not overridden, no parametrization, no hooks),
both modules are used at exactly one place, the BN's channel count matches the layer's outputs
and its channel axis is the one the layer writes (axis 1 for convolutions; for ``Linear`` the
last axis, which is axis 1 of an (N, features) input: a BN with axis 1 after a Linear is assumed
to see 2-D input, as in every Sequential MLP; bnlab's ``num_dims``/``axis=-1`` make it explicit).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

from torch import fx, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils import parametrize

from bnlab.tools.common import bn_axis, check_module, has_hooks, is_foldable_norm

Method = Literal["auto", "fx", "sequential"]
METHODS: tuple[str, ...] = ("auto", "fx", "sequential")

# The layers whose forward is "weight op x + bias", by the forward they must not override.
_PLAIN_FORWARDS = {
    nn.Conv1d: nn.Conv1d.forward,
    nn.Conv2d: nn.Conv2d.forward,
    nn.Conv3d: nn.Conv3d.forward,
    nn.ConvTranspose1d: nn.ConvTranspose1d.forward,
    nn.ConvTranspose2d: nn.ConvTranspose2d.forward,
    nn.ConvTranspose3d: nn.ConvTranspose3d.forward,
    nn.Linear: nn.Linear.forward,
}


@dataclass
class FoldPlan:
    """The (layer, BN) pairs found, by qualified module name, and why every other BN was left."""

    method: str
    pairs: list[tuple[str, str]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # BN name -> reason

    def describe_skipped(self) -> str:
        return "; ".join(f"{name or '<model>'}: {why}" for name, why in self.skipped.items())


def is_foldable_layer(module: nn.Module) -> bool:
    """A plain convolution (any rank, transposed or not) or Linear, computing ``W x + b``."""
    for cls, forward in _PLAIN_FORWARDS.items():
        if isinstance(module, cls):
            return type(module).forward is forward and not parametrize.is_parametrized(module)
    return False


def layer_out_features(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return int(layer.out_features)
    assert isinstance(layer, _ConvNd)
    return int(layer.out_channels)


def is_transposed(layer: nn.Module) -> bool:
    return isinstance(layer, _ConvTransposeNd)


def _pair_problem(layer: nn.Module, bn: nn.Module) -> str | None:
    """Why folding ``bn`` into ``layer`` would not be exact, or None if it is."""
    if not is_foldable_layer(layer):
        return (
            f"follows {type(layer).__name__}, which is not a plain Conv/ConvTranspose/Linear "
            "(overridden forward or a parametrized weight)"
        )
    if has_hooks(layer) or has_hooks(bn):
        return "the layer or the BN has hooks, which folding would bypass"
    channels = getattr(bn, "num_features", None)
    if channels is not None and channels != layer_out_features(layer):
        return f"has {channels} channels but the preceding layer has {layer_out_features(layer)}"
    axis = bn_axis(bn)
    num_dims = getattr(bn, "num_dims", None)
    resolved = axis % num_dims if (num_dims is not None and -num_dims <= axis < num_dims) else axis
    if isinstance(layer, nn.Linear):
        last_axis = axis == -1 or (num_dims is not None and resolved == num_dims - 1)
        two_d_axis1 = resolved == 1 and num_dims in (None, 2)
        if not (last_axis or two_d_axis1):
            return (
                f"normalizes axis {axis} of a rank-{num_dims} input but the Linear writes the "
                "last axis"
            )
    elif resolved != 1:
        return f"normalizes axis {axis} but the convolution writes its channels on axis 1"
    return None


def _use_counts(model: nn.Module) -> dict[int, int]:
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    return counts


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _last_layer(module: nn.Module) -> nn.Module:
    while _is_plain_sequential(module) and len(children := list(module.children())) > 0:
        module = children[-1]
    return module


def _first_layer(module: nn.Module) -> nn.Module:
    while _is_plain_sequential(module) and len(children := list(module.children())) > 0:
        module = children[0]
    return module


def _sequential_candidates(model: nn.Module) -> dict[int, nn.Module]:
    """id(BN) -> the layer right before it in some plain nn.Sequential."""
    before: dict[int, nn.Module] = {}
    for _, seq in model.named_modules():
        if not _is_plain_sequential(seq):
            continue
        children = list(seq.children())
        for prev, nxt in itertools.pairwise(children):
            layer, bn = _last_layer(prev), _first_layer(nxt)
            if is_foldable_norm(bn) and is_foldable_layer(layer):
                before[id(bn)] = layer
    return before


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps norms (bnlab's and torch's) as opaque calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_foldable_norm(m) or type(m).__module__.startswith(("bnlab.nn", "bnlab.tools")):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _fx_candidates(model: nn.Module) -> tuple[dict[int, nn.Module], dict[int, str]]:
    """id(BN) -> the layer feeding it, and id(BN) -> why a traced BN call was not a pair."""
    graph = _LeafTracer().trace(model)
    calls: dict[int, int] = {}
    node_module: dict[fx.Node, nn.Module] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            module = model.get_submodule(str(node.target))
            node_module[node] = module
            calls[id(module)] = calls.get(id(module), 0) + 1
    before: dict[int, nn.Module] = {}
    reasons: dict[int, str] = {}
    for node, module in node_module.items():
        if not is_foldable_norm(module):
            continue
        source = node.args[0] if node.args else None
        if len(node.args) != 1 or node.kwargs or not isinstance(source, fx.Node):
            reasons[id(module)] = "is called with other than one tensor argument"
        elif source not in node_module:
            reasons[id(module)] = f"its input comes from {source.op} {source.target!r}, not a layer"
        elif len(source.users) != 1:
            reasons[id(module)] = (
                f"the output of {source.target} is also used elsewhere, so it cannot be changed"
            )
        elif calls[id(module)] != 1 or calls[id(node_module[source])] != 1:
            reasons[id(module)] = "the BN or its layer is called more than once in forward()"
        else:
            before[id(module)] = node_module[source]
    return before, reasons


def _candidates(
    model: nn.Module, method: Method
) -> tuple[dict[int, nn.Module], dict[int, str], str]:
    """(id(BN) -> the module feeding it, id(BN) -> why fx found none, the method used)."""
    if method not in METHODS:
        raise ValueError(
            f"method: expected one of {list(METHODS)}, got {method!r}. 'fx' traces forward(), "
            "'sequential' looks at consecutive nn.Sequential entries, 'auto' tries fx first."
        )
    if method in ("auto", "fx"):
        try:
            before, reasons = _fx_candidates(model)
            return before, reasons, "fx"
        except Exception as err:  # any failure to trace: data-dependent control flow etc.
            if method == "fx":
                raise ValueError(
                    f"method='fx': torch.fx could not trace {type(model).__name__}.forward "
                    f"({type(err).__name__}: {err}). Use method='sequential' (consecutive "
                    "nn.Sequential entries only) or make forward traceable."
                ) from err
    return _sequential_candidates(model), {}, "sequential"


def preceding_layers(model: nn.Module, *, method: Method = "auto") -> dict[int, nn.Module]:
    """id(BN) -> the Conv/ConvTranspose/Linear whose output it directly normalizes (unchecked:
    also pairs that could not be folded exactly)."""
    before, _, _ = _candidates(model, method)
    return {key: m for key, m in before.items() if is_foldable_layer(m)}


def find_foldable(model: nn.Module, *, method: Method = "auto") -> FoldPlan:
    """Find every (layer, BN) pair that can be folded exactly (see the module docstring).

    Returns a :class:`FoldPlan` with the pairs by qualified name and, for every other BN, the
    reason it was left alone. The model is not modified. Training mode is not checked here.
    """
    check_module(model)
    before, fx_reasons, used = _candidates(model, method)
    counts = _use_counts(model)
    plan = FoldPlan(method=used)
    for name, bn in model.named_modules():
        if not is_foldable_norm(bn):
            continue
        layer = before.get(id(bn))
        if layer is None:
            plan.skipped[name] = fx_reasons.get(
                id(bn),
                "not called in the traced forward()"
                if used == "fx"
                else "not directly after a Conv/ConvTranspose/Linear in an nn.Sequential "
                "(method='sequential' sees only Sequential adjacency; try method='fx')",
            )
            continue
        if counts[id(bn)] != 1 or counts[id(layer)] != 1:
            plan.skipped[name] = "the BN or its layer is registered at several places (shared)"
            continue
        problem = _pair_problem(layer, bn)
        if problem is not None:
            plan.skipped[name] = problem
            continue
        plan.pairs.append((_name_of(model, layer), name))
    return plan


def _name_of(model: nn.Module, target: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is target:
            return name
    raise LookupError(f"{type(target).__name__} is not a submodule")  # unreachable


__all__ = [
    "METHODS",
    "FoldPlan",
    "Method",
    "find_foldable",
    "is_foldable_layer",
    "is_transposed",
    "layer_out_features",
    "preceding_layers",
]
