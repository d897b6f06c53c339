"""Runs, their cache, and the executor that works through a plan of them.

A :class:`Run` is one unit of work: a task name (a function in :mod:`bnlab.lab.tasks`) with
JSON parameters. A run is identified by its key, a hash of the task and parameters alone, so
experiments that need the same run (the chapter's BN-LeNet appears in six sections) share one
result. It is cached as ``<results>/runs/<key>.json``, so a rerun (or the report) never
recomputes what it has, and a killed ``bnlab reproduce`` continues where it stopped: finished
runs are cached, and a training run in progress resumes from its last epoch checkpoint in
``<results>/work/<key>/`` (checkpoints, not committed: the directory ignores ``work/``).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlab._io import atomic_write_text

RESULT_VERSION = 2  # bump when a task's result format changes: old cache entries are ignored


@dataclass(frozen=True, eq=False)
class Run:
    """One unit of work. Equal (and hashed) by :attr:`key`: the experiment and label only say
    who planned it."""

    experiment: str
    label: str  # human-readable, e.g. "bn lr=0.1 seed=0"
    task: str  # a name in bnlab.lab.tasks.TASKS
    params: dict[str, Any] = field(hash=False)

    @property
    def key(self) -> str:
        blob = json.dumps(
            {"task": self.task, "params": self.params, "v": RESULT_VERSION}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Run) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)


class ResultStore:
    """One JSON file per run, written atomically; a corrupt file is reported by name and
    moved aside (``.corrupt``), never used."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, run: Run) -> Path:
        return self.root / "runs" / f"{run.key}.json"

    def records(self) -> list[dict[str, Any]]:
        """Every readable cached record (for re-analysis without the plan)."""
        out = []
        for path in sorted((self.root / "runs").glob("*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except ValueError:
                continue
        return out

    def workdir(self, run: Run) -> Path:
        return self.root / "work" / run.key

    def get(self, run: Run) -> dict[str, Any] | None:
        path = self.path(run)
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text())
            if record["task"] != run.task or record["params"] != run.params:
                raise ValueError("its task/params do not match the run's")
            return dict(record["result"])
        except (ValueError, KeyError, TypeError) as e:
            aside = path.with_suffix(".json.corrupt")
            os.replace(path, aside)
            warnings.warn(
                f"cached result {path} is unreadable ({e}); moved it to {aside.name} and the "
                "run will be recomputed.",
                RuntimeWarning,
                stacklevel=2,
            )
            return None

    def seconds(self, run: Run) -> float:
        """How long the cached run took to compute (0 if unknown)."""
        try:
            return float(json.loads(self.path(run).read_text()).get("seconds", 0.0))
        except (OSError, ValueError):
            return 0.0

    def put(
        self, run: Run, result: dict[str, Any], seconds: float, env: dict[str, Any] | None = None
    ) -> None:
        path = self.path(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        ignore = self.root / ".gitignore"  # checkpoints stay out of a committed record
        if not ignore.exists():
            atomic_write_text(ignore, "work/\n")
        record = {
            "key": run.key,
            "experiment": run.experiment,
            "label": run.label,
            "task": run.task,
            "params": run.params,
            "seconds": seconds,
            "env": env or {},
            "result": result,
        }
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True))


@dataclass(frozen=True)
class Where:
    """How runs execute; never part of a run's key (results do not depend on it)."""

    threads: int | None = None  # torch threads per run (None: the cores split among the jobs)
    device: str = "cpu"


def _execute(run: Run, store_root: str, where: Where) -> tuple[Run, dict[str, Any], float]:
    """Run one task (in this or a worker process) and cache its result."""
    import torch

    from bnlab.lab.tasks import run_task

    store = ResultStore(store_root)
    start = time.perf_counter()
    result = run_task(
        run.task, run.params, workdir=store.workdir(run), threads=where.threads, device=where.device
    )
    seconds = time.perf_counter() - start
    env = {
        "threads": torch.get_num_threads(),
        "device": where.device,
        "torch": torch.__version__,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store.put(run, result, seconds, env)
    return run, result, seconds


def execute_plan(
    runs: Sequence[Run],
    store: ResultStore,
    *,
    jobs: int = 1,
    progress: bool = True,
    where: Where | None = None,
    on_result: Callable[[Run, dict[str, Any]], None] | None = None,
) -> dict[Run, dict[str, Any]]:
    """Results for every run, computing only those not cached; shows one progress bar for the
    whole plan (which experiment, which run, ETA)."""
    results: dict[Run, dict[str, Any]] = {}
    todo: list[Run] = []
    for run in _unique(runs):
        cached = store.get(run)
        if cached is None:
            todo.append(run)
        else:
            results[run] = cached
    from bnlab.lab.tasks import task_params

    for run in todo:  # every run's parameters are checked before the first one starts
        task_params(run.task, run.params)
    from tqdm.auto import tqdm  # here: a notebook importing the lab needs no widget support

    where = where or Where()
    bar = tqdm(total=len(todo), desc="plan", unit="run", disable=not progress or not todo)
    try:
        if jobs <= 1 or len(todo) <= 1:
            for run in todo:
                bar.set_postfix_str(f"{run.experiment}: {run.label}")
                _, result, _ = _execute(run, str(store.root), where)
                results[run] = result
                if on_result:
                    on_result(run, result)
                bar.update()
        else:
            # LeNet-sized ops gain little from intra-op threads, and oversubscribed OpenMP
            # threads spin-wait: one run per core is faster than runs sharing all cores
            threads = where.threads or max(1, (os.cpu_count() or 1) // jobs)
            worker = Where(threads, where.device)
            # spawn, not fork: a forked child of a process whose OpenMP pool is running can hang
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(jobs, mp_context=context) as pool:
                futures = [pool.submit(_execute, run, str(store.root), worker) for run in todo]
                for future in as_completed(futures):
                    run, result, _ = future.result()
                    bar.set_postfix_str(f"{run.experiment}: {run.label}")
                    results[run] = result
                    if on_result:
                        on_result(run, result)
                    bar.update()
    finally:
        bar.close()
    return results


def _unique(runs: Iterable[Run]) -> list[Run]:
    seen: set[str] = set()
    out = []
    for run in runs:
        if run.key not in seen:
            seen.add(run.key)
            out.append(run)
    return out
