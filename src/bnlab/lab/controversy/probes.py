"""The probes: internal covariate shift (:func:`ics_probe`) and the loss landscape along the
gradient (:func:`landscape_probe`), on one batch at the current weights (definitions in
:mod:`bnlab.lab.controversy`). They run in training mode through
``torch.func.functional_call`` on copies of the parameters and buffers: the model, its BN
running statistics, its ``.grad`` fields and every random generator are left as they were."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bnlab.lab.controversy.config import _check_number

LossFn = Callable[[Tensor, Tensor], Tensor]


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


__all__ = ["LossFn", "full_gradient", "ics_probe", "landscape_probe", "weight_layers"]
