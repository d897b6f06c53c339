"""The training loop of the chapter (``train_ch6``: plain SGD on cross-entropy, accuracy on the
training minibatches and on the test set per epoch), flat, returning its history.

Data stay in memory as one tensor on the device: images are converted once to float
(N, 1, 28, 28) in [0, 1]; an epoch is slices of one ``torch.randperm``; no DataLoader and no
per-sample Python. Loss and accuracy are summed on the device and read once per epoch (and at
progress-bar refreshes), so the loop adds no host-device synchronization per step.

The pieces are here; :mod:`bnlab.train.run` puts them together into runs (:func:`train`,
:func:`resume`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab._machine import cpu_model
from bnlab.models import LeNet, init_weights, lenet
from bnlab.train.config import ConfigError, TrainConfig
from bnlab.train.rundir import RunDir

EVAL_BATCH_SIZE = 1024  # eval mode uses running statistics, so this only trades memory for speed
REFRESH_SECONDS = 0.5  # progress-bar postfix refresh: one device sync per refresh, not per step


class Dataset(Protocol):
    """What the loop needs from :class:`bnlab.data.FashionMNIST` (or synthetic tensors):
    uint8 images (N, H, W) and int labels (N,), as tensors or NumPy arrays."""

    @property
    def train_images(self) -> Any: ...
    @property
    def train_labels(self) -> Any: ...
    @property
    def test_images(self) -> Any: ...
    @property
    def test_labels(self) -> Any: ...


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    train_loss: float  # mean cross-entropy over the epoch's training minibatches
    train_acc: float  # accuracy on those minibatches, in training mode (as the chapter)
    test_acc: float  # accuracy on the test set, eval mode
    seconds: float  # wall time of the training pass
    examples_per_s: float  # training examples per second
    eval_seconds: float  # wall time of the evaluation

    def scores(self) -> tuple[float, float, float]:
        """The deterministic part (timings vary from run to run)."""
        return (self.train_loss, self.train_acc, self.test_acc)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> EpochStats:
        return cls(**{f.name: row[f.name] for f in dataclasses.fields(cls)})


@dataclass
class TrainResult:
    config: TrainConfig  # resolved: out and device filled in
    run: RunDir
    history: list[EpochStats]
    model: nn.Module  # a LeNet unless train() was given a model of one's own
    device: torch.device


# --- the pieces


def resolve_device(spec: str) -> torch.device:
    """ "auto" -> CUDA when available, else CPU; anything else is checked to exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ConfigError(
            f"device: expected auto, cpu, cuda or cuda:N, got {spec!r} ({e})."
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device: {spec!r} requested but CUDA is not available in this torch build "
                f"({torch.__version__}); use --device cpu or auto."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device: {spec!r} requested, but there are {torch.cuda.device_count()} CUDA "
                "devices."
            )
    return device


