"""Starting ``torch.distributed`` processes: N local processes from Python, or the ones
``torchrun`` started.

:func:`launch` runs ``fn(*args)`` in N fresh processes on this machine (rendezvous on
127.0.0.1 at a free port, gloo on CPU, NCCL when there is one GPU per process), waits for all of
them with a bound on the time, and returns every rank's return value. When a process raises, the
others fail at their next collective (the peer is gone) or after ``timeout_s``; the launcher then
raises :class:`DistributedRunError`, naming the rank that failed first with its traceback, and
ends any process still running.

:func:`init_from_env` joins a group described by the ``torchrun`` environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# a failed process's peers need up to the collective timeout to notice; then this much more
_GRACE_S = 5.0
_POLL_S = 0.05


@dataclass(frozen=True)
class RankOutcome:
    """What one process did: its return value, or the error it raised (type, message and
    formatted traceback) and when, or only its exit code if it left no record."""

    rank: int
    ok: bool
    value: Any = None
    error_type: str = ""
    error: str = ""
    traceback: str = ""
    failed_at: float = float("inf")  # time.time() when the error was caught
    exitcode: int | None = None

    def summary(self) -> str:
        if self.ok:
            return f"rank {self.rank}: ok"
        if self.error_type:
            return f"rank {self.rank}: {self.error_type}: {self.error}"
        if self.exitcode is not None and self.exitcode < 0:
            try:
                how = f"killed by {signal.Signals(-self.exitcode).name}"
            except ValueError:
                how = f"killed by signal {-self.exitcode}"
        else:
            how = f"exit code {self.exitcode}, no result recorded"
        return f"rank {self.rank}: {how}"


class DistributedRunError(RuntimeError):
    """One or more processes of a :func:`launch` failed; ``outcomes`` holds every rank's
    :class:`RankOutcome` and ``first`` the one that failed first."""

    def __init__(self, outcomes: Sequence[RankOutcome]) -> None:
        failed = [o for o in outcomes if not o.ok]
        # the root cause raised first; the others failed waiting for it
        first = min(failed, key=lambda o: (o.failed_at, o.rank))
        lines = [
            f"{len(failed)} of {len(outcomes)} processes failed; rank {first.rank} failed first:",
            first.traceback.rstrip() or first.summary(),
            "All ranks:",
            *(f"  {o.summary()}" for o in outcomes),
        ]
        super().__init__("\n".join(lines))
        self.outcomes = list(outcomes)
        self.first = first


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_backend(nprocs: int) -> str:
    """NCCL when this machine has a GPU for every process, else gloo (CPU tensors)."""
    if (
        torch.cuda.is_available()
        and torch.cuda.device_count() >= nprocs
        and dist.is_nccl_available()
    ):
        return "nccl"
    return "gloo"


def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):  # platforms without if_nameindex
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def _check_positive_int(value: object, name: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}. {hint}")
    return value


def _worker(
    rank: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    nprocs: int,
    port: int,
    backend: str,
    timeout_s: float,
    result_dir: str,
    env: dict[str, str],
) -> None:
    """Body of one launched process: join the group, run ``fn``, record the outcome."""
    os.environ.update(
        env,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_WORLD_SIZE=str(nprocs),
    )
    if "OMP_NUM_THREADS" not in os.environ:  # N processes share the cores (torchrun does this too)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    path = Path(result_dir) / f"rank{rank}.pt"
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=nprocs,
            timeout=timedelta(seconds=timeout_s),
        )
        value = fn(*args)
        torch.save({"ok": True, "value": value}, path)
    except BaseException as e:
        record = {
            "ok": False,
            "error_type": type(e).__name__,
            "error": str(e),
            "traceback": traceback.format_exc(),
            "failed_at": time.time(),
        }
        torch.save(record, path)
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    args: tuple[Any, ...] = (),
    *,
    backend: str | None = None,
    timeout_s: float = 300.0,
    join_timeout_s: float | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` in ``nprocs`` new processes joined in one ``torch.distributed`` group;
    return their return values, by rank.

    Args:
        fn: a module-level function (it is pickled by name into each process); inside it
            ``dist.get_rank()`` / ``dist.get_world_size()`` and the torchrun environment
            variables are set. Its return value must be picklable.
        nprocs: number of processes (>= 1).
        backend: "gloo" or "nccl"; by default :func:`default_backend`.
        timeout_s: collective timeout: a process waiting longer for its peers raises.
        join_timeout_s: bound on the whole run (None: none); processes still running then are
            terminated and the run fails.

    Raises:
        DistributedRunError: some process raised, crashed or was terminated.
    """
    _check_positive_int(nprocs, "nprocs", "Use nprocs=2 for two processes.")
    backend = default_backend(nprocs) if backend is None else backend
    if backend not in ("gloo", "nccl"):
        raise ValueError(
            f"backend: expected 'gloo' (CPU) or 'nccl' (CUDA), got {backend!r}. Leave it None "
            "to choose NCCL when there is a GPU per process and gloo otherwise."
        )
    if backend == "nccl" and torch.cuda.device_count() < nprocs:
        raise ValueError(
            f"backend='nccl' needs one GPU per process: {nprocs} processes, "
            f"{torch.cuda.device_count()} GPUs visible. Use fewer processes or backend='gloo'."
        )
    env: dict[str, str] = {}
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ:
        loopback = _loopback_interface()  # one machine: keep gloo's traffic on loopback
        if loopback is not None:
            env["GLOO_SOCKET_IFNAME"] = loopback
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bnlab-launch-") as result_dir:
        port = find_free_port()
        procs = [
            ctx.Process(
                target=_worker,
                args=(rank, fn, args, nprocs, port, backend, timeout_s, result_dir, env),
                name=f"bnlab-rank{rank}",
            )
            for rank in range(nprocs)
        ]
        try:
            for p in procs:
                p.start()
            _wait(procs, timeout_s=timeout_s, join_timeout_s=join_timeout_s)
        finally:
            for p in procs:  # a process still alive here is stuck: end it
                if p.is_alive():
                    p.terminate()
                    p.join(_GRACE_S)
                if p.is_alive():
                    p.kill()
                    p.join()
        outcomes = [_outcome(rank, p.exitcode, Path(result_dir)) for rank, p in enumerate(procs)]
    if not all(o.ok for o in outcomes):
        raise DistributedRunError(outcomes)
    return [o.value for o in outcomes]


