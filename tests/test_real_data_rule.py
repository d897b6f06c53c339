"""The fresh-machine rule for tests that read the real Fashion-MNIST (tests/conftest.py): where
the files cannot be found they skip with a one-line reason saying how to get them, and under
BNLAB_REQUIRE_DATA=1 (as CI sets) the same tests fail instead."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
A_REAL_DATA_TEST = "tests/test_data.py::test_real_copy_shapes_and_dtypes"


def run_pytest(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pytest", A_REAL_DATA_TEST, "-q", "-rs", "-p", "no:cacheprovider"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_missing_data_skips_with_a_how_to_and_fails_where_required(tmp_path: Path) -> None:
    empty = tmp_path / "no-data"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "BNLAB_REQUIRE_DATA"}
    env["BNLAB_DATA_DIR"] = str(empty)
    skipped = run_pytest(env)
    assert skipped.returncode == 0, skipped.stdout
    assert "1 skipped" in skipped.stdout
    reason = next(line for line in skipped.stdout.splitlines() if line.startswith("SKIPPED"))
    assert f"Fashion-MNIST is not in $BNLAB_DATA_DIR ({empty})" in reason
    assert "put the four files there" in reason and "load_fashion_mnist()" in reason
    failed = run_pytest({**env, "BNLAB_REQUIRE_DATA": "1"})
    assert failed.returncode == 1, failed.stdout
    assert "BNLAB_REQUIRE_DATA=1 but Fashion-MNIST is not in" in failed.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="XDG_CACHE_HOME places the cache on Linux")
def test_the_cache_is_where_the_tests_look_without_the_variable(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("BNLAB_REQUIRE_DATA", "BNLAB_DATA_DIR")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # the per-user cache on Linux
    skipped = run_pytest(env)
    assert skipped.returncode == 0, skipped.stdout
    assert f"not in the cache {tmp_path / 'cache' / 'bnlab' / 'fashion-mnist'}" in skipped.stdout
