"""Time bnlab's batch norm against PyTorch's, the chapter's formula and a memory-traffic floor.

Every contender runs on the same tensors in one process, interleaved, for each thread count:
first the layers as users build them (bnlab.nn.BatchNorm(C), with its default kernel, against
torch.nn.BatchNorm1d/2d), then the functions (every bnlab kernel against
torch.nn.functional.batch_norm), then one BN-LeNet training epoch per norm layer, then `bnlab
train` itself on the real Fashion-MNIST (the default norm against --norm torch, in pairs of fresh
processes); then a fresh process's first training step, and the performance goals met or not.
See docs/speed.md.

The default kernel (impl="auto") is the C++ kernel on the CPU where `bnlab build` has built it.
Its build is loaded once before any timing, never compiled; the table states how long loading
took, or why the kernel is unavailable.

examples:
  bnlab bench                          # the full benchmark, 1 and 2 threads (about 20 minutes
                                       # on 2 cores, plus about 10 for the `bnlab train` pairs)
  bnlab bench --quick                  # a smoke run: few samples, a small epoch, no compile
                                       # (torch.compile), no `bnlab train` runs, the current
                                       # thread count
  bnlab bench --threads 1 --no-functions --no-lenet --train-pairs 0   # only the layers, 1 thread
  bnlab bench --no-functions --no-lenet --train-pairs 10   # the layers, and `bnlab train` in
                                       # 10 pairs of runs per thread count
  bnlab bench --out results/bench      # also write results/bench/bench.md and bench.json
  bnlab bench --no-native              # no impl="native" column in the function tables
  bnlab bench --device cuda --no-lenet --train-pairs 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from bnlab._io import atomic_write_text
from bnlab.bench import BenchConfig, run_benchmark


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="few samples, small epoch, no torch.compile"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="also write DIR/bench.md (the table) and DIR/bench.json (every number, machine, "
        "versions, date)",
    )
    parser.add_argument("--reps", type=int, help="interleaved samples per contender")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time impl='compiled' too (default: yes, except with --quick)",
    )
    parser.add_argument(
        "--native",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time impl='native' by name in the function tables (default: yes on the CPU, "
        "where alone it runs, if it is built)",
    )
    parser.add_argument(
        "--functions",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the functions as well as the layers (default: yes)",
    )
    parser.add_argument(
        "--first-step",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time a default layer's first training step in a fresh process (default: yes)",
    )
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        metavar="N×C[×H×W],...",
        help="batch-norm input shapes, e.g. 256x6x24x24,256x120 (default: the LeNet and the "
        "large conv shapes of docs/speed.md)",
    )
    parser.add_argument("--no-lenet", action="store_true", help="skip the BN-LeNet epochs")
    parser.add_argument(
        "--train-pairs",
        type=int,
        metavar="N",
        help="pairs of `bnlab train` runs (default norm, then --norm torch) on the real data per "
        "thread count; 0 skips them (default: 10; --quick: 0)",
    )
    parser.add_argument(
        "--train-epochs",
        type=int,
        metavar="N",
        help="epochs per `bnlab train` run, the first untimed (default: 3)",
    )
    parser.add_argument(
        "--train-subset",
        type=int,
        metavar="N",
        help="train each `bnlab train` run on the first N images (default: all 60000)",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where the `bnlab train` runs find Fashion-MNIST (default: as `bnlab train`: "
        "$BNLAB_DATA_DIR, else the user cache, downloading it there once)",
    )
    parser.add_argument("--lenet-images", type=int, help="images per BN-LeNet epoch")
    parser.add_argument("--lenet-rounds", type=int, help="epochs per norm layer")
    parser.add_argument(
        "--threads",
        type=parse_threads,
        metavar="N[,N...]",
        help="thread counts, one pass of the benchmark each (default: 1,2; --quick: the "
        "current one)",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        help="wall (default): elapsed time; cpu: the thread's CPU time, steadier on a busy "
        "shared machine (needs --threads 1; the LeNet epochs stay in wall time)",
    )


def parse_shapes(text: str) -> tuple[tuple[int, ...], ...]:
    """ "256x6x24x24,256x120" -> ((256, 6, 24, 24), (256, 120))."""
    shapes = []
    for part in text.split(","):
        try:
            shape = tuple(int(s) for s in part.lower().replace("×", "x").split("x"))
        except ValueError:
            shape = ()
        if len(shape) < 2 or min(shape) < 1:
            raise argparse.ArgumentTypeError(
                f"expected shapes like 256x6x24x24,256x120 (N, C, then spatial sizes, all "
                f"positive), got {part!r}."
            )
        shapes.append(shape)
    return tuple(shapes)


def parse_threads(text: str) -> tuple[int, ...]:
    """ "1,2" -> (1, 2)."""
    try:
        counts = tuple(int(s) for s in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(
            f"expected positive thread counts like 1,2 or 1, got {text!r}."
        )
    return counts


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    config = BenchConfig.quick() if args.quick else BenchConfig()
    changes: dict[str, object] = {"device": args.device}
    for flag, name, minimum in (
        ("--reps", "reps", 1),
        ("--lenet-rounds", "lenet_rounds", 1),
        ("--lenet-images", "lenet_images", 2),
        ("--train-pairs", "train_pairs", 0),
        ("--train-epochs", "train_epochs", 2),
        ("--train-subset", "train_subset", 2),
    ):
        value = getattr(args, name)
        if value is not None:
            if value < minimum:
                raise ValueError(f"{flag}: expected an int >= {minimum}, got {value}.")
            changes[name] = value
    if args.data_dir is not None:
        changes["data_dir"] = args.data_dir
    if args.compile is not None:
        changes["compiled"] = args.compile
    if args.native is not None:
        changes["native"] = args.native
    elif not args.device.startswith("cpu"):
        changes["native"] = False  # CPU-only: elsewhere impl="native" runs the eager kernel
    if args.clock is not None:
        changes["clock"] = args.clock
    if args.threads is not None:
        changes["threads"] = args.threads
    changes["functions"] = args.functions
    changes["first_step"] = args.first_step
    if args.shapes is not None:
        changes["shapes"] = args.shapes
    if args.no_lenet:
        changes["lenet_images"] = 0
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        result = run_benchmark(config, progress=lambda line: print(line, file=sys.stderr))
    except ValueError as e:
        print(f"bnlab bench: {e}", file=sys.stderr)
        return 2
    table = result.to_markdown()
    print(table)
    if args.out is not None:
        md, js = args.out / "bench.md", args.out / "bench.json"
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(md, table)
        atomic_write_text(js, json.dumps(result.to_json(), indent=2) + "\n")
        print(f"wrote {md} and {js}")
    return 0
