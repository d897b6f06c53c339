"""The training configuration: one typed dataclass with commented defaults; the ``bnlab train``
options are generated from its fields, and the resolved config is saved with every run."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value (or option combination) that cannot be used; the message says why
    and how to fix it."""


def option(
    default: T,
    help: str,
    *,
    flag: str | None = None,
    metavar: str | None = None,
    cli: bool = True,
) -> T:
    """A config field: its default and the help text ``bnlab train --help`` shows (``cli``:
    whether it is a command-line option at all)."""
    metadata = {"help": help, "flag": flag, "metavar": metavar, "cli": cli}
    if isinstance(default, list | dict | set):
        raise TypeError("option: use an immutable default (tuple) for dataclass fields.")
    return typing.cast(T, field(default=default, metadata=metadata))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; the defaults are the chapter's (lr 1.0, 10 epochs, batch
    256, plain SGD, BN-LeNet with sigmoid)."""

    # --- what is trained
    model: str = option(
        "lenet",
        "the network: 'lenet', the chapter's BN-LeNet that the options below describe; a run of "
        "train(config, model=...) records the class of the model it was given",
        cli=False,
    )
    norm: str = option(
        "bnlab",
        "normalization layer: 'bnlab' (bnlab.nn.BatchNorm, from scratch), 'torch' "
        "(nn.BatchNorm1d/2d, the chapter's concise version), 'none' (plain LeNet), or a name "
        "registered in bnlab.nn.make_norm",
        metavar="NAME",
    )
    norm_options: tuple[str, ...] = option(
        (),
        "a KEY=VALUE option for every norm layer, repeatable (e.g. --norm-option "
        "convention=d2l --norm-option momentum=0.9 for the chapter's from-scratch conventions); "
        "VALUE is read as JSON or a Python literal (0.9, null or None, true or True) when it "
        "parses, else as a string",
        flag="--norm-option",
        metavar="KEY=VALUE",
    )
    norm_layers: str = option(
        "all",
        "which hidden layers get a norm: all, conv, dense, none, or indices such as 0,2 "
        "(0, 1 the convolutions; 2, 3 the dense layers)",
        metavar="LAYERS",
    )
    norm_position: Literal["before", "after"] = option(
        "before", "put the norm before the activation (the chapter) or after it"
    )
    activation: str = option(
        "sigmoid", "activation: sigmoid (the chapter), relu, tanh, gelu, ...", metavar="NAME"
    )
    bias_before_norm: bool = option(
        True, "keep the bias of a conv/dense layer directly followed by a norm (the chapter does)"
    )
    dropout: float = option(0.0, "dropout probability after the activation (0: none)", metavar="P")
    dropout_layers: str = option(
        "dense", "which hidden layers get dropout (as --norm-layers)", metavar="LAYERS"
    )
    pool: Literal["max", "avg"] = option("max", "pooling: max (the chapter) or avg")
    # --- how it is trained (plain SGD, the chapter's optimizer)
    lr: float = option(1.0, "SGD learning rate (the chapter: 1.0 with BN, 0.9 without)")
    epochs: int = option(10, "number of epochs", metavar="N")
    batch_size: int = option(
        256, "minibatch size (>= 2: BN needs two values per channel)", metavar="N"
    )
    micro_batches: int = option(
        1,
        "gradient accumulation: split each batch into N micro-batches, one forward/backward "
        "each, and take one optimizer step per batch (BN normalizes each micro-batch with its "
        "own statistics)",
        metavar="N",
    )
    accumulate_bn: bool = option(
        False,
        "with --micro-batches N > 1: update the BN running statistics once per optimizer step, "
        "from the merged statistics of its N micro-batches (bnlab.tools.accumulate_bn), "
        "instead of once per micro-batch",
    )
    seed: int = option(0, "seed of the weight init, the shuffling and dropout", metavar="N")
    subset: int | None = option(
        None,
        "train on the first N training images only (quick runs); default: all 60000",
        metavar="N",
    )
    test_subset: int | None = option(
        None,
        "evaluate on the first N test images only (quick runs); default: all 10000",
        metavar="N",
    )
    # --- where
    device: str = option(
        "auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:1, ...", metavar="DEVICE"
    )
    threads: int | None = option(
        None,
        "torch CPU threads (default: torch's, one per core); on a machine shared with other "
        "jobs, 1 avoids threads waiting on each other. Part of the run: results are exact "
        "across resume only with the same count",
        metavar="N",
    )
    sync_bn: bool = option(
        True,
        "with several processes (--nproc, torchrun): synchronized BatchNorm, statistics of the "
        "whole global batch; --no-sync-bn keeps per-process BN as plain DDP (each process "
        "normalizes with its own part) and makes the running statistics identical on every "
        "process (bnlab.distributed.sync_running_stats) before every evaluation and checkpoint",
    )
    data_dir: str | None = option(
        None,
        "Fashion-MNIST directory (default: $BNLAB_DATA_DIR, else the per-user cache; "
        "downloaded when missing)",
        metavar="DIR",
    )
    out: str | None = option(
        None,
        "run directory (default: runs/<timestamp>-<norm> under the current directory)",
        metavar="DIR",
    )

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            _check_type(f.name, value, hints[f.name])
            if hints[f.name] is float and isinstance(value, int):
                object.__setattr__(self, f.name, float(value))  # lr=1 is saved as 1.0
        for name, low in (
            ("epochs", 1),
            ("batch_size", 2),
            ("subset", 2),
            ("test_subset", 1),
            ("threads", 1),
            ("micro_batches", 1),
        ):
            value = getattr(self, name)
            if value is not None and value < low:
                extra = (
                    " A batch of one leaves a single value per channel, from which BN cannot "
                    "compute a variance."
                    if name == "batch_size"
                    else ""
                )
                raise ConfigError(f"{name}: expected an int >= {low}, got {value}.{extra}")
        if self.batch_size < 2 * self.micro_batches:
            raise ConfigError(
                f"micro_batches: each of the {self.micro_batches} micro-batches needs at least 2 "
                f"examples for BN's statistics, so expected batch_size >= "
                f"{2 * self.micro_batches}, got {self.batch_size}. Use fewer micro-batches or a "
                "larger batch."
            )
        if self.accumulate_bn and self.micro_batches == 1:
            raise ConfigError(
                "accumulate_bn: expected --micro-batches N > 1 (with one micro-batch per step "
                "the running statistics are already updated once per step), got 1."
            )
        if not self.lr > 0:
            raise ConfigError(f"lr: expected a positive learning rate such as 1.0, got {self.lr}.")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: expected a probability in [0, 1), got {self.dropout}.")
        self.parsed_norm_options()  # fails early on a malformed KEY=VALUE

    def parsed_norm_options(self) -> dict[str, Any]:
        """``("momentum=0.9", "convention=d2l")`` -> ``{"momentum": 0.9, "convention": "d2l"}``."""
        parsed: dict[str, Any] = {}
        for item in self.norm_options:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(
                    f"norm_options: expected KEY=VALUE items such as 'momentum=0.9', got {item!r}."
                )
            parsed[key.strip()] = _option_value(raw)
        return parsed

    def lenet_fields(self) -> dict[str, Any]:
        """The fields that describe the built-in LeNet (none of them used with a model of
        one's own), with their values."""
        return {k: getattr(self, k) for k in LENET_FIELDS}

    def model_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`bnlab.models.lenet` this config asks for."""
        return {**self.lenet_fields(), "norm_options": self.parsed_norm_options()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples become lists."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a config from another version
        should not be half-applied)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"config: unknown keys {unknown}; expected a subset of {sorted(names)}."
            )
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
        }
        return cls(**values)


# the fields that configure the built-in LeNet (model="lenet")
LENET_FIELDS = (
    "norm",
    "norm_options",
    "norm_layers",
    "norm_position",
    "activation",
    "bias_before_norm",
    "dropout",
    "dropout_layers",
    "pool",
)


def _option_value(raw: str) -> Any:
    """A --norm-option VALUE: JSON (0.9, null, true), else a Python literal (None, True), else
    the string itself (a bare word such as d2l)."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return raw


def _check_type(name: str, value: Any, hint: Any) -> None:
    origin = get_origin(hint)
    if origin is Literal:
        if value not in get_args(hint):
            raise ConfigError(f"{name}: expected one of {list(get_args(hint))}, got {value!r}.")
        return
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in get_args(hint):
            return
        (hint,) = [a for a in get_args(hint) if a is not type(None)]
        origin = get_origin(hint)
    if origin is tuple:
        if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}: expected a tuple of strings, got {value!r}.")
        return
    ok = (
        isinstance(value, int | float) and not isinstance(value, bool)
        if hint is float
        else isinstance(value, hint) and (hint is bool or not isinstance(value, bool))
    )
    if not ok:
        raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}.")


