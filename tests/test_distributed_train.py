"""Data-parallel training: 2-process DDP with synchronized BN equals single-process training on
the full batch, and the command-line entry points (--nproc, torchrun) run every rank with
output from rank 0 only.

The single-process reference is bnlab.train's own train_epoch/evaluate; the distributed side
drives the same steps through bnlab.distributed's plan, as a training loop does.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from bnlab.distributed import DataParallel, SingleProcess, current_plan, launch
from bnlab.distributed.cli import add_arguments, run_distributed
from bnlab.nn import SyncBatchNorm
from bnlab.train import TrainConfig, evaluate, resume, train, train_epoch
from bnlab.train.checkpoint import load_checkpoint
from bnlab.train.loop import batch_bounds, build_model

RUN_BOUND_S = 240.0
N_TRAIN, N_TEST, BATCH = 40, 24, 15  # batches of 15, 15, 10: parts of 8/7 and 5/5 on 2 ranks
CONFIGS = {
    "bnlab": TrainConfig(norm="bnlab", seed=3),
    "torch-bn": TrainConfig(norm="torch", seed=4, activation="relu", lr=0.1),
}


def make_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fashion-MNIST-shaped synthetic data in float64 (so the comparison can be tight)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.rand(N_TRAIN + N_TEST, 1, 28, 28, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (N_TRAIN + N_TEST,), generator=gen)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def _model(config: TrainConfig) -> torch.nn.Module:
    torch.manual_seed(config.seed)
    return build_model(config).double()


def _shuffle(config: TrainConfig) -> torch.Generator:
    return torch.Generator().manual_seed(config.seed + 1)


def single_process(config: TrainConfig) -> dict[str, Any]:
    """The reference: bnlab.train's epoch on the full batches, one process."""
    x, y, test_x, test_y = make_data()
    model = _model(config)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    loss, acc, _ = train_epoch(model, opt, x, y, batch_size=BATCH, generator=_shuffle(config))
    return {
        "state": model.state_dict(),
        "loss": loss,
        "acc": acc,
        "test_acc": evaluate(model, test_x, test_y),
    }


def _ddp_epoch(config: TrainConfig) -> dict[str, Any]:
    """The same epoch on this rank: the plan's shard, scaled loss, DDP and metric reduction."""
    x, y, test_x, test_y = make_data()
    plan = current_plan("cpu")
    assert isinstance(plan, DataParallel)
    model = _model(config)
    net = plan.wrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    perm = torch.randperm(N_TRAIN, generator=_shuffle(config))
    loss_sum, correct, seen = 0.0, 0, 0
    parts = []
    net.train()
    for a, b in batch_bounds(N_TRAIN, BATCH):
        idx = plan.shard(perm[a:b])
        parts.append(idx.numel())
        logits = net(x[idx])
        loss = plan.loss_fn(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.item() * (b - a)
        correct += int((logits.argmax(dim=1) == y[idx]).sum())
        seen += b - a
    loss_all, acc_all = plan.reduce_epoch(loss_sum / seen, correct / seen)
    return {
        "state": model.state_dict(),
        "loss": loss_all,
        "acc": acc_all,
        "test_acc": plan.evaluate(evaluate, model, test_x, test_y),
        "parts": parts,
        "sync_layers": sum(isinstance(m, SyncBatchNorm) for m in model.modules()),
        "agreed": plan.agree(f"chosen by rank {plan.rank}"),
    }


def _ddp_worker() -> dict[str, Any]:
    return {name: _ddp_epoch(config) for name, config in CONFIGS.items()}


@pytest.fixture(scope="module")
def ddp_runs() -> list[dict[str, Any]]:
    return launch(_ddp_worker, 2, backend="gloo", timeout_s=60, join_timeout_s=RUN_BOUND_S)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_process_ddp_equals_single_process(ddp_runs: list[dict[str, Any]], name: str) -> None:
    ref = single_process(CONFIGS[name])
    for rank, run in enumerate(ddp_runs):
        got = run[name]
        assert got["parts"] == ([8, 8, 5] if rank == 0 else [7, 7, 5])
        assert got["sync_layers"] == 4  # the BN-LeNet's four norms, synchronized
        assert got["state"].keys() == ref["state"].keys()  # loads into a one-process model
        for key, value in ref["state"].items():
            torch.testing.assert_close(got["state"][key], value, rtol=1e-9, atol=1e-11, msg=key)
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)  # train_epoch sums in float32
        assert got["acc"] == pytest.approx(ref["acc"], abs=1e-12)
        assert got["test_acc"] == pytest.approx(ref["test_acc"], abs=1e-12)
        assert got["agreed"] == "chosen by rank 0"


