"""The lab: the chapter's claims and exercises as cached, resumable experiments, and one report.

reproduce(scale, results_dir, only)   runs what is not cached yet, writes manifest.json
build_report(results_dir, out_dir)    report.md + self-contained report.html + figures/ +
                                      verdicts.json (every comparison, machine-readable)
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bnlab._io import atomic_write_text
from bnlab._machine import cpu_model
from bnlab.lab.experiments import EXPERIMENTS
from bnlab.lab.plan import ResultStore, Run, Where, execute_plan
from bnlab.lab.report import Section, render_html, render_markdown
from bnlab.lab.scale import Scale, make_scale

MANIFEST = "manifest.json"
# what runs first when a plan is computed: the sections most claims rest on, the long sweeps
# last (a run stopped part-way leaves the most useful partial report)
RUN_ORDER = (
    "chapter",
    "accumulation",
    "shift",
    "population-stats",
    "placement",
    "dropout",
    "affine",
    "fold",
    "norms",
    "lr",
    "controversy",
    "batch-size",
)
VERDICTS = "verdicts.json"


def select(only: Sequence[str] | None) -> list[str]:
    names = list(only) if only else list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ValueError(
            f"unknown experiment(s) {unknown}; expected names from {list(EXPERIMENTS)}."
        )
    return names


def reproduce(
    scale: Scale,
    results_dir: str | Path,
    *,
    only: Sequence[str] | None = None,
    jobs: int = 1,
    progress: bool = True,
    threads: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Run every planned run of the chosen experiments that has no cached result.

    Planning goes in rounds: adaptive experiments (the lr boundary search) plan further runs
    once earlier ones have results, until nothing is left to run. ``threads``: torch threads
    per run (default: the cores split among ``jobs``); ``device``: where runs train. Neither is
    part of a run's identity, so cached results are reused whatever they are."""
    names = select(only)
    root = Path(results_dir)
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if manifest and manifest.get("scale") != scale.to_dict():
        raise ValueError(
            f"{root} holds results of another scale ({manifest.get('scale')}); use another "
            "--results directory for this one."
        )
    store = ResultStore(root)
    manifest = {
        "scale": scale.to_dict(),
        "experiments": sorted(set(manifest.get("experiments", [])) | set(names)),
        "runs": None,
        "started": now(),
        "finished": None,  # a killed reproduce leaves None: the report says it is incomplete
        "last_reproduce_seconds": None,
        "machine": machine(),
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    start = time.perf_counter()
    where = Where(threads, device)
    while True:
        runs = planned_runs(names, scale, store)
        todo = [run for run in runs if store.get(run) is None]
        if not todo:
            break
        execute_plan(todo, store, jobs=jobs, progress=progress, where=where)
    manifest["runs"] = len(runs)
    manifest["last_reproduce_seconds"] = round(time.perf_counter() - start, 1)
    manifest["finished"] = now()
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    return manifest


def planned_runs(names: Sequence[str], scale: Scale, store: ResultStore) -> list[Run]:
    """Every distinct run the experiments plan, given what the store already has, in the
    order they should run: by the earliest place in RUN_ORDER of any experiment that needs
    the run (a run shared by an early and a late section runs early)."""
    results = _cached(names, scale, store)
    runs: dict[str, Run] = {}
    rank: dict[str, int] = {}
    for n in names:
        place = RUN_ORDER.index(n) if n in RUN_ORDER else len(RUN_ORDER)
        for _, run in EXPERIMENTS[n].plan(scale, results):
            runs.setdefault(run.key, run)
            rank[run.key] = min(rank.get(run.key, place), place)
    return sorted(runs.values(), key=lambda run: rank[run.key])  # stable: plan order within


def _cached(names: Sequence[str], scale: Scale, store: ResultStore) -> dict[Run, dict[str, Any]]:
    """The stored results of every run planned so far (adaptive plans grow with them)."""
    results: dict[Run, dict[str, Any]] = {}
    while True:
        grew = False
        for n in names:
            for _, run in EXPERIMENTS[n].plan(scale, results):
                if run not in results and (r := store.get(run)) is not None:
                    results[run] = r
                    grew = True
        if not grew:
            return results


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def build_report(results_dir: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Render every experiment the results directory knows of (missing runs are named)."""
    root = Path(results_dir)
    manifest_path = root / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"{manifest_path} not found: run `bnlab reproduce --results {root}` first."
        )
    manifest = json.loads(manifest_path.read_text())
    scale = Scale(**manifest["scale"])
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    store = ResultStore(root)
    names = [n for n in EXPERIMENTS if n in manifest["experiments"]]
    cached = _cached(names, scale, store)
    sections: list[Section] = []
    planned_keys: set[str] = set()
    for name in names:
        exp = EXPERIMENTS[name]
        planned = exp.plan(scale, cached)
        planned_keys |= {run.key for _, run in planned}
        results = {run: cached[run] for _, run in planned if run in cached}
        sections.append(exp.summarize(scale, planned, results, fig_dir))
    done_runs = [run for run in cached if run.key in planned_keys]
    planned_count, done = len(planned_keys), len(done_runs)
    run_seconds = sum(store.seconds(run) for run in done_runs)
    m = manifest["machine"]
    title = "bnlab: the Batch Normalization chapter, measured"
    complete = done == planned_count and manifest.get("finished") is not None
    status = (
        f"All {planned_count} planned runs are done (runs that several sections share ran once)"
        if complete
        else f"INCOMPLETE: {done} of {planned_count} runs planned so far are done (sections say "
        "which are missing; the learning-rate search plans more as results come in; "
        "`bnlab reproduce` with the same options computes only what is missing)"
    )
    wall = manifest.get("last_reproduce_seconds")
    preamble = (
        f'Every section states a claim or question of the chapter "Batch Normalization" '
        f"(Dive into Deep Learning), the measurement, and a verdict computed from the numbers: "
        "each arm is compared with the section's reference arm by the difference of their "
        "means, paired by seed, with a 95% t-interval; the verdict says 'better' or 'worse' only "
        "when that interval excludes 0, otherwise 'no detectable difference', and arms are "
        "never ranked on differences inside the noise. Test accuracy is read with precise "
        "whole-training-set statistics (`bnlab.tools.precise_bn`), the moving-average reading "
        f"beside it. {scale.describe()}.\n\n"
        f"{status}. Compute: {run_seconds / 60:.0f} minutes of run time in all (one process per "
        "run, each with its share of the cores)"
        + (
            f"; the last `bnlab reproduce` took {wall / 60:.0f} minutes of wall time"
            if wall
            else ""
        )
        + f". Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, Python {m['python']}."
    )
    md, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md, render_markdown(title, preamble, sections, out))
    atomic_write_text(html_path, render_html(title, preamble, sections))
    verdicts = {
        "scale": scale.name,
        "complete": complete,
        "claims": [c for s in sections for c in s.claims],
    }
    atomic_write_text(out / VERDICTS, json.dumps(verdicts, indent=1, allow_nan=False) + "\n")
    return md, html_path


__all__ = ["build_report", "make_scale", "reproduce"]
