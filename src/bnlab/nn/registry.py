"""Normalization layers by name: ``make_norm("group", 16, num_groups=4)``.

Models and the CLI pick their normalization with a string and keyword options, as timm's
``create_norm_layer``. Each entry of :data:`NORMS` is a :class:`NormBuilder` that knows the
options its layer accepts, so a misspelt or inapplicable option fails at construction with the
list of valid ones, instead of being silently ignored.

    name          layer                                   lazy (num_features=None)  inputs
    batch         bnlab.nn.BatchNorm                      yes                       any
    torch-batch   torch.nn.BatchNorm2d / 1d (by kind)     yes (LazyBatchNorm*d)     conv / dense
    layer         bnlab.nn.LayerNorm                      yes (per-channel affine)  any
    group         bnlab.nn.GroupNorm                      yes                       any
    instance      bnlab.nn.InstanceNorm                   yes                       conv only
    renorm        bnlab.nn.BatchRenorm                    yes                       any
    ghost         bnlab.nn.GhostBatchNorm                 yes                       any
    whitening     bnlab.nn.DecorrelatedBatchNorm (ZCA)    yes                       any
    iternorm      bnlab.nn.IterNorm                       yes                       any
    pit           bnlab.nn.PITNorm                        yes                       any
    none          torch.nn.Identity                       (no state)                any
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from torch import nn

from bnlab.nn.base import check_num_features
from bnlab.nn.batchnorm import BatchNorm
from bnlab.nn.norms import BatchRenorm, GhostBatchNorm, GroupNorm, InstanceNorm, LayerNorm
from bnlab.nn.pit import PITNorm
from bnlab.nn.whitening import DecorrelatedBatchNorm, IterNorm

Kind = Literal["conv", "dense"]
KINDS: tuple[str, ...] = ("conv", "dense")


def keyword_options(cls: type) -> frozenset[str]:
    """The keyword arguments ``cls.__init__`` accepts besides ``num_features`` (its
    ``__init__``, since a class that defines ``__new__(*args, **kwargs)`` hides it from
    ``inspect.signature(cls)``)."""
    init: Callable[..., Any] = cls.__init__  # type: ignore[misc]
    params = inspect.signature(init).parameters.values()
    return frozenset(
        p.name
        for p in params
        if p.name not in ("self", "num_features")
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )


@dataclass(frozen=True)
class NormBuilder:
    """Builds one kind of norm layer: ``builder(num_features, kind="conv", **options)``.

    ``factory(num_features, kind, **options)`` makes the module; ``options`` are the keyword
    names it accepts; ``kinds`` the input kinds it supports ("conv": (N, C, H, W), "dense":
    (N, C)); ``size_names`` other names of ``num_features`` for this norm (the torch class's
    own, e.g. GroupNorm's ``num_channels``), accepted by :func:`make_norm`.
    """

    factory: Callable[..., nn.Module]
    options: frozenset[str]
    description: str
    kinds: tuple[str, ...] = KINDS
    size_names: tuple[str, ...] = ()

    def __call__(
        self, num_features: int | None = None, *, kind: Kind = "conv", **options: Any
    ) -> nn.Module:
        return self.factory(num_features, kind, **options)


def from_class(
    cls: type[nn.Module], description: str, *, size_names: tuple[str, ...] = ()
) -> NormBuilder:
    """A builder that calls ``cls(num_features, **options)`` for either kind."""

    def factory(num_features: int | None, kind: str, **options: Any) -> nn.Module:
        return cls(num_features, **options)

    return NormBuilder(factory, keyword_options(cls), description, size_names=size_names)


def _torch_batch(num_features: int | None, kind: str, **options: Any) -> nn.Module:
    if kind == "dense":
        return (
            nn.BatchNorm1d(num_features, **options)
            if num_features
            else nn.LazyBatchNorm1d(**options)
        )
    return (
        nn.BatchNorm2d(num_features, **options) if num_features else nn.LazyBatchNorm2d(**options)
    )


def _identity(num_features: int | None, kind: str, **options: Any) -> nn.Module:
    return nn.Identity()


_NORMS: dict[str, NormBuilder] = {
    "batch": from_class(BatchNorm, "bnlab's BatchNorm (Ioffe & Szegedy 2015)"),
    "torch-batch": NormBuilder(
        _torch_batch,
        keyword_options(nn.BatchNorm2d),
        "torch.nn.BatchNorm2d (conv) or BatchNorm1d (dense), the reference",
    ),
    "layer": from_class(LayerNorm, "layer norm over (C, *spatial) per sample (Ba et al. 2016)"),
    "group": from_class(GroupNorm, "group norm (Wu & He 2018)", size_names=("num_channels",)),
    "instance": NormBuilder(
        from_class(InstanceNorm, "").factory,
        keyword_options(InstanceNorm),
        "instance norm over the spatial axes (Ulyanov et al. 2016)",
        kinds=("conv",),
    ),
    "renorm": from_class(BatchRenorm, "batch renormalization (Ioffe 2017)"),
    "ghost": from_class(GhostBatchNorm, "ghost batch norm (Hoffer et al. 2017)"),
    "whitening": from_class(DecorrelatedBatchNorm, "ZCA whitening BN (Huang et al. 2018)"),
    "iternorm": from_class(IterNorm, "Newton–Schulz whitening, IterNorm (Huang et al. 2019)"),
    "pit": from_class(PITNorm, "probability-integral-transform normalization"),
    "none": NormBuilder(_identity, frozenset(), "no normalization (torch.nn.Identity)"),
}

NORMS: Mapping[str, NormBuilder] = MappingProxyType(_NORMS)
"""Name -> builder, read-only; add entries with :func:`register_norm`."""


def register_norm(name: str, builder: NormBuilder, *, replace: bool = False) -> None:
    """Make ``make_norm(name, ...)`` build with ``builder``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}.")
    if not isinstance(builder, NormBuilder):
        raise TypeError(
            f"builder: expected a NormBuilder (e.g. from_class(MyNorm, 'description')), got "
            f"{type(builder).__name__}."
        )
    if name in _NORMS and not replace:
        raise ValueError(f"name: {name!r} is already registered. Pass replace=True to override it.")
    _NORMS[name] = builder


