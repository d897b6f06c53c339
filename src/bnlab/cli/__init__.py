"""The ``bnlab`` command. Each subcommand is a module here with ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches.

Only the chosen subcommand's module is imported (``bnlab --help`` and ``bnlab --version`` import
no torch), so each subcommand's one-line summary is listed here; its module's docstring, which
opens with the same line, is the subcommand's full description.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable, Sequence
from types import ModuleType

# name -> (module, one-line summary: the first line of the module's docstring)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "bnlab.cli.train",
        "Train the chapter's BN-LeNet on Fashion-MNIST (Dive into Deep Learning, \"Batch "
        'Normalization").',
    ),
    "bench": (
        "bnlab.cli.bench",
        "Time bnlab's batch norm against PyTorch's, the chapter's formula and a memory-traffic "
        "floor.",
    ),
    "build": (
        "bnlab.cli.build",
        "Build the C++ batch-norm kernel ahead of time and say where the build lives.",
    ),
    "reproduce": (
        "bnlab.cli.reproduce",
        "Run the chapter's experiments (cached and resumable), then write the report.",
    ),
    "report": (
        "bnlab.cli.report",
        "Render the report (HTML with inline images, and Markdown) from cached experiment results.",
    ),
}


class SubcommandImportError(ImportError):
    """A subcommand's module failed to import: the command is broken, not absent."""


def load_subcommand(name: str) -> ModuleType:
    module_name = SUBCOMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise SubcommandImportError(
            f"the {name!r} command cannot be loaded: importing {module_name} failed "
            f"({type(e).__name__}: {e}). The installation is incomplete or broken; reinstall "
            "bnlab with its dependencies (make setup, or pip install -e .)."
        ) from e


def _version() -> str:
    from bnlab import __version__

    return f"bnlab {__version__}"


def build_parser(load: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line. ``load``: the subcommands whose options are added (their
    modules imported); default: all. The others are listed by name and summary only."""
    names = set(SUBCOMMANDS if load is None else load)
    parser = argparse.ArgumentParser(
        prog="bnlab", description="Batch normalization from scratch, and a lab for its claims."
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in SUBCOMMANDS.items():
        module = load_subcommand(name) if name in names else None
        p = sub.add_parser(
            name,
            help=summary,
            description=(module.__doc__ or summary).strip() if module else summary,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if module is not None:
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def chosen_subcommand(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv``: the top-level parser takes only flags without values
    (--help, --version), so it is the first argument that does not start with '-'."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in SUBCOMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = chosen_subcommand(argv)
    try:
        parser = build_parser(load=[name] if name else [])
    except SubcommandImportError as e:
        print(f"bnlab: error: {e}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
