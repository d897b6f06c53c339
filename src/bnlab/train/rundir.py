"""A run directory and the files in it; every file is written atomically.

<run>/config.json      the resolved TrainConfig (what ``resume`` restarts from)
<run>/metrics.csv      one row per epoch: epoch, train_loss, train_acc, test_acc,
                       seconds, examples_per_s, eval_seconds
<run>/metrics.json     {"history": [rows as above], "environment": {...}}
<run>/curves.png       train loss / train acc / test acc per epoch
<run>/checkpoint.pt    the state after the last complete epoch (weights_only loadable)
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bnlab._io import atomic_write_text
from bnlab.train.config import ConfigError, TrainConfig

METRIC_FIELDS = (
    "epoch",
    "train_loss",
    "train_acc",
    "test_acc",
    "seconds",
    "examples_per_s",
    "eval_seconds",
)


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def metrics_json(self) -> Path:
        return self.path / "metrics.json"

    @property
    def curves(self) -> Path:
        return self.path / "curves.png"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"


def default_out(
    norm: str, *, base: str | os.PathLike[str] = "runs", now: datetime | None = None
) -> Path:
    """``runs/<YYYYmmdd-HHMMSS>-<norm>``, with ``-2``, ``-3``... if that name is taken."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', norm)}"
    path = Path(base) / name
    k = 2
    while path.exists():
        path = Path(base) / f"{name}-{k}"
        k += 1
    return path


def check_new_run_dir(path: str | os.PathLike[str]) -> RunDir:
    """The run directory at ``path``, refused if it already holds a run (nothing is made)."""
    run = RunDir(Path(path))
    if run.config.exists() or run.checkpoint.exists():
        raise ConfigError(
            f"out: {run.path} already holds a run. Continue it with --resume {run.path}, or "
            "choose another --out (or leave it out for a fresh runs/<timestamp>-<norm>)."
        )
    if run.path.exists() and not run.path.is_dir():
        raise ConfigError(f"out: {run.path} is a file; expected a directory for the run.")
    return run


def create_run_dir(path: str | os.PathLike[str]) -> RunDir:
    """Make a fresh run directory; refuse one that already holds a run."""
    run = check_new_run_dir(path)
    try:
        run.path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise ConfigError(f"out: cannot create the run directory {run.path}: {e}.") from e
    return run


def write_config(run: RunDir, config: TrainConfig) -> None:
    atomic_write_text(run.config, json.dumps(config.to_dict(), indent=2) + "\n")


def read_config(path: str | os.PathLike[str]) -> tuple[RunDir, TrainConfig]:
    """The run directory at ``path`` and the config it was started with."""
    run = RunDir(Path(path))
    if not run.config.is_file():
        raise ConfigError(
            f"resume: {run.path} is not a run directory (no config.json). Pass the directory "
            "a `bnlab train` run printed, e.g. runs/20260101-120000-bnlab."
        )
    try:
        data = json.loads(run.config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"resume: {run.config} is not valid JSON ({e}).") from e
    if not isinstance(data, dict):
        raise ConfigError(f"resume: {run.config} should hold a JSON object, got {data!r:.80}.")
    return run, TrainConfig.from_dict(data)


def write_metrics(
    run: RunDir, history: Sequence[Mapping[str, Any]], environment: Mapping[str, Any]
) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row[k] for k in METRIC_FIELDS})  # repr floats: exact round trip
    atomic_write_text(run.metrics_csv, buf.getvalue())
    payload = {"history": [dict(row) for row in history], "environment": dict(environment)}
    atomic_write_text(run.metrics_json, json.dumps(payload, indent=2) + "\n")


__all__ = [
    "METRIC_FIELDS",
    "RunDir",
    "check_new_run_dir",
    "create_run_dir",
    "default_out",
    "read_config",
    "write_config",
    "write_metrics",
]
