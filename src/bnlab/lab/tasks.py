"""The units of work a plan is made of. Each task takes its typed parameters
(:mod:`bnlab.lab.params`, rebuilt from the run's JSON) and a work directory and returns a
JSON-serializable result; nothing here decides what to run (the experiments do).

    train        one training run (resumed from its work directory if it was killed), its final
                 evaluation with moving and with precise statistics, and probes of the trained
                 model (first BN's γ/β, folding)
    batch_one    what happens to BN with one value per channel (the chapter's batch size 1)
    controversy  a training run with ICS / loss-landscape probes (bnlab.lab.controversy)
    shift        a train run's model under shifted inputs, with test-time adaptation
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab.data import FashionMNIST, load_fashion_mnist
from bnlab.lab.controversy.config import ControversyConfig
from bnlab.lab.params import BatchOneParams, ShiftParams, TaskParams, TrainParams

CPU = torch.device("cpu")


@functools.cache
def dataset() -> FashionMNIST:
    """Fashion-MNIST once per process (from BNLAB_DATA_DIR, else the user cache)."""
    return load_fashion_mnist(progress=False)


def _split(
    which: str, n: int | None, device: torch.device = CPU
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images of a split as the training loop sees them."""
    from bnlab.train import to_device_tensors

    data = dataset()
    images, labels = (
        (data.train_images, data.train_labels)
        if which == "train"
        else (data.test_images, data.test_labels)
    )
    return to_device_tensors(images[:n], labels[:n], device)


def train_task(params: TrainParams, workdir: Path, device: str = "cpu") -> dict[str, Any]:
    """Train (or resume) one configuration, then evaluate it the ways the report compares:

    final.train_loss / train_acc   the last epoch's running averages (training mode)
    final.test_acc_moving          eval mode with the moving averages kept in training
    final.test_acc_precise         eval mode after bnlab.tools.precise_bn over the run's
                                   training images (the chapter's whole-dataset statistics;
                                   equal to the moving reading where no BN keeps running
                                   statistics, as final.recalibrated = 0 says)
    final.test_acc_batch_stats     training mode on 256-image test batches (running stats
                                   untouched)
    probes.first_bn                the first norm layer's learned γ and β
    probes.fold                    BN folded into the layer before it (BN models only)
    """
    from bnlab.train import TrainConfig, evaluate, resume, train

    config = TrainConfig.from_dict({**params.config, "out": str(workdir), "device": device})
    if (workdir / "config.json").exists():
        result = resume(workdir, dataset(), progress=False)
    else:
        result = train(config, dataset(), progress=False)
    model = result.model.eval()
    dev = result.device
    train_x, _ = _split("train", config.subset, dev)
    test_x, test_y = _split("test", config.test_subset, dev)
    last = result.history[-1]
    precise = copy.deepcopy(model)
    recalibrated = _recalibrate(precise, train_x)
    final = {
        "train_loss": last.train_loss,
        "train_acc": last.train_acc,
        "test_acc_moving": last.test_acc,
        "test_acc_precise": evaluate(precise, test_x, test_y) if recalibrated else last.test_acc,
        "test_acc_batch_stats": _batch_stats_accuracy(model, test_x, test_y),
        "recalibrated": recalibrated,
    }
    probes: dict[str, Any] = {"first_bn": probe_first_bn(model)}
    foldable = config.norm_position == "before" and config.norm_layers != "none"
    if config.norm in ("bnlab", "torch") and foldable:
        try:
            probes["fold"] = probe_fold(model, test_x[:256])
        except (ValueError, TypeError) as e:  # e.g. BN after the activation has no layer to go
            probes["fold"] = {"error": str(e)}
    return {"history": [e.to_dict() for e in result.history], "final": final, "probes": probes}


