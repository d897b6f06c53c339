"""``impl="native"``: the analytic kernel's math (:mod:`bnlab.functional.fast`) as fused C++
loops for CPU tensors, and ``impl="auto"`` (the default), which runs it wherever it is built.

On small tensors an eager PyTorch operation costs more in dispatch than in arithmetic, and the
analytic kernel of :mod:`bnlab.functional.fast` needs a dozen of them per pass; here forward,
backward and eval are one call each (csrc/batch_norm.cpp, with the derivation). The autograd
function lives in C++ too, so a training step pays no Python in the backward pass, and
:class:`bnlab.nn.BatchNorm` makes a whole step one call: :func:`layer_forward` checks the
input, runs the kernel and updates the layer's running statistics in place, as PyTorch's own
module does.

The build. The extension is compiled ahead of time by ``bnlab build`` (which ``make setup``
runs) with the machine's C++ compiler and ninja, into :func:`build_dir`:
``$BNLAB_BUILD_DIR`` (default: the per-user cache, ``platformdirs.user_cache_dir("bnlab")``)
``/native/<name>``, where the name hashes the source, the compiler flags, torch's version and
commit, Python's ABI and the CPU (``-march=native``). Next to the library it writes
``build.json``, what the build was made for; a build is loaded only when that matches this
process exactly, so a build for another torch is never loaded (its ABI would not match).
Loading takes milliseconds and never compiles:

* ``impl="auto"`` runs the C++ kernel for CPU tensors when a build is there, and otherwise the
  ``"eager"`` kernel, after one :class:`NativeKernelWarning` that names ``bnlab build``;
  on other devices it is ``"eager"``.
* ``impl="native"`` asks for the C++ kernel by name: without a build it compiles one on first
  use (about a minute on two cores), and raises :class:`NativeBuildError` if it cannot.

Where the C++ kernel does not apply, both use the ``"eager"`` kernel instead: CUDA tensors,
code being traced by ``torch.compile``, torch.func transforms and forward-mode AD.

Outputs of 1 MiB or more (y, and ∂x in the backward) take their memory from a cache of freed
blocks, as PyTorch's CUDA allocator does: glibc returns large blocks to the OS on free, and
faulting a fresh 51 MB output back in costs more than the kernel itself. The cache keeps at
most ``BNLAB_NATIVE_CACHE_MB`` MiB of freed memory (default 512; 0 turns it off); see
:func:`output_cache_info`, :func:`set_output_cache_limit` and :func:`empty_output_cache`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import platformdirs
import torch
from torch import Tensor

from bnlab._machine import cpu_model, cpuinfo_field
from bnlab.functional.batch_norm import (
    CONVENTIONS,
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
BUILD_DIR_ENV = "BNLAB_BUILD_DIR"
BUILD_INFO = "build.json"
FIX = (
    "Build it once with `bnlab build` (`make setup` runs it; it needs a C++ compiler such as "
    "g++, and ninja, which pip installed with bnlab)."
)

log = logging.getLogger(__name__)


class NativeBuildError(RuntimeError):
    """The C++ kernel could not be compiled or loaded."""


class NativeKernelWarning(RuntimeWarning):
    """``impl="auto"`` found no usable build of the C++ kernel and runs the eager one."""


def _cpu_key() -> str:
    """What ``-march=native`` compiles for: the CPU model and its instruction-set flags."""
    return f"{cpu_model()} | {cpuinfo_field('flags') or ''}"


def build_info() -> dict[str, str]:
    """What a build is made for; one that was made for anything else is not loaded."""
    return {
        "source_sha256": hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
        "flags": " ".join(CFLAGS + LDFLAGS),
        "torch": torch.__version__,
        "torch_git": torch.version.git_version,
        "python": sys.implementation.cache_tag or platform.python_version(),
        "cpu": hashlib.sha256(_cpu_key().encode()).hexdigest()[:16],
    }


def extension_name() -> str:
    """The build's name: one build per source, flags, torch, Python ABI and CPU."""
    h = hashlib.sha256(json.dumps(build_info(), sort_keys=True).encode())
    return f"bnlab_native_{h.hexdigest()[:12]}"


def build_root() -> Path:
    """``$BNLAB_BUILD_DIR``, else ``<per-user cache>/bnlab/native``."""
    raw = os.environ.get(BUILD_DIR_ENV)
    return Path(raw) if raw else Path(platformdirs.user_cache_dir("bnlab")) / "native"


def build_dir() -> Path:
    """Where this process's build lives (the library, ``build.json``, the compiler's files)."""
    return build_root() / extension_name()


def library_path() -> Path:
    """The compiled library in :func:`build_dir` (named as torch.utils.cpp_extension names it)."""
    return build_dir() / (extension_name() + (".pyd" if sys.platform == "win32" else ".so"))