# --- the command line, generated from the fields


def _flag(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[TrainConfig]) -> None:
    """One option per field: its type, choices (Literal), help and default come from the field.

    Defaults are left out of the namespace (``argparse.SUPPRESS``) so that
    :func:`config_overrides` can tell an option given on the command line from a default.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        hint = hints[f.name]
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if get_origin(hint) in (types.UnionType, typing.Union):
            (hint,) = [a for a in get_args(hint) if a is not type(None)]
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(hint) is Literal:
            kwargs["choices"] = list(get_args(hint))
        elif get_origin(hint) is tuple:
            kwargs["action"] = "append"
            kwargs["type"] = str
        else:
            kwargs["type"] = hint
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        default = "" if f.default in (None, ()) else f" (default: {f.default})"
        parser.add_argument(_flag(f), help=f.metadata.get("help", "") + default, **kwargs)


def config_overrides(args: argparse.Namespace, cls: type[TrainConfig]) -> dict[str, Any]:
    """The config fields given on the command line (lists turned into tuples)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names}


def flag_of(name: str, cls: type[TrainConfig] = TrainConfig) -> str:
    """The command-line flag of a config field (for error messages); the name itself for a
    field that has none, or is no field."""
    for f in dataclasses.fields(cls):
        if f.name == name and f.metadata.get("cli", True):
            return _flag(f)
    return name


def describe_fields(names: Iterable[str]) -> str:
    """``["lr", "epochs"]`` -> ``"lr (--lr), epochs (--epochs)"``, for messages read by both
    the Python API's and the command line's users."""
    return ", ".join(n if flag_of(n) == n else f"{n} ({flag_of(n)})" for n in names)


__all__ = [
    "LENET_FIELDS",
    "ConfigError",
    "TrainConfig",
    "add_config_arguments",
    "config_overrides",
    "describe_fields",
    "flag_of",
    "option",
]
