"""``bnlab train`` as users run it: the chapter's BN-LeNet on the real Fashion-MNIST, the default
norm against ``--norm torch``, every run a fresh process.

    python -m bnlab train --norm {bnlab,torch} --epochs E --threads N --device D --no-progress \
        --out ...

The two norms run in pairs, and the order swaps from one pair to the next (bnlab first, then
torch first, ...), so that a slow spell of a shared machine, or a drift, falls on both. A run's
time is the median of its epochs after the first (the first also pays for warming the allocator
and the caches), in the seconds ``bnlab train`` writes to metrics.json: the training pass alone,
without evaluation or checkpoint. Processes differ from one another (memory layout, where the
scheduler puts them), which is why the ratio is taken over pairs of processes, not over epochs
of one.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bnlab.bench.timing import Ratio, median_ratio

NORMS = ("bnlab", "torch")  # the default norm, and the one it is compared with
RUN_TIMEOUT_S = 1800  # one run; a 3-epoch run takes about 20 s on 2 cores


@dataclass(frozen=True)
class TrainEpochs:
    """Epoch seconds of ``bnlab train`` per norm, one number per pair of runs."""

    threads: int  # --threads of every run
    epochs: int  # --epochs of every run; epochs 2..epochs are timed
    subset: int | None  # --subset (None: all 60000 training images)
    seconds: dict[str, list[float]]  # norm -> per pair, the median of its run's timed epochs

    @property
    def pairs(self) -> int:
        return len(self.seconds[NORMS[0]])

    def ratio(self) -> Ratio:
        """bnlab / torch over the pairs: the median and its sign-test 95% interval."""
        return median_ratio(self.seconds[NORMS[0]], self.seconds[NORMS[1]])


def train_command(
    norm: str,
    out: Path,
    *,
    threads: int,
    epochs: int,
    device: str,
    data_dir: str | None,
    subset: int | None,
) -> list[str]:
    """The command line of one run, as a user would type it (with the interpreter running)."""
    cmd = [sys.executable, "-m", "bnlab", "train", "--norm", norm, "--epochs", str(epochs)]
    cmd += ["--threads", str(threads), "--device", device, "--no-progress", "--out", str(out)]
    if data_dir is not None:
        cmd += ["--data-dir", data_dir]
    if subset is not None:
        cmd += ["--subset", str(subset)]
    return cmd


def _epoch_seconds(cmd: list[str], out: Path) -> float:
    """Run ``cmd`` and return the median of its timed epochs (metrics.json's ``seconds``)."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`{' '.join(cmd)}` did not finish in {RUN_TIMEOUT_S} s.") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit status {done.returncode}:\n{tail}")
    history = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["history"]
    return statistics.median(row["seconds"] for row in history[1:])


def bench_train(
    *,
    pairs: int,
    threads: int,
    epochs: int = 3,
    device: str = "cpu",
    data_dir: str | None = None,
    subset: int | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> TrainEpochs:
    """Time ``pairs`` pairs of runs (see the module docstring). Each run finds the data where
    ``bnlab train`` looks (``data_dir``, else ``$BNLAB_DATA_DIR`` or the cache); the benchmark
    loads it once first, so that a missing dataset fails before any run and is downloaded once."""
    if pairs < 1 or epochs < 2 or threads < 1:
        raise ValueError(
            f"expected pairs >= 1, epochs >= 2 (the first epoch is not timed) and threads >= 1, "
            f"got pairs={pairs}, epochs={epochs}, threads={threads}."
        )
    seconds: dict[str, list[float]] = {norm: [] for norm in NORMS}
    with tempfile.TemporaryDirectory(prefix="bnlab-bench-train-") as tmp:
        for pair in range(pairs):
            order = NORMS if pair % 2 == 0 else NORMS[::-1]
            for norm in order:
                out = Path(tmp) / f"{threads}t-{pair}-{norm}"
                cmd = train_command(
                    norm,
                    out,
                    threads=threads,
                    epochs=epochs,
                    device=device,
                    data_dir=data_dir,
                    subset=subset,
                )
                seconds[norm].append(_epoch_seconds(cmd, out))
            say(
                f"{threads}t train pair {pair + 1}/{pairs}: "
                + ", ".join(f"{n} {seconds[n][-1]:.2f}s" for n in NORMS)
            )
    return TrainEpochs(threads, epochs, subset, seconds)


__all__ = ["NORMS", "TrainEpochs", "bench_train", "train_command"]
