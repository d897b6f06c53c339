"""End to end: one training epoch of the chapter's BN-LeNet, with each batch-norm layer.

    Conv(6, k5) → BN → sigmoid → MaxPool(2) → Conv(16, k5) → BN → sigmoid → MaxPool(2) →
    Flatten → Linear(120) → BN → sigmoid → Linear(84) → BN → sigmoid → Linear(10)

SGD with lr 1.0, batch 256, over random tensors shaped like Fashion-MNIST's 60000 training
images (timing does not depend on the pixel values, and the benchmark needs no download). The
model is built here so that the benchmark does not move when the library's models do.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.bench.timing import synchronizer
from bnlab.nn import BatchNorm

# norm name -> factory(num_features, rank)
NormFactory = Callable[[int, int], nn.Module]


def _bnlab(impl: str) -> NormFactory:
    return lambda c, rank: BatchNorm(c, num_dims=rank, impl=impl)


def _torch(c: int, rank: int) -> nn.Module:
    return nn.BatchNorm2d(c) if rank == 4 else nn.BatchNorm1d(c)


def _none(c: int, rank: int) -> nn.Module:
    return nn.Identity()


NORMS: dict[str, NormFactory] = {
    "bnlab": _bnlab("auto"),  # the default: the C++ kernel where built, else "eager"
    "bnlab_eager": _bnlab("eager"),  # the eager kernel
    "bnlab_compiled": _bnlab("compiled"),
    "bnlab_native": _bnlab("native"),  # the C++ kernel by name
    "torch": _torch,
    "none": _none,
}


def bn_lenet(norm: NormFactory) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5), norm(6, 4), nn.Sigmoid(),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), norm(16, 4), nn.Sigmoid(),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(256, 120), norm(120, 2), nn.Sigmoid(),
        nn.Linear(120, 84), norm(84, 2), nn.Sigmoid(),
        nn.Linear(84, 10),
    )  # fmt: skip


@dataclass(frozen=True)
class EpochResult:
    norm: str
    seconds: list[float]  # one per round
    images: int
    warmup_s: float  # the untimed warm-up steps (compilation, for bnlab_compiled)
    threads: int = 1  # torch.get_num_threads() during the epochs

    @property
    def median_s(self) -> float:
        s = sorted(self.seconds)
        return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def _epoch(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    batch_size: int,
    gen: torch.Generator,
) -> None:
    order = torch.randperm(images.shape[0], generator=gen).to(images.device)
    for i in range(0, images.shape[0], batch_size):
        idx = order[i : i + batch_size]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(images[idx]), labels[idx])
        loss.backward()
        opt.step()


def bench_lenet(
    norms: tuple[str, ...],
    *,
    images: int,
    rounds: int,
    device: torch.device,
    batch_size: int = 256,
    lr: float = 1.0,
    seed: int = 0,
) -> list[EpochResult]:
    """Seconds per training epoch for each norm in ``norms``, epochs interleaved by round.

    Before its first timed epoch each model takes two untimed steps, on a full and on the last
    (partial) batch, where bnlab_compiled compiles its kernels (``warmup_s`` reports it) and
    the C++ kernel's build is loaded if it was not yet.
    """
    unknown = [n for n in norms if n not in NORMS]
    if unknown:
        raise ValueError(f"norms: expected names from {sorted(NORMS)}, got {unknown}.")
    if images < 2 or rounds < 1:
        raise ValueError(f"expected images >= 2 and rounds >= 1, got {images} and {rounds}.")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(images, 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 10, (images,), generator=gen).to(device)
    sync = synchronizer(device)
    models: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    warmup: dict[str, float] = {}
    for name in norms:
        torch.manual_seed(seed)  # the same initial weights for every norm
        net = bn_lenet(NORMS[name]).to(device).train()
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        start = time.perf_counter()
        last = images % batch_size or batch_size
        for n in (min(batch_size, images), last):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x[:n]), y[:n]).backward()
            opt.step()
        sync()
        warmup[name] = time.perf_counter() - start
        models[name] = (net, opt)
    seconds: dict[str, list[float]] = {name: [] for name in norms}
    for _ in range(rounds):
        for name in norms:
            model, optim = models[name]
            sync()
            start = time.perf_counter()
            _epoch(model, optim, x, y, batch_size, gen)
            sync()
            seconds[name].append(time.perf_counter() - start)
    threads = torch.get_num_threads()
    return [EpochResult(name, seconds[name], images, warmup[name], threads) for name in norms]


__all__ = ["NORMS", "EpochResult", "bench_lenet", "bn_lenet"]
