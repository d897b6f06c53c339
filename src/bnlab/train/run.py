"""Runs: :func:`train` starts one in a fresh run directory, :func:`resume` continues one, both
over the pieces of :mod:`bnlab.train.loop`, with a checkpoint after every epoch.

Reproducibility: ``seed`` seeds the weight init and dropout (the global generator, restored
afterwards by ``torch.random.fork_rng``) and a dedicated generator for shuffling; a checkpoint
after every epoch stores all three with the model and optimizer, so :func:`resume` after a
crash ends with the same history as an uninterrupted run (bit for bit on the CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.distributed import current_plan
from bnlab.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from bnlab.train.config import ConfigError, TrainConfig, describe_fields, flag_of
from bnlab.train.loop import (
    Dataset,
    EpochStats,
    TrainResult,
    build_model,
    environment,
    evaluate,
    resolve_device,
    to_device_tensors,
    train_epoch,
)
from bnlab.train.plot import plot_history
from bnlab.train.rundir import (
    RunDir,
    check_new_run_dir,
    create_run_dir,
    default_out,
    read_config,
    write_config,
    write_metrics,
)

# Test hook: "EPOCH:STEP" (both 1-based) makes the process SIGKILL itself right after that
# optimizer step, to test crash recovery. Not for normal use.
KILL_ENV = "BNLAB_TEST_KILL_AT"
SHUFFLE_SEED_OFFSET = 0x5EED  # the shuffling stream differs from the init stream of the same seed
RESUME_OVERRIDES = ("epochs", "device", "data_dir")  # what may change when a run is resumed


def _kill_step() -> tuple[int, int] | None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return None
    try:
        kill_epoch, kill_step = (int(s) for s in spec.split(":"))
    except ValueError:
        raise ConfigError(f"{KILL_ENV}: expected EPOCH:STEP such as 2:5, got {spec!r}.") from None
    return kill_epoch, kill_step


def _step_hook(
    epoch: int, start: list[Callable[[], None]], kill: tuple[int, int] | None
) -> Callable[[int], None]:
    """After each optimizer step: the pending ``start`` callbacks (run once, after the first
    step of the run), then the test hook's SIGKILL at its EPOCH:STEP."""

    def hook(step: int) -> None:
        while start:
            start.pop(0)()
        if kill == (epoch, step):
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _split(
    images: Any, labels: Any, config: TrainConfig, field: str, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The first ``config.<field>`` examples (all when None) as device tensors."""
    n: int | None = getattr(config, field)
    if n is not None:
        if n > len(images):
            what = "training" if field == "subset" else "test"
            raise ConfigError(
                f"{field}: expected at most the {len(images)} {what} images, got {n}. Leave "
                f"{flag_of(field)} out to use them all."
            )
        images, labels = images[:n], labels[:n]
    return to_device_tensors(images, labels, device)


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
    train_x, train_y = _split(data.train_images, data.train_labels, config, "subset", device)
    test_x, test_y = _split(data.test_images, data.test_labels, config, "test_subset", device)
    return train_x, train_y, test_x, test_y, info


def auto_kernel(model: nn.Module, device: torch.device) -> str | None:
    """What the model's ``impl="auto"`` norm layers run here: "native" (the C++ kernel, where
    a build of it loads) or "eager"; None when no layer leaves the choice to "auto"."""
    if not any(getattr(m, "impl", None) == "auto" for m in model.modules()):
        return None
    from bnlab.functional.native import load_native

    return "native" if device.type == "cpu" and load_native() is not None else "eager"


def _check_same_kernel(run: RunDir, kernel: str | None) -> None:
    """Warn when a resumed run's "auto" layers run another kernel than its earlier epochs did
    (a build appeared or went stale in between): the two kernels round differently, so the
    history is then no longer exactly that of an uninterrupted run."""
    try:
        before = json.loads(run.metrics_json.read_text(encoding="utf-8"))["environment"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no epoch finished yet, or metrics from an older version: nothing to compare
    was = before.get("auto_kernel", kernel) if isinstance(before, dict) else kernel
    if was != kernel:
        how = " (`bnlab build` makes the native one)" if was == "native" else ""
        warnings.warn(
            f"resume: {run.path}'s epochs so far ran the {was} kernel (impl='auto'), this "
            f"process runs the {kernel} one, so the rest of the history will differ in the last "
            f"digits from an uninterrupted run. To keep it exact, resume where the {was} kernel "
            f"runs{how}.",
            RuntimeWarning,
            stacklevel=4,  # the caller of resume()
        )


def _fit(
    config: TrainConfig,
    run: RunDir,
    tensors: tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]],
    model: nn.Module,
    state: dict[str, Any] | None,
    *,
    progress: bool | None,
    on_epoch: Callable[[EpochStats], None] | None,
    start: Callable[[], None] | None = None,
) -> TrainResult:
    """The loop proper; runs inside the caller's ``fork_rng`` after ``manual_seed``.
    ``start`` runs after the run's first optimizer step: a new run's directory and config.json
    are made only once the configuration has been seen to train."""
    device = torch.device(config.device)
    # data-parallel when torch.distributed runs several processes
    plan = current_plan(device, sync_bn=config.sync_bn)
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
    env = {**environment(device), **data_info, "auto_kernel": auto_kernel(model, device)}
    if state is not None and plan.is_main:
        _check_same_kernel(run, env["auto_kernel"])
    pending = [start] if start is not None else []
    kill = _kill_step()
    for epoch in range(len(history) + 1, config.epochs + 1):
        t0 = time.perf_counter()
        with _accumulating(model, config):
            loss, acc, seen = train_epoch(
                net,
                optimizer,
                train_x,
                train_y,
                batch_size=config.batch_size,
                generator=shuffle,
                progress=progress if plan.is_main else False,
                desc=f"epoch {epoch}/{config.epochs}",
                step_hook=_step_hook(epoch, pending, kill),
                loss_fn=plan.loss_fn,
                shard=plan.shard,
                micro_batches=config.micro_batches,
            )
        loss, acc = plan.reduce_epoch(loss, acc)
        t1 = time.perf_counter()  # train_epoch ended with a device sync (.item())
        plan.sync_running_stats(model)  # per-process BN: one set of statistics to test, save
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


def _accumulating(model: nn.Module, config: TrainConfig) -> contextlib.AbstractContextManager[Any]:
    """accumulate_bn over one epoch (every step is a whole group of micro-batches, so nothing
    is pending at the epoch's end, when the model is evaluated and saved)."""
    if not config.accumulate_bn:
        return contextlib.nullcontext()
    from bnlab.tools import accumulate_bn

    return accumulate_bn(model, micro_batches=config.micro_batches)


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


def _model_name(model: nn.Module) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _with_model(config: TrainConfig, model: nn.Module | None) -> TrainConfig:
    """The config of a run of ``model`` (None: the built-in LeNet): records the model's class,
    and refuses LeNet options that a model of one's own would silently ignore."""
    if model is None:
        if config.model != "lenet":
            raise ConfigError(
                f"model: this config names the model {config.model!r}; pass that model, "
                "train(config, model=...), or use model='lenet' for the built-in LeNet."
            )
        return config
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model: expected a torch.nn.Module mapping (N, 1, 28, 28) images to (N, classes) "
            f"logits, got {type(model).__name__}."
        )
    defaults = TrainConfig().lenet_fields()
    changed = [k for k, v in config.lenet_fields().items() if v != defaults[k]]
    if changed:
        raise ConfigError(
            f"{describe_fields(changed)}: these configure the built-in LeNet and would be "
            "ignored with a model of one's own; leave them at their defaults and build the "
            "model as you want it."
        )
    return dataclasses.replace(config, model=_model_name(model))


