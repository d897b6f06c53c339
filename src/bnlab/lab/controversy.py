"""Why does BN help? Internal covariate shift against loss-landscape smoothness, measured on the
chapter's LeNet (Santurkar, Tsipras, Ilyas & Mądry, 2018, "How Does Batch Normalization Help
Optimization?", arXiv:1805.11604; Ioffe & Szegedy, 2015, arXiv:1502.03167).

Three networks train side by side with plain SGD on the same data: ``norm="bnlab"`` (the
chapter's BN-LeNet), ``"none"`` (the same LeNet without norm layers) and ``"noisy"`` (BN-LeNet
with non-stationary noise after every BN layer, :class:`NonstationaryNoise`). Every
``measure_every`` steps, on the current training batch B and at the current weights w, with
g = ∇L_B(w) the gradient of the SGD step about to be taken (η₀ the learning rate):

Internal covariate shift (Santurkar et al., Definition 2.1), for each weight layer i > 0::

    G  = ∇_{W_i} L_B(W_1,          ..., W_{i-1},          W_i, ..., W_k)
    G' = ∇_{W_i} L_B(W_1 - η₀ g_1, ..., W_{i-1} - η₀ g_{i-1}, W_i, ..., W_k)
    ics_l2 = ||G - G'||₂,   ics_cos = <G, G'> / (||G||₂ ||G'||₂)

"Layers before i" are all parameters (weights, biases, BN γ and β) of the modules that come
before layer i's conv/dense module; layer i's own norm and everything after it stay put. Layer
0 has nothing before it (G' = G), so it is not reported. ICS is large when ||G - G'|| is large
and cos(G, G') is far from 1.

Loss landscape along the gradient, for η in η₀ · step_sizes::

    loss_variation      = max_η L_B(w - η g) - min_η L_B(w - η g)         (loss Lipschitzness)
    grad_predictiveness = max_η ||∇L_B(w - η g) - ∇L_B(w)||₂          (gradient predictiveness)
    beta_smoothness     = max_η ||∇L_B(w - η g) - ∇L_B(w)||₂ / ||η g||₂  ("effective" β-smoothness)

Lower is smoother for all three. A network on its initial plateau (batch loss near ln 10, as the
sigmoid LeNet without norm for its first few hundred steps at lr 1) is flat along the gradient
because it is not learning, so :func:`summarize_controversy` also reports, and its verdict
compares, the probes "off the plateau" (batch loss below 0.9 · ln 10).

All probes run in training mode (batch statistics), on the same batch and with the same noise
sample, through ``torch.func.functional_call`` on copies of the parameters and buffers: the
model, its BN running statistics, its ``.grad`` fields and every random generator are left
exactly as they were.

Parameters (``run_controversy(params, data)``; missing keys take these defaults)::

    norm           "bnlab"           "bnlab" | "none" | "noisy"
    lr             1.0               SGD learning rate (the chapter's BN-LeNet uses 1.0)
    epochs         2
    subset         6000              the first N training images; None: all 60,000
    batch_size     256               the chapter's
    seed           0                 weights, shuffling and noise all derive from it
    measure_every  10                steps between probes (step 0 is probed)
    step_sizes     [0.5, 1, 2, 3, 4] multiples of lr probed along the gradient
    noise_mean     0.5               bound a of the per-step means (noisy only, NonstationaryNoise)
    noise_std      0.5               bound b of the per-step spreads (noisy only)
    device         "cpu"

The test set is always the full 10,000 images. A probe costs 1 + (number of layers - 1) +
len(step_sizes) forward/backward passes (10 with the defaults, against 1 for a training step);
with the defaults one run (48 steps, 5 probes) takes well under a minute on two CPU cores.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor, nn
from torch.func import functional_call

from bnlab.functional.core import apply_scale_shift
from bnlab.models import NormFactory, init_weights, lenet, norm_factory
from bnlab.models.lenet import LayerKind
from bnlab.train.loop import batch_bounds, evaluate, to_device_tensors

LossFn = Callable[[Tensor, Tensor], Tensor]

NORMS: Final[tuple[str, ...]] = ("bnlab", "none", "noisy")
NORM_LABELS: Final[dict[str, str]] = {"bnlab": "BN", "noisy": "noisy BN", "none": "no norm"}
NORM_COLORS: Final[dict[str, str]] = {"bnlab": "C0", "noisy": "C1", "none": "C3"}
DEFAULTS: Final[dict[str, Any]] = {
    "norm": "bnlab",
    "lr": 1.0,
    "epochs": 2,
    "subset": 6000,
    "batch_size": 256,
    "seed": 0,
    "measure_every": 10,
    # From half of the SGD step to four times it: the step SGD takes sits inside the range.
    "step_sizes": [0.5, 1.0, 2.0, 3.0, 4.0],
    "noise_mean": 0.5,
    "noise_std": 0.5,
    "device": "cpu",
}
# A probe whose batch loss is above 0.9 · ln 10 (the cross-entropy of a uniform guess over the
# 10 classes) finds the network on its initial plateau, not learning yet.
PLATEAU_LOSS: Final = 0.9 * math.log(10)
SAME_RATIO: Final = 1.1  # medians within 10% of each other are reported as "about the same"
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


# ------------------------------------------------------------------------------- noisy BN


class NonstationaryNoise(nn.Module):
    """Per-channel noise whose distribution itself changes at every step, for "noisy BN"
    (Santurkar et al., Section 2.1): after BN, ``y = x · s + t`` with, at each
    :meth:`resample` (one per training step), for a = ``mean_bound``, b = ``std_bound``::

        μ_t ~ U(-a, a),  σ_t ~ U(0, b),   t_c ~ N(μ_t, σ_t²)          per-channel shift
        ν_t ~ U(-a, a),  τ_t ~ U(0, b),   log s_c ~ N(ν_t, τ_t²)      per-channel scale > 0

    so every layer's input distribution moves at every step, by more than BN removes. The
    paper draws the noise i.i.d. per activation and example; here one draw per channel is shared
    by the whole batch, so it is a pure shift of each unit's distribution between steps, which
    is what "covariate shift" names, rather than extra per-example noise. Training mode only:
    in eval mode it is the identity. The current sample is kept in (non-persistent)
    buffers, so repeated forwards between two resamples see the same noise.
    """

    scale: Tensor
    shift: Tensor

    def __init__(
        self,
        num_features: int,
        *,
        mean_bound: float = DEFAULTS["noise_mean"],
        std_bound: float = DEFAULTS["noise_std"],
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                f"num_features: expected a positive int (the channel count C), got "
                f"{num_features!r}."
            )
        for name, value in (("mean_bound", mean_bound), ("std_bound", std_bound)):
            _check_number(value, name, low=0.0, inclusive=True, example="0.5")
        self.num_features = num_features
        self.mean_bound = float(mean_bound)
        self.std_bound = float(std_bound)
        self.generator = generator
        self.register_buffer("scale", torch.ones(num_features), persistent=False)
        self.register_buffer("shift", torch.zeros(num_features), persistent=False)
        self.resample()

    def extra_repr(self) -> str:
        return f"{self.num_features}, mean_bound={self.mean_bound}, std_bound={self.std_bound}"

    def _draw(self) -> Tensor:
        """One per-channel sample: N(μ, σ²) with μ ~ U(-a, a), σ ~ U(0, b); on the CPU, so
        a seed gives the same noise on every device."""
        a, b = self.mean_bound, self.std_bound
        mu_sigma = torch.rand(2, generator=self.generator, dtype=torch.float64)
        mu, sigma = (2 * mu_sigma[0] - 1) * a, mu_sigma[1] * b
        z = torch.randn(self.num_features, generator=self.generator, dtype=torch.float64)
        return mu + sigma * z  # (C,)

    @torch.no_grad()
    def resample(self) -> None:
        """Draw a new scale and shift (call once per training step)."""
        shift = self._draw()
        scale = self._draw().exp()
        self.shift.copy_(shift)
        self.scale.copy_(scale)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        return apply_scale_shift(x, self.scale, self.shift)  # (N, C, ...) per channel


def noisy_bn_factory(
    generator: torch.Generator | None = None,
    *,
    mean_bound: float = DEFAULTS["noise_mean"],
    std_bound: float = DEFAULTS["noise_std"],
) -> NormFactory:
    """A LeNet norm factory: :class:`bnlab.nn.BatchNorm` followed by
    :class:`NonstationaryNoise`, one shared generator for all layers."""
    make_bn = norm_factory("bnlab")
    assert make_bn is not None

    def make(num_features: int, kind: LayerKind) -> nn.Module:
        noise = NonstationaryNoise(
            num_features, mean_bound=mean_bound, std_bound=std_bound, generator=generator
        )
        return nn.Sequential(make_bn(num_features, kind), noise)

    return make


def noise_modules(model: nn.Module) -> list[NonstationaryNoise]:
    return [m for m in model.modules() if isinstance(m, NonstationaryNoise)]


# ------------------------------------------------------------------------------ parameters


def _check_number(
    value: Any, name: str, *, low: float, inclusive: bool = False, example: str = "1.0"
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name}: expected a number such as {example}, got {value!r}.")
    ok = value >= low if inclusive else value > low
    if not (ok and math.isfinite(value)):
        bound = f">= {low}" if inclusive else f"> {low}"
        raise ValueError(f"{name}: expected a finite number {bound}, e.g. {example}; got {value}.")


def _check_int(value: Any, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}.")


def resolve_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` over :data:`DEFAULTS`, checked; unknown keys are kept (the caller may carry
    bookkeeping in them) and warned about, since a misspelt key would otherwise be ignored."""
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params: expected a dict such as {{'norm': 'bnlab', 'lr': 1.0}}, got "
            f"{type(params).__name__}."
        )
    p = {**DEFAULTS, **params}
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        warnings.warn(
            f"controversy: ignoring unknown parameter(s) {unknown}; known: {sorted(DEFAULTS)}.",
            RuntimeWarning,
            stacklevel=3,
        )
    if p["norm"] not in NORMS:
        raise ValueError(
            f"norm: expected one of {list(NORMS)}, got {p['norm']!r}. 'noisy' is BN followed by "
            "non-stationary noise."
        )
    _check_number(p["lr"], "lr", low=0.0)
    _check_int(p["epochs"], "epochs", 1)
    _check_int(p["batch_size"], "batch_size", 2)
    _check_int(p["measure_every"], "measure_every", 1)
    _check_int(p["seed"], "seed", 0)
    if p["subset"] is not None:
        _check_int(p["subset"], "subset", 2)
    for name in ("noise_mean", "noise_std"):
        _check_number(p[name], name, low=0.0, inclusive=True, example="0.5")
    steps = p["step_sizes"]
    if isinstance(steps, str | bytes) or not isinstance(steps, Sequence) or not steps:
        raise ValueError(
            f"step_sizes: expected a non-empty list of positive multiples of lr such as "
            f"[0.5, 1, 2, 4], got {steps!r}."
        )
    for s in steps:
        _check_number(s, "step_sizes[...]", low=0.0, example="0.5")
    p["step_sizes"] = [float(s) for s in steps]
    p["lr"] = float(p["lr"])
    return p


