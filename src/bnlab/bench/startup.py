"""The first training step of a default ``BatchNorm`` in a fresh process, import included."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass

# Runs in a new interpreter: one training step of BatchNorm(6) on a LeNet-sized batch, then what
# ran and whether anything was compiled (the C++ kernel's build; "auto" never uses inductor).
_CODE = """
import json, torch
from bnlab.nn import BatchNorm
from bnlab.functional import native
x = torch.randn(256, 6, 24, 24, requires_grad=True)
BatchNorm(6)(x).sum().backward()
load = native.native_load()
print(json.dumps({"native": load is not None, "compiled": bool(load and load.compiled)}))
"""


@dataclass(frozen=True)
class FirstStep:
    seconds: float  # wall time of the whole process: interpreter start, imports, the step
    native: bool  # the step ran the C++ kernel (else the eager one)
    compiled: bool  # the process compiled something

    def describe(self) -> str:
        kernel = "the C++ kernel" if self.native else "the eager kernel (no C++ build)"
        how = "compiled it first" if self.compiled else "nothing compiled"
        return f"{self.seconds:.2f} s with {kernel}, {how}"


def first_step() -> FirstStep:
    """Run :data:`_CODE` in a fresh interpreter and time it."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", _CODE], capture_output=True, text=True, check=True, timeout=600
    )
    seconds = time.perf_counter() - start
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    return FirstStep(seconds, bool(facts["native"]), bool(facts["compiled"]))


__all__ = ["FirstStep", "first_step"]
