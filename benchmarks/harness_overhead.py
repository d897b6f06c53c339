"""What the bnlab training loop costs over a minimal hand-written loop.

One training epoch of BN-LeNet (``--norm torch``) over the same in-memory tensors, the same
initial weights and the same batch order, timed as:

    minimal     randperm, slice, forward, cross-entropy, zero_grad, backward, SGD step
    harness     bnlab.train.train_epoch (adds on-device loss/accuracy sums, one sync per epoch)
    harness+bar the same with the tqdm progress bar the CLI shows on a terminal

The variants run interleaved, in a rotating order, for several repetitions; the overhead is the
median over repetitions of (variant time / minimal time of the same repetition) - 1, for wall
time and for the process's CPU time (steadier on a shared machine). Goal: at most 5%.

    python benchmarks/harness_overhead.py                 # full 60000 images, 5 repetitions
    python benchmarks/harness_overhead.py --subset 10000 --reps 3 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.models import init_weights, lenet
from bnlab.train.loop import environment, resolve_device, to_device_tensors, train_epoch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minimal_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """The loop one would write by hand (same order as the harness: a CPU-generator randperm)."""
    model.train()
    n = x.shape[0]
    perm = torch.randperm(n, generator=generator).to(x.device)
    stop = n - 1 if n % batch_size == 1 else n
    for a in range(0, stop, batch_size):
        idx = perm[a : min(a + batch_size, stop)]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def harness_epoch(progress: bool) -> Callable[..., None]:
    def run(
        model: nn.Module,
        opt: torch.optim.Optimizer,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        generator: torch.Generator,
    ) -> None:
        if not progress:
            train_epoch(model, opt, x, y, batch_size=batch_size, generator=generator)
            return
        with contextlib.redirect_stderr(io.StringIO()):  # the bar is drawn, into a buffer
            train_epoch(model, opt, x, y, batch_size=batch_size, generator=generator, progress=True)

    return run


def load_data(args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (args.subset or 60000, 28, 28), generator=g)
        return images.to(torch.uint8), torch.randint(0, 10, (images.shape[0],), generator=g)
    from bnlab.data import load_fashion_mnist

    data = load_fashion_mnist(progress=False)
    n = args.subset or data.train_images.shape[0]
    return data.train_images[:n], data.train_labels[:n]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--subset", type=int, default=None, help="first N training images")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--synthetic", action="store_true", help="random images, no dataset")
    parser.add_argument("--json", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    images, labels = load_data(args)
    x, y = to_device_tensors(images, labels, device)

    torch.manual_seed(0)
    model = init_weights(lenet("torch")).to(device)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    variants: dict[str, Callable[..., None]] = {
        "minimal": minimal_epoch,
        "harness": harness_epoch(progress=False),
        "harness+bar": harness_epoch(progress=True),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu_times: dict[str, list[float]] = {name: [] for name in variants}  # all threads, this process
    final: dict[str, dict[str, Tensor]] = {}

    def one(name: str) -> None:
        model.load_state_dict(initial)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        gen = torch.Generator().manual_seed(1)
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        variants[name](model, opt, x, y, args.batch_size, gen)
        sync(device)
        times[name].append(time.perf_counter() - t0)
        cpu_times[name].append(time.process_time() - c0)
        final[name] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    names = list(variants)
    one("minimal")  # warm-up: first-call allocations and lazy init
    times["minimal"].clear()
    cpu_times["minimal"].clear()
    for rep in range(args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate who goes first
        for name in order:
            one(name)
        print(
            f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names),
            file=sys.stderr,
            flush=True,
        )

    same = all(
        torch.equal(final["minimal"][k], final[n][k]) for n in names[1:] for k in final["minimal"]
    )
    n_images = x.shape[0]
    rows = []
    for name in names:
        med = statistics.median(times[name])
        ratios = [t / m - 1 for t, m in zip(times[name], times["minimal"], strict=True)]
        cpu_ratios = [t / m - 1 for t, m in zip(cpu_times[name], cpu_times["minimal"], strict=True)]
        rows.append(
            {
                "variant": name,
                "median_s": med,
                "min_s": min(times[name]),
                "max_s": max(times[name]),
                "examples_per_s": n_images / med,
                "overhead_median": statistics.median(ratios),
                "cpu_median_s": statistics.median(cpu_times[name]),
                "cpu_overhead_median": statistics.median(cpu_ratios),
                "times_s": times[name],
                "cpu_times_s": cpu_times[name],
            }
        )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {
        "benchmark": "harness_overhead",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": environment(device),
        "load_average": load,
        "images": n_images,
        "batch_size": args.batch_size,
        "reps": args.reps,
        "data": "synthetic" if args.synthetic else "fashion-mnist",
        "same_final_weights": same,
        "results": rows,
    }
    m = result["machine"]
    print(
        f"\nBN-LeNet (--norm torch), one epoch of {n_images} images, batch {args.batch_size}, "
        f"{args.reps} interleaved reps; {m['device_name']}, {m['cpu_count']} cores, "
        f"{m['torch_threads']} torch threads, torch {m['torch']}\n"
    )
    print(
        "| loop | median s/epoch | min | max | examples/s | overhead vs minimal (median) "
        "| CPU s (median) | CPU overhead (median) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} | "
            f"{r['examples_per_s']:.0f} | {100 * r['overhead_median']:+.1f}% | "
            f"{r['cpu_median_s']:.2f} | {100 * r['cpu_overhead_median']:+.1f}% |"
        )
    print(f"\nsame final weights in every variant: {same}")
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
