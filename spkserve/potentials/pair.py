"""Analytic pair potentials (Lennard-Jones, Morse) as registered architectures.

Both are shifted to zero energy at the cutoff, like ASE's ``LennardJones(sigma,
epsilon, rc)`` (forces are not shifted, so they jump at the cutoff). Parameters
are in the bundle's units (Å and eV for the reference bundles).
"""

from __future__ import annotations

import torch

from spkserve import keys
from spkserve.model import AtomisticModel, pair_vectors, scatter_sum
from spkserve.registry import register


class PairPotential(AtomisticModel):
    """Sum over a full neighbor list of 1/2 φ(r_ij) - φ(r_c), pairs beyond the cutoff masked."""

    def __init__(self, cutoff: float) -> None:
        super().__init__()
        if cutoff <= 0:
            raise ValueError(f"pair potential cutoff must be positive, got {cutoff}")
        self.cutoff = float(cutoff)

    def phi(self, r: torch.Tensor) -> torch.Tensor:
        """Pair energy at distance ``r``."""
        raise NotImplementedError

    def compute(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        rij = pair_vectors(inputs)  # [P, 3]
        r = torch.linalg.vector_norm(rij, dim=-1)  # [P]
        inside = r < self.cutoff
        # evaluate phi on a safe distance so masked pairs cannot produce inf/NaN gradients
        r_safe = torch.where(inside, r, torch.full_like(r, self.cutoff))
        shift = self.phi(torch.tensor(self.cutoff, dtype=r.dtype, device=r.device))
        e_pair = torch.where(inside, self.phi(r_safe) - shift, torch.zeros_like(r))  # [P]
        e_atom = scatter_sum(0.5 * e_pair, inputs[keys.idx_i], inputs[keys.R].shape[0])  # [N]
        energy = scatter_sum(e_atom, inputs[keys.idx_m], inputs[keys.n_atoms].shape[0])  # [S]
        return {keys.energy: energy, keys.atomic_energies: e_atom}


class LennardJones(PairPotential):
    """φ(r) = 4ε[(σ/r)^12 - (σ/r)^6]."""

    def __init__(self, sigma: float, epsilon: float, cutoff: float) -> None:
        super().__init__(cutoff)
        self.sigma = float(sigma)
        self.epsilon = float(epsilon)

    def phi(self, r: torch.Tensor) -> torch.Tensor:
        s6 = (self.sigma / r) ** 6
        return 4.0 * self.epsilon * (s6 * s6 - s6)


class Morse(PairPotential):
    """φ(r) = D[exp(-2a(r-r0)) - 2 exp(-a(r-r0))]."""

    def __init__(self, depth: float, alpha: float, r0: float, cutoff: float) -> None:
        super().__init__(cutoff)
        self.depth = float(depth)
        self.alpha = float(alpha)
        self.r0 = float(r0)

    def phi(self, r: torch.Tensor) -> torch.Tensor:
        x = torch.exp(-self.alpha * (r - self.r0))
        return self.depth * (x * x - 2.0 * x)


@register("lennard_jones")
def build_lennard_jones(sigma: float, epsilon: float, cutoff: float | None = None) -> LennardJones:
    """Lennard-Jones; ``cutoff`` defaults to 3σ like ASE."""
    return LennardJones(sigma, epsilon, 3.0 * sigma if cutoff is None else cutoff)


@register("morse")
def build_morse(depth: float, alpha: float, r0: float, cutoff: float) -> Morse:
    return Morse(depth, alpha, r0, cutoff)
