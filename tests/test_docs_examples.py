"""The Python examples of docs/func.md and docs/adaptation.md run as shown: each file's
```python blocks in order, in one namespace, as a reader pasting them would."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


@pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode")
@pytest.mark.parametrize("name", ["func.md", "adaptation.md"])
def test_the_examples_run(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    blocks = BLOCK.findall((DOCS / name).read_text(encoding="utf-8"))
    assert blocks, f"{name} has no python examples"
    namespace: dict[str, object] = {"__name__": f"docs_{name}"}
    for number, code in enumerate(blocks, start=1):
        exec(compile(code, f"{name} example {number}", "exec"), namespace)
    printed = capsys.readouterr().out  # the checks the examples print must all hold
    assert not re.search(r"(^|\s)False(\s|$)", printed), f"{name} printed False:\n{printed}"
