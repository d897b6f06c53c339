"""Shared test settings: hypothesis profiles sized for a 2-core CI machine, and the data path."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    deadline=None,  # shared machine: a slow example is not a failure
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=400)
# CI explores the same examples every run, so a verdict does not depend on the draw; local runs
# (and HYPOTHESIS_PROFILE=thorough) keep exploring new ones
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default")
)

# Local runs without BNLAB_DATA_DIR use the checkout's sibling copy; CI sets the variable.
os.environ.setdefault(
    "BNLAB_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared/data/fashion-mnist")
)
