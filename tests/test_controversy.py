"""bnlab.lab.controversy: the ICS and loss-landscape probes against hand-computed values and
against a direct recomputation with ordinary autograd on a copy of the model, the probes' promise
to change nothing, the noisy-BN module, the parameters, the shared loop's before-step hook, and
tiny end-to-end runs with their plots and table."""

from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnlab.data import CLASS_NAMES, FashionMNIST, load_fashion_mnist
from bnlab.lab.controversy import (
    NORMS,
    SHUFFLE_SEED_OFFSET,
    ControversyConfig,
    NonstationaryNoise,
    build_model,
    full_gradient,
    ics_probe,
    landscape_probe,
    noise_modules,
    plot_controversy,
    run_controversy,
    summarize_controversy,
    weight_layers,
)
from bnlab.train.config import ConfigError
from bnlab.train.loop import train_epoch

TINY = {"epochs": 1, "subset": None, "batch_size": 32, "measure_every": 2, "step_sizes": [0.5, 1]}


def synthetic_data(n_train: int = 96, n_test: int = 40, seed: int = 0) -> FashionMNIST:
    """A FashionMNIST of random uint8 28×28 images whose label is readable from the image
    (the mean brightness of one of ten bands), so a short run can learn something."""
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> tuple[Tensor, Tensor]:
        labels = torch.randint(0, 10, (n,), generator=g)
        images = torch.randint(0, 100, (n, 28, 28), generator=g, dtype=torch.uint8)
        for i, c in enumerate(labels.tolist()):
            images[i, :, 2 * c : 2 * c + 3] += 150
        return images, labels

    train_x, train_y = make(n_train)
    test_x, test_y = make(n_test)
    return FashionMNIST(
        train_images=train_x,
        train_labels=train_y,
        test_images=test_x,
        test_labels=test_y,
        classes=CLASS_NAMES,
        source=Path("synthetic"),
        official=False,
    )


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    """One tiny run per norm, and a second seed for BN (for the mean ± std over seeds)."""
    data = synthetic_data()
    out = [run_controversy({**TINY, "norm": norm, "seed": 0}, data) for norm in NORMS]
    out.append(run_controversy({**TINY, "norm": "bnlab", "seed": 1}, data))
    return out


