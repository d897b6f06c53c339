"""Input checks shared by every public function: each error says what was expected, what came,
and how to fix it. They run before any state is touched, so a bad call changes nothing."""

from __future__ import annotations

from torch import Tensor


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
        raise ValueError(
            f"{name}: expected shape ({num_channels},) to match the input's {num_channels} "
            f"channels (axis 1), got {tuple(t.shape)}. Build the layer with "
            f"num_features={num_channels}, or pass an input with {t.numel()} channels."
        )


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


def check_enough_values(x: Tensor, count: int, reduced: str) -> None:
    if count <= 1:
        raise ValueError(
            f"expected more than 1 value per channel to compute batch statistics, got input "
            f"shape {tuple(x.shape)} ({count} value per channel over {reduced}). With one value "
            "the normalized output is always 0 and nothing can be learned. Use a batch of at "
            "least 2, or call .eval() to normalize with the running statistics."
        )


def check_dtype_device(x: Tensor, t: Tensor | None, name: str) -> None:
    if t is not None and t.device != x.device:
        raise ValueError(
            f"{name}: expected it on the input's device {x.device}, got {t.device}. "
            f"Move the module or tensor with .to({str(x.device)!r})."
        )


__all__ = [
    "check_dtype_device",
    "check_enough_values",
    "check_eps",
    "check_float",
    "check_input",
    "check_momentum",
    "check_per_channel",
]
