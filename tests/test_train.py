"""The training loop on small synthetic in-memory data: the plain SGD it claims to be (checked
against a hand-written loop), determinism, run-directory files, checkpoints and resume."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab._io import atomic_write, atomic_write_text
from bnlab.models import init_weights, lenet
from bnlab.train import (
    CheckpointError,
    ConfigError,
    TrainConfig,
    evaluate,
    load_checkpoint,
    resume,
    to_device_tensors,
    train,
    train_epoch,
)
from bnlab.train.config import add_config_arguments, config_overrides
from bnlab.train.loop import batch_bounds
from bnlab.train.plot import history_figure


def synthetic(n_train: int = 300, n_test: int = 100, seed: int = 0) -> SimpleNamespace:
    """A learnable 10-class problem: class k lights up a 6x6 block at a class-specific place."""
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 10, (n,), generator=g)
        images = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
        for i, k in enumerate(labels.tolist()):
            r, c = 2 + 8 * (k // 4), 2 + 6 * (k % 4)
            images[i, r : r + 6, c : c + 6] = 230
        return images, labels

    tr_x, tr_y = make(n_train)
    te_x, te_y = make(n_test)
    return SimpleNamespace(train_images=tr_x, train_labels=tr_y, test_images=te_x, test_labels=te_y)


def config(tmp_path: Path, name: str = "run", **kw: object) -> TrainConfig:
    base: dict = {"epochs": 2, "batch_size": 64, "device": "cpu", "out": str(tmp_path / name)}
    return TrainConfig(**{**base, **kw})


# --- pieces


@pytest.mark.parametrize(
    ("n", "bs", "expected"),
    [
        (512, 256, [(0, 256), (256, 512)]),
        (513, 256, [(0, 256), (256, 512)]),  # a lone last example is dropped
        (514, 256, [(0, 256), (256, 512), (512, 514)]),  # a partial batch of 2 is kept
        (100, 256, [(0, 100)]),
        (257, 256, [(0, 256)]),
        (1, 256, []),
        (5, 2, [(0, 2), (2, 4)]),
    ],
)
def test_batch_bounds(n: int, bs: int, expected: list[tuple[int, int]]) -> None:
    assert batch_bounds(n, bs) == expected


def test_to_device_tensors() -> None:
    images = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    x, y = to_device_tensors(images.numpy(), [3], torch.device("cpu"))
    assert x.shape == (1, 1, 2, 2) and x.dtype == torch.float32
    assert x.flatten().tolist() == pytest.approx([0.0, 1.0, 0.2, 0.4])
    assert y.dtype == torch.long and y.tolist() == [3]
    with pytest.raises(ValueError, match=r"uint8 of shape \(N, H, W\), got torch.float32"):
        to_device_tensors(images.float(), [3], torch.device("cpu"))
    with pytest.raises(ValueError, match=r"labels: expected integers of shape \(1,\)"):
        to_device_tensors(images, [3, 4], torch.device("cpu"))


def test_train_epoch_is_plain_sgd_over_a_randperm() -> None:
    """The loop must equal the hand-written chapter loop on the same order and weights."""
    data = synthetic(n_train=150)
    x, y = to_device_tensors(data.train_images, data.train_labels, torch.device("cpu"))
    torch.manual_seed(0)
    net = init_weights(lenet("torch"))
    ref = lenet("torch")
    ref.load_state_dict(net.state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    loss, acc, seen = train_epoch(
        net, opt, x, y, batch_size=64, generator=torch.Generator().manual_seed(7)
    )

    perm = torch.randperm(150, generator=torch.Generator().manual_seed(7))
    losses, correct = [], 0
    for a in (0, 64, 128):  # 64 + 64 + 22
        idx = perm[a : a + 64]
        out = ref(x[idx])
        step_loss = F.cross_entropy(out, y[idx])
        ref.zero_grad()
        step_loss.backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= 0.5 * p.grad
        losses.append(step_loss.item() * len(idx))
        correct += int((out.argmax(1) == y[idx]).sum())
    assert seen == 150
    assert loss == pytest.approx(sum(losses) / 150, rel=1e-6)
    assert acc == correct / 150
    for (name, p), (_, q) in zip(net.state_dict().items(), ref.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_evaluate_uses_eval_mode_and_restores_the_mode() -> None:
    data = synthetic(n_test=70)
    x, y = to_device_tensors(data.test_images, data.test_labels, torch.device("cpu"))
    torch.manual_seed(0)
    net = init_weights(lenet("bnlab"))
    net(torch.rand(32, 1, 28, 28))  # move the running statistics away from 0/1
    running = net[1].running_mean.clone()
    with torch.no_grad():
        net.eval()
        expected = (net(x).argmax(1) == y).float().mean().item()
    for mode in (True, False):
        net.train(mode)
        assert evaluate(net, x, y, batch_size=16) == pytest.approx(expected)
        assert all(m.training == mode for m in net.modules())
    assert torch.equal(net[1].running_mean, running)  # eval did not update statistics


# --- whole runs


def test_same_seed_same_history_and_global_rng_untouched(tmp_path: Path) -> None:
    data = synthetic()
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    a = train(config(tmp_path, "a", dropout=0.2), data, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)
    b = train(config(tmp_path, "b", dropout=0.2), data, progress=False)
    c = train(config(tmp_path, "c", dropout=0.2, seed=1), data, progress=False)
    assert [h.scores() for h in a.history] == [h.scores() for h in b.history]
    assert [h.scores() for h in a.history] != [h.scores() for h in c.history]
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


def test_run_directory_files(tmp_path: Path) -> None:
    seen: list[int] = []
    threads = torch.get_num_threads()
    result = train(
        config(tmp_path, threads=1),
        synthetic(),
        progress=True,
        on_epoch=lambda s: seen.append(s.epoch),
    )
    assert torch.get_num_threads() == threads  # restored after the run
    run = result.run
    assert seen == [1, 2] and [h.epoch for h in result.history] == [1, 2]
    saved = json.loads(run.config.read_text())
    assert TrainConfig.from_dict(saved) == result.config
    assert saved["device"] == "cpu" and saved["out"] == str(tmp_path / "run")

    with run.metrics_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["test_acc"]) for r in rows] == [h.test_acc for h in result.history]
    assert [float(r["train_loss"]) for r in rows] == [h.train_loss for h in result.history]
    metrics = json.loads(run.metrics_json.read_text())
    assert metrics["history"] == [h.to_dict() for h in result.history]
    assert metrics["environment"]["torch"] == torch.__version__
    assert metrics["environment"]["torch_threads"] == 1
    assert run.curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    state = torch.load(run.checkpoint, weights_only=True)  # plain tensors, dicts, lists, numbers
    assert state["epoch"] == 2 and len(state["history"]) == 2
    for k, v in result.model.state_dict().items():
        assert torch.equal(state["model"][k], v), k
    data = synthetic()
    x, y = to_device_tensors(data.test_images, data.test_labels, torch.device("cpu"))
    assert result.history[-1].test_acc == evaluate(result.model, x, y)
    assert not list(run.path.glob(".*.tmp"))


def test_resume_extends_a_finished_run_to_the_uninterrupted_history(tmp_path: Path) -> None:
    data = synthetic()
    full = train(config(tmp_path, "full", epochs=3, dropout=0.1), data, progress=False)
    part = train(config(tmp_path, "part", epochs=1, dropout=0.1), data, progress=False)
    resumed = resume(part.run.path, data, progress=False, epochs=3)
    assert [h.scores() for h in resumed.history] == [h.scores() for h in full.history]
    assert json.loads(part.run.config.read_text())["epochs"] == 3


def test_resume_refuses_config_changes_and_unknown_dirs(tmp_path: Path) -> None:
    data = synthetic()
    part = train(config(tmp_path, epochs=1), data, progress=False)
    with pytest.raises(ConfigError, match=r"lr \(--lr\) cannot change"):
        resume(part.run.path, data, lr=0.1)
    with pytest.raises(ConfigError, match="not a run directory"):
        resume(tmp_path / "nothing", data)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config(tmp_path, epochs=1), data, progress=False)


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),  # truncated
        lambda p: p.write_bytes(b"\x00garbage" * 10),
        lambda p: torch.save([1, 2, 3], p),  # loadable, but not a checkpoint
        lambda p: torch.save({"format": "bnlab-train-checkpoint", "version": 99}, p),
    ],
)
def test_a_corrupt_checkpoint_is_reported_by_name(tmp_path: Path, damage) -> None:
    part = train(config(tmp_path, epochs=1), synthetic(), progress=False)
    damage(part.run.checkpoint)
    with pytest.raises(CheckpointError, match=str(part.run.checkpoint)):
        load_checkpoint(part.run.checkpoint)
    with pytest.raises(CheckpointError, match="checkpoint"):
        resume(part.run.path, synthetic())


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def fail(f) -> None:
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


class TinyNet(nn.Sequential):
    """A model of one's own: not a LeNet, with a torch BN and dropout."""

    def __init__(self) -> None:
        super().__init__(
            nn.Flatten(), nn.Linear(784, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(32, 10),
        )  # fmt: skip


def test_train_any_model_with_the_same_run_directory_and_exact_resume(tmp_path: Path) -> None:
    data = synthetic()
    torch.manual_seed(5)
    full_model = TinyNet()
    torch.manual_seed(5)
    part_model = TinyNet()
    full = train(config(tmp_path, "full", epochs=3), data, model=full_model, progress=False)
    assert full.model is full_model  # trained in place
    names = {p.name for p in full.run.path.iterdir()}
    assert names == {"config.json", "metrics.csv", "metrics.json", "curves.png", "checkpoint.pt"}
    saved = json.loads(full.run.config.read_text())
    assert saved["model"] == f"{__name__}.TinyNet"
    assert len(full.history) == 3 and full.history[-1].test_acc > 0.5

    part = train(config(tmp_path, "part", epochs=1), data, model=part_model, progress=False)
    with pytest.raises(ConfigError, match=r"trained a .*TinyNet; pass a fresh one"):
        resume(part.run.path, data)  # the built-in LeNet cannot stand in for it
    with pytest.raises(ConfigError, match=r"got a torch.nn.modules.container.Sequential"):
        resume(part.run.path, data, model=nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))
    resumed = resume(part.run.path, data, model=TinyNet(), progress=False, epochs=3)
    assert [h.scores() for h in resumed.history] == [h.scores() for h in full.history]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_a_model_of_ones_own_refuses_lenet_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"norm \(--norm\), dropout \(--dropout\): these"):
        train(config(tmp_path, norm="torch", dropout=0.2), synthetic(), model=TinyNet())
    with pytest.raises(TypeError, match=r"model: expected a torch\.nn\.Module"):
        train(config(tmp_path), synthetic(), model=lenet)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="leave model out"):
        part = train(config(tmp_path, epochs=1), synthetic(), progress=False)
        resume(part.run.path, synthetic(), model=TinyNet())
    assert not (tmp_path / "other").exists()


