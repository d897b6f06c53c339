"""Build the C++ batch-norm kernel ahead of time and say where the build lives.

bnlab's default kernel (impl="auto") runs the C++ kernel on the CPU wherever it is built, and
the slower eager PyTorch kernel elsewhere, after one warning; it never compiles on first use.
`make setup` (which `make train` and `make test` run first) runs this command. A build is made
for one source, torch version, Python and CPU, and is loaded only by a process that matches all
of them: after upgrading torch, run it again.

The build goes to $BNLAB_BUILD_DIR, else to the per-user cache (bnlab/native/<name>). It needs a
C++ compiler (g++ or clang++) and ninja (installed with bnlab).

examples:
  bnlab build            # compile the kernel unless a build for this setup exists
  bnlab build --force    # compile it again
  bnlab build --check    # only say whether a usable build exists (exit status 1 if not)
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--force", action="store_true", help="compile even if a build exists")
    what.add_argument(
        "--check", action="store_true", help="build nothing; exit 1 if there is no usable build"
    )


def run(args: argparse.Namespace) -> int:
    from bnlab.functional import native

    directory = native.build_dir()
    if args.check:
        try:
            native.find_build()
        except native.NativeBuildError as e:
            print(f"bnlab build: no usable C++ kernel: {e}. Run `bnlab build`.", file=sys.stderr)
            return 1
        print(f"C++ batch-norm kernel: built, in {directory}")
        return 0
    try:
        native.build_native(force=args.force)
    except native.NativeBuildError as e:
        print(
            f"{e}\nbnlab build: nothing was built. bnlab still works: its default kernel is "
            "then the eager PyTorch one (slower than torch's own batch norm).",
            file=sys.stderr,
        )
        return 1
    load = native.native_load()
    assert load is not None  # build_native either loaded a build or raised
    how = f"compiled in {load.seconds:.0f} s" if load.compiled else "already built"
    print(f"C++ batch-norm kernel: {how}, in {load.path}")
    return 0
