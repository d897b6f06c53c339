"""``bnlab train`` end to end on the real Fashion-MNIST (found through BNLAB_DATA_DIR): a short
run, the files it writes, clean errors, and resume after a SIGKILL mid-epoch."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bnlab.cli import main
from bnlab.train import TrainConfig
from bnlab.train.run import KILL_ENV

QUICK = ["--subset", "640", "--test-subset", "1000", "--epochs", "2", "--batch-size", "64"]
QUICK += ["--no-progress"]


def scores(run_dir: Path) -> list[tuple[float, float, float]]:
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    return [(h["train_loss"], h["train_acc"], h["test_acc"]) for h in history]


@pytest.mark.usefixtures("real_data_dir")  # tests/conftest.py
def test_short_real_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    args = ["--subset", "2048", "--epochs", "1", "--batch-size", "64", "--out", str(out)]
    assert main(["train", *args, "--no-progress"]) == 0
    text = capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "metrics.csv", "metrics.json", "curves.png", "checkpoint.pt"}
    config = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert (config.subset, config.epochs, config.norm, config.lr) == (2048, 1, "bnlab", 1.0)
    ((loss, train_acc, test_acc),) = scores(out)
    assert test_acc > 0.25  # 10 classes: chance is 0.1
    assert 0 < loss < 2.3 and train_acc > 0.25
    # the table row, then the chapter's print of the first BN layer's gamma and beta
    assert re.search(rf"^\s+1\s+{loss:.4f}\s+{train_acc:.4f}\s+{test_acc:.4f}\s", text, re.M)
    gamma = re.search(r"gamma = net\[1\]\.weight: \[([^\]]*)\]", text)
    beta = re.search(r"beta  = net\[1\]\.bias: +\[([^\]]*)\]", text)
    assert gamma and beta and "net[1] = BatchNorm" in text
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    expected = state["model"]["1.weight"].tolist()
    assert [float(v) for v in gamma.group(1).split(",")] == pytest.approx(expected, abs=1e-4)
    assert len(beta.group(1).split(",")) == 6
    assert f"run directory: {out}" in text and f"curves: {out / 'curves.png'}" in text


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--norm ", "--lr", "--epochs", "--batch-size", "--seed", "--device",
                 "--data-dir", "--out", "--resume", "--subset", "--norm-option",
                 "--activation", "--norm-position", "--norm-layers", "--dropout",
                 "--bias-before-norm", "--pool", "--progress", "--test-subset"):  # fmt: skip
        assert flag in text, flag


def test_data_error_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):  # fmt: skip
        (tmp_path / name).write_bytes(b"not gzip")
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bnlab train: error: ") and "Traceback" not in err
    assert "train-images-idx3-ubyte.gz" in err
    assert not out.exists()  # nothing written for a run that never started


@pytest.mark.usefixtures("real_data_dir")  # tests/conftest.py
def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--lr", "0.1"]) == 2
    assert "lr (--lr) cannot change" in capsys.readouterr().err
    assert main(["train", *QUICK, "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--batch-size", "1"]) == 2
    assert "batch_size: expected an int >= 2" in capsys.readouterr().err
    (out / "checkpoint.pt").write_bytes(b"\x00" * 100)
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {out / 'checkpoint.pt'}: cannot be read" in err


@pytest.mark.usefixtures("real_data_dir")  # tests/conftest.py
def test_resume_of_a_complete_run_says_so_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", *QUICK, "--epochs", "1", "--out", str(out)]) == 0
    assert "1 epoch, seed 0" in capsys.readouterr().out
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    assert main(["train", "--resume", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"{out} is complete: 1 epoch of 1, nothing to train" in text
    assert "--epochs N (more than 1)" in text and "gamma = net[1].weight: [" in text
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before


@pytest.mark.usefixtures("real_data_dir")  # tests/conftest.py
def test_norm_option_values_none_and_true_as_python_spells_them(tmp_path: Path) -> None:
    out = tmp_path / "run"
    opts = ["--norm-option", "momentum=None", "--norm-option", "affine=True"]
    assert main(["train", *QUICK, "--epochs", "1", *opts, "--out", str(out)]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert state["1.num_batches_tracked"] > 0 and "1.weight" in state
    config = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert config.parsed_norm_options() == {"momentum": None, "affine": True}


@pytest.fixture(scope="module")
def uninterrupted(
    tmp_path_factory: pytest.TempPathFactory, real_data_dir: Path
) -> list[tuple[float, float, float]]:
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *QUICK, "--out", str(out)]) == 0
    return scores(out)


@pytest.mark.parametrize("kill_at", ["2:3", "1:4"])
def test_resume_after_sigkill_mid_epoch_gives_the_uninterrupted_history(
    tmp_path: Path, kill_at: str, uninterrupted: list[tuple[float, float, float]]
) -> None:
    out = tmp_path / "run"
    env = {**os.environ, KILL_ENV: kill_at}
    cmd = [sys.executable, "-m", "bnlab", "train", *QUICK, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    completed = int(kill_at.split(":")[0]) - 1
    assert (out / "checkpoint.pt").exists() == (completed > 0)
    if completed:
        assert len(scores(out)) == completed
    assert not list(out.glob(".*.tmp"))  # the kill came between writes, not inside one
    assert main(["train", "--resume", str(out)]) == 0
    assert scores(out) == uninterrupted  # exact: same floats on the CPU