def test_resuming_a_complete_run_writes_nothing(tmp_path: Path) -> None:
    data = synthetic()
    done = train(config(tmp_path, epochs=2), data, progress=False)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in done.run.path.iterdir()}
    again = resume(done.run.path, progress=False)  # no data needed: nothing to train
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in done.run.path.iterdir()}
    assert after == before
    assert [h.scores() for h in again.history] == [h.scores() for h in done.history]
    for k, v in done.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k


def test_a_configuration_that_cannot_train_writes_nothing(tmp_path: Path) -> None:
    """A bad layer option, or a model that does not fit the data (found only when it runs: the
    run directory comes after the first optimizer step) leaves no config.json to block the
    same --out."""
    cfg = config(tmp_path, norm_options=("impl=typo",))
    with pytest.raises(ConfigError, match=r"impl: expected one of .*, got 'typo'"):
        train(cfg, synthetic(), progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"first training step failed.*mat1 and mat2"):
        train(config(tmp_path), synthetic(), model=nn.Linear(3, 10), progress=False)
    assert not (tmp_path / "run").exists()
    assert len(train(config(tmp_path, epochs=1), synthetic(), progress=False).history) == 1


# --- config


def test_config_round_trip_and_validation() -> None:
    cfg = TrainConfig(norm="torch", lr=2, norm_options=("momentum=0.9", "convention=d2l"))
    assert cfg.lr == 2.0 and isinstance(cfg.lr, float)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.parsed_norm_options() == {"momentum": 0.9, "convention": "d2l"}
    values = ("momentum=None", "momentum=null", "affine=False", "affine=true", "eps=1e-3")
    parsed = [TrainConfig(norm_options=(v,)).parsed_norm_options() for v in values]
    assert parsed == [
        {"momentum": None},
        {"momentum": None},
        {"affine": False},
        {"affine": True},
        {"eps": 0.001},
    ]
    for bad, match in (
        ({"batch_size": 1}, "batch_size: expected an int >= 2"),
        ({"epochs": 0}, "epochs"),
        ({"lr": -1.0}, "lr: expected a positive"),
        ({"dropout": 1.5}, "dropout"),
        ({"norm_position": "middle"}, r"norm_position: expected one of \['before', 'after'\]"),
        ({"epochs": "3"}, "epochs: expected int"),
        ({"norm_options": ("momentum",)}, "KEY=VALUE"),
        ({"subset": 1}, "subset"),
    ):
        with pytest.raises(ConfigError, match=match):
            TrainConfig(**bad)
    with pytest.raises(ConfigError, match="unknown keys"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def test_cli_options_are_generated_from_the_fields() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    help_text = parser.format_help()
    for f in dataclasses.fields(TrainConfig):
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        assert (flag in help_text) == f.metadata["cli"], flag  # model= is Python only
    args = parser.parse_args(
        ["--lr", "0.5", "--no-bias-before-norm", "--norm-option", "eps=0.001", "--norm-option",
         "convention=d2l", "--norm-position", "after", "--subset", "100"]
    )  # fmt: skip
    overrides = config_overrides(args, TrainConfig)
    assert overrides == {
        "lr": 0.5,
        "bias_before_norm": False,
        "norm_options": ("eps=0.001", "convention=d2l"),
        "norm_position": "after",
        "subset": 100,
    }  # options not given stay out, so the dataclass defaults apply
    cfg = TrainConfig(**overrides)
    assert cfg.epochs == TrainConfig().epochs
    with pytest.raises(SystemExit):
        parser.parse_args(["--pool", "min"])


@pytest.mark.parametrize("epochs", [1, 2, 10, 40])
def test_curves_have_ticks_only_at_whole_epochs(epochs: int) -> None:
    rows = [
        {"epoch": e, "train_loss": 1 / e, "train_acc": 0.5, "test_acc": 0.4}
        for e in range(1, epochs + 1)
    ]
    (ax,) = history_figure(rows).axes
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() and 1 <= t <= epochs for t in ticks)
    assert (low, high) == (0.5, epochs + 0.5)