def _check_resumed_model(config: TrainConfig, model: nn.Module | None, run: RunDir) -> None:
    if config.model == "lenet" and model is not None:
        raise ConfigError(
            f"resume: {run.path} trained the built-in LeNet, which its config rebuilds; leave "
            "model out."
        )
    if config.model != "lenet" and (model is None or _model_name(model) != config.model):
        got = "no model" if model is None else f"a {_model_name(model)}"
        raise ConfigError(
            f"resume: {run.path} trained a {config.model}; pass a fresh one, resume(run_dir, "
            f"model=...), got {got}."
        )


def saved_history(run: RunDir) -> list[EpochStats]:
    """The epochs of ``run`` that its checkpoint holds (none before the first one ends)."""
    if not run.checkpoint.exists():
        return []
    return [EpochStats.from_dict(row) for row in load_checkpoint(run.checkpoint)["history"]]


def train(
    config: TrainConfig,
    data: Dataset | None = None,
    *,
    model: nn.Module | None = None,
    progress: bool | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainResult:
    """Train ``config`` into a fresh run directory and return the history and model.

    ``data``: in-memory images/labels (default: :func:`bnlab.data.load_fashion_mnist` from
    ``config.data_dir``). ``model``: any ``nn.Module`` mapping (N, 1, 28, 28) images to
    (N, classes) logits, trained in place with its own initial weights; default: the BN-LeNet
    ``config`` describes, with the chapter's Xavier init. Either way the run gets the same run
    directory, checkpoints, plots and :func:`resume`. ``progress``: tqdm bars (None: only on a
    terminal). ``on_epoch``: called with each epoch's :class:`EpochStats` (the CLI prints its
    table with it).

    Nothing is written until the first optimizer step has succeeded, so a configuration that
    cannot train (a bad layer option, a model that does not fit the data) leaves no files.
    The global RNG state and torch's thread count are the same before and after the call.
    """
    config = _with_model(config, model)
    device = resolve_device(config.device)
    plan = current_plan()
    out = Path(config.out) if config.out is not None else default_out(config.norm)
    out = Path(plan.agree(str(out)))  # every process: rank 0's directory
    config = dataclasses.replace(config, out=str(out), device=str(device))
    run = check_new_run_dir(out)
    started: list[bool] = []

    def start() -> None:
        if plan.is_main:
            write_config(create_run_dir(out), config)
        started.append(True)

    with torch.random.fork_rng(devices=_rng_devices(device)), _threads(config.threads):
        torch.manual_seed(config.seed)
        net = build_model(config) if model is None else model
        tensors = _tensors(config, data, device, progress)
        try:
            return _fit(
                config, run, tensors, net, None, progress=progress, on_epoch=on_epoch, start=start
            )
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:
            if started or isinstance(e, ConfigError):
                raise
            # e.g. a layer option that is checked only when the layer runs (impl="typo")
            raise ConfigError(
                f"the first training step failed, so no run was started and nothing was "
                f"written: {type(e).__name__}: {e}"
            ) from e


def resume(
    run_dir: str | os.PathLike[str],
    data: Dataset | None = None,
    *,
    model: nn.Module | None = None,
    progress: bool | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
    **overrides: Any,
) -> TrainResult:
    """Continue the run in ``run_dir`` from its last complete epoch (or from the start if it
    was killed during the first). The result equals an uninterrupted run with the same config.
    A run that already has all its epochs is returned as it is (model loaded), writing nothing.

    ``model``: a fresh instance of the model a ``train(config, model=...)`` run was given
    (its weights come from the checkpoint); leave it out for the built-in LeNet.
    ``overrides``: only ``epochs`` (to train longer), ``device`` and ``data_dir`` may change.
    """
    bad = sorted(set(overrides) - set(RESUME_OVERRIDES))
    if bad:
        raise ConfigError(
            f"resume continues a run with its saved config; {describe_fields(bad)} cannot "
            f"change (only {describe_fields(RESUME_OVERRIDES)} can). Start a new run for a "
            "different configuration."
        )
    run, config = read_config(run_dir)
    _check_resumed_model(config, model, run)
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
    with torch.random.fork_rng(devices=_rng_devices(device)), _threads(config.threads):
        torch.manual_seed(config.seed)
        net = build_model(config) if model is None else model
        if state is not None and done == config.epochs:  # complete: nothing to train or write
            net.to(device).load_state_dict(state["model"])
            history = [EpochStats.from_dict(row) for row in state["history"]]
            return TrainResult(config=config, run=run, history=history, model=net, device=device)
        tensors = _tensors(config, data, device, progress)
        if current_plan().is_main:
            write_config(run, config)
        return _fit(config, run, tensors, net, state, progress=progress, on_epoch=on_epoch)


__all__ = ["KILL_ENV", "RESUME_OVERRIDES", "resume", "saved_history", "train"]