# ---- per-process BN (--no-sync-bn): DDP as plain PyTorch, then sync_running_stats -----------


def per_process_reference(config: TrainConfig, world: int = 2) -> list[dict[str, Any]]:
    """DDP with per-process BN simulated in one process: a model copy per rank, each trained on
    its part with the plan's loss scaling, the gradients averaged as DDP does."""
    x, y, _, _ = make_data()
    copies = [_model(config) for _ in range(world)]
    opts = [torch.optim.SGD(c.parameters(), lr=config.lr) for c in copies]
    perm = torch.randperm(N_TRAIN, generator=_shuffle(config))
    for a, b in batch_bounds(N_TRAIN, BATCH):
        for rank, c in enumerate(copies):
            c.zero_grad(set_to_none=True)
            idx = perm[a:b][rank::world]
            loss = torch.nn.functional.cross_entropy(c(x[idx]), y[idx], reduction="sum")
            (loss * (world / (b - a))).backward()
        for params in zip(*(c.parameters() for c in copies), strict=True):
            mean = torch.stack([q.grad for q in params]).mean(0)
            for q in params:
                q.grad = mean.clone()
        for opt in opts:
            opt.step()
    return [c.state_dict() for c in copies]


def _per_process_epoch(config: TrainConfig) -> dict[str, Any]:
    x, y, _, _ = make_data()
    plan = current_plan("cpu", sync_bn=False)
    model = _model(config)
    net = plan.wrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr)
    perm = torch.randperm(N_TRAIN, generator=_shuffle(config))
    net.train()
    for a, b in batch_bounds(N_TRAIN, BATCH):
        idx = plan.shard(perm[a:b])
        loss = plan.loss_fn(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan.sync_running_stats(model)
    return {
        "before": before,
        "after": model.state_dict(),
        "sync_layers": sum(isinstance(m, SyncBatchNorm) for m in model.modules()),
    }


def _per_process_worker() -> dict[str, Any]:
    return _per_process_epoch(CONFIGS["bnlab"])


@dataclass(frozen=True)
class _Images:
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def _images() -> _Images:
    gen = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (N_TRAIN + N_TEST, 28, 28), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (N_TRAIN + N_TEST,), generator=gen)
    return _Images(images[:N_TRAIN], labels[:N_TRAIN], images[N_TRAIN:], labels[N_TRAIN:])


def _train_worker(out: str) -> dict[str, Any]:
    config = TrainConfig(epochs=2, batch_size=BATCH, sync_bn=False, out=out, device="cpu")
    result = train(config, _images(), progress=False)
    # the same run stopped after epoch 1 and resumed: every rank restarts from the checkpoint
    first = dataclasses.replace(config, epochs=1, out=out + "-resumed")
    train(first, _images(), progress=False)
    dist.barrier()  # rank 0's checkpoint is on disk before any rank reads it
    resumed = resume(out + "-resumed", _images(), progress=False, epochs=2)
    return {
        "state": result.model.state_dict(),
        "history": [(h.train_loss, h.train_acc, h.test_acc) for h in result.history],
        "test_acc": [h.test_acc for h in result.history],
        "sync_layers": sum(isinstance(m, SyncBatchNorm) for m in result.model.modules()),
        "resumed_state": resumed.model.state_dict(),
        "resumed_history": [(h.train_loss, h.train_acc, h.test_acc) for h in resumed.history],
    }


@pytest.fixture(scope="module")
def per_process_runs() -> list[dict[str, Any]]:
    return launch(_per_process_worker, 2, backend="gloo", timeout_s=60, join_timeout_s=RUN_BOUND_S)


def test_per_process_bn_trains_as_plain_ddp(per_process_runs: list[dict[str, Any]]) -> None:
    refs = per_process_reference(CONFIGS["bnlab"])
    for rank, run in enumerate(per_process_runs):
        assert run["sync_layers"] == 0
        for key, value in refs[rank].items():
            torch.testing.assert_close(run["before"][key], value, rtol=1e-9, atol=1e-11, msg=key)
    stats = [k for k in refs[0] if k.endswith("running_mean")]
    assert stats and all(not torch.allclose(refs[0][k], refs[1][k]) for k in stats)  # drifted


