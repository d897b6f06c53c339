"""Input checks shared by every public function: each error says what was expected, what came,
and how to fix it. They run before any state is touched, so a bad call changes nothing."""

from __future__ import annotations

from torch import Tensor


class MismatchError(ValueError, RuntimeError):
    """An input that does not fit the others: a wrong channel count, per-channel shape or device.

    A ``ValueError``, as every bnlab input error, and a ``RuntimeError``, as PyTorch raises for
    the same mistakes, so code written for either catches it.
    """


def check_float(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{name}: expected a torch.Tensor, got {type(x).__name__}. "
            f"Convert it first, e.g. torch.as_tensor({name}, dtype=torch.float32)."
        )
    if not x.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {x.dtype}. Convert it first, e.g. {name}.float()"
            + (" (complex inputs have no ordering-free variance here)." if x.is_complex() else ".")
        )


def check_input(x: Tensor, *, min_ndim: int = 2, name: str = "x") -> None:
    check_float(x, name)
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name}: expected a tensor of rank >= {min_ndim} with channels on axis 1, "
            f"e.g. (N, C) or (N, C, H, W); got shape {tuple(x.shape)}. "
            f"Add a batch axis with {name}.unsqueeze(0) or reshape to (N, C, ...)."
        )


def check_per_channel(t: Tensor | None, name: str, num_channels: int) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(
            f"{name}: expected a torch.Tensor of shape ({num_channels},), got {type(t).__name__}."
        )
    if tuple(t.shape) != (num_channels,):
        raise MismatchError(
            f"{name}: expected shape ({num_channels},) to match the input's {num_channels} "
            f"channels (axis 1), got {tuple(t.shape)}. Pass a {name} with {num_channels} values, "
            f"e.g. {_FRESH.get(name, 'torch.ones')}({num_channels})."
        )


# what a fresh per-channel tensor of each name holds, for the error messages
_FRESH = {"bias": "torch.zeros", "running_mean": "torch.zeros", "beta": "torch.zeros"}


def check_momentum(momentum: float | None) -> None:
    if momentum is None:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, int | float):
        raise TypeError(f"momentum: expected a float in [0, 1] or None, got {momentum!r}.")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(
            f"momentum: expected a value in [0, 1], got {momentum}. PyTorch's convention "
            "weights the new batch (0.1); decay-style conventions (MXNet 0.9, Keras/Flax 0.99) "
            "are chosen with convention='mxnet'/'keras'/'flax'; None means a cumulative average."
        )


def check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, int | float):
        raise TypeError(f"eps: expected a positive float such as 1e-5, got {eps!r}.")
    if not eps > 0:
        raise ValueError(
            f"eps: expected a positive float (it keeps 1/sqrt(var + eps) finite), got {eps}. "
            "Use e.g. eps=1e-5."
        )


def check_batch_norm_eps(eps: float, *, batch_statistics: bool) -> None:
    """eps as ``torch.nn.functional.batch_norm`` takes it: > 0 where batch statistics are used
    (a constant channel has variance 0), >= 0 with running statistics."""
    if isinstance(eps, bool) or not isinstance(eps, int | float):
        raise TypeError(f"eps: expected a positive float such as 1e-5, got {eps!r}.")
    if batch_statistics and not eps > 0:
        raise ValueError(
            f"batch_norm eps must be positive when normalizing with batch statistics (a "
            f"constant channel has variance 0 and 1/sqrt(0 + eps) must stay finite), got {eps}. "
            "Use e.g. eps=1e-5."
        )
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, got {eps}. Use e.g. eps=1e-5.")


def check_enough_values(x: Tensor, count: int, reduced: str, *, running_stats: bool = True) -> None:
    """More than one value per channel, or batch statistics are meaningless. ``running_stats``
    says whether normalizing with running statistics instead is possible (the advice)."""
    if count > 1:
        return
    shape = tuple(x.shape)
    if count == 0:
        raise ValueError(
            f"expected more than 1 value per channel to compute batch statistics, got an empty "
            f"input of shape {shape} (no values per channel over {reduced}). Leave empty "
            "batches out before this layer."
        )
    fix = (
        "Use a batch of at least 2, or normalize with the running statistics instead "
        "(training=False; for a layer, .eval())."
        if running_stats
        else "Use a batch of at least 2: there are no running statistics to normalize with "
        "instead (track_running_stats=False)."
    )
    raise ValueError(
        f"expected more than 1 value per channel to compute batch statistics, got input "
        f"shape {shape} (1 value per channel over {reduced}). A single value is its own mean, "
        f"so it always normalizes to 0 and nothing can be learned. {fix}"
    )


def check_dtype_device(x: Tensor, t: Tensor | None, name: str) -> None:
    if t is not None and t.device != x.device:
        raise MismatchError(
            f"{name}: expected it on the input's device {x.device}, got {t.device}. "
            f"Move the module or tensor with .to({str(x.device)!r})."
        )


__all__ = [
    "MismatchError",
    "check_batch_norm_eps",
    "check_dtype_device",
    "check_enough_values",
    "check_eps",
    "check_float",
    "check_input",
    "check_momentum",
    "check_per_channel",
]