def find_build() -> Path:
    """The compiled library of a build made for this process; :class:`NativeBuildError` saying
    why there is none."""
    directory = build_dir()
    info_file = directory / BUILD_INFO
    try:
        recorded = json.loads(info_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NativeBuildError(f"no build in {directory}") from None
    except (OSError, ValueError) as e:
        raise NativeBuildError(f"unreadable {info_file} ({e})") from None
    expected = build_info()
    if recorded != expected:
        diff = ", ".join(
            f"{k} {recorded.get(k)!r} (this process: {v!r})"
            for k, v in expected.items()
            if recorded.get(k) != v
        )
        raise NativeBuildError(f"the build in {directory} was made for another setup: {diff}")
    library = library_path()
    if not library.is_file():
        raise NativeBuildError(f"{directory} has no {library.name}")
    return library


@dataclass(frozen=True)
class NativeLoad:
    """How this process got its C++ kernel."""

    path: Path  # the build directory
    seconds: float  # time to load (or compile and load) it
    compiled: bool  # True: compiled in this process; False: loaded from an existing build


_module: ModuleType | None = None
_load: NativeLoad | None = None
_unavailable: str | None = None  # why impl="auto" found no build (it then stops looking)


def _import(library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(extension_name(), library)
    if spec is None or spec.loader is None:
        raise NativeBuildError(f"cannot import {library}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _use(module: ModuleType, load: NativeLoad, cache_limit: int) -> ModuleType:
    global _module, _load, _unavailable
    module.set_cache_limit(cache_limit)
    _module, _load, _unavailable = module, load, None
    return module


def load_native() -> ModuleType | None:
    """The C++ kernel from an existing build, or None (after one :class:`NativeKernelWarning`
    per process that says why and names the fix) when there is none. Never compiles."""
    if _module is not None:
        return _module
    if _unavailable is not None:
        return None
    cache_limit = _cache_limit_from_env()  # a bad setting is an error, not a fallback
    start = time.perf_counter()
    try:
        module = _import(find_build())
    except (NativeBuildError, ImportError, OSError) as e:
        _note_unavailable(str(e))
        return None
    return _use(module, NativeLoad(build_dir(), time.perf_counter() - start, False), cache_limit)


def _note_unavailable(reason: str) -> None:
    global _unavailable
    _unavailable = reason
    warnings.warn(
        f"bnlab: the C++ batch-norm kernel is not available ({reason}), so bnlab's batch norm "
        f"runs its eager PyTorch kernel, which is slower than torch's own. {FIX}",
        NativeKernelWarning,
        stacklevel=4,
    )


def unavailable_reason() -> str | None:
    """Why :func:`load_native` found no usable build in this process, or None."""
    return _unavailable


def native_load() -> NativeLoad | None:
    """How this process loaded the C++ kernel, or None if it has not (yet)."""
    return _load


def _ensure_ninja() -> None:
    """torch's extension builder runs ``ninja``; the ``ninja`` wheel has one off PATH."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # type: ignore[import-untyped]
    except ImportError:
        return  # torch reports it
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def build_native(*, force: bool = False) -> ModuleType:
    """The C++ kernel: this process's, else an existing build, else (or with ``force``) a new
    build compiled now into :func:`build_dir` (about a minute on two cores).

    Raises :class:`NativeBuildError` with the compiler's message when the build fails.
    """
    if _module is not None and not force:
        return _module
    cache_limit = _cache_limit_from_env()  # a bad setting fails before a minute of compiling
    start = time.perf_counter()
    if not force:
        try:
            module = _import(find_build())
        except (NativeBuildError, ImportError, OSError):
            pass
        else:
            load = NativeLoad(build_dir(), time.perf_counter() - start, False)
            return _use(module, load, cache_limit)
    from torch.utils import cpp_extension

    _ensure_ninja()
    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / BUILD_INFO).unlink(missing_ok=True)  # no half-built library is ever loaded
    log.warning("bnlab: compiling the C++ batch-norm kernel into %s (about a minute)...", directory)
    try:
        module = cpp_extension.load(
            name=extension_name(),
            sources=[str(SOURCE)],
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(directory),
            verbose=False,
        )
    except Exception as e:
        raise NativeBuildError(
            f"bnlab: could not build the C++ batch-norm kernel ({type(e).__name__}: {e}). "
            "It needs a C++ compiler (g++) and ninja (pip install ninja). Use impl='eager' for "
            "the same math in eager PyTorch operations, which needs neither."
        ) from e
    tmp = directory / (BUILD_INFO + ".tmp")
    tmp.write_text(json.dumps(build_info(), indent=1) + "\n", encoding="utf-8")
    tmp.replace(directory / BUILD_INFO)
    return _use(module, NativeLoad(directory, time.perf_counter() - start, True), cache_limit)


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


# --------------------------------------------------------------------------- kernels


def _applies(x: Tensor) -> bool:
    return x.is_cpu and not torch.compiler.is_compiling() and not fallback_needed()


def _auto(x: Tensor) -> ModuleType | None:
    """The C++ kernel if ``impl="auto"`` runs it on ``x``, else None."""
    if not _applies(x):
        return None
    return _module if _module is not None else load_native()


def native_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``impl="native"`` training kernel: (y, batch mean, biased batch variance)."""
    if not _applies(x):
        return fast_train(x, weight, bias, eps)
    y, mean, var = build_native().train(x, weight, bias, eps)
    return y, mean, var


def auto_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``impl="auto"`` training kernel: the C++ one where it is built and applies, else "eager"."""
    ext = _auto(x)
    if ext is None:
        return fast_train(x, weight, bias, eps)
    y, mean, var = ext.train(x, weight, bias, eps)
    return y, mean, var


def _train_update(
    ext: ModuleType | None,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running_mean: Tensor,
    running_var: Tensor,
    w: float | Tensor,
    unbiased: bool,
) -> tuple[Tensor, Tensor, Tensor] | None:
    if ext is None:
        return None
    if isinstance(w, Tensor):  # a cumulative average's 1/(k+1) from a tensor count (eager only)
        w = float(w)
    y, new_mean, new_var = ext.train_update(
        x, weight, bias, eps, running_mean, running_var, w, unbiased
    )
    return y, new_mean, new_var


def native_train_update(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running_mean: Tensor,
    running_var: Tensor,
    w: float | Tensor,
    unbiased: bool,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """``impl="native"`` training step with the running-statistic update in the same call, or
    None where the C++ kernel does not run (``batch_norm`` then takes its general path)."""
    ext = build_native() if _applies(x) else None
    return _train_update(ext, x, weight, bias, eps, running_mean, running_var, w, unbiased)


def auto_train_update(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    running_mean: Tensor,
    running_var: Tensor,
    w: float | Tensor,
    unbiased: bool,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """``impl="auto"``: :func:`native_train_update` where the C++ kernel is built, else None."""
    return _train_update(_auto(x), x, weight, bias, eps, running_mean, running_var, w, unbiased)


def _eval(
    ext: ModuleType | None,
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor | None:
    if ext is None or (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (x, weight, bias))
    ):
        return None
    y: Tensor = ext.eval(x, running_mean, running_var, weight, bias, eps)
    return y


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
    ext = build_native() if _applies(x) else None
    return _eval(ext, x, running_mean, running_var, weight, bias, eps)


def auto_eval(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor | None:
    """``impl="auto"`` prediction: :func:`native_eval` where the C++ kernel is built."""
    return _eval(_auto(x), x, running_mean, running_var, weight, bias, eps)


_plain_store: Any = None


def _plain_storage(layer: Any) -> bool:
    """False for a subclass that stores its running statistics its own way (it keeps the
    general path, which calls its ``_store_running_stats``)."""
    global _plain_store
    if _plain_store is None:
        from bnlab.nn.batchnorm import BatchNorm

        _plain_store = BatchNorm._store_running_stats
    return type(layer)._store_running_stats is _plain_store


def layer_forward(layer: Any, x: Tensor) -> Tensor | None:
    """:class:`bnlab.nn.BatchNorm`'s forward as one C++ call (checks, kernel, and in training
    the running statistics and batch count updated in place), or None where that call does not
    apply: another ``impl``, options it does not cover, an input it does not take (another
    device, a tensor subclass, anything the layer rejects). The layer then takes its general
    path, which gives the same result and words any error."""
    impl = layer.impl
    if impl == "auto":
        if type(x) is not Tensor:
            return None
        ext = _auto(x)
    elif impl == "native" and type(x) is Tensor and _applies(x):
        ext = build_native()
    else:
        return None
    if ext is None or layer.skip_nonfinite or layer.axis != 1 or not _plain_storage(layer):
        return None
    conv = CONVENTIONS.get(layer.convention)
    momentum, eps = layer.momentum, layer.eps
    # settings the general path checks (and words the errors for) where they are used; and
    # track_running_stats switched off after construction, which keeps the buffers out
    if (
        conv is None
        or not (type(eps) is float and eps > 0.0)
        or not (momentum is None or (type(momentum) is float and 0.0 <= momentum <= 1.0))
        or (not layer.track_running_stats and layer.running_mean is not None)
    ):
        return None
    y: Tensor | None = ext.layer_forward(
        x,
        layer.weight,
        layer.bias,
        layer.running_mean,
        layer.running_var,
        layer.num_batches_tracked,
        eps,
        -1.0 if momentum is None else momentum,
        conv.momentum_is_decay,
        conv.unbiased_running_var,
        layer.training and not layer.use_global_stats,
        -1 if layer.num_dims is None else layer.num_dims,
        -1 if layer.num_features is None else layer.num_features,
    )
    return y


register_train_kernel("native", native_train)
register_updating_kernel("native", native_train_update)
register_eval_kernel("native", native_eval)
register_train_kernel("auto", auto_train)
register_updating_kernel("auto", auto_train_update)
register_eval_kernel("auto", auto_eval)

__all__ = [
    "BUILD_DIR_ENV",
    "FIX",
    "NativeBuildError",
    "NativeKernelWarning",
    "NativeLoad",
    "auto_eval",
    "auto_train",
    "auto_train_update",
    "build_dir",
    "build_info",
    "build_native",
    "build_root",
    "empty_output_cache",
    "extension_name",
    "find_build",
    "layer_forward",
    "load_native",
    "native_eval",
    "native_load",
    "native_train",
    "native_train_update",
    "output_cache_info",
    "set_output_cache_limit",
    "unavailable_reason",
]