def make_norm(
    name: str, num_features: int | None = None, *, kind: Kind = "conv", **options: Any
) -> nn.Module:
    """Build the normalization layer ``name`` for ``num_features`` channels (None: inferred
    from the first input where the layer supports it, see the module docstring).

    ``kind`` is the input the layer will see: "conv" for (N, C, H, W), "dense" for (N, C). It
    picks BatchNorm2d or BatchNorm1d for "torch-batch" and rejects norms that cannot work on
    that input ("instance" needs spatial axes). ``options`` go to the layer's constructor, e.g.
    ``make_norm("group", 16, num_groups=4)``, ``make_norm("ghost", 6, virtual_batch_size=32)``.
    The torch classes' own argument names work too: ``num_features`` for every batch-style norm,
    ``make_norm("group", num_groups=4, num_channels=16)`` as ``torch.nn.GroupNorm`` writes it,
    ``make_norm("layer", normalized_shape=(16, 8, 8))`` as ``torch.nn.LayerNorm``.

    Raises:
        ValueError: unknown name or kind, or a norm that does not support ``kind``.
        TypeError: an option the layer does not accept (the message lists the ones it does).
    """
    if not isinstance(name, str) or name not in _NORMS:
        raise ValueError(
            f"name: expected one of {sorted(_NORMS)}, got {name!r}. "
            "See bnlab.nn.registry for what each builds."
        )
    builder = _NORMS[name]
    if kind not in KINDS:
        raise ValueError(
            f"kind: expected 'conv' (inputs (N, C, H, W)) or 'dense' (inputs (N, C)), got {kind!r}."
        )
    if kind not in builder.kinds:
        raise ValueError(
            f"make_norm({name!r}): kind={kind!r} is not supported ({builder.description} needs "
            f"kind in {list(builder.kinds)}). For dense (N, C) layers use 'layer', 'group' or "
            "'batch'."
        )
    for alias in builder.size_names:  # e.g. GroupNorm's num_channels, torch's name for C
        if alias in options:
            value = options.pop(alias)
            if num_features is not None and num_features != value:
                raise TypeError(
                    f"make_norm({name!r}): num_features={num_features} and {alias}={value} "
                    "name the same channel count and differ. Pass one of them."
                )
            num_features = value
    check_num_features(num_features)
    unknown = sorted(set(options) - builder.options)
    if unknown:
        accepted = ", ".join(sorted(builder.options)) or "none"
        raise TypeError(
            f"make_norm({name!r}): unexpected option(s) {unknown}; {name!r} accepts: {accepted}."
        )
    return builder(num_features, kind=kind, **options)


__all__ = ["KINDS", "NORMS", "NormBuilder", "from_class", "make_norm", "register_norm"]
