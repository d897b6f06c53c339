"""Gradient accumulation in the training harness: `micro_batches=k` takes one optimizer step per
batch from k forward/backward passes, and `accumulate_bn` makes BN's running statistics move
once per step, from the merged statistics of the step's micro-batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bnlab.nn import BatchNorm
from bnlab.train import ConfigError, TrainConfig, train
from tests.test_train import config, synthetic


def test_micro_batches_without_bn_match_whole_batches(tmp_path: Path) -> None:
    # without BN a batch's mean-loss gradient is the weighted sum of its micro-batches'
    data = synthetic(n_train=256, n_test=64)
    whole = train(config(tmp_path, "whole", norm="none", lr=0.5, epochs=1), data, progress=False)
    split = train(
        config(tmp_path, "split", norm="none", lr=0.5, epochs=1, micro_batches=4),
        data,
        progress=False,
    )
    for a, b in zip(whole.model.parameters(), split.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert whole.history[0].train_loss == pytest.approx(split.history[0].train_loss, rel=1e-5)
    assert whole.history[0].train_acc == split.history[0].train_acc


def test_accumulate_bn_updates_once_per_step(tmp_path: Path) -> None:
    data = synthetic(n_train=256, n_test=64)  # 4 steps of 64 per epoch
    plain = train(config(tmp_path, "plain", epochs=1, micro_batches=4), data, progress=False)
    acc = train(
        config(tmp_path, "acc", epochs=1, micro_batches=4, accumulate_bn=True),
        data,
        progress=False,
    )

    def tracked(model: torch.nn.Module) -> list[int]:
        return [int(m.num_batches_tracked) for m in model.modules() if isinstance(m, BatchNorm)]

    assert tracked(plain.model) == [16] * 4  # one update per micro-batch
    assert tracked(acc.model) == [4] * 4  # one per optimizer step
    # normalization itself is unchanged: the same weights after the same steps
    for a, b in zip(plain.model.parameters(), acc.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_accumulation_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="batch_size >= 16"):
        TrainConfig(batch_size=8, micro_batches=8)
    with pytest.raises(ConfigError, match="accumulate_bn: expected --micro-batches"):
        TrainConfig(accumulate_bn=True)
    with pytest.raises(ConfigError, match="micro_batches: expected an int >= 1"):
        TrainConfig(micro_batches=0)
