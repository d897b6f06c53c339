"""The benchmark in a tiny configuration: the structure of its table and JSON, not its speed."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import pytest
import torch

from bnlab.bench import BenchConfig, run_benchmark
from bnlab.bench.kernels import naive_batch_norm
from bnlab.bench.timing import time_interleaved
from bnlab.cli import main
from bnlab.functional import native

TINY = BenchConfig(
    shapes=((8, 3, 4, 4), (16, 5)),
    reps=3,
    warmup=1,
    min_sample_s=0.0,
    compiled=False,
    native=True,
    lenet_norms=("bnlab", "bnlab_native", "torch", "none"),
    lenet_images=96,
    lenet_rounds=1,
    batch_size=64,
)


def test_tiny_run_has_every_case_and_contender() -> None:
    lines: list[str] = []
    result = run_benchmark(TINY, progress=lines.append)
    # (8,3,4,4): contiguous and channels_last, train and eval; (16,5): train and eval
    cases = [(k.shape, k.layout, k.mode) for k in result.kernels]
    assert cases == [
        ((8, 3, 4, 4), "contiguous", "train"),
        ((8, 3, 4, 4), "contiguous", "eval"),
        ((8, 3, 4, 4), "channels_last", "train"),
        ((8, 3, 4, 4), "channels_last", "eval"),
        ((16, 5), "contiguous", "train"),
        ((16, 5), "contiguous", "eval"),
    ]
    for k in result.kernels:
        expected = (
            {"fast", "native", "reference", "naive", "torch", "floor", "floor_alloc"}
            if k.mode == "train"
            else {"bnlab", "native", "naive", "torch", "floor", "floor_alloc"}
        )
        assert set(k.times) == expected
        assert k.ratio("torch") == 1.0
        for t in k.times.values():
            assert t.samples == 3 and t.median_s > 0 and t.q1_s <= t.median_s <= t.q3_s
    assert [e.norm for e in result.lenet] == ["bnlab", "bnlab_native", "torch", "none"]
    assert all(len(e.seconds) == 1 and e.seconds[0] > 0 for e in result.lenet)
    # one line for the native build, then one per case and per epoch
    assert lines[0].startswith("native kernel: ")
    assert len(lines) == 1 + len(result.kernels) + len(result.lenet)
    assert result.native is not None and result.native.available

    data = json.loads(json.dumps(result.to_json()))  # JSON-serializable as is
    assert {"date", "cpu", "cores", "torch", "torch_threads", "device"} <= set(data["machine"])
    assert data["machine"]["torch"] == torch.__version__
    assert len(data["kernels"]) == 6 and len(data["lenet"]) == 4
    # the build is reported, whether compiled now or loaded from the disk cache
    nat = data["native"]
    assert nat["available"] is True and nat["error"] is None
    assert isinstance(nat["build_s"], float) and nat["build_s"] >= 0
    assert isinstance(nat["was_cached"], bool) and isinstance(nat["loaded_before"], bool)
    assert nat["cache_limit_bytes"] == native.output_cache_info()["limit_bytes"]
    row = data["kernels"][0]
    assert row["ratio_to_torch"]["torch"] == 1.0
    assert math.isclose(
        row["ratio_to_torch"]["fast"],
        row["times"]["fast"]["median_s"] / row["times"]["torch"]["median_s"],
    )
    names = [g["name"] for g in data["goals"]]
    # the LeNet and large-shape goals need those shapes; these tiny ones give only the others
    assert names == [
        "training fwd+bwd, fast, every case",
        "training fwd+bwd, native, every case",
        "eval forward, bnlab, every case",
        "eval forward, native, every case",
        "BN-LeNet epoch, bnlab",
        "BN-LeNet epoch, bnlab_native",
    ]
    assert all(isinstance(g["met"], bool) for g in data["goals"])

    table = result.to_markdown()
    for heading in ("## Training", "## Eval", "## BN-LeNet training epoch", "## Goals"):
        assert heading in table
    assert "| 8×3×4×4 | channels_last |" in table and "| 16×5 | contiguous |" in table
    assert 'Native kernel (impl="native"): ' in table and " s" in table
    assert "| shape | layout | fast | native | reference |" in table  # training
    assert "| shape | layout | bnlab | native | naive |" in table  # eval
    assert "| bnlab_native |" in table


def test_native_build_failure_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    @functools.cache
    def broken() -> object:
        raise native.NativeBuildError("bnlab: could not build the native kernel (no g++)")

    monkeypatch.setattr(native, "build_native", broken)
    result = run_benchmark(dataclasses.replace(TINY, shapes=((6, 2),), lenet_images=64))
    assert result.native is not None and not result.native.available
    assert result.native.error is not None and "no g++" in result.native.error
    assert all("native" not in k.times for k in result.kernels)
    assert [e.norm for e in result.lenet] == ["bnlab", "torch", "none"]
    data = json.loads(json.dumps(result.to_json()))
    assert data["native"]["available"] is False and "no g++" in data["native"]["error"]
    assert {"name": "native kernel measured", "met": False}.items() <= data["goals"][0].items()
    table = result.to_markdown()
    assert "unavailable: bnlab: could not build the native kernel (no g++)" in table
    assert "| shape | layout | fast | native | reference |" in table
    assert "| 6×2 | contiguous | " in table and "| unavailable |" in table


def test_cli_writes_markdown_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results" / "bench"
    args = ["bench", "--quick", "--shapes", "6x2x3x3", "--reps", "2", "--lenet-images", "64"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (tmp_path / "results" / "bench.md").read_text()
    data = json.loads((tmp_path / "results" / "bench.json").read_text())
    assert md in printed
    assert [tuple(k["shape"]) for k in data["kernels"]] == [(6, 2, 3, 3)] * 4
    assert data["config"]["compiled"] is False  # --quick does not torch.compile
    assert data["config"]["native"] is True and data["native"]["available"] is True
    assert [e["norm"] for e in data["lenet"]] == ["bnlab", "bnlab_native", "torch", "none"]


def test_cli_no_native(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "--quick", "--no-native", "--shapes", "6x2", "--reps", "1", "--no-lenet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "native" not in printed  # not asked for: no column, no build line, no goal


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shapes", "256x"], "expected shapes like"),
        (["--reps", "0"], "--reps: expected an int >= 1"),
        (["--lenet-images", "1"], "--lenet-images: expected an int >= 2"),
    ],
)
def test_cli_rejects_bad_options(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["bench", "--quick", *args])
    except SystemExit as e:  # argparse's own type errors exit with 2
        code = int(e.code or 0)
    assert code == 2
    assert message in capsys.readouterr().err


def test_naive_formula_is_the_chapters() -> None:
    """The benchmarked naive contender computes batch norm (against torch's, as an oracle)."""
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    gamma = torch.rand(1, 3, 1, 1, dtype=torch.float64) + 0.5
    beta = torch.randn(1, 3, 1, 1, dtype=torch.float64)
    mm, mv = (
        torch.zeros(1, 3, 1, 1, dtype=torch.float64),
        torch.ones(1, 3, 1, 1, dtype=torch.float64),
    )
    y, new_mm, _ = naive_batch_norm(x, gamma, beta, mm, mv, 1e-5, 0.1, training=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    ref = torch.nn.functional.batch_norm(
        x, rm, rv, gamma.flatten(), beta.flatten(), training=True, momentum=0.1
    )
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(new_mm.flatten(), rm)  # momentum 0.1 on the new batch, as torch
    y_eval, _, _ = naive_batch_norm(x, gamma, beta, mm, mv, 1e-5, 0.1, training=False)
    torch.testing.assert_close(y_eval, gamma * x / math.sqrt(1 + 1e-5) + beta)


def test_cpu_clock_needs_one_thread() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(ValueError, match="get_num_threads"):
            run_benchmark(dataclasses.replace(TINY, clock="cpu", lenet_images=0))
        torch.set_num_threads(1)
        result = run_benchmark(
            dataclasses.replace(TINY, shapes=((6, 2),), clock="cpu", lenet_images=0)
        )
        assert result.config["clock"] == "cpu" and "CPU time" in result.to_markdown()
    finally:
        torch.set_num_threads(threads)


def test_interleaved_timing_validates_and_counts() -> None:
    calls = {"a": 0, "b": 0}

    def bump(name: str) -> None:
        calls[name] += 1

    t = time_interleaved(
        {"a": lambda: bump("a"), "b": lambda: bump("b")},
        reps=4,
        warmup=2,
        min_sample_s=0.0,
        sync=lambda: None,
    )
    assert calls == {"a": 2 + 4, "b": 2 + 4}  # warm-up, then one call per sample
    assert t["a"].samples == 4 and t["a"].inner == 1
    with pytest.raises(ValueError, match="reps >= 1"):
        time_interleaved({"a": lambda: None}, reps=0, warmup=1, min_sample_s=0, sync=lambda: None)
