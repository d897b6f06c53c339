"""Training checkpoints, written crash-safe (:func:`bnlab._io.atomic_write`: a run killed at any
instant leaves either the previous file or the new one, never a torn one).

A checkpoint holds only tensors, dicts, lists, numbers and strings, so it loads with
``torch.load(path, weights_only=True)`` (no pickled code runs on load).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from bnlab._io import atomic_write

CHECKPOINT_FORMAT = "bnlab-train-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = ("format", "version", "epoch", "config", "model", "optimizer", "rng", "history")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or is not a bnlab training checkpoint."""


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write a checkpoint atomically; ``state`` needs the keys of :data:`CHECKPOINT_KEYS`
    except ``format`` and ``version``, which are added."""
    full = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    missing = [k for k in CHECKPOINT_KEYS if k not in full]
    if missing:
        raise ValueError(f"save_checkpoint: state lacks {missing}; expected {CHECKPOINT_KEYS}.")
    atomic_write(path, lambda f: torch.save(full, f))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load with ``weights_only=True`` onto the CPU and check that it is a bnlab checkpoint.

    Raises :class:`CheckpointError`, naming the file, if it is truncated, corrupt, or
    something else.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"checkpoint {path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "The file is corrupt or truncated, or not a checkpoint. Delete it to restart the run "
            "from its first epoch, or start a new run."
        ) from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path}: not a bnlab training checkpoint (expected a dict with "
            f"format={CHECKPOINT_FORMAT!r}, got "
            f"{type(state).__name__ if not isinstance(state, dict) else sorted(state)[:8]})."
        )
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: version {state.get('version')!r}, this bnlab reads version "
            f"{CHECKPOINT_VERSION}. Resume it with the bnlab version that wrote it."
        )
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path}: incomplete, missing {missing}.")
    return state


def capture_rng(shuffle: torch.Generator, device: torch.device) -> dict[str, Any]:
    """The random states a resumed run needs: the shuffling generator, the global CPU
    generator (dropout on CPU) and, on CUDA, the device generators (dropout on GPU)."""
    return {
        "shuffle": shuffle.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
    }


def restore_rng(state: dict[str, Any], shuffle: torch.Generator, device: torch.device) -> None:
    shuffle.set_state(state["shuffle"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "capture_rng",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]