def build_model(params: Mapping[str, Any]) -> nn.Module:
    """The chapter's LeNet for ``params["norm"]``, Xavier-initialized from ``params["seed"]``
    (the global RNG is forked, so the caller's stream is untouched)."""
    p = resolve_params(params)
    if p["norm"] == "noisy":
        gen = torch.Generator().manual_seed(p["seed"] + NOISE_SEED_OFFSET)
        norm: Any = noisy_bn_factory(gen, mean_bound=p["noise_mean"], std_bound=p["noise_std"])
    else:
        norm = p["norm"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p["seed"])
        model = init_weights(lenet(norm))
    return model.to(p["device"])


def weight_layers(model: nn.Module) -> list[tuple[str, int]]:
    """``[(name, index), ...]`` of the conv/dense modules of a sequential model, in order;
    names such as ``conv0, conv1, dense2, dense3, out`` (the last one is the output layer)."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"model: expected an nn.Sequential (e.g. bnlab.models.lenet(...)), got "
            f"{type(model).__name__}; the probes order layers by their position."
        )
    found = [
        (i, "conv" if isinstance(m, nn.Conv2d) else "dense")
        for i, m in enumerate(model)
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    return [
        ("out" if j == len(found) - 1 else f"{kind}{j}", i) for j, (i, kind) in enumerate(found)
    ]


# ---------------------------------------------------------------------------------- probes


def _top_index(name: str) -> int:
    return int(name.split(".", 1)[0])


def _loss_and_grad(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    wrt: Sequence[str],
) -> tuple[float, dict[str, Tensor]]:
    """L_B at ``params`` and its gradient w.r.t. ``wrt``, on copies: fresh buffers per call, so
    BN running statistics (updated in place in training mode) land in throw-away tensors."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    leaves = {n: t.detach().requires_grad_(n in wrt) for n, t in params.items()}
    with torch.enable_grad():
        loss = loss_fn(functional_call(model, {**leaves, **buffers}, (x,)), y)
        grads = torch.autograd.grad(loss, [leaves[n] for n in wrt], allow_unused=True)
    out = {
        n: torch.zeros_like(leaves[n]) if gr is None else gr.detach()
        for n, gr in zip(wrt, grads, strict=True)
    }
    return float(loss.detach()), out


