"""What machine this is, for benchmark tables, run metadata and build-cache keys."""

from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_field(name: str) -> str | None:
    """The value of the first ``name : value`` line of /proc/cpuinfo (Linux), e.g.
    ``cpuinfo_field("model name")``; None where the file or the field is missing."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC 7B13"), else what :mod:`platform` knows."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown"


__all__ = ["cpu_model", "cpuinfo_field"]
