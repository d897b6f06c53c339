"""``python benchmarks/bench_batchnorm.py [options]`` is ``bnlab bench [options]``."""

import sys

from bnlab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
