"""Run the chapter's experiments (cached and resumable), then write the report.

Every experiment's runs are cached in the results directory: rerunning, or running after a
kill, computes only what is missing. `--quick` uses a data subset, 2 epochs and 2 seeds,
finishes in minutes on two cores, and is labelled a smoke run (not evidence) in the report.
"""

from __future__ import annotations

import argparse
import os

from bnlab.lab.experiments import EXPERIMENTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of the pipeline: 4096 images, 2 epochs, 2 seeds",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        choices=list(EXPERIMENTS),
        help="run only these experiments: " + ", ".join(EXPERIMENTS),
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="seeds per arm, at least 2 (default: 5 full, 3 in the costly sweeps lr, "
        "batch-size and controversy; 2 quick)",
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs per run (default: 10 full, 2 quick)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="runs in parallel processes, the cores split among them (default: one per core; "
        "LeNet-sized runs gain more from this than from threads)",
    )
    parser.add_argument(
        "--results",
        default=None,
        metavar="DIR",
        help="results cache directory (default: results/full or results/quick)",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="report directory (default: report/full or report/quick)",
    )
    parser.add_argument("--no-report", action="store_true", help="only run, do not render")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads per run (default: the cores split among --jobs)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        metavar="DEVICE",
        help="where the runs train: cpu (default, as the report's numbers), cuda, cuda:1, ...; "
        "not part of a run's identity, so cached results are reused",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="Fashion-MNIST directory (default: $BNLAB_DATA_DIR, else the per-user cache; "
        "downloaded when missing)",
    )


def run(args: argparse.Namespace) -> int:
    from bnlab.data import DATA_DIR_ENV, DataError
    from bnlab.lab import build_report, make_scale, reproduce

    try:
        scale = make_scale(args.quick, args.seeds, args.epochs)
    except ValueError as e:
        print(f"bnlab reproduce: {e}")
        return 2
    results = args.results or f"results/{scale.name}"
    if args.data_dir is not None:
        # the runs load the dataset in worker processes, which inherit the environment
        os.environ[DATA_DIR_ENV] = args.data_dir
    try:
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads: expected a positive int, got {args.threads}.")
        manifest = reproduce(
            scale, results, only=args.only, jobs=args.jobs, threads=args.threads, device=args.device
        )
    except (DataError, ValueError) as e:
        print(f"bnlab reproduce: {e}")
        return 2
    print(
        f"{manifest['runs']} runs in {results} ({manifest['last_reproduce_seconds']:.0f} s "
        "this time; cached runs cost nothing)."
    )
    if not args.no_report:
        md, html = build_report(results, args.out or f"report/{scale.name}")
        print(f"report: {html}\n        {md}")
    return 0
