"""The chapter's claims and exercises as named experiments (``bnlab reproduce --only NAME``)."""

from bnlab.lab.experiments.base import Experiment
from bnlab.lab.experiments.batch_size import BATCH_SIZE
from bnlab.lab.experiments.chapter import CHAPTER
from bnlab.lab.experiments.controversy import CONTROVERSY
from bnlab.lab.experiments.exercises import (
    ACCUMULATION,
    AFFINE,
    DROPOUT,
    FOLD,
    NORMS,
    PLACEMENT,
)
from bnlab.lab.experiments.lr import LR
from bnlab.lab.experiments.population import POPULATION
from bnlab.lab.experiments.shift import SHIFT

# in the report's order: the chapter first, then its exercises, then the discussion, then
# what goes beyond the chapter
EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        CHAPTER,
        LR,
        PLACEMENT,
        DROPOUT,
        AFFINE,
        BATCH_SIZE,
        POPULATION,
        FOLD,
        NORMS,
        CONTROVERSY,
        ACCUMULATION,
        SHIFT,
    )
}

__all__ = ["EXPERIMENTS", "Experiment"]
