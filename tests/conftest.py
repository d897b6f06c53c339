"""Shared test settings: hypothesis profiles sized for a 2-core CI machine, and the real dataset.

Tests that need the real Fashion-MNIST take the ``real_data_dir`` fixture. It finds the files as
users' runs do ($BNLAB_DATA_DIR, else the per-user cache; no download), and skips the test with
a one-line reason saying how to get them when they are not there. CI sets
``BNLAB_REQUIRE_DATA=1``, which turns that skip into a failure, so there they always run.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from bnlab.data import DATA_DIR_ENV, FASHION_MNIST_SPEC, resolve_data_dir

REQUIRE_DATA_ENV = "BNLAB_REQUIRE_DATA"

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


@functools.cache
def missing_real_data() -> str | None:
    """Why the real dataset cannot be read without a download, or None when it can."""
    directory, origin = resolve_data_dir()
    missing = [f.name for f in FASHION_MNIST_SPEC.files if not (directory / f.name).exists()]
    if not missing:
        return None
    where = f"${DATA_DIR_ENV} ({directory})" if origin == "env" else f"the cache {directory}"
    get = (
        f"put the four files there or unset {DATA_DIR_ENV}"
        if origin == "env"
        else f"set {DATA_DIR_ENV} to a directory holding the four files"
    )
    return (
        f"Fashion-MNIST is not in {where} ({len(missing)} of 4 files missing): {get}, or "
        "download it into the cache with `python -c 'import bnlab.data as d; "
        "d.load_fashion_mnist()'`"
    )


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The directory holding the real Fashion-MNIST, found as users' runs find it; skips (fails
    under BNLAB_REQUIRE_DATA=1) when it is not there."""
    reason = missing_real_data()
    if reason is not None:
        if os.environ.get(REQUIRE_DATA_ENV) == "1":
            pytest.fail(f"{REQUIRE_DATA_ENV}=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return resolve_data_dir()[0]
