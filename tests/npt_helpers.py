"""Shared pieces of the NPT validation tests and benchmarks/npt.py: an ideal-gas calculator
(exact NPT volume distribution), LJ start boxes off the equilibrium density, barostat builders."""

from __future__ import annotations

import math

import ase
import numpy as np
import torch

from spkserve import units
from spkmd.barostats import MTKAnisotropic, MTKIsotropic, PILEBarostat, StochasticCellRescaling
from spkmd.calculators import Calculator
from spkmd.npt import NPTVelocityVerlet, RingPolymerNPT
from spkmd.rpmd import PILELocal
from spkmd.system import System
from spkmd.thermostats import Langevin


class IdealGas(Calculator):
    """No interactions: zero energy, forces and stress. In NPT the volume of N atoms then has
    the exact distribution p(V) ∝ V^N exp(−P V/k_BT): ⟨V⟩ = (N+1) k_BT/P and
    ⟨δV²⟩ = (N+1)(k_BT/P)² = k_BT ⟨V⟩ κ_T with κ_T = 1/P."""

    def calculate(self, system: System) -> None:
        R, M = system.n_replicas, system.n_molecules
        system.forces = torch.zeros_like(system.positions)
        system.energy = system.positions.new_zeros(R, M)
        system.stress = system.positions.new_zeros(R, M, 3, 3)
        system.properties = {}

    def check(self, system: System) -> None:
        """Atoms of an ideal gas may overlap."""


def ideal_gas_boxes(n_boxes: int, n_atoms: int, volume_A3: float, seed: int = 0, n_replicas: int = 1,
                    spread: float = 0.1) -> System:
    """Cubic argon boxes, volumes alternately (1 ± spread)·volume_A3."""
    rng = np.random.default_rng(seed)
    mols = []
    for b in range(n_boxes):
        L = (volume_A3 * (1 + spread * (-1) ** b)) ** (1 / 3)
        mols.append(ase.Atoms(f"Ar{n_atoms}", positions=rng.uniform(0, L, (n_atoms, 3)), cell=[L, L, L], pbc=True))
    return System.from_atoms(mols, n_replicas=n_replicas)


def make_barostat(kind: str, pressure_bar: float, temperature_K: float, time_constant_fs: float,
                  compressibility_per_bar: float):
    """``mtk``, ``anisotropic``, ``pile`` (classical), ``pile_rpmd`` (same barostat, ring polymer), ``scr``."""
    if kind == "mtk":
        return MTKIsotropic(pressure_bar, temperature_K, time_constant_fs)
    if kind == "anisotropic":
        return MTKAnisotropic(pressure_bar, temperature_K, time_constant_fs)
    if kind in ("pile", "pile_rpmd"):
        return PILEBarostat(pressure_bar, temperature_K, time_constant_fs)
    if kind == "scr":
        return StochasticCellRescaling(pressure_bar, temperature_K, time_constant_fs,
                                       compressibility_per_bar=compressibility_per_bar)
    raise ValueError(f"unknown barostat kind {kind!r}")


def integrator_and_thermostat(kind: str, baro, time_step_fs: float, temperature_K: float, thermostat_fs: float):
    if kind == "pile_rpmd":
        return RingPolymerNPT(time_step_fs, temperature_K, baro), PILELocal(temperature_K, thermostat_fs)
    return NPTVelocityVerlet(time_step_fs, baro), Langevin(temperature_K, thermostat_fs)


def volumes_A3(system: System) -> np.ndarray:
    """[M] cell volumes in Å³."""
    return (system.volume()[0] * units.factor("Bohr^3", "Angstrom^3")).numpy().copy()


def ideal_gas_pressure_bar(n_atoms: int, temperature_K: float, mean_volume_A3: float) -> float:
    """P giving ⟨V⟩ = mean_volume_A3 for N ideal atoms: P = (N+1) k_BT/⟨V⟩."""
    kT_eV = temperature_K * units.KB_EV_PER_K
    return (n_atoms + 1) * kT_eV / mean_volume_A3 * units.factor("eV/Angstrom^3", "bar")


def batch_stats(samples: np.ndarray) -> tuple[float, float, float, float]:
    """samples [T, M] (independent boxes M): mean, its standard error, variance, its standard error
    (errors from the spread of the per-box estimates)."""
    m_box = samples.mean(0)
    v_box = samples.var(0)
    M = samples.shape[1]
    grand = float(m_box.mean())
    var = float(((samples - grand) ** 2).mean())
    return grand, float(m_box.std(ddof=1) / math.sqrt(M)), var, float(v_box.std(ddof=1) / math.sqrt(M))
