"""Harmonic reference potentials whose classical and quantum statistics are known.

* :class:`HarmonicBonds`: springs ½k(r - r0)² between listed atom pairs of a
  molecule template (indices local to each system; every system in a batch
  must have the template's atom count).
* :class:`HarmonicTrap`: every atom tied to a fixed centre, E = ½k|R - c|²; a
  3N-dimensional isotropic oscillator of angular frequency ω = sqrt(k/m).

Neither needs a neighbor list (bundle cutoff 0).
"""

from __future__ import annotations

from typing import Sequence

import torch

from spkserve import keys
from spkserve.model import AtomisticModel, scatter_sum
from spkserve.registry import register


def _per_system(e_atom: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return scatter_sum(e_atom, inputs[keys.idx_m], inputs[keys.n_atoms].shape[0])


class HarmonicTrap(AtomisticModel):
    """E = ½ k |R - centre|² summed over atoms (k in energy/length²)."""

    def __init__(self, k: float, centre: Sequence[float] = (0.0, 0.0, 0.0)) -> None:
        super().__init__()
        if k <= 0:
            raise ValueError(f"trap force constant must be positive, got {k}")
        self.k = float(k)
        self.register_buffer("centre", torch.tensor(list(centre), dtype=torch.float64).reshape(3))

    def compute(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        d = inputs[keys.R] - self.centre.to(inputs[keys.R].dtype)  # [N, 3]
        e_atom = 0.5 * self.k * (d * d).sum(-1)  # [N]
        return {keys.energy: _per_system(e_atom, inputs), keys.atomic_energies: e_atom}


class HarmonicBonds(AtomisticModel):
    """E = Σ_bonds ½ k_b (|R_j - R_i| - r0_b)², bonds given with molecule-local indices."""

    def __init__(self, bonds: Sequence[Sequence[int]], k: float | Sequence[float], r0: float | Sequence[float], n_atoms: int) -> None:
        super().__init__()
        b = torch.tensor(bonds, dtype=torch.long).reshape(-1, 2)
        if b.numel() == 0:
            raise ValueError("harmonic bonds need at least one bond")
        if int(b.max()) >= n_atoms or int(b.min()) < 0:
            raise ValueError(f"bond indices must lie in 0..{n_atoms - 1}, got {bonds}")
        self.n_template = int(n_atoms)
        self.register_buffer("bonds", b)
        self.register_buffer("k", torch.broadcast_to(torch.tensor(k, dtype=torch.float64), (len(b),)).clone())
        self.register_buffer("r0", torch.broadcast_to(torch.tensor(r0, dtype=torch.float64), (len(b),)).clone())

    def compute(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        R = inputs[keys.R]
        n_atoms = inputs[keys.n_atoms]
        if bool((n_atoms != self.n_template).any()):
            raise ValueError(
                f"harmonic-bond model is defined for molecules of {self.n_template} atoms, got systems of {n_atoms.tolist()}"
            )
        start = torch.cumsum(n_atoms, 0) - n_atoms  # [S]
        gb = (start[:, None, None] + self.bonds[None]).reshape(-1, 2)  # [S*B, 2]
        d = torch.linalg.vector_norm(R[gb[:, 1]] - R[gb[:, 0]], dim=-1)
        k = self.k.to(R.dtype).repeat(len(n_atoms))
        r0 = self.r0.to(R.dtype).repeat(len(n_atoms))
        e_bond = 0.5 * k * (d - r0) ** 2
        e_atom = scatter_sum(torch.cat([0.5 * e_bond, 0.5 * e_bond]), gb.T.reshape(-1), R.shape[0])
        return {keys.energy: _per_system(e_atom, inputs), keys.atomic_energies: e_atom}


@register("harmonic_trap")
def build_harmonic_trap(k: float, centre: Sequence[float] = (0.0, 0.0, 0.0)) -> HarmonicTrap:
    return HarmonicTrap(k, centre)


@register("harmonic_bonds")
def build_harmonic_bonds(bonds, k, r0, n_atoms: int) -> HarmonicBonds:
    return HarmonicBonds(bonds, k, r0, n_atoms)