def _wait(procs: Sequence[Any], *, timeout_s: float, join_timeout_s: float | None) -> None:
    """Wait until every process exits, the run's bound passes, or - once one has failed - its
    peers have had the collective timeout (plus a grace) to fail in turn."""
    start = time.monotonic()
    give_up = float("inf") if join_timeout_s is None else start + join_timeout_s
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        if any(p.exitcode not in (None, 0) for p in procs):
            give_up = min(give_up, now + timeout_s + _GRACE_S)
        if now >= give_up:
            return
        for p in procs:
            p.join(_POLL_S)


def _outcome(rank: int, exitcode: int | None, result_dir: Path) -> RankOutcome:
    path = result_dir / f"rank{rank}.pt"
    if not path.exists():
        return RankOutcome(rank, ok=False, exitcode=exitcode)
    record = torch.load(path, weights_only=False)  # written by our own child process
    return RankOutcome(rank=rank, exitcode=exitcode, **record)


def init_from_env(backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int, int]:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) unless one is already
    initialized; return ``(rank, world_size, local_rank)``. NCCL (with ``LOCAL_RANK``'s GPU) when
    CUDA is available, gloo otherwise."""
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing and not dist.is_initialized():
        raise RuntimeError(
            f"init_from_env: expected the torchrun environment, but {', '.join(missing)} "
            "is not set. Start the program with `torchrun --nproc-per-node N ...`, or use "
            "bnlab.distributed.launch() to start processes on this machine."
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), local_rank


def is_distributed() -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """True on rank 0, and in a program that is not distributed."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


__all__ = [
    "DistributedRunError",
    "RankOutcome",
    "default_backend",
    "find_free_port",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "launch",
]
