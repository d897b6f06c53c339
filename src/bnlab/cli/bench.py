"""Time bnlab's batch norm against PyTorch's, the chapter's formula and a memory-traffic floor.

Every contender runs on the same tensors in one process, interleaved; the table shows medians
and ratios to torch.nn.functional.batch_norm, then one BN-LeNet training epoch per norm layer,
then the performance goals met or not. See docs/speed.md for the measured numbers.

The native C++ kernel (impl="native") is built, or loaded from its on-disk cache, once before any
timing; the table states how long that took, or why the kernel is unavailable.

examples:
  bnlab bench                          # the full benchmark (about 10 minutes on 2 cores)
  bnlab bench --quick                  # a smoke run: few samples, a small epoch, no compile
                                       # (torch.compile; the native kernel is still timed)
  bnlab bench --out results/bench      # also write results/bench.md and results/bench.json
  bnlab bench --no-native              # leave out impl="native" (and its build)
  bnlab bench --device cuda --no-lenet
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from bnlab.bench import BenchConfig, run_benchmark


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="few samples, small epoch, no torch.compile"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--out",
        type=Path,
        metavar="PATH",
        help="write PATH.md (table) and PATH.json (every number, machine, versions, date)",
    )
    parser.add_argument("--reps", type=int, help="interleaved samples per contender")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time impl='fast_compiled' too (default: yes, except with --quick)",
    )
    parser.add_argument(
        "--native",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time impl='native' too, after building it (default: yes on the CPU, where "
        "alone it runs; a machine's first build compiles for about a minute, reported apart)",
    )
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        metavar="N×C[×H×W],...",
        help="batch-norm input shapes, e.g. 256x6x24x24,256x120 (default: the LeNet and the "
        "large conv shapes of docs/speed.md)",
    )
    parser.add_argument("--no-lenet", action="store_true", help="skip the BN-LeNet epochs")
    parser.add_argument("--lenet-images", type=int, help="images per BN-LeNet epoch")
    parser.add_argument("--lenet-rounds", type=int, help="epochs per norm layer")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads before measuring")
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


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    config = BenchConfig.quick() if args.quick else BenchConfig()
    changes: dict[str, object] = {"device": args.device}
    for flag, name, minimum in (
        ("--reps", "reps", 1),
        ("--lenet-rounds", "lenet_rounds", 1),
        ("--lenet-images", "lenet_images", 2),
    ):
        value = getattr(args, name)
        if value is not None:
            if value < minimum:
                raise ValueError(f"{flag}: expected an int >= {minimum}, got {value}.")
            changes[name] = value
    if args.compile is not None:
        changes["compiled"] = args.compile
    if args.native is not None:
        changes["native"] = args.native
    elif not args.device.startswith("cpu"):
        changes["native"] = False  # CPU-only: elsewhere impl="native" runs the fast kernel
    if args.clock is not None:
        changes["clock"] = args.clock
    if args.shapes is not None:
        changes["shapes"] = args.shapes
    if args.no_lenet:
        changes["lenet_images"] = 0
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


def run(args: argparse.Namespace) -> int:
    import torch

    try:
        config = config_from_args(args)
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads: expected a positive int, got {args.threads}.")
            torch.set_num_threads(args.threads)
        result = run_benchmark(config, progress=lambda line: print(line, file=sys.stderr))
    except ValueError as e:
        print(f"bnlab bench: {e}", file=sys.stderr)
        return 2
    table = result.to_markdown()
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(table, encoding="utf-8")
        args.out.with_suffix(".json").write_text(
            json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8"
        )
        print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")
    return 0
