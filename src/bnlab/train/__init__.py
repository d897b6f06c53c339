"""Training: the chapter's loop on in-memory Fashion-MNIST, with run directories, crash-safe
checkpoints and exact resume. ``bnlab train`` is a thin command line over :func:`train`."""

from bnlab.train.checkpoint import CheckpointError, load_checkpoint
from bnlab.train.config import ConfigError, TrainConfig
from bnlab.train.loop import EpochStats, TrainResult, evaluate, to_device_tensors, train_epoch
from bnlab.train.plot import plot_history
from bnlab.train.run import resume, saved_history, train
from bnlab.train.rundir import RunDir

__all__ = [
    "CheckpointError",
    "ConfigError",
    "EpochStats",
    "RunDir",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "load_checkpoint",
    "plot_history",
    "resume",
    "saved_history",
    "to_device_tensors",
    "train",
    "train_epoch",
]