def _recalibrate(model: nn.Module, train_x: torch.Tensor) -> int:
    """Precise statistics for every BN with running statistics; returns how many there are."""
    from bnlab.tools import precise_bn
    from bnlab.tools.common import find_batch_norms, has_running_stats

    n = sum(1 for _, m in find_batch_norms(model) if has_running_stats(m))
    if n:
        precise_bn(model, [train_x[i : i + 1024] for i in range(0, len(train_x), 1024)])
    return n


def _batch_stats_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy with each 256-image test batch's own statistics (a copy in training mode, so
    the model's running statistics are untouched)."""
    batch_mode = copy.deepcopy(model).train()
    with torch.no_grad():
        correct = sum(
            int((batch_mode(x[i : i + 256]).argmax(1) == y[i : i + 256]).sum())
            for i in range(0, len(x), 256)
        )
    return correct / len(x)


# ---- probes of a trained model -------------------------------------------------------------


def _norm_modules(model: nn.Module) -> list[nn.Module]:
    from bnlab.nn import BatchNorm

    return [m for m in model.modules() if isinstance(m, BatchNorm | nn.modules.batchnorm._NormBase)]


def probe_first_bn(model: nn.Module) -> dict[str, Any]:
    """The learned γ and β of the first BN layer (the chapter prints them)."""
    norms = _norm_modules(model)
    if not norms:
        return {}
    gamma, beta = getattr(norms[0], "weight", None), getattr(norms[0], "bias", None)
    return {
        "gamma": gamma.detach().flatten().tolist() if gamma is not None else None,
        "beta": beta.detach().flatten().tolist() if beta is not None else None,
    }


