"""The parameters of each lab task, one system for all of them: a frozen dataclass per task,
checked when built, whose :meth:`TaskParams.from_dict` refuses unknown keys (a misspelt key
would otherwise be ignored and the run silently take the default), as
:class:`bnlab.train.TrainConfig` does. Experiments build them to plan a run; the executor
rebuilds them from the run's JSON before the task starts, so a bad plan fails before any work.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from bnlab.train.config import ConfigError, TrainConfig

P = TypeVar("P", bound="TaskParams")


class TaskParams:
    """Base of every task's parameters (subclasses are frozen dataclasses)."""

    task: ClassVar[str]  # the task's name in bnlab.lab.tasks.TASKS, for messages

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples become lists): the run's ``params``, hashed into its key."""
        return {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()  # type: ignore[call-overload]
        }

    @classmethod
    def from_dict(cls: type[P], params: Mapping[str, Any]) -> P:
        """``params`` over the defaults; unknown keys are an error."""
        if not isinstance(params, Mapping):
            raise TypeError(
                f"{cls.task}: expected the parameters as a dict, got {type(params).__name__}."
            )
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(params) - set(names))
        if unknown:
            known = f"known: {sorted(names)}" if names else "it takes none"
            raise ConfigError(
                f"{cls.task}: unknown parameter(s) {unknown}; {known}. Check the spelling, or "
                "leave the key out to take its default."
            )
        missing = [
            f.name
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.name not in params
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(
                f"{cls.task}: missing parameter(s) {missing}; they have no default. Pass them."
            )
        return cls(**params)


def _check_train_config(task: str, config: Any) -> None:
    """A training configuration as runs store it: TrainConfig fields (without out/device,
    which the executor sets), checked by TrainConfig itself."""
    if not isinstance(config, Mapping):
        raise TypeError(
            f"{task}: config: expected a dict of TrainConfig fields such as "
            f"{{'norm': 'bnlab', 'seed': 0}}, got {type(config).__name__}."
        )
    TrainConfig.from_dict(config)


@dataclass(frozen=True)
class TrainParams(TaskParams):
    """One training run (task ``train``)."""

    task: ClassVar[str] = "train"
    config: Mapping[str, Any] = field(default_factory=dict)  # TrainConfig fields, non-default

    def __post_init__(self) -> None:
        _check_train_config(self.task, self.config)


@dataclass(frozen=True)
class BatchOneParams(TaskParams):
    """Batch size 1 (task ``batch_one``): nothing to choose, the chapter's LeNet input."""

    task: ClassVar[str] = "batch_one"


@dataclass(frozen=True)
class ShiftParams(TaskParams):
    """A trained model under shifted inputs (task ``shift``)."""

    task: ClassVar[str] = "shift"
    train_key: str  # the key of the ``train`` run whose model is evaluated
    config: Mapping[str, Any]  # that run's TrainConfig fields (to retrain it if its files are gone)
    # the values are the experiment's (bnlab.lab.experiments.shift), which plans every run
    priors: tuple[int, ...]  # adapt_bn's source weight, in examples (0: the target's alone)
    tent_lr: float  # TENT's Adam rate

    def __post_init__(self) -> None:
        if not (isinstance(self.train_key, str) and len(self.train_key) == 16):
            raise ConfigError(
                f"shift: train_key: expected the 16-character key of a train run, got "
                f"{self.train_key!r}."
            )
        _check_train_config(self.task, self.config)
        priors = self.priors
        if isinstance(priors, str | bytes) or not isinstance(priors, Sequence) or not priors:
            raise ConfigError(
                f"shift: priors: expected a non-empty list of source weights in examples such "
                f"as [0, 1000], got {priors!r}."
            )
        for p in priors:
            if isinstance(p, bool) or not isinstance(p, int) or p < 0:
                raise ConfigError(
                    f"shift: priors: expected ints >= 0 (0: the target's statistics alone), "
                    f"got {p!r}."
                )
        lr = self.tent_lr
        if (
            isinstance(lr, bool)
            or not isinstance(lr, int | float)
            or not (lr > 0 and math.isfinite(lr))
        ):
            raise ConfigError(f"shift: tent_lr: expected a finite number > 0, got {lr!r}.")
        object.__setattr__(self, "priors", tuple(priors))
        object.__setattr__(self, "tent_lr", float(lr))


__all__ = ["BatchOneParams", "ConfigError", "ShiftParams", "TaskParams", "TrainParams"]