def test_a_subset_larger_than_the_data_is_refused(tmp_path: Path) -> None:
    data = synthetic(n_train=300, n_test=100)
    with pytest.raises(
        ConfigError, match=r"subset: expected at most the 300 training images.*--subset"
    ):
        train(config(tmp_path, subset=301), data, progress=False)
    with pytest.raises(
        ConfigError, match=r"test_subset: .* 100 test images, got 101.*--test-subset"
    ):
        train(config(tmp_path, test_subset=101), data, progress=False)
    assert not (tmp_path / "run").exists()


def test_resume_warns_when_the_auto_kernel_changed(tmp_path: Path) -> None:
    """impl='auto' runs the C++ kernel where a build loads, else the eager one; the two round
    differently, so resuming under the other one cannot be exact and says so."""
    data = synthetic()
    part = train(config(tmp_path, epochs=1, norm_options=("impl=auto",)), data, progress=False)
    metrics = json.loads(part.run.metrics_json.read_text())
    kernel = metrics["environment"]["auto_kernel"]
    assert kernel in ("native", "eager")
    other = "eager" if kernel == "native" else "native"
    metrics["environment"]["auto_kernel"] = other  # as if the first epoch ran the other one
    part.run.metrics_json.write_text(json.dumps(metrics))
    with pytest.warns(RuntimeWarning, match=rf"ran the {other} kernel.*runs the {kernel} one"):
        resume(part.run.path, data, progress=False, epochs=2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        resume(part.run.path, data, progress=False, epochs=3)  # same kernel as epoch 2: quiet
    assert not [w for w in seen if "resume:" in str(w.message)]
    torch_run = train(config(tmp_path, "torch", epochs=1, norm="torch"), data, progress=False)
    assert json.loads(torch_run.run.metrics_json.read_text())["environment"]["auto_kernel"] is None
