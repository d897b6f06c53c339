"""The training loop of the chapter (``train_ch6``: plain SGD on cross-entropy, accuracy on the
training minibatches and on the test set per epoch), flat, returning its history.

Data stay in memory as one tensor on the device: images are converted once to float
(N, 1, 28, 28) in [0, 1]; an epoch is slices of one ``torch.randperm``; no DataLoader and no
per-sample Python. Loss and accuracy are summed on the device and read once per epoch (and at
progress-bar refreshes), so the loop adds no host-device synchronization per step.

Reproducibility: ``seed`` seeds the weight init and dropout (the global generator, restored
afterwards by ``torch.random.fork_rng``) and a dedicated generator for shuffling; a checkpoint
after every epoch stores all three with the model and optimizer, so :func:`resume` after a
crash ends with the same history as an uninterrupted run (bit for bit on the CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.distributed import current_plan
from bnlab.models import LeNet, init_weights, lenet
from bnlab.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from bnlab.train.config import ConfigError, TrainConfig
from bnlab.train.plot import plot_history
from bnlab.train.rundir import (
    RunDir,
    create_run_dir,
    default_out,
    read_config,
    write_config,
    write_metrics,
)

# Test hook: "EPOCH:STEP" (both 1-based) makes the process SIGKILL itself right after that
# optimizer step, to test crash recovery. Not for normal use.
KILL_ENV = "BNLAB_TEST_KILL_AT"
EVAL_BATCH_SIZE = 1024  # eval mode uses running statistics, so this only trades memory for speed
REFRESH_SECONDS = 0.5  # progress-bar postfix refresh: one device sync per refresh, not per step
SHUFFLE_SEED_OFFSET = 0x5EED  # the shuffling stream differs from the init stream of the same seed
RESUME_OVERRIDES = ("epochs", "device", "data_dir")  # what may change when a run is resumed


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
    model: LeNet
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
) -> tuple[float, float, int]:
    """One pass over ``x`` (N, 1, H, W) in a fresh random order; returns (mean loss, accuracy,
    examples used). ``progress``: a tqdm bar (None: only on a terminal). ``step_hook(step)``
    runs after each optimizer step (1-based). ``shard(indices)``: the part of each batch this
    process trains on, in a data-parallel run (bnlab.distributed)."""
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
        logits = model(xb)  # (B, classes)
        loss = loss_fn(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            loss_sum.add_(loss.detach(), alpha=b - a)
            correct.add_((logits.argmax(dim=1) == yb).sum())
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

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
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


def _kill_hook(epoch: int) -> Callable[[int], None] | None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return None
    try:
        kill_epoch, kill_step = (int(s) for s in spec.split(":"))
    except ValueError:
        raise ConfigError(f"{KILL_ENV}: expected EPOCH:STEP such as 2:5, got {spec!r}.") from None
    if epoch != kill_epoch:
        return None

    def hook(step: int) -> None:
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _tensors(
    config: TrainConfig, data: Dataset | None, device: torch.device, progress: bool | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]]:
    info: dict[str, Any] = {}
    if data is None:
        from bnlab.data import load_fashion_mnist

        fmnist = load_fashion_mnist(config.data_dir, progress=progress is not False)
        info = {"data_source": str(fmnist.source), "data_official": bool(fmnist.official)}
        data = fmnist
    assert data is not None  # for the type checker
    images, labels = data.train_images, data.train_labels
    if config.subset is not None:
        if config.subset > len(images):
            raise ConfigError(
                f"subset: expected at most the {len(images)} training images, got "
                f"{config.subset}. Leave --subset out to use them all."
            )
        images, labels = images[: config.subset], labels[: config.subset]
    test_images, test_labels = data.test_images, data.test_labels
    if config.test_subset is not None:
        if config.test_subset > len(test_images):
            raise ConfigError(
                f"test_subset: expected at most the {len(test_images)} test images, got "
                f"{config.test_subset}. Leave --test-subset out to use them all."
            )
        test_images, test_labels = (
            test_images[: config.test_subset],
            test_labels[: config.test_subset],
        )
    train_x, train_y = to_device_tensors(images, labels, device)
    test_x, test_y = to_device_tensors(test_images, test_labels, device)
    return train_x, train_y, test_x, test_y, info


def _fit(
    config: TrainConfig,
    run: RunDir,
    tensors: tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]],
    model: LeNet,
    state: dict[str, Any] | None,
    *,
    progress: bool | None,
    on_epoch: Callable[[EpochStats], None] | None,
) -> TrainResult:
    """The loop proper; runs inside the caller's ``fork_rng`` after ``manual_seed``."""
    device = torch.device(config.device)
    plan = current_plan(device)  # data-parallel when torch.distributed runs several processes
    train_x, train_y, test_x, test_y, data_info = tensors
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    shuffle = torch.Generator().manual_seed(config.seed + SHUFFLE_SEED_OFFSET)
    history: list[EpochStats] = []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"], shuffle, device)
        history = [EpochStats.from_dict(row) for row in state["history"]]
    net = plan.wrap(model)  # SyncBatchNorm + DDP; `model` itself is evaluated and saved
    env = {**environment(device), **data_info}
    for epoch in range(len(history) + 1, config.epochs + 1):
        t0 = time.perf_counter()
        loss, acc, seen = train_epoch(
            net,
            optimizer,
            train_x,
            train_y,
            batch_size=config.batch_size,
            generator=shuffle,
            progress=progress if plan.is_main else False,
            desc=f"epoch {epoch}/{config.epochs}",
            step_hook=_kill_hook(epoch),
            loss_fn=plan.loss_fn,
            shard=plan.shard,
        )
        loss, acc = plan.reduce_epoch(loss, acc)
        t1 = time.perf_counter()  # train_epoch ended with a device sync (.item())
        test_acc = plan.evaluate(evaluate, model, test_x, test_y)
        stats = EpochStats(
            epoch=epoch,
            train_loss=loss,
            train_acc=acc,
            test_acc=test_acc,
            seconds=t1 - t0,
            examples_per_s=seen / (t1 - t0),
            eval_seconds=time.perf_counter() - t1,
        )
        history.append(stats)
        if not plan.is_main:  # files and callbacks: rank 0 only
            continue
        rows = [h.to_dict() for h in history]
        save_checkpoint(
            run.checkpoint,
            {
                "epoch": epoch,
                "config": config.to_dict(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": capture_rng(shuffle, device),
                "history": rows,
            },
        )
        write_metrics(run, rows, env)
        if on_epoch is not None:
            on_epoch(stats)
    if history and plan.is_main:
        rows = [h.to_dict() for h in history]
        write_metrics(run, rows, env)
        title = f"norm={config.norm}, lr={config.lr}, batch={config.batch_size}"
        plot_history(rows, run.curves, title=title)
    return TrainResult(config=config, run=run, history=history, model=model, device=device)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Use ``n`` torch CPU threads inside the block, and restore the caller's count after."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


# --- the two entry points


def train(
    config: TrainConfig,
    data: Dataset | None = None,
    *,
    progress: bool | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainResult:
    """Train ``config`` into a fresh run directory and return the history and model.

    ``data``: in-memory images/labels (default: :func:`bnlab.data.load_fashion_mnist` from
    ``config.data_dir``). ``progress``: tqdm bars (None: only on a terminal). ``on_epoch``:
    called with each epoch's :class:`EpochStats` (the CLI prints its table with it).
    The global RNG state and torch's thread count are the same before and after the call.
    """
    device = resolve_device(config.device)
    out = Path(config.out) if config.out is not None else default_out(config.norm)
    out = Path(current_plan().agree(str(out)))  # every process: rank 0's directory
    config = dataclasses.replace(config, out=str(out), device=str(device))
    tensors = _tensors(config, data, device, progress)  # data errors before any file is made
    with torch.random.fork_rng(devices=_rng_devices(device)), _threads(config.threads):
        torch.manual_seed(config.seed)
        model = build_model(config)
        run = create_run_dir(out) if current_plan().is_main else RunDir(out)
        if current_plan().is_main:
            write_config(run, config)
        return _fit(config, run, tensors, model, None, progress=progress, on_epoch=on_epoch)


def resume(
    run_dir: str | os.PathLike[str],
    data: Dataset | None = None,
    *,
    progress: bool | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Continue the run in ``run_dir`` from its last complete epoch (or from the start if it
    was killed during the first). The result equals an uninterrupted run with the same config.

    ``overrides``: only ``epochs`` (to train longer), ``device`` and ``data_dir`` may change.
    """
    bad = sorted(set(overrides) - set(RESUME_OVERRIDES))
    if bad:
        raise ConfigError(
            f"resume: {bad} cannot change when a run is resumed (only {list(RESUME_OVERRIDES)} "
            "can); start a new run for a different configuration."
        )
    run, config = read_config(run_dir)
    state = load_checkpoint(run.checkpoint) if run.checkpoint.exists() else None
    if state is not None and TrainConfig.from_dict(state["config"]).model_kwargs() != (
        config.model_kwargs()
    ):
        raise ConfigError(
            f"resume: {run.config} and {run.checkpoint} describe different models; the config "
            "file was edited. Restore it, or start a new run."
        )
    done = len(state["history"]) if state is not None else 0
    if overrides.get("epochs", config.epochs) < done:
        raise ConfigError(
            f"epochs: the run already has {done} epochs; expected --epochs >= {done}, got "
            f"{overrides['epochs']}."
        )
    device = resolve_device(overrides.get("device", config.device))
    config = dataclasses.replace(config, **{**overrides, "device": str(device)})
    tensors = _tensors(config, data, device, progress)
    if current_plan().is_main:
        write_config(run, config)
    with torch.random.fork_rng(devices=_rng_devices(device)), _threads(config.threads):
        torch.manual_seed(config.seed)
        model = build_model(config)  # then overwritten by the checkpoint, if there is one
        return _fit(config, run, tensors, model, state, progress=progress, on_epoch=on_epoch)


__all__ = [
    "KILL_ENV",
    "Dataset",
    "EpochStats",
    "TrainResult",
    "batch_bounds",
    "build_model",
    "environment",
    "evaluate",
    "resolve_device",
    "resume",
    "to_device_tensors",
    "train",
    "train_epoch",
]
