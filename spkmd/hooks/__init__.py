"""Simulation hooks: thermostats (:mod:`spkmd.thermostats`), COM removal, checkpoints,
loggers (HDF5, TensorBoard), progress bar. See :class:`spkmd.hooks.base.Hook`."""

from spkmd.hooks.base import Hook

__all__ = ["Hook"]
