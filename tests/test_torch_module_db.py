"""PyTorch's own table of batch-norm cases, run with bnlab's class in place of torch's.

``torch.testing._internal.common_modules.module_db`` holds a ModuleInfo for each of
``torch.nn.BatchNorm1d/2d/3d``: sample inputs (constructor arguments, positional as torch code
passes them, plus a forward input; ``zero_batch`` and ``affine_not_bias`` among them) and error
inputs. PyTorch's test/test_modules.py runs a standard set of checks over them; each test below
is one of those checks with ``bnlab.nn.BatchNorm`` built from the same arguments, and, where a
check has an answer to compare with, torch's own module built alike as the oracle.
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.testing._internal.common_modules import ModuleErrorEnum, ModuleInfo, module_db
from torch.testing._internal.common_utils import gradcheck, gradgradcheck

from bnlab.nn import BatchNorm

TORCH_CLASSES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
INFOS: dict[str, ModuleInfo] = {i.name: i for i in module_db if i.module_cls in TORCH_CLASSES}
F64 = torch.float64


def samples(
    info: ModuleInfo, *, dtype: torch.dtype = F64, requires_grad: bool = False, training: bool
) -> list[Any]:
    torch.manual_seed(0)  # make_tensor draws from the global generator
    return list(
        info.module_inputs_func(
            info, device="cpu", dtype=dtype, requires_grad=requires_grad, training=training
        )
    )


CASES = [
    pytest.param(name, i, id=f"{name.removeprefix('nn.')}-{s.desc or 'default'}")
    for name, info in INFOS.items()
    for i, s in enumerate(samples(info, training=True))
]
MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]
# the default kernel, as torch code gets it, and the eager one every machine has
IMPLS = [pytest.param("", id="default"), pytest.param("eager", id="eager")]


def test_the_table_has_every_class_and_the_cases_bnlab_once_missed() -> None:
    assert set(INFOS) == {"nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d"}
    descs = {s.desc for info in INFOS.values() for s in samples(info, training=True)}
    assert {"zero_batch", "affine_not_bias", "not_tracking_stats"} <= descs


def build(
    info: ModuleInfo, sample: Any, *, dtype: torch.dtype = F64, training: bool, impl: str = ""
) -> tuple[nn.Module, nn.Module]:
    """(bnlab's layer, torch's layer) from the sample's constructor arguments, same values;
    ``impl`` names a kernel, else the default one is used, as torch code would get it."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    ours = BatchNorm(*args, **kwargs, **({"impl": impl} if impl else {}))
    ref = info.module_cls(*args, **kwargs)
    for m in (ours, ref):
        m.to(dtype).train(training)
    with torch.no_grad():  # non-trivial γ/β, the same in both
        for p_ours, p_ref in zip(ours.parameters(), ref.parameters(), strict=True):
            p_ref.copy_(torch.linspace(0.5, 1.5, p_ref.numel(), dtype=dtype))
            p_ours.copy_(p_ref)
    return ours, ref


def forward_input(sample: Any) -> Tensor:
    (x,) = sample.forward_input.args
    assert not sample.forward_input.kwargs
    return x


def fresh(x: Tensor) -> Tensor:
    return x.detach().clone().requires_grad_(True)


def assert_same_state(ours: nn.Module, ref: nn.Module) -> None:
    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    assert list(ours_state) == list(ref_state)
    for k, v in ref_state.items():
        torch.testing.assert_close(ours_state[k], v, msg=k)