def test_sync_running_stats_gives_every_rank_the_combination(
    per_process_runs: list[dict[str, Any]],
) -> None:
    before = [run["before"] for run in per_process_runs]
    for key in before[0]:
        values = torch.stack([b[key].double() for b in before])
        if key.endswith("running_mean"):
            want = values.mean(0)
        elif key.endswith("running_var"):
            means = torch.stack([b[key.replace("running_var", "running_mean")] for b in before])
            want = values.mean(0) + means.var(0, correction=0)
        elif key.endswith("num_batches_tracked"):
            want = values.amax(0)
        else:  # weights: identical on both ranks already (DDP)
            want = values[0]
        for run in per_process_runs:
            torch.testing.assert_close(run["after"][key].double(), want, rtol=1e-12, atol=0)


def test_train_with_per_process_bn_tests_saves_and_resumes_one_set_of_statistics(
    tmp_path: Path,
) -> None:
    out = str(tmp_path / "run")
    runs = launch(_train_worker, 2, (out,), backend="gloo", timeout_s=60, join_timeout_s=240)
    saved = load_checkpoint(Path(out) / "checkpoint.pt")
    assert saved["config"]["sync_bn"] is False
    for run in runs:
        assert run["sync_layers"] == 0
        assert run["test_acc"] == runs[0]["test_acc"]
        for key, value in saved["model"].items():
            assert torch.equal(run["state"][key], value), key  # every rank holds what was saved
        # resumed after epoch 1 on every rank: the same as uninterrupted, bit for bit
        assert run["resumed_history"] == run["history"]
        for key, value in run["state"].items():
            assert torch.equal(run["resumed_state"][key], value), key


def test_single_process_plan_is_the_identity() -> None:
    plan = current_plan()
    assert isinstance(plan, SingleProcess) and plan.is_main
    model = torch.nn.Linear(2, 3)
    idx = torch.arange(5)
    assert plan.wrap(model) is model
    assert plan.shard(idx) is idx
    assert plan.reduce_epoch(0.5, 0.25) == (0.5, 0.25)
    assert plan.agree("x") == "x"
    logits, target = torch.randn(5, 3), torch.randint(0, 3, (5,))
    assert torch.equal(
        plan.loss_fn(logits, target), torch.nn.functional.cross_entropy(logits, target)
    )
    with pytest.raises(RuntimeError, match="not initialized"):
        DataParallel()


# ---- the command line ------------------------------------------------------------------------


def _report(args: argparse.Namespace) -> int:
    """A stand-in command: every rank prints; only rank 0's stdout may reach the terminal."""
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"stdout of rank {rank} of {world}, tag {args.tag}", flush=True)
    print(f"stderr of rank {rank}", file=sys.stderr, flush=True)
    return 0


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.add_argument("--tag", default="ok")
    return parser.parse_args(list(argv))


def test_nproc_runs_every_rank_with_stdout_from_rank_0(capfd: pytest.CaptureFixture[str]) -> None:
    assert run_distributed(_report, _args("--nproc", "1")) is None  # one process: caller runs
    assert run_distributed(_report, _args("--nproc", "2")) == 0
    out, err = capfd.readouterr()
    assert "stdout of rank 0 of 2, tag ok" in out
    assert "rank 1" not in out
    assert "stderr of rank 0" in err and "stderr of rank 1" in err
    assert run_distributed(_report, _args("--nproc", "0")) == 2
    assert "--nproc: expected a positive int" in capfd.readouterr().err


def test_torchrun_runs_the_same_command(tmp_path: Path) -> None:
    script = tmp_path / "command.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from test_distributed_train import _args, _report
            from bnlab.distributed.cli import run_distributed

            code = run_distributed(_report, _args(*sys.argv[1:]))
            sys.exit(code)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    done = subprocess.run(
        [*cmd, str(script), "--tag", "torchrun"],
        capture_output=True,
        text=True,
        env=env,
        timeout=RUN_BOUND_S,
    )
    assert done.returncode == 0, done.stderr
    assert "stdout of rank 0 of 2, tag torchrun" in done.stdout
    assert "rank 1" not in done.stdout


def test_nproc_under_torchrun_is_refused(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_distributed(_report, _args("--nproc", "2")) == 2
    assert "under torchrun leave it out" in capfd.readouterr().err
    assert not dist.is_initialized()
