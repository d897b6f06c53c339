"""A model as a pure function of its parameters and buffers, for ``torch.func``.

``torch.func.functional_call`` runs a module with tensors passed in, but a batch norm in
training mode writes its new running statistics into the buffers it was given, so the call is
not pure and the new statistics are lost to the caller. :func:`stateless` returns

    f(params, buffers, *args, **kwargs) -> (output, new_buffers)

where ``new_buffers`` holds every buffer as the model would hold it after ``model(*args,
**kwargs)``, and nothing passed in is changed. Because bnlab's ``batch_norm`` computes the new
statistics as values (no host round trip, no in-place update of an input), ``f`` composes with
``vmap``, ``grad``, ``jacrev`` and ``jvp``: an ensemble of K models, each with its own running
statistics, trains in one ``vmap`` over ``torch.func.stack_module_state(models)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

StatelessFn = Callable[..., tuple[Any, dict[str, Tensor]]]


def stateless(model: nn.Module) -> StatelessFn:
    """``f(params, buffers, *args, **kwargs) -> (output, new_buffers)`` for ``model``.

    ``params`` and ``buffers`` are dicts keyed as ``model.named_parameters()`` and
    ``model.named_buffers()`` (what ``dict(model.named_parameters())`` and
    ``torch.func.stack_module_state`` give); every key must be present. ``new_buffers`` has the
    same keys, with the values the model's buffers would have after the call (new running
    statistics and batch counts in training mode; the same values in eval mode). The model's
    own tensors are untouched; it is only the template whose ``forward`` and mode are used, so
    call ``model.train()`` or ``model.eval()`` before calling ``f``.

    Batch norms: bnlab's (:class:`bnlab.nn.BatchNorm` and its relatives) work in every mode and
    under every ``torch.func`` transform, ``momentum=None`` included. torch's
    ``BatchNorm1d/2d/3d`` work with a float momentum; with ``momentum=None`` PyTorch reads the
    batch count back as a Python float, which no transform can trace, so they are refused:
    ``bnlab.tools.convert_norm(model, "bnlab")`` converts them with the same values.

    Under ``vmap`` pass the buffers batched like the parameters (``in_dims=(0, 0, None)``):
    each model's new statistics are written into its own slice.

    Raises:
        TypeError: ``model`` is not a module.
        ValueError: a layer is lazy, or a torch BN has ``momentum=None`` (at construction);
            a key is missing from or unknown to ``params``/``buffers`` (at the call).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model: expected a torch.nn.Module, got {type(model).__name__}. Pass the network "
            "itself (e.g. bnlab.models.lenet()), not its state_dict."
        )
    for name, module in model.named_modules():
        where = name or "model"
        if any(
            is_lazy(t) for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
        ):
            raise ValueError(
                f"{where} ({type(module).__name__}) still has uninitialized (lazy) parameters, "
                "so the keys of params and buffers are not known yet. Run one forward pass with "
                "a sample input first, e.g. model(torch.zeros(2, 1, 28, 28))."
            )
        if (
            isinstance(module, _BatchNorm)
            and module.track_running_stats
            and module.momentum is None
        ):
            raise ValueError(
                f"{where} ({type(module).__name__}) has momentum=None: torch's batch norm then "
                "reads its batch count as a Python number, which torch.func transforms and "
                "compilers cannot trace. Convert it to bnlab's BatchNorm, which keeps the count "
                "as a tensor and gives the same values: "
                'model = bnlab.tools.convert_norm(model, "bnlab").'
            )
    param_keys = frozenset(name for name, _ in model.named_parameters())
    buffer_keys = frozenset(name for name, _ in model.named_buffers())

    def f(
        params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], *args: Any, **kwargs: Any
    ) -> tuple[Any, dict[str, Tensor]]:
        _check_keys(params, param_keys, "params", "named_parameters")
        _check_keys(buffers, buffer_keys, "buffers", "named_buffers")
        # the model writes its new buffers in place: into copies, so the caller's stay as they
        # were and the copies come back as the new state
        new_buffers = {name: t.clone() for name, t in buffers.items()}
        output = torch.func.functional_call(
            model, ({**params}, new_buffers), args, kwargs, strict=True
        )
        return output, new_buffers

    return f


def _check_keys(given: object, expected: frozenset[str], name: str, method: str) -> None:
    if not isinstance(given, Mapping):
        raise TypeError(
            f"{name}: expected a dict of tensors keyed as model.{method}(), got "
            f"{type(given).__name__}. Use dict(model.{method}()) or "
            "torch.func.stack_module_state(models)."
        )
    keys = set(given)
    if keys == expected:
        return
    missing, unknown = sorted(expected - keys), sorted(keys - expected)
    raise ValueError(
        f"{name}: expected the keys of model.{method}(); "
        + (f"missing {missing}" if missing else "")
        + ("; " if missing and unknown else "")
        + (f"unknown {unknown}" if unknown else "")
        + f". Build it with dict(model.{method}()) from the same architecture."
    )


__all__ = ["StatelessFn", "stateless"]
