"""Models for the experiments: the chapter's BN-LeNet with every variation as an argument."""

from bnlab.models.lenet import LeNet, NormFactory, NormSpec, init_weights, lenet, norm_factory

__all__ = ["LeNet", "NormFactory", "NormSpec", "init_weights", "lenet", "norm_factory"]