# ---------------------------------------------------------------- test_forward (+ the oracle)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize(("name", "index"), CASES)
def test_forward_backward_and_state_match_torch(
    name: str, index: int, training: bool, dtype: torch.dtype, impl: str
) -> None:
    info = INFOS[name]
    sample = samples(info, dtype=dtype, training=training)[index]
    ours, ref = build(info, sample, dtype=dtype, training=training, impl=impl)
    x = forward_input(sample)
    for step in range(2):  # two steps: the running statistics (and a cumulative average) move
        xs = x * (1 + step) + step
        x_ours, x_ref = fresh(xs), fresh(xs)
        y_ours, y_ref = ours(x_ours), ref(x_ref)
        torch.testing.assert_close(y_ours, y_ref)
        dy = torch.randn_like(y_ref)
        y_ours.backward(dy)
        y_ref.backward(dy)
        torch.testing.assert_close(x_ours.grad, x_ref.grad)
        for p_ours, p_ref in zip(ours.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p_ours.grad, p_ref.grad)
        assert_same_state(ours, ref)
    # test_forward's last step: the dtype methods convert every parameter and buffer
    ours.float() if dtype == torch.float32 else ours.double()
    ours(x)
    for t in [*ours.parameters(), *ours.buffers()]:
        assert t.dtype == (dtype if t.is_floating_point() else torch.long)


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize(("name", "index"), CASES)
def test_factory_kwargs_repr_and_meta_device(name: str, index: int) -> None:
    info = INFOS[name]
    sample = samples(info, training=True)[index]
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    ours = BatchNorm(*args, **kwargs, device="cpu", dtype=F64)
    ref = info.module_cls(*args, **kwargs, device="cpu", dtype=F64)
    for (n_ours, t_ours), (n_ref, t_ref) in zip(
        [*ours.named_parameters(), *ours.named_buffers()],
        [*ref.named_parameters(), *ref.named_buffers()],
        strict=True,
    ):
        assert n_ours == n_ref
        assert (t_ours.dtype, t_ours.device, t_ours.shape) == (
            t_ref.dtype,
            t_ref.device,
            t_ref.shape,
        )
        torch.testing.assert_close(t_ours, t_ref)  # same initial values
    # the same attributes torch code reads, and torch's repr as the start of ours
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    ref_repr = ref.extra_repr()
    assert ours.extra_repr().startswith(ref_repr), (ours.extra_repr(), ref_repr)
    assert str(ours).startswith("BatchNorm(")
    # test_device_ctx_init: built under the meta device, the same metadata as on the CPU
    with torch.device("meta"):
        meta = BatchNorm(*args, **kwargs)
    for t_meta, t_cpu in zip(
        [*meta.parameters(), *meta.buffers()], [*ours.parameters(), *ours.buffers()], strict=True
    ):
        assert t_meta.is_meta
        assert (t_meta.shape, t_meta.requires_grad) == (t_cpu.shape, t_cpu.requires_grad)


# ---------------------------------------------------------------- serialization


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize(("name", "index"), CASES)
def test_pickle_and_state_dict_both_ways(name: str, index: int, training: bool) -> None:
    info = INFOS[name]
    sample = samples(info, training=training)[index]
    ours, ref = build(info, sample, training=training)
    x = forward_input(sample).detach()
    y = ours(x)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    copy = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(copy(x), y if not training else ours(x))
    assert type(pickle.loads(pickle.dumps(ours))) is BatchNorm
    # bnlab's state dict loads into torch's class (strict) and torch's into bnlab's
    ref.load_state_dict(ours.state_dict())
    assert_same_state(ours, ref)
    ours_again, _ = build(info, sample, training=training)
    ours_again.load_state_dict(ref.state_dict())
    assert_same_state(ours_again, ref)


# ---------------------------------------------------------------- test_non_contiguous_tensors


def non_contiguous(t: Tensor) -> Tensor:
    """The same values every second element of a twice-as-wide tensor (test_modules' trick)."""
    out = torch.repeat_interleave(t.detach(), 2, dim=-1)[..., ::2]
    return out.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize(("name", "index"), CASES)
def test_non_contiguous_inputs_and_gradients(name: str, index: int, training: bool) -> None:
    info = INFOS[name]
    sample = samples(info, requires_grad=True, training=training)[index]
    ours, ref = build(info, sample, training=training)
    x = forward_input(sample)
    x_ref = fresh(x)
    y_ref = ref(x_ref)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    for x_in, dy_in in (
        (fresh(x), non_contiguous(dy)),
        (non_contiguous(x), dy),
        (non_contiguous(x), non_contiguous(dy)),
    ):
        assert not (x_in.is_contiguous() and dy_in.is_contiguous()) or x.numel() == 0
        ours.zero_grad()
        y = ours(x_in)
        torch.testing.assert_close(y, y_ref)
        y.backward(dy_in)
        torch.testing.assert_close(x_in.grad, x_ref.grad, atol=1e-4, rtol=0)
        for p_ours, p_ref in zip(ours.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p_ours.grad, p_ref.grad)