def trained(norm: str, steps: int = 3, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A LeNet after a few SGD steps, so BN running statistics are not at their initial values."""
    model = build_model({"norm": norm, "seed": 3}).to(dtype)
    data = synthetic_data(32, 8, seed=1)
    x = data.train_images.unsqueeze(1).to(dtype) / 255
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        for m in noise_modules(model):
            m.resample()
        opt.zero_grad()
        F.cross_entropy(model(x), data.train_labels).backward()
        opt.step()
    return model


def batch(n: int = 8, dtype: torch.dtype = torch.float32, seed: int = 2) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g, dtype=dtype), torch.randint(0, 10, (n,))


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter, every buffer (persistent or not) and every .grad, cloned."""
    state = {f"p:{n}": p.detach().clone() for n, p in model.named_parameters()}
    state |= {f"b:{n}": b.detach().clone() for n, b in model.named_buffers()}
    state |= {
        f"g:{n}": p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
    }
    return state


def assert_same_state(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"


# ------------------------------------------------------------------ the ICS probe, by hand


def test_ics_two_layer_linear_by_hand() -> None:
    """f(x) = W₂ W₁ x, L = ½ Σ (f(x) - t)²: with h = W₁x and r = W₂h - t (per example),
    ∇_{W₁}L = Σ W₂ᵀ r xᵀ and ∇_{W₂}L = Σ r hᵀ. G' is ∇_{W₂}L after W₁ ← W₁ - lr ∇_{W₁}L."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)  # (N, 3)
    t = torch.randn(5, 2, generator=g, dtype=torch.float64)  # (N, 2)
    w1, w2 = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    lr = 0.05

    def grads(w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
        h = x @ w1.T  # (N, 4)
        r = h @ w2.T - t  # (N, 2)
        return (r @ w2).T @ x, r.T @ h  # ∇W₁ (4, 3), ∇W₂ (2, 4)

    g1, g2 = grads(w1, w2)
    _, g2_after = grads(w1 - lr * g1, w2)
    result = ics_probe(
        model, x, t, lr=lr, loss_fn=lambda out, target: 0.5 * ((out - target) ** 2).sum()
    )
    assert list(result) == ["out"]  # the first layer has nothing below it
    expected_l2 = float((g2 - g2_after).norm())
    expected_cos = float((g2 * g2_after).sum() / (g2.norm() * g2_after.norm()))
    assert expected_l2 > 1e-3  # the case is not degenerate
    assert result["out"]["l2"] == pytest.approx(expected_l2, rel=1e-10)
    assert result["out"]["cos"] == pytest.approx(expected_cos, rel=1e-10)
    assert result["out"]["g_norm"] == pytest.approx(float(g2.norm()), rel=1e-10)


@pytest.mark.parametrize("norm", NORMS)
def test_ics_matches_direct_recomputation(norm: str) -> None:
    """Against ordinary autograd on a deep copy: SGD-update every parameter of the modules
    before layer i (weights, biases, BN γ/β), backward, read W_i's gradient."""
    model = trained(norm, dtype=torch.float64)
    x, y = batch(dtype=torch.float64)
    lr = 0.3
    result = ics_probe(model, x, y, lr=lr)
    layers = weight_layers(model)
    assert [name for name, _ in layers] == ["conv0", "conv1", "dense2", "dense3", "out"]
    assert list(result) == ["conv1", "dense2", "dense3", "out"]

    ref = copy.deepcopy(model).train()
    ref.zero_grad()
    F.cross_entropy(ref(x), y).backward()
    g = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
    for name, index in layers[1:]:
        moved = copy.deepcopy(model).train()
        with torch.no_grad():
            for n, p in moved.named_parameters():
                if int(n.split(".")[0]) < index:
                    p -= lr * g[n]
        moved.zero_grad()
        F.cross_entropy(moved(x), y).backward()
        before, after = g[f"{index}.weight"], moved[index].weight.grad
        assert result[name]["l2"] == pytest.approx(float((before - after).norm()), rel=1e-8)
        cos = float((before * after).sum() / (before.norm() * after.norm()))
        assert result[name]["cos"] == pytest.approx(cos, rel=1e-8)


# ------------------------------------------------------------ the landscape probe, by hand


def test_landscape_quadratic_by_hand() -> None:
    """L(W) = ½ Σ ||W x - t||² has the constant Hessian H = I ⊗ XᵀX (acting as V ↦ V XᵀX):
    L(W - ηG) = L - η||G||² + ½η² <G, G XᵀX>, ∇L(W - ηG) - ∇L(W) = -η G XᵀX, so the effective
    β-smoothness ||G XᵀX|| / ||G|| is the same for every η."""
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 2, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(2, 3, generator=g, dtype=torch.float64))
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    t = torch.randn(6, 2, generator=g, dtype=torch.float64)
    w = model[0].weight.detach().clone()
    lr, steps = 0.02, [0.5, 1.0, 3.0]

    loss0 = 0.5 * float(((x @ w.T - t) ** 2).sum())
    grad = (x @ w.T - t).T @ x  # (2, 3)
    hg = grad @ (x.T @ x)  # H applied to G
    gg, ghg = float((grad * grad).sum()), float((grad * hg).sum())
    etas = [lr * s for s in steps]
    losses = [loss0 - eta * gg + 0.5 * eta**2 * ghg for eta in etas]

    out = landscape_probe(
        model,
        x,
        t,
        lr=lr,
        step_sizes=steps,
        loss_fn=lambda o, target: 0.5 * ((o - target) ** 2).sum(),
    )
    assert out["loss"] == pytest.approx(loss0, rel=1e-12)
    assert out["grad_norm"] == pytest.approx(math.sqrt(gg), rel=1e-12)
    assert out["etas"] == pytest.approx(etas)
    assert out["losses"] == pytest.approx(losses, rel=1e-10)
    assert out["loss_variation"] == pytest.approx(max(losses) - min(losses), rel=1e-9)
    assert out["grad_predictiveness"] == pytest.approx(max(etas) * float(hg.norm()), rel=1e-10)
    assert out["beta_smoothness"] == pytest.approx(float(hg.norm()) / math.sqrt(gg), rel=1e-10)


@pytest.mark.parametrize("norm", ["bnlab", "noisy"])
def test_landscape_matches_direct_recomputation(norm: str) -> None:
    model = trained(norm, dtype=torch.float64)
    x, y = batch(dtype=torch.float64)
    lr, steps = 0.5, [0.5, 2.0]
    out = landscape_probe(model, x, y, lr=lr, step_sizes=steps)

    def loss_grad(m: nn.Module) -> tuple[float, list[Tensor]]:
        m.train().zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        return float(loss.detach()), [p.grad.detach().clone() for p in m.parameters()]

    loss0, g0 = loss_grad(copy.deepcopy(model))
    g_norm = math.sqrt(sum(float((t * t).sum()) for t in g0))
    losses, diffs = [], []
    for s in steps:
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for p, gp in zip(moved.parameters(), g0, strict=True):
                p -= lr * s * gp
        loss, gs = loss_grad(moved)
        losses.append(loss)
        diffs.append(
            math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(gs, g0, strict=True)))
        )
    assert out["loss"] == pytest.approx(loss0, rel=1e-10)
    assert out["grad_norm"] == pytest.approx(g_norm, rel=1e-10)
    assert out["losses"] == pytest.approx(losses, rel=1e-10)
    assert out["loss_variation"] == pytest.approx(max(losses) - min(losses), rel=1e-8)
    assert out["grad_predictiveness"] == pytest.approx(max(diffs), rel=1e-8)
    betas = [d / (lr * s * g_norm) for d, s in zip(diffs, steps, strict=True)]
    assert out["beta_smoothness"] == pytest.approx(max(betas), rel=1e-8)


