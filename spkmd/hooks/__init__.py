"""Simulation hooks: thermostats (:mod:`spkmd.thermostats`), COM removal, checkpoints,
loggers (HDF5, TensorBoard), progress bar. See :class:`spkmd.hooks.base.Hook`."""

from spkmd.hooks.base import Hook
from spkmd.hooks.callbacks import Checkpoint, ProgressBar, RemoveCOMMotion
from spkmd.hooks.loggers import FileLogger, TensorBoardLogger

__all__ = ["Hook", "Checkpoint", "ProgressBar", "RemoveCOMMotion", "FileLogger", "TensorBoardLogger"]
