"""The chapter's exercises that compare model variants: where BN goes (3), BN vs dropout (4),
fixed γ/β (5), the bias before BN and folding (1), and other normalizations (7)."""

from __future__ import annotations

from pathlib import Path

from bnlab.lab.experiments.base import finals, mean
from bnlab.lab.experiments.variants import Groups, VariantExperiment
from bnlab.lab.report import Block, Table, fmt_mean_std
from bnlab.lab.scale import Scale


def _acc(groups: Groups) -> dict[str, float]:
    return {k: mean(finals(v, "test_acc")) for k, v in groups.items() if v}


def _ranking(groups: Groups) -> str:
    acc = _acc(groups)
    order = sorted(acc, key=lambda k: -acc[k])
    return " > ".join(f"{k} ({acc[k]:.3f})" for k in order)


def _placement_verdict(groups: Groups) -> str:
    acc = _acc(groups)
    best = max(acc, key=lambda k: acc[k])
    return (
        f"Ranked by final test accuracy: {_ranking(groups)}; best here: {best}, "
        f"{acc[best] - acc.get('none', acc[best]):+.3f} over no BN."
    )


PLACEMENT = VariantExperiment(
    name="placement",
    title="Exercise 3: BN in every layer, some layers, or none; before or after the activation",
    claim="Do we need BN in every layer? What if it sits after the activation instead of before?",
    variants=[
        ("all", {"norm_layers": "all"}),
        ("conv only", {"norm_layers": "conv"}),
        ("dense only", {"norm_layers": "dense"}),
        ("none", {"norm_layers": "none"}),
        ("all, after activation", {"norm_layers": "all", "norm_position": "after"}),
    ],
    verdict=_placement_verdict,
    max_seeds=2,
    notes="All variants use the chapter's lr 1.0 so that only the placement differs.",
)


def _dropout_verdict(groups: Groups) -> str:
    acc = _acc(groups)
    beats = acc.get("dropout only", 0.0) > acc.get("BN only", 1.0)
    gap = {
        k: mean(finals(v, "train_acc")) - mean(finals(v, "test_acc"))
        for k, v in groups.items()
        if v
    }
    return (
        f"Ranked by test accuracy: {_ranking(groups)}. Train−test gap: "
        + ", ".join(f"{k} {gap[k]:+.3f}" for k in gap)
        + f". Dropout alone {'beats' if beats else 'does not beat'} BN alone here."
    )


DROPOUT = VariantExperiment(
    name="dropout",
    title="Exercise 4: BN instead of dropout, both, or neither",
    claim="Can BN replace dropout? Does combining them help?",
    variants=[
        ("BN only", {"norm": "bnlab", "lr": 1.0}),
        ("dropout only", {"norm": "none", "lr": 0.9, "dropout": 0.5, "dropout_layers": "dense"}),
        ("BN + dropout", {"norm": "bnlab", "lr": 1.0, "dropout": 0.5, "dropout_layers": "dense"}),
        ("neither", {"norm": "none", "lr": 0.9}),
    ],
    verdict=_dropout_verdict,
    max_seeds=2,
    notes="Dropout p = 0.5 after the two dense hidden layers; lr 1.0 with BN, 0.9 without.",
)


def _affine_verdict(groups: Groups) -> str:
    acc = _acc(groups)
    learned = acc.get("learned γ, β", float("nan"))
    fixed = acc.get("fixed γ=1, β=0", float("nan"))
    return (
        f"Fixing γ=1, β=0 changes test accuracy by {fixed - learned:+.3f} "
        f"({fixed:.3f} vs {learned:.3f} learned); ranking: {_ranking(groups)}."
    )


AFFINE = VariantExperiment(
    name="affine",
    title="Exercise 5: learned vs fixed γ and β",
    claim="What happens if γ and β are not learned (fixed at 1 and 0)?",
    variants=[
        ("learned γ, β", {"norm": "bnlab"}),
        ("fixed γ=1, β=0", {"norm": "bnlab", "norm_options": ["fixed_affine=true"]}),
        ("no γ, β (affine=False)", {"norm": "bnlab", "norm_options": ["affine=false"]}),
    ],
    verdict=_affine_verdict,
    max_seeds=2,
)