# ------------------------------------------------------------------- probes change nothing


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_probes_leave_model_unchanged(norm: str, mode: str) -> None:
    model = trained(norm)
    model.train(mode == "train")
    x, y = batch()
    before = snapshot(model)
    assert any(k.startswith("g:") for k in before)  # .grad fields exist and must survive
    if norm != "none":
        assert any(
            "running_mean" in k and not torch.equal(v, torch.zeros_like(v))
            for k, v in before.items()
        )  # running statistics have moved away from their init
    rng = torch.random.get_rng_state()
    loss_grad = full_gradient(model, x, y)
    landscape_probe(model, x, y, lr=0.5, step_sizes=[0.5, 4.0], loss_and_grad=loss_grad)
    ics_probe(model, x, y, lr=0.5, grad=loss_grad[1])
    ics_probe(model, x, y, lr=0.5)
    landscape_probe(model, x, y, lr=0.5, step_sizes=[1.0])
    assert_same_state(model, before)
    assert model.training == (mode == "train")
    assert all(m.training == (mode == "train") for m in model.modules())
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_probes_use_batch_statistics() -> None:
    """Training mode in the probe even if the model is in eval mode: the probe's loss is the
    training-mode loss of the batch."""
    model = trained("bnlab").eval()
    x, y = batch()
    loss, _ = full_gradient(model, x, y)
    with torch.no_grad():
        train_loss = float(F.cross_entropy(copy.deepcopy(model).train()(x), y))
        eval_loss = float(F.cross_entropy(model(x), y))
    assert loss == pytest.approx(train_loss, rel=1e-6)
    assert abs(train_loss - eval_loss) > 1e-4  # the two modes really differ here


# ---------------------------------------------------------------------------- noisy BN


