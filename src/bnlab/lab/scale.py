"""How big a reproduction is: the full chapter setup, or a quick one clearly labelled as such."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Scale:
    name: str  # "full" or "quick"; printed on every report section
    seeds: int  # repetitions per configuration (means with 95% CIs over these)
    epochs: int  # the chapter trains 10
    subset: int | None  # training images used (None: all 60,000)
    measure_every: int  # steps between probes in the controversy experiment
    test_subset: int | None = None  # test images used (None: all 10,000; smaller in tests only)
    costly_seeds: int | None = None  # seeds of the costly sweeps (lr, batch size, controversy)

    def seeds_for(self, costly: bool) -> int:
        return min(self.seeds, self.costly_seeds or self.seeds) if costly else self.seeds

    @property
    def quick(self) -> bool:
        return self.name == "quick"

    def describe(self) -> str:
        data = "all 60,000" if self.subset is None else f"the first {self.subset:,}"
        text = (
            f"{self.name} scale: {self.epochs} epoch(s), {self.seeds} seed(s) per arm "
            f"({self.seeds_for(True)} in the costly sweeps), {data} training images, "
            + (
                "the full 10,000-image test set"
                if self.test_subset is None
                else f"the first {self.test_subset:,} test images"
            )
        )
        if self.quick:
            text += (
                " — a QUICK smoke run of the pipeline: its numbers are not evidence and not the "
                "chapter's setup"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = Scale("full", seeds=5, epochs=10, subset=None, measure_every=25, costly_seeds=3)
QUICK = Scale("quick", seeds=2, epochs=2, subset=4096, measure_every=8, costly_seeds=2)


def make_scale(quick: bool, seeds: int | None = None, epochs: int | None = None) -> Scale:
    """The full or quick scale; ``seeds`` replaces every seed count (at least 2, so that each
    mean has a confidence interval)."""
    base = QUICK if quick else FULL
    if seeds is not None and seeds < 2:
        raise ValueError(
            f"seeds: expected at least 2 (a confidence interval needs two values), got {seeds}."
        )
    if seeds is not None:
        base = replace(base, seeds=seeds, costly_seeds=seeds)
    return replace(base, epochs=epochs or base.epochs)
