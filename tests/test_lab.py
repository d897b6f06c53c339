"""The lab end to end at a tiny scale: every experiment yields results and figures, the report
renders every section and a verdicts.json of the documented schema, runs that several sections
share run once, and cached results are reused instead of recomputed."""

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

TINY = Scale("quick", seeds=2, epochs=1, subset=256, measure_every=4, test_subset=512)


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory: pytest.TempPathFactory, real_data_dir: Path) -> tuple[Path, Path]:
    results = tmp_path_factory.mktemp("results")
    report = tmp_path_factory.mktemp("report")
    reproduce(TINY, results, progress=False, jobs=2)  # also exercises the process pool
    build_report(results, report)
    return results, report


def test_every_experiment_has_results_and_a_section(tiny_lab: tuple[Path, Path]) -> None:
    results, report = tiny_lab
    store = ResultStore(results)
    cached = {run: r for run in _all_runs(store) if (r := store.get(run)) is not None}
    for name, exp in EXPERIMENTS.items():
        planned = exp.plan(TINY, cached)
        assert planned, name
        for _, run in planned:
            assert store.get(run) is not None, f"{name}: {run.label} has no result"
    md = (report / "report.md").read_text()
    html = (report / "report.html").read_text()
    for exp in EXPERIMENTS.values():
        assert f'<a id="{exp.name}"></a>' in md
        assert f'id="{exp.name}"' in html
        section = md.split(f'<a id="{exp.name}"></a>', 1)[1].split("<a id=", 1)[0]
        assert "**Verdict.**" in section and "No measurement yet" not in section, exp.name
        assert "QUICK smoke run" in section  # quick numbers are labelled as such
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
    keys = {run.key for n in ("chapter", "fold") for _, run in EXPERIMENTS[n].plan(TINY)}
    assert manifest["runs"] == len(keys)


def _all_runs(store: ResultStore) -> list[Run]:
    return [Run(r["experiment"], r["label"], r["task"], r["params"]) for r in store.records()]


def test_a_run_several_sections_need_runs_once(tiny_lab: tuple[Path, Path]) -> None:
    chapter = {run.key for _, run in EXPERIMENTS["chapter"].plan(TINY)}
    placement = {run.key for _, run in EXPERIMENTS["placement"].plan(TINY)}
    population = {run.key for _, run in EXPERIMENTS["population-stats"].plan(TINY)}
    shared = chapter & placement & population  # the BN-LeNet at lr 1.0, momentum 0.1
    assert len(shared) == TINY.seeds
    results, _ = tiny_lab
    on_disk = {p.stem for p in (results / "runs").glob("*.json")}
    assert shared <= on_disk
    planned = {run.key for exp in EXPERIMENTS.values() for _, run in exp.plan(TINY)}
    assert on_disk >= planned
    assert not (results / "work").exists() or (results / ".gitignore").read_text() == "work/\n"


def test_every_run_records_moving_and_precise_accuracy(tiny_lab: tuple[Path, Path]) -> None:
    results, _ = tiny_lab
    trains = [r for r in ResultStore(results).records() if r["task"] == "train"]
    assert trains
    for record in trains:
        final = record["result"]["final"]
        for key in ("train_loss", "test_acc_moving", "test_acc_precise", "test_acc_batch_stats"):
            assert key in final, (record["label"], key)
        if final["recalibrated"] == 0:  # no BN: nothing to recalibrate, one reading
            assert final["test_acc_precise"] == final["test_acc_moving"]
        assert final["test_acc_moving"] == record["result"]["history"][-1]["test_acc"]


def test_verdicts_json_has_the_documented_schema(tiny_lab: tuple[Path, Path]) -> None:
    _, report = tiny_lab
    verdicts = json.loads((report / "verdicts.json").read_text())
    assert verdicts["scale"] == "quick" and verdicts["complete"] is True
    ids = {c["id"] for c in verdicts["claims"]}
    assert ids == set(EXPERIMENTS)  # every experiment makes at least one claim
    words = {"a better", "b better", "no detectable difference"}
    for claim in verdicts["claims"]:
        assert {"id", "metric", "reference", "comparisons"} <= claim.keys()
        for c in claim["comparisons"]:
            assert {
                "a", "b", "n_a", "n_b", "mean_a", "mean_b", "diff", "ci95", "higher_is_better",
                "verdict",
            } <= c.keys()  # fmt: skip
            assert c["verdict"] in words and len(c["ci95"]) == 2
            assert isinstance(c["n_a"], int) and isinstance(c["higher_is_better"], bool)
            if c["mean_a"] is not None and c["mean_b"] is not None:
                assert c["diff"] == pytest.approx(c["mean_a"] - c["mean_b"])
    lr = next(c for c in verdicts["claims"] if c["id"] == "lr")
    assert lr["grid"] and set(lr["largest_converging"]) == {"BN", "no BN"}


def test_markdown_tables_escape_pipes(tiny_lab: tuple[Path, Path]) -> None:
    _, report = tiny_lab
    md = (report / "report.md").read_text()
    section = md.split('<a id="controversy"></a>', 1)[1]
    header = next(line for line in section.splitlines() if line.startswith("| arm") or
                  line.startswith("| norm"))  # fmt: skip
    assert "\\|\\|G" in header  # ||G−G'|| would otherwise split the cell


@pytest.mark.usefixtures("real_data_dir")  # tests/conftest.py
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
