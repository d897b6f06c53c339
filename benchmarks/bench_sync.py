"""Per-step time of data-parallel BN-LeNet training with synchronized vs per-process BatchNorm,
and where the time goes.

P processes (bnlab.distributed.launch; gloo on CPU, NCCL with a GPU per process) each train
the chapter's BN-LeNet under DistributedDataParallel on their 1/P of every global batch:

    local   DDP, bnlab BatchNorm: each process normalizes with its own part's statistics
    sync    DDP, bnlab SyncBatchNorm: one all-gather of 2C + 1 numbers per layer in forward,
            one all-reduce of 2C numbers per layer in backward

The two variants alternate in rounds (the same weights, data and order each time); every step
is split into forward, backward (which includes DDP's gradient all-reduce) and optimizer step.
One process on the full batch (with 1 thread, and with one per core) gives the baseline, and
the latency of the collectives themselves is measured alone (the message sizes SyncBatchNorm
and DDP send for this model).

    python benchmarks/bench_sync.py                       # 2 processes, batch 256
    python benchmarks/bench_sync.py --steps 50 --rounds 5 --json bench_sync.json

Results are printed as a table; they depend on the machine and its load (the load average is
recorded with them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import bnlab
from bnlab.distributed import DataParallel, launch
from bnlab.distributed.parallel import ddp
from bnlab.models import init_weights, lenet
from bnlab.nn import BatchNorm

CHANNELS = (6, 16, 120, 84)  # the BN-LeNet's four norm layers
PHASES = ("forward", "backward", "step")


def _device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return init_weights(lenet("bnlab")).to(device)


def _data(batch: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return x.to(device), y.to(device)


def _time_steps(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    warmup: int,
    device: torch.device,
) -> dict[str, list[float]]:
    """Seconds per phase and per step, after ``warmup`` untimed steps."""
    times: dict[str, list[float]] = {p: [] for p in (*PHASES, "total")}
    net.train()
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        _sync(device)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP's gradient all-reduce finishes inside
        _sync(device)
        t2 = time.perf_counter()
        opt.step()
        _sync(device)
        t3 = time.perf_counter()
        if i >= warmup:
            for name, dt in zip(
                (*PHASES, "total"), (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True
            ):
                times[name].append(dt)
    return times


def _collective_latency(device: torch.device, iters: int) -> dict[str, float]:
    """Microseconds per call of the collectives one step makes, alone."""
    world = dist.get_world_size()
    n_params = sum(p.numel() for p in _model(device, 0).parameters())
    cases: dict[str, tuple[str, int]] = {}
    for c in CHANNELS:
        cases[f"all-gather {2 * c + 1} floats (C={c})"] = ("gather", 2 * c + 1)
        cases[f"all-reduce {2 * c} floats (C={c})"] = ("reduce", 2 * c)
    cases[f"all-reduce {n_params} floats (DDP gradients)"] = ("reduce", n_params)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    out: dict[str, float] = {}
    for name, (kind, n) in cases.items():
        t = torch.ones(n, device=device)
        buf = torch.empty(world * n, device=device)
        for i in range(iters + 10):
            if i == 10:
                dist.barrier()
                _sync(device)
                start = time.perf_counter()
            if kind == "gather":
                gather(buf, t)
            else:
                dist.all_reduce(t)
        _sync(device)
        out[name] = (time.perf_counter() - start) / iters * 1e6
    return out


def _rank_main(batch: int, steps: int, warmup: int, rounds: int, iters: int) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = _device(int(os.environ.get("LOCAL_RANK", "0")))
    x_all, y_all = _data(batch, device, seed=1)
    x, y = x_all[rank::world], y_all[rank::world]  # this process's part of the global batch
    results: dict[str, dict[str, list[float]]] = {}
    for r in range(rounds):
        for variant in ("local", "sync") if r % 2 == 0 else ("sync", "local"):
            model = _model(device, seed=0)
            if variant == "sync":
                net = DataParallel(device).wrap(model)  # SyncBatchNorm + DDP
            else:  # the same DDP settings (no per-step buffer broadcast), local statistics
                net = ddp(model, device)
                assert any(type(m) is BatchNorm for m in model.modules())
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            dist.barrier()
            times = _time_steps(net, opt, x, y, steps, warmup, device)
            for phase, values in times.items():
                results.setdefault(variant, {}).setdefault(phase, []).extend(values)
    return {
        "steps": results,
        "collectives_us": _collective_latency(device, iters),
        "threads": torch.get_num_threads(),
    }


def _single_process(
    batch: int, steps: int, warmup: int, rounds: int, threads: int
) -> dict[str, list[float]]:
    device = _device(0)
    torch.set_num_threads(threads)
    x, y = _data(batch, device, seed=1)
    out: dict[str, list[float]] = {}
    for _ in range(rounds):
        model = _model(device, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for phase, values in _time_steps(model, opt, x, y, steps, warmup, device).items():
            out.setdefault(phase, []).extend(values)
    return out


def _environment(nproc: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "bnlab": bnlab.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "nproc": nproc,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:7.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--batch", type=int, default=256, help="global batch (default 256)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per round")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per variant")
    parser.add_argument("--iters", type=int, default=200, help="calls per collective timing")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    env = _environment(args.nproc)
    per_rank = launch(
        _rank_main,
        args.nproc,
        (args.batch, args.steps, args.warmup, args.rounds, args.iters),
        timeout_s=120,
    )
    threads = sorted({1, os.cpu_count() or 1})
    single = {
        t: _single_process(args.batch, args.steps, args.warmup, args.rounds, t) for t in threads
    }
    env["load_average_1min_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    rank0 = per_rank[0]["steps"]
    print(f"# {env['cpu']}, {env['cpu_count']} cores; torch {env['torch']}; {env['date']}")
    print(
        f"# global batch {args.batch}, {args.nproc} processes x {per_rank[0]['threads']} threads; "
        f"median ms per step over {args.rounds} x {args.steps} steps (rank 0); "
        f"load average {env['load_average_1min']:.1f} -> {env['load_average_1min_after']:.1f}"
    )
    print(f"{'variant':<28} {'forward':>7} {'backward':>8} {'step':>7} {'total':>7}")
    rows = {
        **{f"1 process x {t} threads": single[t] for t in threads},
        f"{args.nproc} proc DDP, local BN": rank0["local"],
        f"{args.nproc} proc DDP, SyncBatchNorm": rank0["sync"],
    }
    for name, t in rows.items():
        print(
            f"{name:<28} {_ms(t['forward'])} {_ms(t['backward']):>8} {_ms(t['step'])} "
            f"{_ms(t['total'])}"
        )
    extra = statistics.median(rank0["sync"]["total"]) - statistics.median(rank0["local"]["total"])
    print(f"sync - local: {extra * 1e3:+.2f} ms per step")
    print("\ncollective latency alone (rank 0, us per call):")
    for name, us in per_rank[0]["collectives_us"].items():
        print(f"  {name:<44} {us:8.1f}")
    if args.json:
        payload = {
            "environment": env,
            "args": vars(args),
            "single": {str(t): v for t, v in single.items()},
            "ranks": per_rank,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
