"""The parameters of one controversy run: a typed frozen dataclass with commented defaults,
checked when built; :meth:`ControversyConfig.from_dict` refuses unknown keys, as every task's
parameters do (:mod:`bnlab.lab.params`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from bnlab.lab.params import TaskParams
from bnlab.train.config import ConfigError

NORMS: Final[tuple[str, ...]] = ("bnlab", "none", "noisy")


def _check_number(
    value: Any, name: str, *, low: float, inclusive: bool = False, example: str = "1.0"
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name}: expected a number such as {example}, got {value!r}.")
    ok = value >= low if inclusive else value > low
    if not (ok and math.isfinite(value)):
        bound = f">= {low}" if inclusive else f"> {low}"
        raise ConfigError(f"{name}: expected a finite number {bound}, e.g. {example}; got {value}.")


def _check_int(value: Any, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}: expected an int >= {low}, got {value!r}.")


@dataclass(frozen=True)
class ControversyConfig(TaskParams):
    """Everything that defines one run of :func:`bnlab.lab.controversy.run_controversy`."""

    task: ClassVar[str] = "controversy"

    norm: str = "bnlab"  # "bnlab" (the chapter's BN-LeNet) | "none" | "noisy" (BN + noise)
    lr: float = 1.0  # SGD learning rate (the chapter's BN-LeNet uses 1.0)
    epochs: int = 2
    subset: int | None = 6000  # the first N training images; None: all 60,000
    batch_size: int = 256  # the chapter's
    seed: int = 0  # weights, shuffling and noise all derive from it
    measure_every: int = 10  # steps between probes (step 0 is probed)
    # Multiples of lr probed along the gradient: from half of the SGD step to four times it,
    # so the step SGD takes sits inside the range.
    step_sizes: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0, 4.0)
    noise_mean: float = 0.5  # bound a of the per-step means (noisy only, NonstationaryNoise)
    noise_std: float = 0.5  # bound b of the per-step spreads (noisy only)
    device: str = "cpu"  # where the run trains; the results do not depend on it

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ConfigError(
                f"norm: expected one of {list(NORMS)}, got {self.norm!r}. 'noisy' is BN "
                "followed by non-stationary noise."
            )
        _check_number(self.lr, "lr", low=0.0)
        _check_int(self.epochs, "epochs", 1)
        _check_int(self.batch_size, "batch_size", 2)
        _check_int(self.measure_every, "measure_every", 1)
        _check_int(self.seed, "seed", 0)
        if self.subset is not None:
            _check_int(self.subset, "subset", 2)
        for name in ("noise_mean", "noise_std"):
            _check_number(getattr(self, name), name, low=0.0, inclusive=True, example="0.5")
        steps = self.step_sizes
        if isinstance(steps, str | bytes) or not isinstance(steps, Sequence) or not steps:
            raise ConfigError(
                f"step_sizes: expected a non-empty list of positive multiples of lr such as "
                f"[0.5, 1, 2, 4], got {steps!r}."
            )
        for s in steps:
            _check_number(s, "step_sizes[...]", low=0.0, example="0.5")
        if not isinstance(self.device, str):
            raise TypeError(
                f"device: expected a device name such as 'cpu' or 'cuda', got {self.device!r}."
            )
        # stored as floats, so lr=1 and lr=1.0 describe (and cache as) the same run
        for name in ("lr", "noise_mean", "noise_std"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "step_sizes", tuple(float(s) for s in steps))


__all__ = ["NORMS", "ConfigError", "ControversyConfig"]