def _fold_extra(groups: Groups, fig_dir: Path, scale: Scale) -> list[Block]:
    probes = [r["probes"]["fold"] for rs in groups.values() for r in rs if "fold" in r["probes"]]
    if not probes:
        return []
    rows = [
        [
            fmt_mean_std([p["max_rel_diff"] for p in probes], 9),
            fmt_mean_std([p["argmax_agreement"] for p in probes], 4),
            fmt_mean_std([p["ms_unfolded"] for p in probes], 3),
            fmt_mean_std([p["ms_folded"] for p in probes], 3),
            fmt_mean_std([p["ms_unfolded"] / p["ms_folded"] for p in probes], 2),
            str(probes[0]["norms_left"]),
        ]
    ]
    return [
        Table(
            [
                "max |Δ| / max |y|",
                "same argmax",
                "ms unfolded",
                "ms folded",
                "speed-up",
                "BN layers left",
            ],
            rows,
            "Folding BN into the layer before it (eval mode, 256 test images, float32, CPU): "
            "output difference and forward time (medians of interleaved repetitions).",
        )
    ]


def _fold_verdict(groups: Groups) -> str:
    acc = _acc(groups)
    with_b, without = acc.get("bias before BN", float("nan")), acc.get("no bias before BN", 0.0)
    probes = [r["probes"]["fold"] for rs in groups.values() for r in rs if "fold" in r["probes"]]
    speed = mean([p["ms_unfolded"] / p["ms_folded"] for p in probes]) if probes else float("nan")
    diff = max((p["max_rel_diff"] for p in probes), default=float("nan"))
    return (
        f"Dropping the bias before BN changes test accuracy by {without - with_b:+.3f} (in "
        "training BN's mean subtraction cancels a bias exactly, so only the initialization's "
        f"random draws differ); folding BN leaves outputs equal to {diff:.1e} relative and runs "
        f"inference {speed:.2f}× as fast."
    )


FOLD = VariantExperiment(
    name="fold",
    title="Exercise 1: the bias before BN, and folding BN into the previous layer",
    claim="Can we remove the bias of the layer before BN? Can BN be folded into that layer?",
    variants=[
        ("bias before BN", {"norm": "bnlab", "bias_before_norm": True}),
        ("no bias before BN", {"norm": "bnlab", "bias_before_norm": False}),
    ],
    verdict=_fold_verdict,
    probes=("fold",),
    max_seeds=2,
    extra=_fold_extra,
)


# Batch Renorm's paper schedule (warm-up over 5k-40k steps) is for ImageNet-length runs; here
# the correction is phased in over the first few hundred steps so that it acts at all.
RENORM_OPTIONS = ["warmup_start=50", "rmax_warmup_end=500", "dmax_warmup_end=300"]

NORM_VARIANTS: list[tuple[str, dict[str, object]]] = [
    ("batch", {"norm": "bnlab"}),
    ("layer", {"norm": "layer"}),
    ("group (2 groups)", {"norm": "group", "norm_options": ["num_groups=2"]}),
    ("instance (conv layers only)", {"norm": "instance", "norm_layers": "conv"}),
    ("batch renorm", {"norm": "renorm", "norm_options": RENORM_OPTIONS}),
    ("ghost (virtual 32)", {"norm": "ghost", "norm_options": ["virtual_batch_size=32"]}),
    ("whitening (ZCA, groups of 16)", {"norm": "whitening"}),
    ("IterNorm (groups of 16)", {"norm": "iternorm"}),
    # a conv over Fashion-MNIST's all-zero background outputs exactly its bias: a block of tied
    # values whose running quantiles lag the moving bias; without the bias PIT predicts well
    ("PIT (no bias before it)", {"norm": "pit", "bias_before_norm": False}),
    ("none (lr 0.9)", {"norm": "none", "lr": 0.9}),
]


def _norms_verdict(groups: Groups) -> str:
    secs = {
        k: mean([mean([e["seconds"] for e in r["history"]]) for r in v])
        for k, v in groups.items()
        if v
    }
    fastest = min(secs, key=lambda k: secs[k])
    slowest = max(secs, key=lambda k: secs[k])
    return (
        f"Ranked by test accuracy: {_ranking(groups)}. Cheapest per epoch: {fastest} "
        f"({secs[fastest]:.1f} s); dearest: {slowest} ({secs[slowest]:.1f} s)."
    )


NORMS = VariantExperiment(
    name="norms",
    title="Exercise 7: other normalizations on the same LeNet",
    claim=(
        "How do layer, group, instance norm, Batch Renormalization, Ghost BN, full-covariance "
        "whitening and the probability integral transform compare with BN?"
    ),
    variants=NORM_VARIANTS,
    verdict=_norms_verdict,
    max_seeds=2,
    notes="Each norm replaces BN at the same four places, lr 1.0; instance norm needs spatial "
    "axes, so it sits after the two conv layers only. Batch Renorm is phased in over the "
    "first 50-500 steps.",
)