# ---------------------------------------------------------------- test_grad / test_gradgrad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("check", [gradcheck, gradgradcheck], ids=["grad", "gradgrad"])
@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize(("name", "index"), CASES)
def test_gradients_total_and_partial(
    name: str, index: int, training: bool, check: Callable[..., bool], impl: str
) -> None:
    """torch's testing gradcheck (fast mode, with check_batched_grad: the backward under vmap,
    is_grads_batched=True) for the input and every parameter, then each parameter alone."""
    info = INFOS[name]
    sample = samples(info, requires_grad=True, training=training)[index]
    ours, _ = build(info, sample, training=training, impl=impl)
    x = forward_input(sample)
    params = tuple(ours.parameters())  # gradcheck perturbs the module's own tensors

    def fn(*inputs: Tensor) -> Tensor:
        return ours(inputs[0])

    assert check(fn, (x, *params), nondet_tol=0.0)
    for p in params:
        p.requires_grad_(False)
    for p in params:  # each partial derivative alone
        p.requires_grad_(True)
        assert check(fn, (x, *params), nondet_tol=0.0)
        p.requires_grad_(False)


# ---------------------------------------------------------------- test_memory_format


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize(("name", "index"), CASES)
def test_memory_formats(name: str, index: int, training: bool) -> None:
    info = INFOS[name]
    sample = samples(info, requires_grad=True, training=training)[index]
    ours, _ = build(info, sample, training=training)
    x = forward_input(sample)
    last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.ndim)
    formats = [torch.contiguous_format] + ([last] if last else [])
    x0 = fresh(x)
    y0 = ours(x0)
    dy = torch.rand_like(y0)
    (g0,) = torch.autograd.grad(y0, x0, dy)
    for input_format in formats:
        for module_format in [torch.preserve_format, *formats]:
            ours.to(memory_format=module_format)
            xi = x.detach().clone().to(memory_format=input_format).requires_grad_(True)
            y = ours(xi)
            torch.testing.assert_close(y, y0)
            assert y.is_contiguous(memory_format=input_format)
            (g,) = torch.autograd.grad(y, xi, torch.empty_like(y).copy_(dy))
            torch.testing.assert_close(g, g0)
            assert g.is_contiguous(memory_format=input_format)


# ------------------------------------------------- test_if_train_and_eval_modes_differ


@pytest.mark.parametrize(("name", "index"), CASES)
def test_forward_reads_the_training_flag(name: str, index: int) -> None:
    info = INFOS[name]
    assert info.train_and_eval_differ
    sample = samples(info, training=True)[index]
    ours, _ = build(info, sample, training=True)
    del ours.training
    with pytest.raises(AttributeError, match="'training'"):
        ours(forward_input(sample).detach())


# ---------------------------------------------------------------- test_errors


ERRORS = [
    pytest.param(name, i, id=f"{name.removeprefix('nn.')}-{i}")
    for name, info in INFOS.items()
    for i, _ in enumerate(
        info.module_error_inputs_func(
            info, device="cpu", dtype=F64, requires_grad=False, training=True
        )
    )
]


@pytest.mark.parametrize(("name", "index"), ERRORS)
def test_error_inputs(name: str, index: int) -> None:
    info = INFOS[name]
    error = info.module_error_inputs_func(
        info, device="cpu", dtype=F64, requires_grad=False, training=True
    )[index]
    sample = error.module_error_input
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    assert error.error_on == ModuleErrorEnum.FORWARD_ERROR  # built fine, refused at forward
    for cls in (info.module_cls, BatchNorm):
        m = cls(*args, **kwargs)
        with pytest.raises(error.error_type, match=re.compile(error.error_regex)):
            m(*sample.forward_input.args, **sample.forward_input.kwargs)
