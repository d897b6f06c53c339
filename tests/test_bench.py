"""The benchmark in a tiny configuration: the structure of its table and JSON, not its speed."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from bnlab.bench import BenchConfig, BenchResult, run_benchmark
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
    lenet_norms=("bnlab", "bnlab_eager", "bnlab_native", "torch", "none"),
    lenet_images=96,
    lenet_rounds=1,
    train_pairs=0,  # the `bnlab train` runs have tests of their own below
    batch_size=64,
    threads=(1, 2),
    first_step=False,
)
CASES = [
    ((8, 3, 4, 4), "contiguous", "train"),
    ((8, 3, 4, 4), "contiguous", "eval"),
    ((8, 3, 4, 4), "channels_last", "train"),
    ((8, 3, 4, 4), "channels_last", "eval"),
    ((16, 5), "contiguous", "train"),
    ((16, 5), "contiguous", "eval"),
]


def test_tiny_run_has_every_case_and_contender() -> None:
    lines: list[str] = []
    threads = torch.get_num_threads()
    result = run_benchmark(TINY, progress=lines.append)
    assert torch.get_num_threads() == threads  # restored
    # per thread count: (8,3,4,4) contiguous and channels_last, train and eval; (16,5)
    for rows in (result.modules, result.kernels):
        cases = [(k.threads, k.shape, k.layout, k.mode) for k in rows]
        assert cases == [(n, *c) for n in (1, 2) for c in CASES]
    for k in result.modules:
        assert set(k.times) == {"bnlab", "bnlab_eager", "torch"}
    for k in result.kernels:
        expected = (
            {"eager", "native", "reference", "naive", "torch", "floor", "floor_alloc"}
            if k.mode == "train"
            else {"bnlab", "native", "naive", "torch", "floor", "floor_alloc"}
        )
        assert set(k.times) == expected
    for k in (*result.modules, *result.kernels):
        assert k.ratio("torch") == 1.0
        for t in k.times.values():
            assert t.samples == 3 and t.median_s > 0 and t.q1_s <= t.median_s <= t.q3_s
    norms = ["bnlab", "bnlab_eager", "bnlab_native", "torch", "none"]
    assert [(e.threads, e.norm) for e in result.lenet] == [(n, m) for n in (1, 2) for m in norms]
    assert all(len(e.seconds) == 1 and e.seconds[0] > 0 for e in result.lenet)
    # one line for the native kernel's load, then one per case and per epoch
    assert lines[0].startswith("native kernel: loaded from its build")
    assert len(lines) == 1 + len(result.modules) + len(result.kernels) + len(result.lenet)
    assert result.native is not None and result.native.available and result.native.was_cached

    data = json.loads(json.dumps(result.to_json()))  # JSON-serializable as is
    assert {"date", "cpu", "cores", "torch", "device"} <= set(data["machine"])
    assert data["machine"]["torch"] == torch.__version__
    assert len(data["modules"]) == len(data["kernels"]) == 12 and len(data["lenet"]) == 10
    nat = data["native"]
    assert nat["available"] is True and nat["error"] is None and nat["path"]
    assert isinstance(nat["build_s"], float) and nat["build_s"] >= 0
    assert nat["cache_limit_bytes"] == native.output_cache_info()["limit_bytes"]
    row = data["modules"][0]
    assert row["ratio_to_torch"]["torch"] == 1.0 and row["threads"] == 1
    assert math.isclose(
        row["ratio_to_torch"]["bnlab"],
        row["times"]["bnlab"]["median_s"] / row["times"]["torch"]["median_s"],
    )
    goals = [(g["name"], g["threads"]) for g in data["goals"]]
    # the LeNet-mean and large-shape goals need those shapes; these tiny ones give the others
    per_thread = [
        "layer training fwd+bwd, default BatchNorm, every case",
        "layer eval, default BatchNorm, every case",
        "function training fwd+bwd, native, every case",
        "function eval, native, every case",
    ]
    assert goals == [(name, n) for n in (1, 2) for name in per_thread]
    assert all(isinstance(g["met"], bool) for g in data["goals"])

    table = result.to_markdown()
    for heading in (
        "## 1 thread",
        "## 2 threads",
        "### Layers, training",
        "### Layers, eval",
        "### Functions, training",
        "### Functions, eval",
        "### BN-LeNet training epoch",
        "## Goals",
    ):
        assert heading in table
    assert "| 8×3×4×4 | channels_last |" in table and "| 16×5 | contiguous |" in table
    assert 'the default kernel (impl="auto") is the C++ kernel' in table
    assert "| shape | layout | bnlab | bnlab_eager | torch |" in table  # layers
    assert "| shape | layout | native | eager | reference |" in table  # training functions
    assert "| shape | layout | native | bnlab | naive |" in table  # eval functions
    assert "| bnlab_native |" in table


def test_layers_run_what_users_build() -> None:
    """The timed layers: bnlab's default, its eager kernel, and torch's own class per rank."""
    from bnlab.bench.modules import layers

    built = layers(6, 4)
    assert built["bnlab"].impl == "auto" and built["bnlab_eager"].impl == "eager"
    assert type(built["torch"]) is torch.nn.BatchNorm2d
    assert type(layers(6, 2)["torch"]) is torch.nn.BatchNorm1d


def test_first_step_runs_in_a_fresh_process() -> None:
    from bnlab.bench.startup import first_step

    step = first_step()
    assert step.native and not step.compiled and step.seconds > 0
    result = run_benchmark(
        dataclasses.replace(TINY, shapes=((6, 2),), lenet_images=0, threads=(1,))
    )
    result.first_step = step
    goal = result.goals()[0]
    assert goal.name.startswith("first training step") and goal.threads is None
    assert "nothing compiled" in goal.value


def test_missing_native_build_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_load", None)
    monkeypatch.setattr(native, "_unavailable", "no build in /nowhere")
    result = run_benchmark(dataclasses.replace(TINY, shapes=((6, 2),), lenet_images=64))
    assert result.native is not None and not result.native.available
    assert result.native.error is not None and "no build in /nowhere" in result.native.error
    assert "bnlab build" in result.native.error
    assert all("native" not in k.times for k in result.kernels)
    assert [e.norm for e in result.lenet if e.threads == 1] == [
        "bnlab",
        "bnlab_eager",
        "torch",
        "none",
    ]
    data = json.loads(json.dumps(result.to_json()))
    assert data["native"]["available"] is False and "/nowhere" in data["native"]["error"]
    assert {
        "name": "C++ kernel available (the default's kernel on the CPU)",
        "met": False,
    }.items() <= data["goals"][0].items()
    table = result.to_markdown()
    assert "unavailable: no build in /nowhere" in table
    assert 'the default kernel (impl="auto") is the eager kernel ("eager") here' in table
    assert "| shape | layout | native | eager | reference |" in table
    assert "| 6×2 | contiguous | unavailable |" in table


def test_cli_writes_markdown_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results" / "bench"
    args = ["bench", "--quick", "--shapes", "6x2x3x3", "--reps", "2", "--lenet-images", "64"]
    args += ["--threads", "1", "--no-first-step"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (out / "bench.md").read_text()
    data = json.loads((out / "bench.json").read_text())
    assert md in printed
    assert [tuple(k["shape"]) for k in data["kernels"]] == [(6, 2, 3, 3)] * 4
    assert [tuple(k["shape"]) for k in data["modules"]] == [(6, 2, 3, 3)] * 4
    assert data["config"]["compiled"] is False  # --quick does not torch.compile
    assert data["config"]["threads"] == [1]
    assert data["config"]["native"] is True and data["native"]["available"] is True
    assert [e["norm"] for e in data["lenet"]] == ["bnlab", "bnlab_eager", "torch", "none"]


def test_cli_no_native(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "--quick", "--no-native", "--shapes", "6x2", "--reps", "1", "--no-lenet"]
    assert main([*args, "--no-first-step"]) == 0
    printed = capsys.readouterr().out
    assert "| shape | layout | native |" not in printed  # not asked for: no native column
    assert "function training fwd+bwd, native" not in printed  # nor its goals


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shapes", "256x"], "expected shapes like"),
        (["--reps", "0"], "--reps: expected an int >= 1"),
        (["--lenet-images", "1"], "--lenet-images: expected an int >= 2"),
        (["--threads", "0"], "expected positive thread counts"),
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
        with pytest.raises(ValueError, match="expected threads"):
            run_benchmark(dataclasses.replace(TINY, clock="cpu", lenet_images=0))
        result = run_benchmark(
            dataclasses.replace(TINY, shapes=((6, 2),), clock="cpu", lenet_images=0, threads=(1,))
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


def test_paired_ratio_interval_brackets_the_median() -> None:
    """The sign-test interval: for n = 21 the 6th and 16th of the sorted per-round ratios
    (97.3 % coverage, the smallest interval with at least 95 %)."""
    from bnlab.bench.timing import Timing, median_ci_ranks, paired_ratio

    assert median_ci_ranks(21) == (6, 16) and median_ci_ranks(5) is None
    base = tuple(float(i) for i in range(1, 22))
    a = Timing(0, 0, 0, 21, 1, tuple(v * (0.5 + i / 40) for i, v in enumerate(base)))
    b = Timing(0, 0, 0, 21, 1, base)
    r = paired_ratio(a, b)
    ratios = sorted(0.5 + i / 40 for i in range(21))
    assert r.n == 21 and r.median == ratios[10]
    assert (r.low, r.high) == (ratios[5], ratios[15])
    assert r.describe() == f"{ratios[10]:.2f}x [{ratios[5]:.2f}, {ratios[15]:.2f}]"


# --- `bnlab train` in pairs of processes


def _train_result(bnlab_s: list[float], torch_s: list[float]) -> BenchResult:
    from bnlab.bench.report import machine_info
    from bnlab.bench.train import TrainEpochs

    seconds = {"bnlab": bnlab_s, "torch": torch_s}
    result = BenchResult(machine_info(torch.device("cpu")), {})
    result.train.append(TrainEpochs(threads=1, epochs=3, subset=None, seconds=seconds))
    return result


@pytest.mark.parametrize(
    ("ratios", "met"),
    [
        ([0.85, 0.88, 0.9, 0.86, 0.91, 0.84, 0.87, 0.89], True),
        # median 0.90 but one pair in eight at 1.02: the interval (min, max for n = 8) reaches 1
        ([0.85, 0.88, 0.9, 0.86, 0.91, 0.84, 1.02, 0.9], False),
        ([0.97, 0.96, 0.98, 0.95, 0.96, 0.97, 0.99, 0.98], False),  # faster, not 0.95x
    ],
)
def test_train_goal_needs_the_median_and_the_interval(ratios: list[float], met: bool) -> None:
    torch_s = [4.0 + 0.1 * i for i in range(len(ratios))]
    result = _train_result([r * t for r, t in zip(ratios, torch_s, strict=True)], torch_s)
    (goal,) = [g for g in result.goals() if g.name.startswith("`bnlab train` epoch")]
    assert (goal.threads, goal.met) == (1, met)
    r = sorted(ratios)
    assert goal.value == f"{(r[3] + r[4]) / 2:.2f}x [{r[0]:.2f}, {r[-1]:.2f}], 8 pairs"
    table = result.to_markdown()
    assert "### `bnlab train` epoch (all 60000 training images, fresh processes)" in table
    assert f"| 1 | {ratios[0] * 4.0:.2f} | 4.00 | {ratios[0]:.3f}x |" in table
    data = result.to_json()
    assert data["train"][0]["pairs"] == 8 and data["train"][0]["seconds"]["torch"] == torch_s


def test_train_without_data_is_a_goal_not_measured(tmp_path: Path) -> None:
    missing = tmp_path / "no-data-here"
    config = dataclasses.replace(
        TINY, threads=(1,), functions=False, lenet_images=0, train_pairs=1, data_dir=str(missing)
    )
    result = run_benchmark(config)
    assert result.train == [] and result.train_unavailable is not None
    assert str(missing) in result.train_unavailable
    (goal,) = [g for g in result.goals() if g.name.startswith("`bnlab train` epoch")]
    assert not goal.met and goal.value.startswith("not measured: ")
    assert "`bnlab train` was not (fully) timed: " in result.to_markdown()
    assert not missing.exists()  # nothing written where the data was looked for


def test_train_command_is_what_a_user_types(tmp_path: Path) -> None:
    import sys

    from bnlab.bench.train import train_command

    cmd = train_command(
        "torch", tmp_path, threads=2, epochs=3, device="cpu", data_dir="d", subset=None
    )
    assert cmd[:3] == [sys.executable, "-m", "bnlab"]
    assert cmd[3:] == [
        "train", "--norm", "torch", "--epochs", "3", "--threads", "2", "--device", "cpu",
        "--no-progress", "--out", str(tmp_path), "--data-dir", "d",
    ]  # fmt: skip


def test_bench_train_checks_its_arguments() -> None:
    from bnlab.bench.train import bench_train

    with pytest.raises(ValueError, match="epochs >= 2"):
        bench_train(pairs=1, threads=1, epochs=1)
    with pytest.raises(ValueError, match="pairs >= 1"):
        bench_train(pairs=0, threads=1)


def test_bench_train_runs_bnlab_train_on_the_real_data(real_data_dir: Path) -> None:
    """Two real `bnlab train` processes, one per norm, on a small subset: the timed epoch is
    the second one's seconds from each run's metrics.json."""
    from bnlab.bench.train import bench_train

    lines: list[str] = []
    t = bench_train(
        pairs=1, threads=1, epochs=2, data_dir=str(real_data_dir), subset=512, say=lines.append
    )
    assert t.pairs == 1 and set(t.seconds) == {"bnlab", "torch"}
    assert all(0 < s[0] < 60 for s in t.seconds.values())
    assert t.ratio().n == 1 and t.ratio().low is None
    assert lines and lines[0].startswith("1t train pair 1/1: bnlab ")


def test_cli_train_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--train-epochs", "1"]) == 2
    assert "--train-epochs: expected an int >= 2" in capsys.readouterr().err
    assert main(["bench", "--quick", "--train-pairs", "-1"]) == 2
    assert "--train-pairs: expected an int >= 0" in capsys.readouterr().err


def test_a_failed_train_run_is_reported_with_its_error(tmp_path: Path) -> None:
    from bnlab.bench.train import bench_train

    missing = tmp_path / "no-data-here"
    with pytest.raises(RuntimeError, match=r"failed with exit status 2:\n.*no-data-here"):
        bench_train(pairs=1, threads=1, epochs=2, data_dir=str(missing))


def test_the_benchmark_keeps_its_results_when_a_train_run_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import bnlab.bench as bench

    def failing(**kwargs: object) -> None:
        raise RuntimeError("`bnlab train` failed with exit status 1:\nboom")

    monkeypatch.setattr(bench, "bench_train", failing)
    monkeypatch.setattr(bench, "_train_data", lambda config, result: True)
    config = dataclasses.replace(TINY, threads=(1,), functions=False, lenet_images=0, train_pairs=1)
    result = run_benchmark(config)
    assert result.modules and result.train == []  # the layers measured before are kept
    assert result.train_unavailable == "`bnlab train` failed with exit status 1:\nboom"
    (goal,) = [g for g in result.goals() if g.name.startswith("`bnlab train` epoch")]
    assert goal.value == "not measured: `bnlab train` failed with exit status 1:" and not goal.met