def _median_seconds(fn: Callable[[], Any], reps: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def probe_fold(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Fold every BN into the layer before it: the largest output difference and the eval
    forward time of a 256-image batch, folded vs not (medians, measured interleaved)."""
    from bnlab.tools import fold_bn

    model.eval()
    folded = fold_bn(model)
    with torch.no_grad():
        ref, got = model(x), folded(x)
        diff = float((ref - got).abs().max() / ref.abs().max())
        agree = float((ref.argmax(1) == got.argmax(1)).float().mean())
        t_ref, t_fold = [], []
        for _ in range(5):  # interleave so drift on a shared machine hits both
            t_ref.append(_median_seconds(lambda: model(x), 10))
            t_fold.append(_median_seconds(lambda: folded(x), 10))
    t_ref.sort()
    t_fold.sort()
    return {
        "max_rel_diff": diff,
        "argmax_agreement": agree,
        "ms_unfolded": 1e3 * t_ref[2],
        "ms_folded": 1e3 * t_fold[2],
        "norms_left": len(_norm_modules(folded)),
    }


# ---- the other tasks -------------------------------------------------------------------------


def batch_one_task(params: BatchOneParams, workdir: Path, device: str = "cpu") -> dict[str, Any]:
    """Batch size 1: bnlab refuses to train (the error it raises), and the normalized output
    computed anyway is identically zero, so γ gets no gradient and β alone passes through."""
    from bnlab.functional import moments, scale_shift
    from bnlab.nn import BatchNorm

    x, _ = _split("train", 1)
    flat = x.flatten(1)  # (1, 784): the fully-connected case, one value per feature
    try:
        BatchNorm(flat.shape[1])(flat)
        error = None
    except ValueError as e:
        error = str(e)
    mean, var = moments(flat, [0])
    scale, shift = scale_shift(mean, var, 1e-5)
    x_hat = flat * scale + shift
    gamma = torch.ones(flat.shape[1], requires_grad=True)
    (gamma * x_hat).sum().backward()
    return {
        "error": error,
        "max_abs_normalized": float(x_hat.abs().max()),
        "max_abs_gamma_grad": float(gamma.grad.abs().max()) if gamma.grad is not None else 0.0,
    }


def shift_task(params: ShiftParams, workdir: Path, device: str = "cpu") -> dict[str, Any]:
    """The trained model of a ``train`` run (``params.train_key``: resumed from that run's
    work directory, which a finished run leaves complete; trained there if it is gone) under
    every corruption of bnlab.data.corrupt, read five ways:

    source      eval mode with precise statistics of the clean training images
    target      eval mode with precise statistics of the (unlabelled) corrupted test images
    prior N     adapt_bn: the two mixed with weight N examples on the source (Schneider et al.)
    tent        bnlab.tools.tent, one Adam step per 256-image batch on γ and β, then predicted
                with each batch's statistics (BN models only)

    Returns ``{"accuracy": {"clean" | "<kind>/<severity>": {method: accuracy}}}``."""
    from bnlab.data import CORRUPTIONS, corrupt, to_float_batches
    from bnlab.tools import adapt_bn, precise_bn, tent
    from bnlab.tools.common import find_batch_norms, has_running_stats
    from bnlab.train import TrainConfig, evaluate, resume, train

    train_dir = workdir.parent / params.train_key
    config = TrainConfig.from_dict({**params.config, "out": str(train_dir), "device": device})
    if (train_dir / "config.json").exists():
        result = resume(train_dir, dataset(), progress=False)
    else:
        result = train(config, dataset(), progress=False)
    dev = result.device
    source = result.model.eval()
    train_x, _ = _split("train", config.subset, dev)
    has_bn = any(has_running_stats(m) for _, m in find_batch_norms(source))
    if has_bn:
        precise_bn(source, list(train_x.split(1024)))
    data = dataset()
    test_y = data.test_labels[: config.test_subset].to(dev)
    sets = {"clean": data.test_images[: config.test_subset]}
    for kind, levels in CORRUPTIONS.items():
        for severity in range(1, len(levels) + 1):
            images = data.test_images[: config.test_subset]
            sets[f"{kind}/{severity}"] = corrupt(images, kind, severity, seed=config.seed)
    accuracy: dict[str, dict[str, float]] = {}
    for name, images in sets.items():
        x = to_float_batches(images, dev)  # (N, 1, 28, 28)
        batches = list(x.split(256))
        row = {"source": evaluate(source, x, test_y)}
        if has_bn:
            for prior in params.priors:
                adapted = adapt_bn(copy.deepcopy(source), batches, prior=float(prior))
                row["target" if prior == 0 else f"prior {prior:g}"] = evaluate(adapted, x, test_y)
            tented = tent(source, batches, steps=1, lr=params.tent_lr)
            with torch.no_grad():
                correct = sum(
                    int((tented(xb).argmax(1) == yb).sum())
                    for xb, yb in zip(batches, test_y.split(256), strict=True)
                )
            row["tent"] = correct / len(test_y)
        accuracy[name] = row
    return {"accuracy": accuracy}


def controversy_task(
    params: ControversyConfig, workdir: Path, device: str = "cpu"
) -> dict[str, Any]:
    from bnlab.lab.controversy import run_controversy

    return run_controversy(dataclasses.replace(params, device=device), dataset())


@dataclass(frozen=True)
class Task:
    """A task: its parameters' type (bnlab.lab.params) and the function that runs it."""

    params: type[TaskParams]
    run: Callable[[Any, Path, str], dict[str, Any]]


TASKS: dict[str, Task] = {
    "train": Task(TrainParams, train_task),
    "batch_one": Task(BatchOneParams, batch_one_task),
    "controversy": Task(ControversyConfig, controversy_task),
    "shift": Task(ShiftParams, shift_task),
}


def task_params(task: str, params: Mapping[str, Any]) -> TaskParams:
    """``params`` as ``task``'s typed parameters: an unknown task, an unknown key or a bad value
    is an error here, before any work."""
    if task not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}.")
    return TASKS[task].params.from_dict(params)


def run_task(
    task: str,
    params: dict[str, Any],
    *,
    workdir: Path,
    threads: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    typed = task_params(task, params)  # checked before anything is written
    workdir.parent.mkdir(parents=True, exist_ok=True)
    if threads is not None:
        torch.set_num_threads(threads)
    return TASKS[task].run(typed, workdir, device)