def _norm(tensors: Sequence[Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def _current(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


class _TrainMode:
    """``with _TrainMode(model):`` training mode inside, the previous mode restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was = model, model.training

    def __enter__(self) -> None:
        self.model.train()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was)


def full_gradient(
    model: nn.Module, x: Tensor, y: Tensor, *, loss_fn: LossFn = F.cross_entropy
) -> tuple[float, dict[str, Tensor]]:
    """(L_B(w), ∇L_B(w) for every parameter), training mode, the model left untouched."""
    with _TrainMode(model):
        params = _current(model)
        return _loss_and_grad(model, params, x, y, loss_fn, list(params))


def ics_probe(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    lr: float,
    loss_fn: LossFn = F.cross_entropy,
    grad: Mapping[str, Tensor] | None = None,
) -> dict[str, dict[str, float]]:
    """Internal covariate shift of each weight layer but the first (module docstring):
    ``{layer: {"l2": ||G - G'||, "cos": cos(G, G'), "g_norm": ||G||}}``.

    ``model`` is an ``nn.Sequential`` whose conv/dense modules hold a ``weight``; ``grad`` is
    ∇L_B(w) if already computed (:func:`full_gradient`). Nothing in the model changes.
    """
    _check_number(lr, "lr", low=0.0)
    layers = weight_layers(model)
    with _TrainMode(model):
        params = _current(model)
        if grad is None:
            _, grad = _loss_and_grad(model, params, x, y, loss_fn, list(params))
        result: dict[str, dict[str, float]] = {}
        for name, index in layers[1:]:
            key = f"{index}.weight"
            g_before = grad[key]
            # SGD step on the layers before i only; i and later keep their weights
            moved = {
                n: (t - lr * grad[n]) if _top_index(n) < index else t for n, t in params.items()
            }
            _, g_after_all = _loss_and_grad(model, moved, x, y, loss_fn, [key])
            g_after = g_after_all[key]
            gb, ga = g_before.double().flatten(), g_after.double().flatten()
            denom = float(gb.norm() * ga.norm())
            result[name] = {
                "l2": float((gb - ga).norm()),
                "cos": float(gb @ ga) / denom if denom > 0 else float("nan"),
                "g_norm": float(gb.norm()),
            }
    return result


def landscape_probe(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    lr: float,
    step_sizes: Sequence[float],
    loss_fn: LossFn = F.cross_entropy,
    loss_and_grad: tuple[float, Mapping[str, Tensor]] | None = None,
) -> dict[str, Any]:
    """Loss and gradient along the gradient direction (module docstring): ``loss``, ``grad_norm``,
    ``etas``, ``losses`` (L_B(w - η g) per η), ``loss_variation``, ``grad_predictiveness``,
    ``beta_smoothness``. ``loss_and_grad`` is :func:`full_gradient`'s result if already
    computed. Nothing in the model changes."""
    _check_number(lr, "lr", low=0.0)
    if not step_sizes:
        raise ValueError("step_sizes: expected at least one multiple of lr, got none.")
    with _TrainMode(model):
        params = _current(model)
        names = list(params)
        if loss_and_grad is None:
            loss_and_grad = _loss_and_grad(model, params, x, y, loss_fn, names)
        loss0, grad = loss_and_grad
        g_norm = _norm([grad[n] for n in names])
        etas = [lr * float(s) for s in step_sizes]
        losses: list[float] = []
        diffs: list[float] = []
        for eta in etas:
            moved = {n: t - eta * grad[n] for n, t in params.items()}
            loss_eta, grad_eta = _loss_and_grad(model, moved, x, y, loss_fn, names)
            losses.append(loss_eta)
            diffs.append(_norm([grad_eta[n] - grad[n] for n in names]))
    betas = [
        d / (eta * g_norm) if g_norm > 0 else float("nan")
        for d, eta in zip(diffs, etas, strict=True)
    ]
    return {
        "loss": loss0,
        "grad_norm": g_norm,
        "etas": etas,
        "losses": losses,
        "loss_variation": max(losses) - min(losses),
        "grad_predictiveness": max(diffs),
        "beta_smoothness": max(betas),
    }


# -------------------------------------------------------------------------------- training


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


def run_controversy(params: Mapping[str, Any], data: Any) -> dict[str, Any]:
    """Train one LeNet (``params["norm"]``) with plain SGD, probing ICS and the loss landscape
    every ``measure_every`` steps (module docstring). ``data``: a
    :class:`bnlab.data.FashionMNIST` or any object with uint8 ``train_images`` (N, H, W),
    ``train_labels`` (N,), ``test_images``, ``test_labels``.

    Returns a JSON-serializable dict (non-finite numbers become None):
        params: the resolved parameters; layers: the probed layer names;
        history: per epoch ``{epoch, train_loss, train_acc, test_acc, seconds}``;
        probes: columns ``step, epoch, loss, grad_norm, loss_variation, grad_predictiveness,
            beta_smoothness, losses_along`` (one entry per probe) and ``ics_l2``, ``ics_cos``,
            ``ics_g_norm`` (``{layer: [...]}``);
        final_test_acc, steps, train_examples, diverged, seconds, probe_seconds, torch, threads.
    """
    p = resolve_params(params)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        if not hasattr(data, name):
            raise TypeError(
                f"data: expected a bnlab.data.FashionMNIST (or an object with train_images, "
                f"train_labels, test_images, test_labels), got {type(data).__name__} without "
                f"{name!r}. Load it with bnlab.data.load_fashion_mnist()."
            )
    device = torch.device(p["device"])
    sub = slice(None) if p["subset"] is None else slice(0, p["subset"])
    x, y = to_device_tensors(data.train_images[sub], data.train_labels[sub], device)
    xt, yt = to_device_tensors(data.test_images, data.test_labels, device)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"data: expected at least 2 training images, got {n}.")
    lr, measure_every = p["lr"], p["measure_every"]
    model = build_model({k: p[k] for k in DEFAULTS})  # known keys only: warn once, above
    noise = noise_modules(model)
    layer_names = [name for name, _ in weight_layers(model)[1:]]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    shuffle = torch.Generator().manual_seed(p["seed"] + SHUFFLE_SEED_OFFSET)

    probes: dict[str, Any] = {k: [] for k in (*PROBE_KEYS, "losses_along")}
    for key in ("ics_l2", "ics_cos", "ics_g_norm"):
        probes[key] = {name: [] for name in layer_names}
    history: list[dict[str, Any]] = []
    step, probe_seconds, t_start = 0, 0.0, time.perf_counter()
    for epoch in range(1, p["epochs"] + 1):
        t_epoch = time.perf_counter()
        model.train()
        perm = torch.randperm(n, generator=shuffle).to(device)  # (n,)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for a, b in batch_bounds(n, p["batch_size"]):
            xb, yb = x[perm[a:b]], y[perm[a:b]]  # (B, 1, 28, 28), (B,)
            for m in noise:
                m.resample()  # a new noise distribution at every step
            if step % measure_every == 0:
                t_probe = time.perf_counter()
                loss_grad = full_gradient(model, xb, yb)
                land = landscape_probe(
                    model, xb, yb, lr=lr, step_sizes=p["step_sizes"], loss_and_grad=loss_grad
                )
                ics = ics_probe(model, xb, yb, lr=lr, grad=loss_grad[1])
                probes["step"].append(step)
                probes["epoch"].append(epoch)
                for key in PROBE_KEYS[2:]:
                    probes[key].append(land[key])
                probes["losses_along"].append(land["losses"])
                for name in layer_names:
                    probes["ics_l2"][name].append(ics[name]["l2"])
                    probes["ics_cos"][name].append(ics[name]["cos"])
                    probes["ics_g_norm"][name].append(ics[name]["g_norm"])
                probe_seconds += time.perf_counter() - t_probe
            opt.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            loss.backward()
            opt.step()
            loss_sum += loss.detach().double() * (b - a)
            correct += (logits.detach().argmax(dim=1) == yb).sum()
            seen += b - a
            step += 1
        with torch.no_grad():
            test_acc = evaluate(model, xt, yt)
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(loss_sum) / seen,
                "train_acc": int(correct) / seen,
                "test_acc": test_acc,
                "seconds": time.perf_counter() - t_epoch,
            }
        )
    final_loss = history[-1]["train_loss"]
    result = {
        "params": p,
        "layers": layer_names,
        "history": history,
        "probes": probes,
        "final_test_acc": history[-1]["test_acc"],
        "steps": step,
        "train_examples": n,
        "diverged": not math.isfinite(final_loss),
        "seconds": time.perf_counter() - t_start,
        "probe_seconds": probe_seconds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return dict(_jsonable(result))


# ------------------------------------------------------------------------- plot, summarize


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _group(results: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Results grouped by norm, plus every other parameter that differs between results
    (seeds are what a group averages over), in the order NORMS lists the norms."""
    if isinstance(results, Mapping) or not isinstance(results, Sequence):
        raise TypeError(
            f"results: expected a list of run_controversy results, got {type(results).__name__}."
        )
    for r in results:
        if not isinstance(r, Mapping) or "params" not in r or "probes" not in r:
            raise ValueError(
                "results: expected dicts returned by run_controversy (with 'params' and "
                f"'probes'), got {type(r).__name__} with keys "
                f"{sorted(r) if isinstance(r, Mapping) else '—'}."
            )
    varying = sorted(
        k
        for k in {k for r in results for k in r["params"]} - {"norm", "seed"}
        if len({repr(r["params"].get(k)) for r in results}) > 1
    )
    order = {norm: i for i, norm in enumerate(NORMS)}
    keyed: dict[tuple[int, str], list[Mapping[str, Any]]] = defaultdict(list)
    for r in results:
        norm = r["params"]["norm"]
        extra = ", ".join(f"{k}={r['params'].get(k)}" for k in varying)
        label = NORM_LABELS.get(norm, norm) + (f" ({extra})" if extra else "")
        keyed[(order.get(norm, len(order)), label)].append(r)
    return {label: keyed[(i, label)] for i, label in sorted(keyed)}


Getter = Callable[[Mapping[str, Any]], list[Any]]


def _column(key: str, layer: str | None = None) -> Getter:
    """Reads ``probes[key]`` (or ``probes[key][layer]``) of a result."""

    def get(result: Mapping[str, Any]) -> list[Any]:
        column = result["probes"][key]
        return list(column if layer is None else column.get(layer, []))

    return get


def _by_step(runs: Sequence[Mapping[str, Any]], get: Getter) -> tuple[list[int], list[list[Any]]]:
    """(steps, per-step lists of the values of every run that probed that step)."""
    table: dict[int, list[Any]] = defaultdict(list)
    for r in runs:
        for s, v in zip(r["probes"]["step"], get(r), strict=True):
            table[int(s)].append(v)
    steps = sorted(table)
    return steps, [table[s] for s in steps]


def _nanstats(values: list[float]) -> tuple[float, float, float]:
    """(mean, min, max) of the finite values; NaN if none."""
    ok = [v for v in values if math.isfinite(v)]
    if not ok:
        return float("nan"), float("nan"), float("nan")
    return statistics.fmean(ok), min(ok), max(ok)


def _plot_band(
    ax: Axes,
    runs: Sequence[Mapping[str, Any]],
    get: Getter,
    label: str,
    color: str,
) -> None:
    steps, values = _by_step(runs, get)
    stats = [_nanstats([_num(v) for v in per]) for per in values]
    ax.plot(steps, [s[0] for s in stats], color=color, label=f"{label} (n={len(runs)})")
    if len(runs) > 1:
        ax.fill_between(
            steps, [s[1] for s in stats], [s[2] for s in stats], color=color, alpha=0.2, lw=0
        )


def _color(runs: Sequence[Mapping[str, Any]], i: int) -> str:
    return NORM_COLORS.get(runs[0]["params"]["norm"], f"C{4 + i}")


def plot_controversy(
    results: Sequence[Mapping[str, Any]], out_dir: str | Path
) -> list[tuple[Path, str]]:
    """Four PNG figures in ``out_dir`` (created if needed): ICS per layer, loss landscape,
    gradient predictiveness, training curves. Lines are means over seeds; shaded: min–max over
    seeds (for the landscape, also the range of the loss along the gradient). Returns
    ``[(path, caption), ...]``."""
    groups = _group(results)
    if not groups:
        raise ValueError("results: expected at least one run_controversy result, got none.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[Path, str]] = []

    def save(fig: Figure, name: str, caption: str) -> None:
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        figures.append((path, caption))

    # (1) ICS per layer
    layers = list(dict.fromkeys(name for r in results for name in r["layers"]))
    fig = Figure(figsize=(3.4 * len(layers), 6.2))
    axes = fig.subplots(2, len(layers), squeeze=False)
    for j, layer in enumerate(layers):
        for i, (label, runs) in enumerate(groups.items()):
            have = [r for r in runs if layer in r["probes"]["ics_l2"]]
            if not have:
                continue
            for row, key in enumerate(("ics_l2", "ics_cos")):
                _plot_band(
                    axes[row][j],
                    have,
                    _column(key, layer),
                    label,
                    _color(runs, i),
                )
        axes[0][j].set_title(f"layer {layer}")
        axes[0][j].set_yscale("log")
        axes[0][j].set_ylabel("||G − G'||₂")
        axes[1][j].set_ylabel("cos(G, G')")
        axes[1][j].set_xlabel("training step")
    axes[0][0].legend(fontsize="small")
    fig.suptitle("Internal covariate shift (Santurkar et al. Def. 2.1): gradient change")
    save(
        fig,
        "controversy_ics.png",
        "Internal covariate shift per layer: ||G − G'||₂ (top, log scale) and cos(G, G') "
        "(bottom) between a layer's gradient before and after the layers below it take the "
        "SGD step; mean over seeds, shaded min–max over seeds. Higher ||G − G'|| and lower "
        "cosine mean more shift.",
    )

    # (2) loss landscape along the gradient
    fig = Figure(figsize=(11, 4.2))
    ax_band, ax_var = fig.subplots(1, 2)
    for i, (label, runs) in enumerate(groups.items()):
        color = _color(runs, i)
        steps, along = _by_step(runs, _column("losses_along"))
        lo = [statistics.fmean(min(_num(v) for v in a) for a in per) for per in along]
        hi = [statistics.fmean(max(_num(v) for v in a) for a in per) for per in along]
        ax_band.fill_between(steps, lo, hi, color=color, alpha=0.35, lw=0, label=label)
        _plot_band(ax_var, runs, _column("loss_variation"), label, color)
    ax_band.set(
        xlabel="training step",
        ylabel="loss",
        title="Loss along the gradient: L(w − ηg), η ∈ lr·step_sizes",
    )
    ax_var.set(
        xlabel="training step",
        ylabel="max − min of L(w − ηg)",
        title="Loss variation",
        yscale="log",
    )
    ax_band.legend(fontsize="small")
    ax_var.legend(fontsize="small")
    save(
        fig,
        "controversy_loss_landscape.png",
        "Loss landscape along the gradient (Santurkar et al. Fig. 4a): left, the band between "
        "the lowest and highest loss met along the gradient direction (mean over seeds); right, "
        "its width (lower = smoother), mean over seeds with the min–max over seeds shaded.",
    )

    # (3) gradient predictiveness
    fig = Figure(figsize=(11, 4.2))
    ax_pred, ax_beta = fig.subplots(1, 2)
    for i, (label, runs) in enumerate(groups.items()):
        color = _color(runs, i)
        _plot_band(ax_pred, runs, _column("grad_predictiveness"), label, color)
        _plot_band(ax_beta, runs, _column("beta_smoothness"), label, color)
    ax_pred.set(
        xlabel="training step",
        ylabel="max_η ||∇L(w − ηg) − ∇L(w)||₂",
        title="Gradient predictiveness (lower = more predictive)",
        yscale="log",
    )
    ax_beta.set(
        xlabel="training step",
        ylabel="max_η ||∇L(w − ηg) − ∇L(w)||₂ / ||ηg||₂",
        title="Effective β-smoothness",
        yscale="log",
    )
    ax_pred.legend(fontsize="small")
    ax_beta.legend(fontsize="small")
    save(
        fig,
        "controversy_gradient_predictiveness.png",
        "Gradient predictiveness (left) and effective β-smoothness (right) along the gradient "
        "direction (Santurkar et al. Fig. 4b, c); mean over seeds, shaded min–max over seeds.",
    )

    # (4) training curves
    fig = Figure(figsize=(11, 4.2))
    ax_acc, ax_loss = fig.subplots(1, 2)
    for i, (label, runs) in enumerate(groups.items()):
        color = _color(runs, i)
        epochs = sorted({h["epoch"] for r in runs for h in r["history"]})
        for ax, key in ((ax_acc, "test_acc"), (ax_loss, "train_loss")):
            per = [
                _nanstats([_num(h[key]) for r in runs for h in r["history"] if h["epoch"] == e])
                for e in epochs
            ]
            ax.plot(
                epochs, [s[0] for s in per], "o-", color=color, label=f"{label} (n={len(runs)})"
            )
            if len(runs) > 1:
                ax.fill_between(
                    epochs, [s[1] for s in per], [s[2] for s in per], color=color, alpha=0.2, lw=0
                )
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy")
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss (epoch mean)")
    ax_acc.legend(fontsize="small")
    ax_loss.legend(fontsize="small")
    save(
        fig,
        "controversy_training.png",
        "Training curves of BN, noisy BN (non-stationary noise after every BN) and no norm: "
        "test accuracy and mean training loss per epoch; mean over seeds, shaded min–max.",
    )
    return figures


def _mean_std(values: list[float], digits: int = 3) -> str:
    ok = [v for v in values if math.isfinite(v)]
    if not ok:
        return "—"
    if len(ok) == 1:
        return f"{ok[0]:.{digits}f} (n=1)"
    return f"{statistics.fmean(ok):.{digits}f} ± {statistics.stdev(ok):.{digits}f} (n={len(ok)})"


def _pooled(runs: Sequence[Mapping[str, Any]], get: Getter) -> list[float]:
    return [v for r in runs for v in map(_num, get(r)) if math.isfinite(v)]


def _stat(values: list[float], how: Callable[[list[float]], float]) -> float:
    return how(values) if values else float("nan")


def _relative_ics(runs: Sequence[Mapping[str, Any]], layers: list[str]) -> list[float]:
    """||G - G'|| / ||G|| of every probe and layer: ICS free of the gradient's scale, which
    differs by orders of magnitude between a BN and a plain sigmoid network."""
    out = []
    for r in runs:
        for layer in layers:
            l2 = map(_num, _column("ics_l2", layer)(r))
            norms = map(_num, _column("ics_g_norm", layer)(r))
            out += [d / g for d, g in zip(l2, norms, strict=True) if g > 0 and math.isfinite(d / g)]
    return out


def _off_plateau(runs: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """The values of probe column ``key`` at probes whose batch loss was below the plateau
    level (:data:`PLATEAU_LOSS`), i.e. while the network was learning."""
    out = []
    for r in runs:
        for loss, v in zip(r["probes"]["loss"], r["probes"][key], strict=True):
            if _num(loss) < PLATEAU_LOSS and math.isfinite(_num(v)):
                out.append(_num(v))
    return out


LANDSCAPE = (
    ("loss_var", "loss_variation"),
    ("pred", "grad_predictiveness"),
    ("beta", "beta_smoothness"),
)


def _group_stats(runs: Sequence[Mapping[str, Any]], layers: list[str]) -> dict[str, Any]:
    ics = {
        layer: _stat(_pooled(runs, _column("ics_l2", layer)), statistics.fmean) for layer in layers
    }
    cos_all = [v for layer in layers for v in _pooled(runs, _column("ics_cos", layer))]
    stats: dict[str, Any] = {
        "acc": [_num(r["final_test_acc"]) for r in runs],
        "ics": ics,
        "ics_mean": _stat([v for v in ics.values() if math.isfinite(v)], statistics.fmean),
        "cos": _stat(cos_all, statistics.fmean),
        "rel": _stat(_relative_ics(runs, layers), statistics.fmean),
        "probes": sum(len(r["probes"]["loss"]) for r in runs),
        "learning": len(_off_plateau(runs, "loss")),
    }
    for short, key in LANDSCAPE:
        stats[short] = _stat(_pooled(runs, _column(key)), statistics.median)
        stats[short + "_off"] = _stat(_off_plateau(runs, key), statistics.median)
    return stats


def _g(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{v:.3g}"


def summarize_controversy(
    results: Sequence[Mapping[str, Any]],
) -> tuple[list[str], list[list[str]], str]:
    """(headers, one row per norm, one-sentence verdict computed from the numbers).

    Columns: final test accuracy (mean ± std over seeds, n); mean ||G − G'|| per layer; mean
    cos(G, G') and mean ||G − G'|| / ||G|| over layers and probes; the medians of loss
    variation, gradient predictiveness and effective β-smoothness over all probes and over the
    probes "off the plateau" (batch loss below 0.9 · ln 10, where the network was learning).

    The verdict compares BN with no norm off the plateau when both have such probes: a network
    still on its initial plateau is flat along the gradient because it is not learning, which
    says nothing about the landscape it trains on.
    """
    groups = _group(results)
    if not groups:
        raise ValueError("results: expected at least one run_controversy result, got none.")
    layers = list(dict.fromkeys(name for r in results for name in r["layers"]))
    off = "all / off plateau"
    headers = [
        "norm",
        "final test acc",
        f"ICS ||G−G'|| ({' / '.join(layers)})",
        "ICS cos(G, G')",
        "ICS ||G−G'||/||G||",
        f"median loss variation ({off})",
        f"median grad. predictiveness ({off})",
        f"median β-smoothness ({off})",
        "probes off plateau",
    ]
    stats = {label: _group_stats(runs, layers) for label, runs in groups.items()}
    rows = [
        [
            label,
            _mean_std(s["acc"]),
            " / ".join(_g(s["ics"][layer]) for layer in layers),
            _g(s["cos"]),
            _g(s["rel"]),
            *[f"{_g(s[short])} / {_g(s[short + '_off'])}" for short, _ in LANDSCAPE],
            f"{s['learning']} of {s['probes']}",
        ]
        for label, s in stats.items()
    ]
    per_norm: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for runs in groups.values():
        per_norm[runs[0]["params"]["norm"]].extend(runs)
    by_norm = {norm: _group_stats(runs, layers) for norm, runs in per_norm.items()}
    return headers, rows, _verdict(by_norm, len(groups) > len(by_norm))


def _compare(what: str, a: float, b: float) -> str | None:
    """'its <what> was N× smaller (a vs b)': BN's value a against no norm's b."""
    if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
        return None
    ratio = b / a
    if 1 / SAME_RATIO < ratio < SAME_RATIO:
        how = "about the same"
    else:
        how = f"{ratio:.1f}× smaller" if ratio > 1 else f"{1 / ratio:.1f}× larger"
    return f"its {what} was {how} ({_g(a)} vs {_g(b)})"


def _verdict(by_norm: Mapping[str, Mapping[str, Any]], mixed: bool) -> str:
    def acc(norm: str) -> str:
        ok = [v for v in by_norm[norm]["acc"] if math.isfinite(v)]
        return f"{statistics.fmean(ok):.3f}" if ok else "diverged"

    parts: list[str] = []
    present = [n for n in ("noisy", "bnlab", "none") if n in by_norm]
    if present:
        parts.append(
            "final test accuracy " + " vs ".join(f"{acc(n)} ({NORM_LABELS[n]})" for n in present)
        )
    bn, none = by_norm.get("bnlab"), by_norm.get("none")
    if bn is not None and none is not None:
        l2_less = bn["ics_mean"] < none["ics_mean"]
        cos_more = bn["cos"] > none["cos"]
        if l2_less and cos_more:
            word = "reduced"
        elif not l2_less and not cos_more:
            word = "did not reduce"
        else:
            word = "gave mixed evidence on"
        parts.append(
            f"BN {word} internal covariate shift (mean ||G−G'|| {_g(bn['ics_mean'])} vs "
            f"{_g(none['ics_mean'])} without norm, mean cos(G, G') {bn['cos']:.3f} vs "
            f"{none['cos']:.3f})"
        )
        learning = bn["learning"] > 0 and none["learning"] > 0
        suffix = "_off" if learning else ""

        def pair(short: str) -> tuple[float, float]:
            return bn[short + suffix], none[short + suffix]

        where = (
            f"while learning (batch loss < {PLATEAU_LOSS:.2f}; {bn['learning']} and "
            f"{none['learning']} probes)"
            if learning
            else "over all probes"
        )
        compared = (
            _compare(f"median loss variation along the gradient {where}", *pair("loss_var")),
            _compare("median gradient change along the gradient", *pair("pred")),
        )
        parts += [c for c in compared if c is not None]
        if none["learning"] == 0:
            parts.append(
                f"but the network without norm never left its initial plateau (batch loss >= "
                f"{PLATEAU_LOSS:.2f} at all {none['probes']} probes), so its flat landscape goes "
                "with not learning"
            )
    if not parts:
        return "No comparable results."
    sentence = "; ".join(parts)
    if mixed:
        sentence += " (pooled over differing settings; see the table)"
    return sentence[0].upper() + sentence[1:] + "."


__all__ = [
    "DEFAULTS",
    "NORMS",
    "NonstationaryNoise",
    "build_model",
    "full_gradient",
    "ics_probe",
    "landscape_probe",
    "noise_modules",
    "noisy_bn_factory",
    "plot_controversy",
    "resolve_params",
    "run_controversy",
    "summarize_controversy",
    "weight_layers",
]
