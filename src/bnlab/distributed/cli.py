"""Command-line support for multi-process training: ``--nproc N`` starts N processes on this
machine, and a command started by ``torchrun`` joins the group torchrun describes.

A command module calls :func:`add_arguments` on its parser and, first thing in ``run``::

    code = run_distributed(run, args)
    if code is not None:
        return code      # this process was the launcher, or a rank that already ran

Every rank then runs the same ``run(args)`` inside an initialized process group; only rank 0
writes to stdout (the others' stdout goes to os.devnull; errors still reach stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

from bnlab.distributed.launch import DistributedRunError, init_from_env, launch

RunFn = Callable[[argparse.Namespace], int]
_IN_RANK = "_bnlab_rank"  # set on the namespace a launched rank runs, so it does not relaunch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-process training")
    group.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train with N processes on this machine: DistributedDataParallel with "
        "synchronized BatchNorm, each process taking 1/N of every batch (gloo on CPU, NCCL "
        "with one GPU per process). For several machines start the same command with "
        "torchrun instead (docs/distributed.md). Default: 1",
    )


def _torchrun_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _backend(args: argparse.Namespace, nproc: int) -> str:
    device = str(getattr(args, "device", "auto"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.startswith("cuda"):
        if gpus < nproc:
            raise ValueError(
                f"--nproc {nproc} with --device {device}: NCCL needs one GPU per process, "
                f"{gpus} visible. Use --nproc {max(gpus, 1)} or --device cpu."
            )
        return "nccl"
    return "nccl" if device == "auto" and gpus >= nproc else "gloo"


def _rank_main(run: RunFn, args: argparse.Namespace) -> int:
    """One launched rank: run the command, with stdout only on rank 0."""
    if int(os.environ.get("RANK", "0")) == 0:
        return run(args)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        return run(args)


def run_distributed(run: RunFn, args: argparse.Namespace) -> int | None:
    """Handle ``--nproc`` and torchrun; return an exit code, or None when the caller should
    simply run in this process (one process, or already inside a launched rank)."""
    nproc = getattr(args, "nproc", 1)
    if getattr(args, _IN_RANK, False):
        return None
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        print(f"bnlab: error: --nproc: expected a positive int, got {nproc!r}.", file=sys.stderr)
        return 2
    if _torchrun_world() > 1 and "RANK" in os.environ:
        if nproc > 1:
            print(
                "bnlab: error: --nproc starts processes itself; under torchrun leave it out "
                "(torchrun's --nproc-per-node sets the count).",
                file=sys.stderr,
            )
            return 2
        init_from_env()
        setattr(args, _IN_RANK, True)
        try:
            return _rank_main(run, args)
        finally:
            dist.destroy_process_group()
    if nproc == 1:
        return None
    try:
        backend = _backend(args, nproc)
    except ValueError as e:
        print(f"bnlab: error: {e}", file=sys.stderr)
        return 2
    rank_args = argparse.Namespace(**vars(args))
    setattr(rank_args, _IN_RANK, True)
    try:
        codes = launch(_rank_main, nproc, (run, rank_args), backend=backend)
    except DistributedRunError as e:
        print(f"bnlab: error: {e}", file=sys.stderr)
        return 1
    return max(codes)  # every rank ends with the same code unless one failed on its own


__all__ = ["add_arguments", "run_distributed"]
