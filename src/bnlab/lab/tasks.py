"""The units of work a plan is made of. Each task takes JSON parameters and a work directory
and returns a JSON-serializable result; nothing here decides what to run (the experiments do).

    train        one training run (resumed from its work directory if it was killed), plus
                 optional probes of the trained model (first BN's γ/β, population statistics,
                 folding)
    batch_one    what happens to BN with one value per channel (the chapter's batch size 1)
    controversy  a training run with ICS / loss-landscape probes (bnlab.lab.controversy)
"""

from __future__ import annotations

import copy
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnlab.data import FashionMNIST, load_fashion_mnist


@functools.cache
def dataset() -> FashionMNIST:
    """Fashion-MNIST once per process (from BNLAB_DATA_DIR, else the user cache)."""
    return load_fashion_mnist(progress=False)


def _test_tensors(device: torch.device, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    data = dataset()
    x = data.test_images[:n].to(device=device, dtype=torch.float32).div_(255).unsqueeze(1)
    return x, data.test_labels[:n].to(device)


def _train_tensors(n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    data = dataset()
    x = data.train_images[:n].to(torch.float32).div_(255).unsqueeze(1)
    return x, data.train_labels[:n]


def train_task(params: dict[str, Any], workdir: Path) -> dict[str, Any]:
    from bnlab.train import TrainConfig, resume, train

    config = TrainConfig.from_dict({**params["config"], "out": str(workdir), "device": "cpu"})
    if (workdir / "config.json").exists():
        result = resume(workdir, dataset(), progress=False)
    else:
        result = train(config, dataset(), progress=False)
    out: dict[str, Any] = {"history": [e.to_dict() for e in result.history]}
    probes: dict[str, Any] = {}
    for probe in params.get("probes", []):
        probes[probe] = PROBES[probe](result.model, config, params)
    out["probes"] = probes
    return out


# ---- probes of a trained model -------------------------------------------------------------


def _norm_modules(model: nn.Module) -> list[nn.Module]:
    from bnlab.nn import BatchNorm

    return [m for m in model.modules() if isinstance(m, BatchNorm | nn.modules.batchnorm._NormBase)]


def probe_first_bn(model: nn.Module, config: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The learned γ and β of the first BN layer (the chapter prints them)."""
    norms = _norm_modules(model)
    if not norms:
        return {}
    gamma, beta = getattr(norms[0], "weight", None), getattr(norms[0], "bias", None)
    return {
        "gamma": gamma.detach().flatten().tolist() if gamma is not None else None,
        "beta": beta.detach().flatten().tolist() if beta is not None else None,
    }


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(x[i : i + 2048]).argmax(1) == y[i : i + 2048]).sum())
            for i in range(0, len(x), 2048)
        )
    return correct / len(x)


def probe_population(model: nn.Module, config: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Test and train accuracy in eval mode with the moving averages, then with precise
    whole-dataset statistics (bnlab.tools.precise_bn), and in train mode (batch statistics)."""
    from bnlab.tools import precise_bn

    xt, yt = _test_tensors(torch.device("cpu"))
    xtr, ytr = _train_tensors(config.subset)
    out = {"moving_test": _accuracy(model, xt, yt), "moving_train": _accuracy(model, xtr, ytr)}
    precise = copy.deepcopy(model)
    precise_bn(precise, (xtr[i : i + 1024] for i in range(0, len(xtr), 1024)))
    out["precise_test"] = _accuracy(precise, xt, yt)
    out["precise_train"] = _accuracy(precise, xtr, ytr)
    batch_mode = copy.deepcopy(model).train()
    with torch.no_grad():  # batch statistics of 256-sample test batches, running stats discarded
        correct = sum(
            int((batch_mode(xt[i : i + 256]).argmax(1) == yt[i : i + 256]).sum())
            for i in range(0, len(xt), 256)
        )
    out["batch_stats_test"] = correct / len(xt)
    return out


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


def probe_fold(model: nn.Module, config: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Fold every BN into the layer before it: the largest output difference and the eval
    forward time of a 256-image batch, folded vs not (medians, measured interleaved)."""
    from bnlab.tools import fold_bn

    model.eval()
    folded = fold_bn(model)
    x, _ = _test_tensors(torch.device("cpu"), 256)
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


PROBES: dict[str, Callable[[nn.Module, Any, dict[str, Any]], dict[str, Any]]] = {
    "first_bn": probe_first_bn,
    "population": probe_population,
    "fold": probe_fold,
}


# ---- the other tasks -------------------------------------------------------------------------


def batch_one_task(params: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Batch size 1: bnlab refuses to train (the error it raises), and the normalized output
    computed anyway is identically zero, so γ gets no gradient and β alone passes through."""
    from bnlab.functional import moments, scale_shift
    from bnlab.nn import BatchNorm

    x, _ = _train_tensors(1)
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


def controversy_task(params: dict[str, Any], workdir: Path) -> dict[str, Any]:
    from bnlab.lab.controversy import run_controversy

    return run_controversy(params, dataset())


TASKS: dict[str, Callable[[dict[str, Any], Path], dict[str, Any]]] = {
    "train": train_task,
    "batch_one": batch_one_task,
    "controversy": controversy_task,
}


def run_task(task: str, params: dict[str, Any], *, workdir: Path) -> dict[str, Any]:
    if task not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}.")
    workdir.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("BNLAB_THREADS", torch.get_num_threads())))
    return TASKS[task](params, workdir)
