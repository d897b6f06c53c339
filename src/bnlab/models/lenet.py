"""LeNet with batch normalization, as in the "Batch Normalization" chapter of Dive into Deep
Learning (Zhang et al., d2l.ai), after LeCun et al. (1998) and Ioffe & Szegedy (2015).

The chapter's network, for a 1x28x28 input (shapes per example):

    Conv(6, k5)   -> BN -> sigmoid -> MaxPool(2, 2)    # (6, 24, 24) -> (6, 12, 12)
    Conv(16, k5)  -> BN -> sigmoid -> MaxPool(2, 2)    # (16, 8, 8)  -> (16, 4, 4)
    Flatten                                            # (256,)
    Dense(120)    -> BN -> sigmoid
    Dense(84)     -> BN -> sigmoid
    Dense(10)                                          # logits

The four hidden layers (conv 0, conv 1, dense 2, dense 3) are the places a norm, an activation
and dropout can go; every variation the experiments need is an argument, not new model code.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from torch import nn

LayerKind = Literal["conv", "dense"]
# A norm factory: (num_features, kind) -> module; kind says whether it sees (N, C, H, W) or (N, C)
NormFactory = Callable[[int, LayerKind], nn.Module]
NormSpec = str | NormFactory
ActivationSpec = str | Callable[[], nn.Module]
LayerSpec = str | Sequence[int]

HIDDEN_KINDS: tuple[LayerKind, ...] = ("conv", "conv", "dense", "dense")
LAYER_GROUPS: dict[str, tuple[int, ...]] = {
    "all": (0, 1, 2, 3),
    "conv": (0, 1),
    "dense": (2, 3),
    "none": (),
}
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "identity": nn.Identity,
}
POOLS: dict[str, type[nn.Module]] = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}
BUILTIN_NORMS = ("bnlab", "torch", "none")
# the chapter's two batch norms by their bnlab.nn.make_norm names ("none" builds no layer)
REGISTRY_NAMES = {"bnlab": "batch", "torch": "torch-batch"}
INPUT_RANKS: dict[LayerKind, int] = {"conv": 4, "dense": 2}  # (N, C, H, W) and (N, C)


class LeNet(nn.Sequential):
    """An ``nn.Sequential`` (indexable like the chapter's ``net``; ``net[1]`` is the first BN)
    that also remembers which of its entries are norm layers."""

    norm_indices: tuple[int, ...]

    def __init__(self, *layers: nn.Module, norm_indices: Sequence[int] = ()) -> None:
        super().__init__(*layers)
        self.norm_indices = tuple(norm_indices)

    def norm_layers(self) -> list[nn.Module]:
        """The norm modules, in order (empty for ``norm="none"``)."""
        return [self[i] for i in self.norm_indices]


def norm_names() -> list[str]:
    """Every name ``norm=`` accepts: the chapter's three, then the other registry norms."""
    from bnlab.nn.registry import NORMS

    return [*BUILTIN_NORMS, *sorted(n for n in NORMS if n != "none")]


def _unknown_norm(norm: str) -> ValueError:
    names = norm_names()
    close = difflib.get_close_matches(norm, names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(
        f"norm: expected one of {names} ('bnlab': bnlab.nn.BatchNorm, the registry's 'batch'; "
        "'torch': nn.BatchNorm2d/1d, its 'torch-batch'; 'none': no norm layer; the others: "
        f"bnlab.nn.make_norm's), got {norm!r}.{hint}"
    )


def _registry_norm(norm: str, options: Mapping[str, Any]) -> NormFactory:
    from bnlab.nn.registry import NORMS, make_norm

    name = REGISTRY_NAMES.get(norm, norm)
    if name not in NORMS or name == "none":
        raise _unknown_norm(norm)
    takes_rank = "num_dims" in NORMS[name].options

    def make(num_features: int, kind: LayerKind) -> nn.Module:
        extra = dict(options)
        if takes_rank:  # the exact input rank, so the layer checks it as the chapter's does
            extra.setdefault("num_dims", INPUT_RANKS[kind])
        try:
            return make_norm(name, num_features, kind=kind, **extra)
        except (TypeError, ValueError) as e:
            if name == norm:
                raise
            raise type(e)(f"norm={norm!r}: {e}") from e

    make(6, "conv")  # fail now, with the registry's own message, not mid-construction
    return make


def norm_factory(norm: NormSpec, options: Mapping[str, Any] | None = None) -> NormFactory | None:
    """Resolve a norm name or factory; None for ``"none"``.

    "bnlab": :class:`bnlab.nn.BatchNorm`; "torch": ``nn.BatchNorm2d`` / ``nn.BatchNorm1d`` (the
    chapter's concise version); "none": no norm; any other name: ``bnlab.nn.make_norm(name,
    num_features, kind=..., **options)``. Every name goes through that registry ("bnlab" is its
    "batch", "torch" its "torch-batch"), and a layer that takes ``num_dims`` gets the rank of
    its input (4 after a conv, 2 after a dense layer). ``options`` go to the norm's constructor
    (e.g. ``eps``, ``momentum``, ``convention="d2l"``).
    """
    opts = dict(options or {})
    if callable(norm):
        if opts:
            raise ValueError(
                "norm_options: expected none with a norm factory (bind them in the factory, e.g. "
                f"with functools.partial), got {sorted(opts)}."
            )
        return norm
    if not isinstance(norm, str):
        raise TypeError(
            f"norm: expected a name such as 'bnlab', 'torch' or 'none', or a callable "
            f"(num_features, kind) -> nn.Module, got {type(norm).__name__}."
        )
    if norm == "none":
        if opts:
            raise ValueError(f"norm_options: norm='none' takes no options, got {sorted(opts)}.")
        return None
    return _registry_norm(norm, opts)


def resolve_layers(spec: LayerSpec, name: str) -> tuple[int, ...]:
    """``"all" | "conv" | "dense" | "none"``, ``"0,2"``, or a sequence of hidden-layer indices
    (0, 1 the convolutions; 2, 3 the dense layers) -> sorted unique indices."""
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in LAYER_GROUPS:
            return LAYER_GROUPS[key]
        try:
            indices: Sequence[int] = [int(s) for s in key.split(",") if s.strip()]
        except ValueError:
            raise ValueError(
                f"{name}: expected one of {list(LAYER_GROUPS)} or comma-separated hidden-layer "
                f"indices 0-3 (0, 1 conv; 2, 3 dense) such as '0,2', got {spec!r}."
            ) from None
    else:
        indices = spec
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(HIDDEN_KINDS):
            raise ValueError(
                f"{name}: expected hidden-layer indices in 0-3 (0, 1 conv; 2, 3 dense), got "
                f"{list(indices)!r}."
            )
    return tuple(sorted(set(indices)))


def _activation(spec: ActivationSpec) -> Callable[[], nn.Module]:
    if callable(spec):
        return spec
    try:
        return ACTIVATIONS[spec]
    except (KeyError, TypeError):
        raise ValueError(
            f"activation: expected one of {sorted(ACTIVATIONS)} or a zero-argument callable "
            f"returning an nn.Module, got {spec!r}."
        ) from None


def lenet(
    norm: NormSpec = "bnlab",
    *,
    norm_options: Mapping[str, Any] | None = None,
    norm_layers: LayerSpec = "all",
    norm_position: Literal["before", "after"] = "before",
    activation: ActivationSpec = "sigmoid",
    bias_before_norm: bool = True,
    dropout: float = 0.0,
    dropout_layers: LayerSpec = "dense",
    pool: Literal["max", "avg"] = "max",
    first_conv_padding: int = 0,
    in_channels: int = 1,
    image_size: int = 28,
    num_classes: int = 10,
) -> LeNet:
    """The chapter's BN-LeNet (module docstring); defaults reproduce it exactly.

    Args:
        norm: "bnlab" (:class:`bnlab.nn.BatchNorm`), "torch" (``nn.BatchNorm2d/1d``), "none"
            (plain LeNet), another name looked up in ``bnlab.nn.make_norm``, or a factory
            ``(num_features, kind) -> nn.Module`` with kind "conv" or "dense".
        norm_options: keyword arguments for each norm layer (e.g. ``{"momentum": 0.9,
            "convention": "d2l"}`` for the chapter's from-scratch conventions).
        norm_layers: which hidden layers get a norm: "all", "conv", "dense", "none", or indices
            0-3 (0, 1 the convolutions; 2, 3 the dense layers), as a sequence or "0,2".
        norm_position: "before" the activation (the chapter, and Ioffe & Szegedy) or "after" it.
        activation: "sigmoid" (the chapter), "relu", "tanh", ... or a zero-argument factory.
        bias_before_norm: keep the bias of a conv/dense layer directly followed by a norm. The
            chapter keeps it (True); the norm's mean subtraction cancels it, so False saves
            parameters without changing what the network can express.
        dropout: drop probability p after the activation (conv blocks: after pooling).
        dropout_layers: which hidden layers get dropout when ``dropout > 0`` (same forms as
            ``norm_layers``).
        pool: "max" (the chapter) or "avg" (the original LeNet).
        first_conv_padding: 0 (the chapter's BN-LeNet); 2 gives the LeNet chapter's plain net.
        in_channels, image_size, num_classes: input channels, square input side, outputs.

    Weights keep PyTorch's default init; call :func:`init_weights` for the chapter's Xavier.
    """
    make_norm = norm_factory(norm, norm_options)
    norm_at = set(resolve_layers(norm_layers, "norm_layers")) if make_norm else set()
    drop_at = set(resolve_layers(dropout_layers, "dropout_layers")) if dropout > 0 else set()
    make_act = _activation(activation)
    if norm_position not in ("before", "after"):
        raise ValueError(f"norm_position: expected 'before' or 'after', got {norm_position!r}.")
    if pool not in POOLS:
        raise ValueError(f"pool: expected one of {sorted(POOLS)}, got {pool!r}.")
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}.")
    for arg, value, low in (
        ("first_conv_padding", first_conv_padding, 0),
        ("in_channels", in_channels, 1),
        ("num_classes", num_classes, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{arg}: expected an int >= {low}, got {value!r}.")
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or ((image_size + 2 * first_conv_padding - 4) // 2 - 4) // 2 < 1
    ):
        raise ValueError(
            f"image_size: expected an int large enough for two 5x5 convs and two 2x2 pools "
            f"(>= {16 - 2 * first_conv_padding}), got {image_size!r}."
        )

    side = ((image_size + 2 * first_conv_padding - 4) // 2 - 4) // 2  # 28 -> 24 -> 12 -> 8 -> 4
    widths = (6, 16, 120, 84)
    fan_in = (in_channels, 6, 16 * side * side, 120)
    layers: list[nn.Module] = []
    norm_indices: list[int] = []
    for i, (kind, width, fin) in enumerate(zip(HIDDEN_KINDS, widths, fan_in, strict=True)):
        has_norm = i in norm_at
        bias = bias_before_norm or not (has_norm and norm_position == "before")
        if kind == "conv":
            pad = first_conv_padding if i == 0 else 0
            layers.append(nn.Conv2d(fin, width, kernel_size=5, padding=pad, bias=bias))
        else:
            if i == 2:
                layers.append(nn.Flatten())
            layers.append(nn.Linear(fin, width, bias=bias))
        norm_module = make_norm(width, kind) if (has_norm and make_norm is not None) else None
        act = make_act()
        for module in (norm_module, act) if norm_position == "before" else (act, norm_module):
            if module is None:
                continue
            if module is norm_module:
                norm_indices.append(len(layers))
            layers.append(module)
        if kind == "conv":
            layers.append(POOLS[pool](kernel_size=2, stride=2))
        if i in drop_at:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(84, num_classes))
    return LeNet(*layers, norm_indices=norm_indices)


def init_weights(model: nn.Module) -> nn.Module:
    """Xavier-uniform init of every conv and dense weight (Glorot & Bengio, 2010), the
    chapter's ``init_cnn``; biases and norm parameters keep their defaults. Returns ``model``.

    Separate from :func:`lenet` so that building a model never silently re-initializes one;
    uses the global RNG, so seed it (the training loop does) for reproducible weights.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(module.weight)
    return model


__all__ = [
    "ACTIVATIONS",
    "LAYER_GROUPS",
    "LeNet",
    "NormFactory",
    "NormSpec",
    "init_weights",
    "lenet",
    "norm_factory",
    "norm_names",
    "resolve_layers",
]
