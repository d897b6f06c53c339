"""How big a reproduction is: the full chapter setup, or a quick one clearly labelled as such."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Scale:
    name: str  # "full" or "quick"; printed on every report section
    seeds: int  # repetitions per configuration (mean ± std over these)
    epochs: int  # the chapter trains 10
    subset: int | None  # training images used (None: all 60,000)
    measure_every: int  # steps between probes in the controversy experiment
    test_subset: int | None = None  # test images used (None: all 10,000; smaller in tests only)

    @property
    def quick(self) -> bool:
        return self.name == "quick"

    def describe(self) -> str:
        data = "all 60,000" if self.subset is None else f"the first {self.subset:,}"
        text = (
            f"{self.name} scale: {self.epochs} epoch(s), {self.seeds} seed(s), {data} training "
            "images, "
            + (
                "the full 10,000-image test set"
                if self.test_subset is None
                else f"the first {self.test_subset:,} test images"
            )
        )
        if self.quick:
            text += " — a QUICK run: numbers are indicative only, not the chapter's setup"
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = Scale("full", seeds=3, epochs=10, subset=None, measure_every=25)
QUICK = Scale("quick", seeds=1, epochs=2, subset=4096, measure_every=8)


def make_scale(quick: bool, seeds: int | None = None, epochs: int | None = None) -> Scale:
    base = QUICK if quick else FULL
    return replace(base, seeds=seeds or base.seeds, epochs=epochs or base.epochs)
