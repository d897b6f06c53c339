"""The lab end to end at a tiny scale: every experiment yields results and figures, the report
renders every section, and cached results are reused instead of recomputed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bnlab.lab import build_report, reproduce
from bnlab.lab import plan as plan_module
from bnlab.lab.experiments import EXPERIMENTS
from bnlab.lab.plan import ResultStore, Run, execute_plan
from bnlab.lab.scale import Scale

TINY = Scale("quick", seeds=1, epochs=1, subset=256, measure_every=4, test_subset=512)


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    results = tmp_path_factory.mktemp("results")
    report = tmp_path_factory.mktemp("report")
    reproduce(TINY, results, progress=False, jobs=2)  # also exercises the process pool
    build_report(results, report)
    return results, report


def test_every_experiment_has_results_and_a_section(tiny_lab: tuple[Path, Path]) -> None:
    results, report = tiny_lab
    for name, exp in EXPERIMENTS.items():
        planned = exp.plan(TINY)
        assert planned, name
        store = ResultStore(results)
        for _, run in planned:
            assert store.get(run) is not None, f"{name}: {run.label} has no result"
    md = (report / "report.md").read_text()
    html = (report / "report.html").read_text()
    for exp in EXPERIMENTS.values():
        assert f'<a id="{exp.name}"></a>' in md
        assert f'id="{exp.name}"' in html
        section = md.split(f'<a id="{exp.name}"></a>', 1)[1].split("<a id=", 1)[0]
        assert "**Verdict.**" in section and "No measurement yet" not in section, exp.name
        assert "QUICK run" in section  # quick numbers are labelled as such
    assert "## Contents" in md
    assert re.search(r"All \d+ planned runs are done", md) and "INCOMPLETE" not in md


def test_report_is_self_contained_with_captioned_figures(tiny_lab: tuple[Path, Path]) -> None:
    _, report = tiny_lab
    html = (report / "report.html").read_text()
    assert "http://" not in html and "https://" not in html  # nothing fetched from a network
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', html)
    assert len(images) >= len(EXPERIMENTS)
    assert all(alt.strip() for alt in images)
    assert html.count("<figcaption>") == len(images)
    for png in (report / "figures").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cached_results_are_reused_not_recomputed(
    tiny_lab: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    results, _ = tiny_lab

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached run was recomputed")

    monkeypatch.setattr(plan_module, "_execute", refuse)
    manifest = reproduce(TINY, results, only=["chapter", "fold"], progress=False)
    assert manifest["runs"] == len(EXPERIMENTS["chapter"].plan(TINY)) + len(
        EXPERIMENTS["fold"].plan(TINY)
    )


def test_corrupt_cache_entry_is_reported_by_name_and_recomputed(tmp_path: Path) -> None:
    run = Run("unit", "batch 1", "batch_one", {})
    store = ResultStore(tmp_path)
    execute_plan([run], store, progress=False)
    path = store.path(run)
    path.write_text("{not json")
    with pytest.warns(RuntimeWarning, match=re.escape(str(path))):
        assert store.get(run) is None
    assert path.with_suffix(".json.corrupt").exists()
    result = execute_plan([run], store, progress=False)[run]
    assert "more than 1 value per channel" in result["error"]
    assert result["max_abs_normalized"] == 0.0 and result["max_abs_gamma_grad"] == 0.0
    assert json.loads(path.read_text())["result"] == result


def test_reproduce_refuses_another_scale_and_unknown_names(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"scale": {"name": "full"}}))
    with pytest.raises(ValueError, match="another scale"):
        reproduce(TINY, tmp_path, only=["chapter"], progress=False)
    with pytest.raises(ValueError, match="unknown experiment"):
        reproduce(TINY, tmp_path / "x", only=["nope"], progress=False)
