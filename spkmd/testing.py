"""Small builders for tests, examples and benchmarks: reference-potential calculators
and simple start structures (argon clusters, trapped atoms)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from spkmd.calculators import BundleCalculator
from spkmd.system import System


def lj_argon_calculator(directory: str | Path, cutoff_angstrom: float = 10.0, skin_angstrom: float = 1.0, **kw) -> BundleCalculator:
    """Lennard-Jones argon (σ = 3.4 Å, ε = 0.0104 eV) as a reference bundle in ``directory``."""
    from spkserve.potentials import reference_bundle

    path = Path(directory) / f"lj_{cutoff_angstrom:g}.bundle"
    if not path.exists():
        reference_bundle("lj", path, sigma=3.4, epsilon=0.0104, cutoff=cutoff_angstrom)
    return BundleCalculator(path, skin_angstrom=skin_angstrom, **kw)


def trap_calculator(directory: str | Path, k_eV_per_A2: float = 0.1, **kw) -> BundleCalculator:
    """Every atom in an isotropic harmonic trap about the origin, E = ½ k |r|²."""
    from spkserve.potentials import reference_bundle

    path = Path(directory) / f"trap_{k_eV_per_A2:g}.bundle"
    if not path.exists():
        reference_bundle("harmonic_trap", path, k=k_eV_per_A2)
    return BundleCalculator(path, skin_angstrom=0.0, **kw)


def argon_cluster(n_shells: int = 2, jitter_angstrom: float = 0.05, seed: int = 0):
    """An argon icosahedron (13 atoms for 2 shells) with small random displacements."""
    from ase.cluster import Icosahedron

    atoms = Icosahedron("Ar", n_shells, latticeconstant=5.26)
    rng = np.random.default_rng(seed)
    atoms.positions += rng.normal(scale=jitter_angstrom, size=atoms.positions.shape)
    return atoms


def trapped_atoms(n_molecules: int, n_replicas: int = 1, symbol: str = "C", seed: int = 0,
                  dtype: torch.dtype = torch.float64) -> System:
    """``n_molecules`` one-atom molecules spread around the origin (for harmonic-trap statistics)."""
    import ase

    rng = np.random.default_rng(seed)
    mols = [ase.Atoms(symbol, positions=rng.normal(scale=0.3, size=(1, 3))) for _ in range(n_molecules)]
    return System.from_atoms(mols, n_replicas=n_replicas, dtype=dtype)
