"""One controversy run: a LeNet trained with plain SGD through the shared loop
(:func:`bnlab.train.loop.train_epoch`), probed every ``measure_every`` steps by a before-step
hook, on the batch and at the weights of the step about to be taken."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, Final

import torch
from torch import Tensor, nn

from bnlab.lab.controversy.config import ControversyConfig
from bnlab.lab.controversy.noise import noise_modules, noisy_bn_factory
from bnlab.lab.controversy.probes import full_gradient, ics_probe, landscape_probe, weight_layers
from bnlab.models import init_weights, lenet
from bnlab.train.loop import evaluate, to_device_tensors, train_epoch

SHUFFLE_SEED_OFFSET: Final = 0x5EED  # shuffling and noise streams differ from the init stream
NOISE_SEED_OFFSET: Final = 0x401CE
PROBE_KEYS: Final[tuple[str, ...]] = (
    "step",
    "epoch",
    "loss",
    "grad_norm",
    "loss_variation",
    "grad_predictiveness",
    "beta_smoothness",
)


def _config(params: ControversyConfig | Mapping[str, Any]) -> ControversyConfig:
    return params if isinstance(params, ControversyConfig) else ControversyConfig.from_dict(params)


def build_model(params: ControversyConfig | Mapping[str, Any]) -> nn.Module:
    """The chapter's LeNet for ``params["norm"]``, Xavier-initialized from ``params["seed"]``
    (the global RNG is forked, so the caller's stream is untouched)."""
    p = _config(params)
    if p.norm == "noisy":
        gen = torch.Generator().manual_seed(p.seed + NOISE_SEED_OFFSET)
        norm: Any = noisy_bn_factory(gen, mean_bound=p.noise_mean, std_bound=p.noise_std)
    else:
        norm = p.norm
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        model = init_weights(lenet(norm))
    return model.to(p.device)


class _Probes:
    """The before-step hook of a run: a new noise sample at every step, and every
    ``measure_every`` steps (counted from 0 over the whole run) the probes on the step's batch
    at the current weights; the columns of the result's ``probes``."""

    def __init__(self, model: nn.Module, config: ControversyConfig) -> None:
        self.model, self.config = model, config
        self.noise = noise_modules(model)
        self.layers = [name for name, _ in weight_layers(model)[1:]]
        self.columns: dict[str, Any] = {k: [] for k in (*PROBE_KEYS, "losses_along")}
        for key in ("ics_l2", "ics_cos", "ics_g_norm"):
            self.columns[key] = {name: [] for name in self.layers}
        self.step = 0  # steps taken so far in the run
        self.epoch = 1  # set by the epoch loop
        self.seconds = 0.0

    def __call__(self, _epoch_step: int, xb: Tensor, yb: Tensor) -> None:
        for m in self.noise:
            m.resample()  # a new noise distribution at every step
        if self.step % self.config.measure_every == 0:
            t_probe = time.perf_counter()
            self._measure(xb, yb)
            self.seconds += time.perf_counter() - t_probe
        self.step += 1

    def _measure(self, xb: Tensor, yb: Tensor) -> None:
        lr, probes = self.config.lr, self.columns
        loss_grad = full_gradient(self.model, xb, yb)
        land = landscape_probe(
            self.model, xb, yb, lr=lr, step_sizes=self.config.step_sizes, loss_and_grad=loss_grad
        )
        ics = ics_probe(self.model, xb, yb, lr=lr, grad=loss_grad[1])
        probes["step"].append(self.step)
        probes["epoch"].append(self.epoch)
        for key in PROBE_KEYS[2:]:
            probes[key].append(land[key])
        probes["losses_along"].append(land["losses"])
        for name in self.layers:
            probes["ics_l2"][name].append(ics[name]["l2"])
            probes["ics_cos"][name].append(ics[name]["cos"])
            probes["ics_g_norm"][name].append(ics[name]["g_norm"])


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None  # JSON has no NaN/Inf


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def run_controversy(params: ControversyConfig | Mapping[str, Any], data: Any) -> dict[str, Any]:
    """Train one LeNet (``params["norm"]``) with plain SGD, probing ICS and the loss landscape
    every ``measure_every`` steps (module docstring of :mod:`bnlab.lab.controversy`).
    ``params``: a :class:`ControversyConfig`, or its fields as a dict (missing keys take its
    defaults, unknown keys are an error). ``data``: a :class:`bnlab.data.FashionMNIST` or any object
    with uint8 ``train_images`` (N, H, W), ``train_labels`` (N,), ``test_images``,
    ``test_labels``.

    Returns a JSON-serializable dict (non-finite numbers become None):
        params: the resolved parameters; layers: the probed layer names;
        history: per epoch ``{epoch, train_loss, train_acc, test_acc, seconds}``;
        probes: columns ``step, epoch, loss, grad_norm, loss_variation, grad_predictiveness,
            beta_smoothness, losses_along`` (one entry per probe) and ``ics_l2``, ``ics_cos``,
            ``ics_g_norm`` (``{layer: [...]}``);
        final_test_acc, steps, train_examples, diverged, seconds, probe_seconds, torch, threads.
    """
    p = _config(params)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        if not hasattr(data, name):
            raise TypeError(
                f"data: expected a bnlab.data.FashionMNIST (or an object with train_images, "
                f"train_labels, test_images, test_labels), got {type(data).__name__} without "
                f"{name!r}. Load it with bnlab.data.load_fashion_mnist()."
            )
    device = torch.device(p.device)
    sub = slice(None) if p.subset is None else slice(0, p.subset)
    x, y = to_device_tensors(data.train_images[sub], data.train_labels[sub], device)
    xt, yt = to_device_tensors(data.test_images, data.test_labels, device)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"data: expected at least 2 training images, got {n}.")
    model = build_model(p)
    probes = _Probes(model, p)
    opt = torch.optim.SGD(model.parameters(), lr=p.lr)
    shuffle = torch.Generator().manual_seed(p.seed + SHUFFLE_SEED_OFFSET)

    history: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for epoch in range(1, p.epochs + 1):
        t_epoch = time.perf_counter()
        probes.epoch = epoch
        train_loss, train_acc, _ = train_epoch(
            model, opt, x, y, batch_size=p.batch_size, generator=shuffle, before_step=probes
        )
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "test_acc": evaluate(model, xt, yt),
                "seconds": time.perf_counter() - t_epoch,
            }
        )
    final_loss = history[-1]["train_loss"]
    result = {
        "params": p.to_dict(),
        "layers": probes.layers,
        "history": history,
        "probes": probes.columns,
        "final_test_acc": history[-1]["test_acc"],
        "steps": probes.step,
        "train_examples": n,
        "diverged": not math.isfinite(final_loss),
        "seconds": time.perf_counter() - t_start,
        "probe_seconds": probes.seconds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return dict(_jsonable(result))


__all__ = ["NOISE_SEED_OFFSET", "SHUFFLE_SEED_OFFSET", "build_model", "run_controversy"]
