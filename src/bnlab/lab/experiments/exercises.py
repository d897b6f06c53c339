"""The chapter's exercises that compare model variants: where BN goes (3), BN vs dropout (4),
fixed γ/β (5), the bias before BN and folding (1), and other normalizations (7)."""

from __future__ import annotations

from pathlib import Path

from bnlab.lab.experiments.base import Groups
from bnlab.lab.experiments.variants import VariantExperiment
from bnlab.lab.report import Block, Table, Text
from bnlab.lab.scale import Scale
from bnlab.lab.stats import mean_ci

PLACEMENT = VariantExperiment(
    name="placement",
    title="Exercise 3: BN in every layer, some layers, or none; before or after the activation",
    claim="Do we need BN in every layer? What if it sits after the activation instead of before?",
    arms=[
        ("all", {"norm_layers": "all"}),
        ("conv only", {"norm_layers": "conv"}),
        ("dense only", {"norm_layers": "dense"}),
        ("none", {"norm_layers": "none"}),
        ("all, after activation", {"norm_layers": "all", "norm_position": "after"}),
    ],
    reference="all",
    notes="All arms use the chapter's lr 1.0 so that only the placement differs.",
)

DROPOUT = VariantExperiment(
    name="dropout",
    title="Exercise 4: BN instead of dropout, both, or neither",
    claim="Can BN replace dropout? Does combining them help?",
    arms=[
        ("BN only", {"norm": "bnlab", "lr": 1.0}),
        ("dropout only", {"norm": "none", "lr": 0.9, "dropout": 0.5, "dropout_layers": "dense"}),
        ("BN + dropout", {"norm": "bnlab", "lr": 1.0, "dropout": 0.5, "dropout_layers": "dense"}),
        ("neither", {"norm": "none", "lr": 0.9}),
    ],
    reference="BN only",
    notes="Dropout p = 0.5 after the two dense hidden layers; lr 1.0 with BN, 0.9 without.",
)

AFFINE = VariantExperiment(
    name="affine",
    title="Exercise 5: learned vs fixed γ and β",
    claim="What happens if γ and β are not learned (fixed at 1 and 0)?",
    arms=[
        ("learned γ, β", {"norm": "bnlab"}),
        ("fixed γ=1, β=0", {"norm": "bnlab", "norm_options": ["fixed_affine=true"]}),
        ("no γ, β (affine=False)", {"norm": "bnlab", "norm_options": ["affine=false"]}),
    ],
    reference="learned γ, β",
    notes="'fixed' keeps γ and β as frozen parameters at 1 and 0; affine=False has none: "
    "the same function, so these two arms should agree.",
)


def _fold_extra(groups: Groups, fig_dir: Path, scale: Scale) -> list[Block]:
    probes = [
        r["probes"]["fold"]
        for runs in groups.values()
        for r in runs.values()
        if "max_rel_diff" in r["probes"].get("fold", {})
    ]
    if not probes:
        return []
    worst = max(p["max_rel_diff"] for p in probes)
    speed = mean_ci([p["ms_unfolded"] / p["ms_folded"] for p in probes])
    agree = min(p["argmax_agreement"] for p in probes)
    return [
        Table(
            ["runs", "largest max |Δ| / max |y|", "same argmax (worst run)", "speed-up"],
            [[str(len(probes)), f"{worst:.1e}", f"{agree:.4f}", speed.fmt(2) + "×"]],
            "Folding every BN into the layer before it (eval mode, 256 test images, float32, "
            "CPU), on every trained run of this section: output difference, and the ratio of "
            "unfolded to folded forward time (medians of interleaved repetitions within each "
            "run; mean and 95% CI over runs). The runs shared the cores with other jobs, so the "
            "ratio is indicative.",
        ),
        Text(f"After folding, {probes[0]['norms_left']} norm layers are left in the model."),
    ]


FOLD = VariantExperiment(
    name="fold",
    title="Exercise 1: the bias before BN, and folding BN into the previous layer",
    claim="Can we remove the bias of the layer before BN? Can BN be folded into that layer?",
    arms=[
        ("bias before BN", {"norm": "bnlab", "bias_before_norm": True}),
        ("no bias before BN", {"norm": "bnlab", "bias_before_norm": False}),
    ],
    reference="bias before BN",
    extra=_fold_extra,
    notes="In training BN subtracts the batch mean, which cancels a constant bias exactly; "
    "the arms differ in the initialization's random draws and in the bias parameters.",
)


# Batch Renorm's paper schedule (warm-up over 5k-40k steps) is for ImageNet-length runs; here
# the correction is phased in over the first few hundred steps so that it acts at all.
RENORM_OPTIONS = ["warmup_start=50", "rmax_warmup_end=500", "dmax_warmup_end=300"]

NORM_ARMS: list[tuple[str, dict[str, object]]] = [
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

NORMS = VariantExperiment(
    name="norms",
    title="Exercise 7: other normalizations on the same LeNet",
    claim=(
        "How do layer, group, instance norm, Batch Renormalization, Ghost BN, full-covariance "
        "whitening and the probability integral transform compare with BN?"
    ),
    arms=NORM_ARMS,
    reference="batch",
    # precise_bn recalibrates BN-type layers only: against batch's precise reading, whitening,
    # IterNorm and PIT are read with their moving averages. Each 256-image test batch's own
    # statistics read every arm the same way, so that comparison is like with like.
    metrics=("test_acc_precise", "test_acc_batch_stats", "train_loss"),
    notes="Each norm replaces BN at the same four places, lr 1.0; instance norm needs spatial "
    "axes, so it sits after the two conv layers only. Batch Renorm is phased in over the "
    "first 50-500 steps. Precise statistics recalibrate BN-type layers (batch, renorm, ghost) "
    "only; for whitening, IterNorm and PIT the precise reading is their moving averages, so "
    "against batch's whole-dataset statistics it does not compare like with like. The "
    "comparison by batch statistics (each 256-image test batch normalized with its own "
    "statistics, every arm alike) does. Run times are not compared: the runs shared the cores "
    "with other jobs (`bnlab bench` measures speed).",
)


ACCUMULATION = VariantExperiment(
    name="accumulation",
    title="Beyond the chapter: BN under gradient accumulation",
    claim=(
        "With gradient accumulation (k micro-batches per optimizer step) BN updates its running "
        "statistics k times per step, each from a batch k times smaller; "
        "`bnlab.tools.accumulate_bn` updates them once per step from the merged statistics of "
        "the k micro-batches, as a forward of the whole batch would. Does it matter?"
    ),
    arms=[
        ("8 × 32, running stats per micro-batch", {"micro_batches": 8}),
        ("8 × 32, accumulate_bn", {"micro_batches": 8, "accumulate_bn": True}),
        ("one batch of 256", {}),
    ],
    reference="8 × 32, running stats per micro-batch",
    metrics=("test_acc_moving", "test_acc_precise", "train_loss"),
    costly=True,
    notes="Every arm takes one SGD step per 256 images at lr 1.0; in the 8 × 32 arms BN "
    "normalizes each micro-batch of 32 with its own statistics (identical in both, so their "
    "training is the same and only the running statistics differ); the batch of 256 is the "
    "chapter's run. The moving-average reading is where accumulate_bn can act; the precise "
    "reading recomputes the statistics and should not differ between the two 8 × 32 arms.",
)
