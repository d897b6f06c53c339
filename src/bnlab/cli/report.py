"""Render the report (HTML with inline images, and Markdown) from cached experiment results."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--results",
        default="results/full",
        metavar="DIR",
        help="results directory written by `bnlab reproduce` (default: results/full)",
    )
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="report directory (default: report/<scale of the results>)",
    )


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from bnlab.lab import build_report

    manifest = Path(args.results) / "manifest.json"
    if not manifest.exists():
        print(f"bnlab report: {manifest} not found; run `bnlab reproduce` (or pass --results).")
        return 2
    out = args.out or f"report/{json.loads(manifest.read_text())['scale']['name']}"
    md, html = build_report(args.results, out)
    print(f"report: {html}\n        {md}")
    return 0
