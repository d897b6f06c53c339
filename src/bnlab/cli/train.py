"""Train the chapter's BN-LeNet on Fashion-MNIST (Dive into Deep Learning, "Batch Normalization").

Plain SGD on the in-memory dataset; every run writes a directory with config.json, metrics.csv,
metrics.json, curves.png and a checkpoint after every epoch, and a killed run continues from its
last complete epoch with --resume, ending exactly as an uninterrupted run would.

examples:
  bnlab train                                  # BN-LeNet with bnlab's BatchNorm, lr 1.0, 10 epochs
  bnlab train --norm torch                     # nn.BatchNorm2d/1d, the chapter's concise version
  bnlab train --norm none --lr 0.9             # plain LeNet
  bnlab train --subset 2048 --epochs 1         # a quick check
  bnlab train --resume runs/20260101-120000-bnlab   # continue a killed run
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from torch import Tensor

from bnlab.distributed.cli import add_arguments as add_distributed_arguments
from bnlab.distributed.cli import run_distributed
from bnlab.models import LeNet
from bnlab.train.checkpoint import CheckpointError
from bnlab.train.config import (
    ConfigError,
    TrainConfig,
    add_config_arguments,
    config_overrides,
    flag_of,
)
from bnlab.train.loop import EpochStats, TrainResult, resolve_device
from bnlab.train.run import RESUME_OVERRIDES, resume, saved_history, train
from bnlab.train.rundir import default_out, read_config

HEADER = f"{'epoch':>5}  {'train loss':>10}  {'train acc':>9}  {'test acc':>8}  {'time':>7}  " + (
    f"{'examples/s':>10}"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainConfig)
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last complete epoch, with its saved config "
        f"(only {', '.join(flag_of(n) for n in RESUME_OVERRIDES)} may be given with it)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar per epoch (default: only on a terminal)",
    )
    add_distributed_arguments(parser)


def _row(stats: EpochStats) -> str:
    return (
        f"{stats.epoch:>5}  {stats.train_loss:>10.4f}  {stats.train_acc:>9.4f}  "
        f"{stats.test_acc:>8.4f}  {stats.seconds:>6.1f}s  {stats.examples_per_s:>10.0f}"
    )


class _Table:
    """Prints the header before the first row (so that an early error is not preceded by an
    empty table), then one row per epoch."""

    def __init__(self, done: list[EpochStats] | None = None) -> None:
        self.started = False
        for stats in done or []:
            self(stats)

    def __call__(self, stats: EpochStats) -> None:
        if not self.started:
            print(HEADER)
            self.started = True
        print(_row(stats), flush=True)


def plural(n: int, noun: str) -> str:
    """``plural(1, "epoch")`` -> "1 epoch", ``plural(10, "epoch")`` -> "10 epochs"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def _print_summary(result: TrainResult) -> None:
    model = result.model
    assert isinstance(model, LeNet)  # the command line trains the built-in LeNet only
    if not model.norm_indices:
        print(f"\nno norm layer (norm={result.config.norm!r}): no gamma and beta to show")
    else:
        i = model.norm_indices[0]
        layer = model[i]
        weight = getattr(layer, "weight", None)
        bias = getattr(layer, "bias", None)
        print(f"\nfirst norm layer, net[{i}] = {type(layer).__name__}:")
        if isinstance(weight, Tensor):
            print(f"  gamma = net[{i}].weight: {_fmt(weight.detach().cpu().reshape(-1).tolist())}")
        else:
            print(f"  gamma = net[{i}].weight: none (no learned scale)")
        if isinstance(bias, Tensor):
            print(f"  beta  = net[{i}].bias:   {_fmt(bias.detach().cpu().reshape(-1).tolist())}")
        else:
            print(f"  beta  = net[{i}].bias:   none (no learned shift)")
    print(f"run directory: {result.run.path}")
    if result.history:
        print(f"curves: {result.run.curves}")


def _describe(config: TrainConfig, where: str) -> str:
    return (
        f"BN-LeNet norm={config.norm} on {where}: lr {config.lr}, batch {config.batch_size}, "
        f"{plural(config.epochs, 'epoch')}, seed {config.seed}"
        + (f", first {config.subset} training images" if config.subset else "")
        + (f", first {config.test_subset} test images" if config.test_subset else "")
    )


def _start(args: argparse.Namespace) -> TrainResult:
    overrides = config_overrides(args, TrainConfig)
    if args.resume is None:
        config = TrainConfig(**overrides)
        device = resolve_device(config.device)
        if config.out is None:  # resolved here so that it can be printed before training
            config = dataclasses.replace(config, out=str(default_out(config.norm)))
        print(_describe(config, str(device)))
        print(f"run directory: {config.out}\n", flush=True)
        return train(config, progress=args.progress, on_epoch=_Table())

    run, config = read_config(args.resume)
    done = saved_history(run)
    epochs = overrides.get("epochs", config.epochs)
    if len(done) >= epochs:  # resume returns it as it is, writing nothing
        print(
            f"{run.path} is complete: {plural(len(done), 'epoch')} of {epochs}, nothing to "
            f"train. Pass --epochs N (more than {len(done)}) to train it longer.\n"
        )
    else:
        print(f"resuming {run.path} after epoch {len(done)} of {epochs}\n")
    return resume(run.path, progress=args.progress, on_epoch=_Table(done), **overrides)


def run(args: argparse.Namespace) -> int:
    from bnlab.data import DataError

    code = run_distributed(run, args)  # --nproc N / torchrun: every rank runs run(args)
    if code is not None:
        return code

    try:
        result = _start(args)
    except (DataError, ConfigError, CheckpointError) as e:
        print(f"bnlab train: error: {e}", file=sys.stderr)
        return 2
    _print_summary(result)
    return 0