def test_noise_module_train_vs_eval() -> None:
    gen = torch.Generator().manual_seed(0)
    noise = NonstationaryNoise(5, mean_bound=0.5, std_bound=0.5, generator=gen)
    x = torch.randn(8, 5, 3, 3)
    y = noise(x)
    expected = x * noise.scale.view(1, 5, 1, 1) + noise.shift.view(1, 5, 1, 1)
    torch.testing.assert_close(y, expected)
    assert not torch.allclose(y, x)
    assert bool((noise.scale > 0).all())
    torch.testing.assert_close(noise(x), y, rtol=0, atol=0)  # fixed until resampled
    noise.resample()
    assert not torch.allclose(noise(x), y)
    noise.eval()
    assert torch.equal(noise(x), x)
    assert noise.state_dict() == {}  # transient: not part of a checkpoint


def test_noise_module_is_nonstationary_and_seeded() -> None:
    """The per-step mean of the shift moves from step to step (its distribution changes), and a
    seed reproduces the sequence."""

    def shifts(seed: int) -> list[float]:
        noise = NonstationaryNoise(2000, generator=torch.Generator().manual_seed(seed))
        out = []
        for _ in range(6):
            noise.resample()
            out.append(float(noise.shift.mean()))
        return out

    a = shifts(0)
    assert a == shifts(0)
    assert a != shifts(1)
    # with 2000 channels the channel mean is within ~0.02 of μ_t; μ_t ~ U(-0.5, 0.5) varies
    assert max(a) - min(a) > 0.1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_features": 0}, "num_features"),
        ({"num_features": 3, "mean_bound": -1.0}, "mean_bound"),
        ({"num_features": 3, "std_bound": float("nan")}, "std_bound"),
    ],
)
def test_noise_module_bad_input(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NonstationaryNoise(**kwargs)


def test_noisy_model_structure() -> None:
    model = build_model({"norm": "noisy"})
    noise = noise_modules(model)
    assert len(noise) == 4  # one after each of the four BN layers
    assert [m.num_features for m in noise] == [6, 16, 120, 84]
    assert noise_modules(build_model({"norm": "bnlab"})) == []


# ------------------------------------------------------------------------- end to end


def test_run_returns_documented_keys(runs: list[dict[str, Any]]) -> None:
    layers = ["conv1", "dense2", "dense3", "out"]
    for r in runs:
        json.dumps(r, allow_nan=False)
        assert {
            "params",
            "layers",
            "history",
            "probes",
            "final_test_acc",
            "steps",
            "train_examples",
            "diverged",
            "seconds",
            "probe_seconds",
        } <= r.keys()
        assert r["layers"] == layers
        assert r["steps"] == 3 and r["train_examples"] == 96  # 96 images, batches of 32
        assert [h["epoch"] for h in r["history"]] == [1]
        assert r["final_test_acc"] == r["history"][-1]["test_acc"]
        probes = r["probes"]
        assert probes["step"] == [0, 2]
        for key in ("loss", "grad_norm", "loss_variation", "grad_predictiveness"):
            assert len(probes[key]) == 2 and all(v >= 0 for v in probes[key])
        assert all(len(a) == 2 for a in probes["losses_along"])  # one loss per step size
        for key in ("ics_l2", "ics_cos", "ics_g_norm"):
            assert list(probes[key]) == layers and all(len(v) == 2 for v in probes[key].values())
        assert r["params"]["lr"] == 1.0 and r["params"]["step_sizes"] == [0.5, 1.0]


def test_run_probe_loss_is_the_step_loss(runs: list[dict[str, Any]]) -> None:
    """The probe at step 0 sees the batch the first SGD step trains on, at the same weights:
    rerunning the first step by hand gives the same loss."""
    params = runs[0]["params"]
    data = synthetic_data()
    model = build_model(params)
    g = torch.Generator().manual_seed(params["seed"] + SHUFFLE_SEED_OFFSET)
    perm = torch.randperm(96, generator=g)[:32]
    x = data.train_images[perm].unsqueeze(1).float() / 255
    with torch.no_grad():
        loss = float(F.cross_entropy(model(x), data.train_labels[perm]))
    assert runs[0]["probes"]["loss"][0] == pytest.approx(loss, rel=1e-5)


def test_run_is_reproducible_and_leaves_global_rng(runs: list[dict[str, Any]]) -> None:
    rng = torch.random.get_rng_state()
    again = run_controversy({**TINY, "norm": "noisy", "seed": 0}, synthetic_data())
    assert torch.equal(torch.random.get_rng_state(), rng)
    first = runs[NORMS.index("noisy")]
    assert again["probes"] == first["probes"]
    assert [h["train_loss"] for h in again["history"]] == [
        h["train_loss"] for h in first["history"]
    ]


@pytest.mark.usefixtures("real_data_dir")  # tests/conftest.py
def test_run_on_real_data_learns() -> None:
    """BN-LeNet on the first 1,024 Fashion-MNIST images, one epoch of 32 steps, beats chance
    clearly on the full test set; the probes run along."""
    data = load_fashion_mnist(download=False, progress=False)
    r = run_controversy(
        {"norm": "bnlab", "subset": 1024, "epochs": 1, "batch_size": 32, "measure_every": 16},
        data,
    )
    assert r["train_examples"] == 1024 and r["steps"] == 32
    assert r["probes"]["step"] == [0, 16]
    assert r["history"][0]["train_loss"] < math.log(10)  # below the loss of a uniform guess
    assert r["final_test_acc"] > 0.3  # chance is 0.1


# ------------------------------------------------------------------- plot and summarize


def test_plot_writes_figures(runs: list[dict[str, Any]], tmp_path: Path) -> None:
    figures = plot_controversy(runs, tmp_path / "figs")
    assert len(figures) == 4
    for path, caption in figures:
        assert path.parent == tmp_path / "figs" and path.suffix == ".png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        assert caption


def test_summary_rows_per_norm(runs: list[dict[str, Any]]) -> None:
    headers, rows, verdict = summarize_controversy(runs)
    assert [row[0] for row in rows] == ["BN", "no norm", "noisy BN"]
    assert all(len(row) == len(headers) for row in rows)
    assert headers[2] == "ICS ||G−G'|| (conv1 / dense2 / dense3 / out)"
    bn = [r for r in runs if r["params"]["norm"] == "bnlab"]
    mean = sum(r["final_test_acc"] for r in bn) / 2
    std = math.sqrt(sum((r["final_test_acc"] - mean) ** 2 for r in bn))  # sample std, n = 2
    assert rows[0][1] == f"{mean:.3f} ± {std:.3f} (n=2)"
    assert rows[1][1].endswith("(n=1)")
    per_layer = []
    for layer in ("conv1", "dense2", "dense3", "out"):
        values = [v for r in bn for v in r["probes"]["ics_l2"][layer]]
        per_layer.append(f"{sum(values) / len(values):.3g}")
    assert rows[0][2] == " / ".join(per_layer)
    rel = [
        d / g
        for r in bn
        for layer in r["layers"]
        for d, g in zip(r["probes"]["ics_l2"][layer], r["probes"]["ics_g_norm"][layer], strict=True)
    ]
    assert rows[0][headers.index("ICS ||G−G'||/||G||")] == f"{sum(rel) / len(rel):.3g}"
    # medians over all probes, and over those with a batch loss below 0.9 ln 10
    var = sorted(v for r in bn for v in r["probes"]["loss_variation"])
    learning = sorted(
        v
        for r in bn
        for loss, v in zip(r["probes"]["loss"], r["probes"]["loss_variation"], strict=True)
        if loss < 0.9 * math.log(10)
    )
    med = f"{(var[1] + var[2]) / 2:.3g}"  # four probes: two seeds, two each
    med_off = f"{statistics.median(learning):.3g}" if learning else "—"
    assert rows[0][headers.index("median loss variation (all / off plateau)")] == (
        f"{med} / {med_off}"
    )
    assert rows[0][-1] == f"{len(learning)} of 4"
    assert "noisy BN" in verdict and "internal covariate shift" in verdict


def _with(
    result: dict[str, Any], ics: float, cos: float, rough: float, loss: float = 1.0
) -> dict[str, Any]:
    """A copy of a result whose every ICS distance, ICS cosine, loss variation, gradient change
    and probed batch loss is the given constant."""
    r = copy.deepcopy(result)
    p = r["probes"]
    p["ics_l2"] = {k: [ics] * len(col) for k, col in p["ics_l2"].items()}
    p["ics_cos"] = {k: [cos] * len(col) for k, col in p["ics_cos"].items()}
    for key in ("loss_variation", "grad_predictiveness"):
        p[key] = [rough] * len(p[key])
    p["loss"] = [loss] * len(p["loss"])
    return r


@pytest.mark.parametrize(
    "bn, none, expected",
    [
        (
            (0.01, 0.9, 0.1),
            (1.0, 0.5, 1.0),
            ["BN reduced", "while learning (batch loss < 2.07; 2 and 2 probes) was 10.0× smaller"],
        ),
        ((1.0, 0.5, 2.0), (0.01, 0.9, 0.5), ["BN did not reduce", "4.0× larger (2 vs 0.5)"]),
        ((0.01, 0.5, 1.0), (1.0, 0.9, 1.05), ["BN gave mixed evidence on", "about the same"]),
    ],
)
def test_verdict_follows_the_numbers(
    runs: list[dict[str, Any]],
    bn: tuple[float, float, float],
    none: tuple[float, float, float],
    expected: list[str],
) -> None:
    assert runs[0]["params"]["norm"] == "bnlab" and runs[1]["params"]["norm"] == "none"
    verdict = summarize_controversy([_with(runs[0], *bn), _with(runs[1], *none)])[2]
    for text in expected:
        assert text in verdict
    assert f"mean cos(G, G') {bn[1]:.3f} vs {none[1]:.3f}" in verdict
    acc = f"{runs[0]['final_test_acc']:.3f} (BN) vs {runs[1]['final_test_acc']:.3f} (no norm)"
    assert acc in verdict
    assert "plateau" not in verdict


def test_verdict_compares_off_the_plateau(runs: list[dict[str, Any]]) -> None:
    """Probes where the no-norm network sits on its plateau (batch loss near ln 10, flat because
    it is not learning) are left out of the landscape comparison; with none left, it says so."""
    bn = _with(runs[0], 0.1, 0.5, 1.0)
    none = _with(runs[1], 0.1, 0.5, 0.01, loss=2.29)  # flat, on the plateau
    verdict = summarize_controversy([bn, none])[2]
    assert "over all probes was 100.0× larger (1 vs 0.01)" in verdict
    assert "never left its initial plateau (batch loss >= 2.07 at all 2 probes)" in verdict
    none["probes"]["loss"][1] = 1.5  # one probe while learning, rougher than BN there
    none["probes"]["loss_variation"][1] = 3.0
    verdict = summarize_controversy([bn, none])[2]
    assert "while learning (batch loss < 2.07; 2 and 1 probes) was 3.0× smaller (1 vs 3)" in verdict
    assert "plateau (" not in verdict


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "params, error, match",
    [
        ({"norm": "batch"}, ValueError, "norm: expected one of"),
        ({"lr": -1.0}, ValueError, "lr"),
        ({"lr": "fast"}, TypeError, "lr"),
        ({"epochs": 0}, ValueError, "epochs"),
        ({"batch_size": 1}, ValueError, "batch_size"),
        ({"subset": 1}, ValueError, "subset"),
        ({"step_sizes": []}, ValueError, "step_sizes"),
        ({"step_sizes": [1.0, 0.0]}, ValueError, "step_sizes"),
        ({"measure_every": 0}, ValueError, "measure_every"),
    ],
)
def test_bad_params(params: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ControversyConfig.from_dict(params)
    with pytest.raises(error, match=match):
        run_controversy(params, synthetic_data())


def test_unknown_param_is_refused_and_defaults_fill_in() -> None:
    with pytest.raises(ConfigError, match=r"measure_evry.*known: \[.*'measure_every'"):
        ControversyConfig.from_dict({"measure_evry": 3})
    with pytest.raises(ValueError, match="measure_evry"):
        run_controversy({**TINY, "measure_evry": 3}, synthetic_data())
    p = ControversyConfig.from_dict({"measure_every": 3}).to_dict()
    assert p["measure_every"] == 3 and p["norm"] == "bnlab" and p["lr"] == 1.0
    assert p["step_sizes"] == [0.5, 1.0, 2.0, 3.0, 4.0]
    assert ControversyConfig.from_dict(p) == ControversyConfig(measure_every=3)  # JSON round trip


def test_train_epoch_calls_before_step_with_the_batch_it_trains_on() -> None:
    """The shared loop's before-step hook sees each step's batch before the step: a model whose
    forward records its inputs gets, at every step, exactly the batch the hook was given, and
    the hook sees the weights the step starts from."""
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(16, 3)
    model = nn.Sequential(nn.Flatten(), linear)
    x, y = torch.rand(10, 1, 4, 4, generator=g), torch.randint(0, 3, (10,), generator=g)
    seen_by_hook: list[tuple[int, Tensor, Tensor, Tensor]] = []
    trained_on: list[Tensor] = []
    model.register_forward_pre_hook(lambda _m, args: trained_on.append(args[0].clone()))

    def before_step(step: int, xb: Tensor, yb: Tensor) -> None:
        seen_by_hook.append((step, xb.clone(), yb.clone(), linear.weight.detach().clone()))

    weights = [linear.weight.detach().clone()]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train_epoch(
        model,
        opt,
        x,
        y,
        batch_size=4,
        generator=torch.Generator().manual_seed(1),
        step_hook=lambda _: weights.append(linear.weight.detach().clone()),
        before_step=before_step,
    )
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    assert [s for s, *_ in seen_by_hook] == [1, 2, 3]  # batches of 4, 4, 2
    assert len(trained_on) == 3
    for i, (_, xb, yb, w) in enumerate(seen_by_hook):
        idx = perm[4 * i : 4 * i + 4]
        assert torch.equal(xb, x[idx]) and torch.equal(yb, y[idx])
        assert torch.equal(trained_on[i], xb)
        assert torch.equal(w, weights[i])  # before the optimizer step
    assert not torch.equal(weights[0], weights[-1])  # the steps did train


def test_bad_data_and_results() -> None:
    with pytest.raises(TypeError, match="train_images"):
        run_controversy(TINY, object())
    with pytest.raises(ValueError, match="at least one"):
        summarize_controversy([])
    with pytest.raises(ValueError, match="run_controversy"):
        plot_controversy([{"norm": "bnlab"}], Path("unused"))
    with pytest.raises(TypeError, match=r"nn\.Sequential"):
        weight_layers(nn.Linear(2, 2))


def test_a_verdict_warns_when_an_arm_mostly_sat_on_its_plateau() -> None:
    from bnlab.lab.experiments.controversy import plateau_caveats

    def run(*losses: float | None) -> dict[str, Any]:
        return {"probes": {"loss": list(losses)}}

    groups = {
        "no BN": {0: run(2.3, 2.2, 0.5), 1: run(2.3, None, 2.1)},  # 5 of 6 on (None: diverged)
        "BN": {0: run(2.3, 0.4, 0.3), 1: run(0.5, 0.4, 0.3)},  # 1 of 6 on
    }
    caveats = plateau_caveats(groups)
    assert len(caveats) == 1 and caveats[0].startswith("Caveat: 5 of no BN's 6 probes")
