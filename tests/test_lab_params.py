"""Every lab task's parameters go through one typed system (bnlab.lab.params): unknown keys and
bad values are refused by name before any work, and the committed full-scale records keep the
keys the experiments plan (so a change of the parameter code never orphans measured runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bnlab.lab import plan as plan_module
from bnlab.lab import planned_runs, select  # the planner reproduce uses
from bnlab.lab.controversy import ControversyConfig
from bnlab.lab.params import ShiftParams, TrainParams
from bnlab.lab.plan import ResultStore, Run, execute_plan
from bnlab.lab.scale import FULL
from bnlab.lab.tasks import run_task, task_params
from bnlab.train.config import ConfigError

KEY = "0123456789abcdef"
FULL_RESULTS = Path(__file__).resolve().parents[1] / "docs" / "report" / "full" / "results"


@pytest.mark.parametrize(
    ("task", "params", "known"),
    [
        ("train", {"config": {}, "confg": {}}, "['config']"),
        ("batch_one", {"n": 1}, "it takes none"),
        ("shift", {"train_key": KEY, "config": {}, "prior": [0]}, "'priors'"),
        ("controversy", {"norm": "bnlab", "epoch": 2}, "'epochs'"),
    ],
)
def test_unknown_keys_are_refused_naming_the_known_ones(
    task: str, params: dict[str, object], known: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^{task}: unknown parameter") as info:
        task_params(task, params)
    assert known in str(info.value)


def test_bad_values_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="unknown keys \\['nrom'\\]"):
        TrainParams(config={"nrom": "bnlab"})
    with pytest.raises(ConfigError, match="priors: expected ints >= 0"):
        ShiftParams(train_key=KEY, config={}, priors=(-1,), tent_lr=1e-3)
    with pytest.raises(ConfigError, match="tent_lr"):
        ShiftParams(train_key=KEY, config={}, priors=(0,), tent_lr=0.0)
    with pytest.raises(ConfigError, match="train_key"):
        ShiftParams(train_key="abc", config={}, priors=(0,), tent_lr=1e-3)
    with pytest.raises(ConfigError, match=r"shift: missing parameter\(s\) \['priors', 'tent_lr'\]"):
        task_params("shift", {"train_key": KEY, "config": {}})
    with pytest.raises(ValueError, match="task: expected one of"):
        task_params("trian", {})


def test_to_dict_is_the_json_a_run_is_keyed_by() -> None:
    shift = ShiftParams(train_key=KEY, config={"seed": 1}, priors=(0, 1000), tent_lr=1e-3)
    assert shift.to_dict() == {
        "train_key": KEY,
        "config": {"seed": 1},
        "priors": [0, 1000],
        "tent_lr": 0.001,
    }
    assert ShiftParams.from_dict(shift.to_dict()) == shift
    assert TrainParams(config={"seed": 1}).to_dict() == {"config": {"seed": 1}}
    controversy = ControversyConfig(norm="noisy", lr=1)
    assert ControversyConfig.from_dict(controversy.to_dict()) == controversy
    json.dumps(controversy.to_dict())  # JSON-ready (tuples became lists)


def test_a_bad_run_fails_before_its_work_directory_exists(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="shift: unknown parameter"):
        run_task("shift", {"train_key": KEY, "config": {}, "tent": 1}, workdir=tmp_path / "w" / "x")
    assert not (tmp_path / "w").exists()


def test_a_bad_run_in_a_plan_stops_it_before_any_run_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[str] = []
    monkeypatch.setattr(plan_module, "_execute", lambda run, *a: started.append(run.label))
    good = Run("unit", "batch 1", "batch_one", {})
    bad = Run("unit", "typo", "train", {"config": {"lr": 1.0, "epoch": 2}})
    with pytest.raises(ConfigError, match="unknown keys \\['epoch'\\]"):
        execute_plan([good, bad], ResultStore(tmp_path), progress=False)
    assert started == []


def test_committed_full_scale_records_are_still_planned() -> None:
    store = ResultStore(FULL_RESULTS)
    recorded = {r["key"] for r in store.records()}
    assert recorded, "the committed store has no records"
    planned = {run.key for run in planned_runs(select(None), FULL, store)}
    assert recorded <= planned, f"{len(recorded - planned)} committed records are orphaned"
