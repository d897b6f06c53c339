"""Why does BN help? Internal covariate shift against loss-landscape smoothness, measured on the
chapter's LeNet (Santurkar, Tsipras, Ilyas & Mądry, 2018, "How Does Batch Normalization Help
Optimization?", arXiv:1805.11604; Ioffe & Szegedy, 2015, arXiv:1502.03167).

Three networks train with plain SGD on the same data: ``norm="bnlab"`` (the chapter's
BN-LeNet), ``"none"`` (without norm layers) and ``"noisy"`` (BN followed by non-stationary
noise, :class:`NonstationaryNoise`). Every ``measure_every`` steps, on the current training
batch B and at the current weights w, with g = ∇L_B(w) the gradient of the SGD step about to be
taken (η₀ the learning rate):

Internal covariate shift (Santurkar et al., Definition 2.1), for each weight layer i > 0::

    G  = ∇_{W_i} L_B(W_1,          ..., W_{i-1},          W_i, ..., W_k)
    G' = ∇_{W_i} L_B(W_1 - η₀ g_1, ..., W_{i-1} - η₀ g_{i-1}, W_i, ..., W_k)
    ics_l2 = ||G - G'||₂,   ics_cos = <G, G'> / (||G||₂ ||G'||₂)

"Layers before i" are all parameters (weights, biases, BN γ and β) of the modules before layer
i's conv/dense module. Layer 0 has nothing before it, so it is not reported.

Loss landscape along the gradient, for η in η₀ · step_sizes::

    loss_variation      = max_η L_B(w - η g) - min_η L_B(w - η g)         (loss Lipschitzness)
    grad_predictiveness = max_η ||∇L_B(w - η g) - ∇L_B(w)||₂          (gradient predictiveness)
    beta_smoothness     = max_η ||∇L_B(w - η g) - ∇L_B(w)||₂ / ||η g||₂  ("effective" β-smoothness)

Lower is smoother for all three. A network on its initial plateau (batch loss near ln 10) is
flat along the gradient because it is not learning, so :func:`summarize_controversy` also
reports, and its verdict compares, the probes "off the plateau" (batch loss below 0.9 · ln 10).

All probes run in training mode, on the same batch and noise sample as the step, and leave the
model, its running statistics, its ``.grad`` fields and every random generator as they were.
The parameters of a run are :class:`ControversyConfig`'s fields; the test set is always the full
10,000 images. A probe costs 1 + (number of layers - 1) + len(step_sizes) forward/backward
passes (10 with the defaults, against 1 for a training step).

The modules: ``config`` (the parameters), ``noise`` (noisy BN), ``probes``, ``run`` (training
through the shared loop, probed before each step) and ``summary`` (table, verdict, figures).
"""

from bnlab.lab.controversy.config import NORMS, ControversyConfig
from bnlab.lab.controversy.noise import NonstationaryNoise, noise_modules, noisy_bn_factory
from bnlab.lab.controversy.probes import full_gradient, ics_probe, landscape_probe, weight_layers
from bnlab.lab.controversy.run import SHUFFLE_SEED_OFFSET, build_model, run_controversy
from bnlab.lab.controversy.summary import plot_controversy, summarize_controversy

__all__ = [
    "NORMS",
    "SHUFFLE_SEED_OFFSET",
    "ControversyConfig",
    "NonstationaryNoise",
    "build_model",
    "full_gradient",
    "ics_probe",
    "landscape_probe",
    "noise_modules",
    "noisy_bn_factory",
    "plot_controversy",
    "run_controversy",
    "summarize_controversy",
    "weight_layers",
]
