"""The chapter notebooks: each runs top to bottom in a fresh kernel (quick mode), the Vietnamese
one carries the same code as the English one, and both are committed with a full run's outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ENGLISH = NOTEBOOKS / "batch_norm.ipynb"
VIETNAMESE = NOTEBOOKS / "batch_norm.vi.ipynb"
BOTH = pytest.mark.parametrize("path", [ENGLISH, VIETNAMESE], ids=["en", "vi"])
CELL_TIMEOUT_S = 900  # one cell, on a loaded 2-core machine


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


@BOTH
@pytest.mark.timeout(1800)
def test_runs_top_to_bottom_in_quick_mode(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_data_dir: Path
) -> None:
    from nbclient import NotebookClient

    # the notebook finds the data as users' runs do; real_data_dir skips (or, under
    # BNLAB_REQUIRE_DATA=1, fails) where it is missing
    monkeypatch.setenv("BNLAB_QUICK", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the notebook draws inline
    nb = read(path)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    first = code_cells(nb)[0]
    assert "quick mode: True" in "".join(o.get("text", "") for o in first.outputs)
    images = [o for c in code_cells(nb) for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # two training curves, γ/β, the learning-rate plot


def test_the_translation_carries_the_same_cells() -> None:
    en, vi = read(ENGLISH), read(VIETNAMESE)
    assert [c.cell_type for c in en.cells] == [c.cell_type for c in vi.cells]
    assert [c.source for c in code_cells(en)] == [c.source for c in code_cells(vi)]
    for a, b in zip(en.cells, vi.cells, strict=True):
        if a.cell_type == "markdown":
            assert a.source != b.source  # translated, not copied
            assert a.source.startswith("#") == b.source.startswith("#")  # headings align


@BOTH
def test_committed_with_the_outputs_of_one_run_that_it_describes(path: Path) -> None:
    nb = read(path)
    cells = code_cells(nb)
    # executed top to bottom in one kernel, once, without errors
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    images = [o for c in cells for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4, "figures are stored so that GitHub renders them"
    # the introduction says which run the stored outputs come from, and it is that one
    setup = "".join(o.get("text", "") for o in cells[0].outputs)
    quick = "quick mode: True" in setup
    assert quick or "quick mode: False" in setup, setup
    intro = nb.cells[0].source
    full_words = ("from a full run", "từ một lần chạy đầy đủ")
    quick_words = ("from a *quick* run", "từ một lần chạy *nhanh*")
    assert any(w in intro for w in (quick_words if quick else full_words)), intro
    assert not any(w in intro for w in (full_words if quick else quick_words)), intro
