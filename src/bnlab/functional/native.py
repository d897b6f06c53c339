"""``impl="native"``: the fast kernel's math as fused C++ loops for CPU tensors.

On small tensors an eager PyTorch operation costs more in dispatch than in arithmetic, and the
analytic kernel of :mod:`bnlab.functional.fast` needs a dozen of them per pass; here forward,
backward and eval are one call each (csrc/batch_norm.cpp, with the derivation). The autograd
function lives in C++ too, so a training step pays no Python in the backward pass.

The extension is compiled on first use with the machine's C++ compiler
(``torch.utils.cpp_extension``, about a minute on a 2-core machine) and cached on disk under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), keyed by the source, the
compiler flags, torch's version and the CPU: later processes load it in well under a second.
Call :func:`build_native` ahead of time (``bnlab bench`` does) to keep that minute out of a run.

Where the C++ kernel does not apply it uses the eager ``fast`` kernel instead: CUDA tensors,
code being traced by ``torch.compile``, torch.func transforms and forward-mode AD.

Outputs of 1 MiB or more (y, and ∂x in the backward) take their memory from a cache of freed
blocks, as PyTorch's CUDA allocator does: glibc returns large blocks to the OS on free, and
faulting a fresh 51 MB output back in costs more than the kernel itself. The cache keeps at
most ``BNLAB_NATIVE_CACHE_MB`` MiB of freed memory (default 512; 0 turns it off); see
:func:`output_cache_info`, :func:`set_output_cache_limit` and :func:`empty_output_cache`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import time
from functools import cache
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from bnlab.functional.batch_norm import (
    register_eval_kernel,
    register_train_kernel,
    register_updating_kernel,
)
from bnlab.functional.fast import fallback_needed, fast_train

SOURCE: Path = Path(__file__).with_name("csrc") / "batch_norm.cpp"
# -fassociative-math (with the two flags it needs) lets the compiler vectorize the sums; no
# -ffast-math, which would also assume there are no NaNs (skip_nonfinite relies on them).
# -fopenmp: at::parallel_for is an OpenMP pragma in ATen's headers, so without it the kernel
# would run on one thread; the extension then shares torch's libgomp (same soname).
CFLAGS: tuple[str, ...] = (
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fno-trapping-math",
    "-fopenmp",
)
LDFLAGS: tuple[str, ...] = ("-fopenmp",)
CACHE_ENV = "BNLAB_NATIVE_CACHE_MB"
DEFAULT_CACHE_MB = 512

log = logging.getLogger(__name__)


class NativeBuildError(RuntimeError):
    """The C++ kernel could not be compiled or loaded."""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def extension_name() -> str:
    """The cache key: one build per source, flags, torch version and CPU (-march=native)."""
    h = hashlib.sha256()
    flags = " ".join(CFLAGS + LDFLAGS).encode()
    for part in (SOURCE.read_bytes(), flags, torch.__version__.encode()):
        h.update(part)
    h.update(_cpu_model().encode())
    return f"bnlab_native_{h.hexdigest()[:12]}"


def _ensure_ninja() -> None:
    """torch's extension builder runs ``ninja``; the ``ninja`` wheel has one off PATH."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # type: ignore[import-untyped]
    except ImportError:
        return  # torch reports it
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@cache
def build_native() -> ModuleType:
    """The compiled extension, built on the first call of this process if no cached build exists.

    Raises :class:`NativeBuildError` with the compiler's message when the build fails.
    """
    from torch.utils import cpp_extension

    cache_limit = _cache_limit_from_env()  # a bad setting fails before a minute of compiling
    _ensure_ninja()
    name = extension_name()
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    cached = any(build_dir.glob(f"{name}*.so"))
    if not cached:
        log.warning(
            "bnlab: compiling the native batch-norm kernel into %s (once per machine, about a "
            "minute)...",
            build_dir,
        )
    start = time.perf_counter()
    try:
        module = cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            verbose=False,
        )
    except Exception as e:
        raise NativeBuildError(
            f"bnlab: could not build the native batch-norm kernel ({type(e).__name__}: {e}). "
            "It needs a C++ compiler (g++) and ninja (pip install ninja). Use impl='fast' for "
            "the same math in eager PyTorch operations, which needs neither."
        ) from e
    build_native.seconds = time.perf_counter() - start  # type: ignore[attr-defined]
    build_native.was_cached = cached  # type: ignore[attr-defined]
    module.set_cache_limit(cache_limit)
    return module


def _cache_limit_from_env() -> int:
    raw = os.environ.get(CACHE_ENV)
    if raw is None:
        return DEFAULT_CACHE_MB << 20
    try:
        mb = int(raw)
    except ValueError:
        mb = -1
    if mb < 0:
        raise ValueError(
            f"{CACHE_ENV}={raw!r}: expected a whole number of MiB, 0 or more (0 turns the native "
            f"kernel's output cache off), e.g. {CACHE_ENV}={DEFAULT_CACHE_MB}"
        )
    return mb << 20


def output_cache_info() -> dict[str, int]:
    """The native kernel's output cache: ``cached_bytes`` (freed memory it holds now),
    ``limit_bytes``, and ``hits``/``misses`` (outputs served from it, or newly allocated)."""
    return dict(build_native().cache_info())


def set_output_cache_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` of freed output memory (0: no cache); frees the excess now."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"set_output_cache_limit: expected a byte count >= 0, got {nbytes!r}")
    build_native().set_cache_limit(nbytes)


def empty_output_cache() -> None:
    """Return every cached block to the system allocator (like ``torch.cuda.empty_cache``)."""
    build_native().empty_cache()


def _use_native(x: Tensor) -> bool:
    return x.is_cpu and not torch.compiler.is_compiling() and not fallback_needed()


def native_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``impl="native"`` training kernel: (y, batch mean, biased batch variance)."""
    if not _use_native(x):
        return fast_train(x, weight, bias, eps)
    y, mean, var = build_native().train(x, weight, bias, eps)
    return y, mean, var


def native_train_update(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running_mean: Tensor,
    running_var: Tensor,
    w: float,
    unbiased: bool,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """``impl="native"`` training step with the running-statistic update in the same call, or
    None where the C++ kernel does not run (``batch_norm`` then takes its general path)."""
    if not _use_native(x):
        return None
    y, new_mean, new_var = build_native().train_update(
        x, weight, bias, eps, running_mean, running_var, w, unbiased
    )
    return y, new_mean, new_var


def native_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor | None:
    """``impl="native"`` prediction: one pass, or None (use the reference) when a gradient is
    needed or the input is not on the CPU."""
    if not _use_native(x) or (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (x, weight, bias))
    ):
        return None
    y: Tensor = build_native().eval(x, running_mean, running_var, weight, bias, eps)
    return y


register_train_kernel("native", native_train)
register_updating_kernel("native", native_train_update)
register_eval_kernel("native", native_eval)

__all__ = [
    "NativeBuildError",
    "build_native",
    "empty_output_cache",
    "extension_name",
    "native_eval",
    "native_train",
    "native_train_update",
    "output_cache_info",
    "set_output_cache_limit",
]