def to_device_tensors(images: Any, labels: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    """uint8 images (N, H, W) -> float (N, 1, H, W) in [0, 1] on ``device``, converted once
    there (moving uint8 is 4x less traffic); labels -> int64 (N,)."""
    x = torch.as_tensor(images)
    y = torch.as_tensor(labels)
    if x.dtype != torch.uint8 or x.ndim != 3:
        raise ValueError(
            f"images: expected uint8 of shape (N, H, W), got {x.dtype} of shape {tuple(x.shape)}."
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise ValueError(
            f"labels: expected integers of shape ({x.shape[0]},), got {y.dtype} of shape "
            f"{tuple(y.shape)}."
        )
    x = x.to(device).unsqueeze(1).float().div_(255)  # (N, 1, H, W)
    return x, y.to(device=device, dtype=torch.long)


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n)``, keeping the last partial batch, except a
    last batch of exactly one example, which is dropped: BN in training mode cannot take a
    variance from one value per channel (the dense layers see (1, C)) and would fail."""
    stop = n - 1 if n % batch_size == 1 else n
    return [(a, min(a + batch_size, stop)) for a in range(0, stop, batch_size)]


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    progress: bool | None = False,
    desc: str = "train",
    step_hook: Callable[[int], None] | None = None,
    shard: Callable[[Tensor], Tensor] | None = None,
    before_step: Callable[[int, Tensor, Tensor], None] | None = None,
    micro_batches: int = 1,
) -> tuple[float, float, int]:
    """One pass over ``x`` (N, 1, H, W) in a fresh random order; returns (mean loss, accuracy,
    examples used). ``progress``: a tqdm bar (None: only on a terminal). ``step_hook(step)``
    runs after each optimizer step (1-based). ``shard(indices)``: the part of each batch this
    process trains on, in a data-parallel run (bnlab.distributed). ``before_step(step, xb,
    yb)`` runs before each step's forward pass (1-based step), with the batch the step trains
    on and the weights it starts from: measurements of the step about to be taken go there.
    ``micro_batches=k``: gradient accumulation, each batch split into k micro-batches whose
    forward and backward run one after the other (each loss weighted by its share of the
    batch, so the gradient is the batch's mean-loss gradient) before one optimizer step."""
    model.train()
    device = x.device
    # A CPU generator gives the same order on every device; (N,) int64, moved once.
    perm = torch.randperm(x.shape[0], generator=generator).to(device)
    bounds = batch_bounds(x.shape[0], batch_size)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    bar = None
    if progress is not False:
        from tqdm.auto import tqdm

        disable: bool | None = None if progress is None else False  # None: only on a terminal
        bar = tqdm(total=len(bounds), desc=desc, unit="batch", leave=False, disable=disable)
        if bar.disable:
            bar = None
    last_refresh = time.monotonic()
    for step, (a, b) in enumerate(bounds, start=1):
        idx = perm[a:b] if shard is None else shard(perm[a:b])
        xb, yb = x[idx], y[idx]  # (B, 1, H, W), (B,)
        if before_step is not None:
            before_step(step, xb, yb)
        optimizer.zero_grad(set_to_none=True)
        if micro_batches == 1:
            logits = model(xb)  # (B, classes)
            loss = loss_fn(logits, yb)
            loss.backward()
            with torch.no_grad():
                loss_sum.add_(loss.detach(), alpha=b - a)
                correct.add_((logits.argmax(dim=1) == yb).sum())
        else:
            for xm, ym in zip(
                xb.tensor_split(micro_batches), yb.tensor_split(micro_batches), strict=True
            ):
                logits = model(xm)  # (B/k, classes)
                loss = loss_fn(logits, ym)
                (loss * (len(ym) / len(yb))).backward()
                with torch.no_grad():
                    loss_sum.add_(loss.detach(), alpha=len(ym))
                    correct.add_((logits.argmax(dim=1) == ym).sum())
        optimizer.step()
        seen += b - a
        if step_hook is not None:
            step_hook(step)
        if bar is not None:
            bar.update(1)
            now = time.monotonic()
            if now - last_refresh >= REFRESH_SECONDS:
                bar.set_postfix(
                    loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}"
                )
                last_refresh = now
    if bar is not None:
        bar.close()
    if seen == 0:
        raise ValueError(f"train_epoch: expected at least 2 training examples, got {x.shape[0]}.")
    return loss_sum.item() / seen, correct.item() / seen, seen


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = EVAL_BATCH_SIZE) -> float:
    """Accuracy of ``model`` on (x, y) in eval mode without gradients; the model's previous
    mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        correct = torch.zeros((), device=x.device, dtype=torch.long)
        for a in range(0, x.shape[0], batch_size):
            logits = model(x[a : a + batch_size])
            correct.add_((logits.argmax(dim=1) == y[a : a + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct.item() / max(x.shape[0], 1)


def build_model(config: TrainConfig) -> LeNet:
    """The model a config asks for, with the chapter's Xavier init (global RNG)."""
    try:
        model = lenet(**config.model_kwargs())
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from e
    init_weights(model)
    return model


def environment(device: torch.device) -> dict[str, Any]:
    """Where a run ran: versions, device and CPU, for metrics.json and benchmarks."""
    from bnlab import __version__

    cpu = cpu_model()
    return {
        "bnlab": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


__all__ = [
    "Dataset",
    "EpochStats",
    "TrainResult",
    "batch_bounds",
    "build_model",
    "environment",
    "evaluate",
    "resolve_device",
    "to_device_tensors",
    "train_epoch",
]
