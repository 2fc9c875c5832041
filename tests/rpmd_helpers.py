"""Shared helpers of the ring-polymer / NPT tests (free ring polymer calculator, block averages)."""

from __future__ import annotations

import math

import numpy as np
import torch

from spkmd.calculators import Calculator
from spkmd.system import System


class ZeroForces(Calculator):
    """Free particles: zero energy, forces and (optionally) stress."""

    def calculate(self, system: System) -> None:
        system.forces = torch.zeros_like(system.positions)
        system.energy = system.positions.new_zeros(system.n_replicas, system.n_molecules)
        system.stress = None
        system.properties = {}


def block_average(series, n_blocks: int = 20) -> tuple[float, float]:
    """Mean and its standard error from ``n_blocks`` block means (series along axis 0)."""
    x = np.asarray(series, dtype=np.float64)
    n = (len(x) // n_blocks) * n_blocks
    if n < n_blocks:
        raise ValueError(f"series of {len(x)} points is too short for {n_blocks} blocks")
    blocks = x[len(x) - n:].reshape(n_blocks, -1, *x.shape[1:]).mean(1)
    return blocks.mean(0), blocks.std(0, ddof=1) / math.sqrt(n_blocks)
