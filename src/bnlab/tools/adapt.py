"""Adapting batch norm to shifted inputs at test time, without labels.

After deployment the inputs move (noise, contrast, another camera) and the running statistics
the network learned no longer describe what its BNs see. Two cheap remedies:

Prior-weighted BN adaptation (Schneider et al., "Improving robustness against common
corruptions by covariate shift adaptation", NeurIPS 2020): each BN's statistics become a mixture
of the source statistics (μ_s, σ²_s: the running statistics) and the target's population
statistics (μ_t, σ²_t) over n unlabelled target examples, the source counting as N examples:

    μ = (N·μ_s + n·μ_t) / (N + n),      σ² = (N·σ²_s + n·σ²_t) / (N + n)

N = 0 gives the target's statistics (precise BN on the target), N = ∞ keeps the source's.

TENT (Wang et al., "Tent: Fully test-time adaptation by entropy minimization", ICLR 2021):
the BNs normalize with each test batch's own statistics, and only their γ and β are trained,
to minimize the entropy H(p) = −Σ_k p_k log p_k of the predictions p = softmax(model(x)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.tools.common import (
    ModuleT,
    bn_axis,
    bn_call_input,
    bn_state,
    check_module,
    find_batch_norms,
    has_running_stats,
    working_copy,
)
from bnlab.tools.precise import (
    PopulationStatistics,
    _batch_input,
    _check_args,
    _precise,
    _unbiased,
)

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
DEFAULT_TENT_LR = 1e-3  # with Adam, TENT's setting for CIFAR-10/100-C


def adapt_bn(
    model: ModuleT,
    batches: Iterable[Any],
    *,
    prior: float,
    num_batches: int | None = None,
) -> ModuleT:
    """Mix every BN's running statistics with the target's (module docstring, Schneider et
    al. 2020): ``μ = (N·μ_s + n·μ_t)/(N + n)``, ``σ² = (N·σ²_s + n·σ²_t)/(N + n)``.

    The target statistics are :func:`bnlab.tools.precise_bn`'s, computed the same way (exact
    for any batching, BN by BN in the order forward() calls them, so each BN sees the upstream
    BNs already adapted, with the same count-weighted estimator). Acts in place, like
    precise_bn, and returns ``model``; if a batch raises, every running statistic is restored.
    ``num_batches_tracked`` is left as it was (adaptation is not training).

    Args:
        model: BNs as for precise_bn (bnlab's and torch's BNs with running statistics); put the
            rest of the model in the mode you want first (``model.eval()``).
        batches: the unlabelled target data: tensors or ``(x, ...)`` tuples, on the model's
            device (a DataLoader works; a one-shot iterable is kept in memory).
        prior: N, the weight of the source statistics, in examples: 0 takes the target's
            statistics, ``float("inf")`` leaves the model as it was. n is the number of target
            examples each BN saw (its values per channel divided by those of one example, e.g.
            B·H·W / (H·W) = B for a convolution's output over B images).
        num_batches: use at most that many batches (default: all).

    Raises:
        TypeError, ValueError: as precise_bn for the model and batches; ``prior`` is not a
            number >= 0.
    """
    if isinstance(prior, bool) or not isinstance(prior, int | float) or not prior >= 0:
        raise ValueError(
            "prior: expected the weight of the source statistics as a number of examples "
            f">= 0 (0: the target's statistics, float(\"inf\"): the source's), got {prior!r}."
        )
    check_module(model)
    if math.isinf(prior):
        _check_args(batches, num_batches, "eval")
        return model  # the mixture is the source statistics: nothing to measure
    per_example: dict[int, int] = {}  # values per channel in one example, per BN

    def measure_example_size(bn: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x, _ = bn_call_input(args, kwargs)
        axis = bn_axis(bn) % x.ndim
        if x.shape[0] > 0:
            per_example[id(bn)] = x.numel() // (x.shape[0] * x.shape[axis])

    def mix(bn: nn.Module, target: PopulationStatistics, _batches_fed: int) -> None:
        state = bn_state(bn)
        assert state.running_mean is not None and state.running_var is not None  # filtered
        n = target.count / per_example[id(bn)]
        w = n / (prior + n)  # weight of the target; 1 when prior = 0
        for running, value in (
            (state.running_mean, target.mean),
            (state.running_var, target.variance(unbiased=_unbiased(bn))),
        ):
            mixed = torch.lerp(running.to(value.dtype), value, w)  # (1 − w)·source + w·target
            running.copy_(mixed.to(running.dtype))

    hooks = [
        bn.register_forward_pre_hook(measure_example_size, with_kwargs=True)
        for _, bn in find_batch_norms(model)
        if has_running_stats(bn)
    ]
    try:
        return _precise(
            model,
            batches,
            num_batches=num_batches,
            mode="eval",
            process_group=None,
            store=mix,
            caller="adapt_bn",
        )
    finally:
        for hook in hooks:
            hook.remove()


def _entropy(logits: Tensor) -> Tensor:
    """The mean over the batch of the predictions' entropy, −Σ_k p_k log p_k, p = softmax."""
    return torch.distributions.Categorical(logits=logits).entropy().mean()


def tent(
    model: ModuleT,
    batches: Iterable[Any],
    *,
    steps: int = 1,
    lr: float | None = None,
    optimizer: OptimizerFactory | None = None,
    inplace: bool = False,
) -> ModuleT:
    """TENT (module docstring; Wang et al. 2021): for each batch, ``steps`` optimizer steps on
    the BNs' γ and β that lower the entropy of ``model(x)``'s predictions; everything else is
    frozen. Returns the adapted model.

    In the adapted model every BN normalizes with the statistics of the batch it is given, in
    training and in evaluation mode alike (its running statistics are removed,
    ``track_running_stats=False``, as in the paper's code), so predict with batches of the
    target. The model's mode is not changed (``model.eval()`` first keeps dropout off) and the
    ``requires_grad`` flags come back as they were.

    Args:
        model: a classifier returning logits (N, K), with bnlab or torch BNs that have γ or β.
        batches: unlabelled target batches: tensors or ``(x, ...)`` tuples, on the model's
            device. Adaptation is online: each batch is used in turn, once.
        steps: optimizer steps per batch (the paper: 1).
        lr: the learning rate of the default optimizer, Adam (default 1e-3, the paper's
            setting for CIFAR); leave it out when passing ``optimizer``.
        optimizer: a factory ``params -> torch.optim.Optimizer`` for other settings, e.g.
            ``lambda p: torch.optim.SGD(p, lr=2.5e-4, momentum=0.9)`` (the paper's ImageNet).
        inplace: False (default) adapts a deep copy and leaves ``model`` as it was, like the
            other transforms of bnlab.tools; True changes ``model``, which comes back as it
            was (values, statistics, flags) if a batch raises.

    Raises:
        TypeError: ``model`` is not a module; ``batches`` is not an iterable of batches;
            ``optimizer`` is not callable or returns no optimizer; the model's output is not a
            (N, K) tensor.
        ValueError: ``steps`` or ``lr`` is not positive, both ``lr`` and ``optimizer`` given,
            the model has no BN with γ or β.
    """
    check_module(model)
    _check_args(batches, None, "eval")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int (the paper uses 1), got {steps!r}.")
    if lr is not None and optimizer is not None:
        raise ValueError(
            "lr and optimizer: expected one of them, got both. The learning rate goes into the "
            "optimizer factory, e.g. optimizer=lambda p: torch.optim.SGD(p, lr=2.5e-4)."
        )
    if lr is not None and (
        isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < math.inf
    ):
        raise ValueError(f"lr: expected a positive learning rate, got {lr!r}.")
    if optimizer is not None and not callable(optimizer):
        raise TypeError(
            f"optimizer: expected a factory params -> torch.optim.Optimizer, e.g. "
            f"lambda p: torch.optim.SGD(p, lr=2.5e-4, momentum=0.9), got "
            f"{type(optimizer).__name__}."
        )
    bns = [
        bn
        for _, bn in find_batch_norms(model)
        if any(isinstance(getattr(bn, name, None), nn.Parameter) for name in ("weight", "bias"))
    ]
    if not bns:
        raise ValueError(
            "model: expected batch norms with a trainable γ or β (bnlab's or torch's BN with "
            "affine=True), found none; TENT trains only those. A FrozenBatchNorm becomes "
            "trainable again with bnlab.tools.unfreeze_bn."
        )
    adapted = working_copy(model, inplace)
    bns = [
        bn
        for _, bn in find_batch_norms(adapted)
        if any(isinstance(getattr(bn, name, None), nn.Parameter) for name in ("weight", "bias"))
    ]
    params = [
        p
        for bn in bns
        for p in (getattr(bn, "weight", None), getattr(bn, "bias", None))
        if isinstance(p, nn.Parameter)
    ]
    flags = [(p, p.requires_grad) for p in adapted.parameters()]
    undo = _BatchStatistics(bns, params)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        undo.switch()
        opt = _make_optimizer(params, lr, optimizer)
        for index, batch in enumerate(batches):
            x = _batch_input(batch, index)
            for _ in range(steps):
                loss = _entropy(_logits(adapted(x)))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for p in params:
            p.grad = None
    except BaseException:
        if inplace:
            undo.restore()
        raise
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return adapted


class _BatchStatistics:
    """Makes BNs normalize with batch statistics in every mode; can put everything back."""

    _BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, bns: list[nn.Module], params: list[nn.Parameter]) -> None:
        self.bns = bns
        self.values = [p.detach().clone() for p in params]
        self.params = params
        self.saved = [
            (
                bool(getattr(bn, "track_running_stats", False)),
                bool(getattr(bn, "use_global_stats", False)),
                {name: getattr(bn, name, None) for name in self._BUFFERS},
            )
            for bn in bns
        ]

    def switch(self) -> None:
        for bn in self.bns:
            self._configure(bn, False, False, dict.fromkeys(self._BUFFERS))

    def restore(self) -> None:
        with torch.no_grad():
            for p, value in zip(self.params, self.values, strict=True):
                p.copy_(value)
                p.grad = None
        for bn, (track, use_global, buffers) in zip(self.bns, self.saved, strict=True):
            self._configure(bn, track, use_global, buffers)

    @staticmethod
    def _configure(
        bn: nn.Module, track: bool, use_global: bool, buffers: dict[str, Tensor | None]
    ) -> None:
        layer: Any = bn  # torch's and bnlab's BNs have these attributes; nn.Module declares none
        layer.track_running_stats = track
        if hasattr(layer, "use_global_stats"):
            layer.use_global_stats = use_global
        for name, value in buffers.items():
            if name in layer._buffers:
                setattr(layer, name, value)


def _make_optimizer(
    params: list[nn.Parameter], lr: float | None, factory: OptimizerFactory | None
) -> torch.optim.Optimizer:
    if factory is None:
        return torch.optim.Adam(params, lr=DEFAULT_TENT_LR if lr is None else lr)
    opt = factory(params)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer: the factory returned {type(opt).__name__}, expected a "
            "torch.optim.Optimizer over the parameters it was given."
        )
    return opt


def _logits(output: Any) -> Tensor:
    if not isinstance(output, Tensor) or output.ndim != 2:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise TypeError(
            f"model: expected it to return logits of shape (N, K) for TENT's entropy, got "
            f"{shape}. Wrap the model so that it returns the class scores."
        )
    return output


__all__ = ["adapt_bn", "tent"]
