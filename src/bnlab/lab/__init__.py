"""The lab: the chapter's claims and exercises as cached, resumable experiments, and one report.

reproduce(scale, only, results_dir)   runs what is not cached yet, writes manifest.json
build_report(results_dir, out_dir)    report.md + self-contained report.html + figures/
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bnlab.lab.experiments import EXPERIMENTS
from bnlab.lab.plan import ResultStore, Run, atomic_write_text, execute_plan
from bnlab.lab.report import Section, render_html, render_markdown
from bnlab.lab.scale import Scale, make_scale

MANIFEST = "manifest.json"


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
) -> dict[str, Any]:
    """Run every planned run of the chosen experiments that has no cached result."""
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
    runs: list[Run] = [run for n in names for _, run in EXPERIMENTS[n].plan(scale)]
    manifest = {
        "scale": scale.to_dict(),
        "experiments": sorted(set(manifest.get("experiments", [])) | set(names)),
        "runs": len(runs),
        "started": now(),
        "finished": None,  # a killed reproduce leaves None: the report says it is incomplete
        "last_reproduce_seconds": None,
        "machine": machine(),
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    start = time.perf_counter()
    execute_plan(runs, ResultStore(root), jobs=jobs, progress=progress)
    manifest["last_reproduce_seconds"] = round(time.perf_counter() - start, 1)
    manifest["finished"] = now()
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    return manifest


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {
        "cpu": cpu,
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
    sections: list[Section] = []
    planned_runs = done = 0
    run_seconds = 0.0
    for name in EXPERIMENTS:
        if name not in manifest["experiments"]:
            continue
        exp = EXPERIMENTS[name]
        planned = exp.plan(scale)
        results = {run: r for _, run in planned if (r := store.get(run)) is not None}
        planned_runs += len(planned)
        done += len(results)
        run_seconds += sum(store.seconds(run) for run in results)
        sections.append(exp.summarize(scale, planned, results, fig_dir))
    m = manifest["machine"]
    title = "bnlab: the Batch Normalization chapter, measured"
    status = (
        f"All {planned_runs} planned runs are done"
        if done == planned_runs
        else f"INCOMPLETE: {done} of {planned_runs} planned runs are done (sections say which "
        "are missing; `bnlab reproduce` with the same options computes only those)"
    )
    wall = manifest.get("last_reproduce_seconds")
    preamble = (
        f'Every section states a claim or question of the chapter "Batch Normalization" '
        f"(Dive into Deep Learning), the measurement, and a one-sentence verdict computed from "
        f"the numbers. {scale.describe()}.\n\n"
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
    return md, html_path


__all__ = ["build_report", "make_scale", "reproduce"]
