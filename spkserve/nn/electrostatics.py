"""Electrostatic energy from latent partial charges: damped Coulomb (molecules) and Ewald (periodic).

A head that reads per-atom charges q [N] computed by an earlier head (for example the
latent charges of :class:`spkserve.nn.outputs.DipoleMoment`, already corrected to sum to
the system's ``total_charge``) and returns an energy term [S] to add with ``energy_sum``:

* molecules (``pbc`` not all True):
  E = 1/2 sum_{i != j, r_ij < cutoff} k_e q_i q_j chi(r_ij), with the short-range damping
  chi(r) = s(r) / sqrt(r^2 + a^2) + (1 - s(r)) / r, s a cosine switch from 1 at r = 0 to 0 at
  r = ``damping_cutoff_angstrom`` (exact 1/r beyond it; finite at r = 0). Choose ``cutoff_angstrom``
  larger than the molecules so every pair is counted.
* periodic systems (``pbc`` all True): Ewald summation with splitting parameter beta,
  E = E_real + E_recip + E_self + E_background, E_real = 1/2 sum_{pairs < cutoff} k_e q_i q_j
  [erfc(beta r)/r + chi(r) - 1/r], E_recip = (2 pi k_e / V) sum_{0<|n|<=kmax} exp(-k^2/4beta^2)/k^2
  |sum_i q_i exp(i k.r_i)|^2, E_self = -k_e beta/sqrt(pi) sum_i q_i^2 and, for a system with net
  charge Q, the neutralising-background term E_background = -k_e pi Q^2 / (2 V beta^2) (which keeps the
  energy independent of beta). Tin-foil boundary conditions (no surface dipole term).

Units: charges in e, lengths in ``length_unit``, energy in ``energy_unit`` (k_e from
:mod:`spkserve.units`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from spkserve import keys, units
from spkserve.nn.geometry import PAIR_DISTANCES, PAIR_I, PAIR_J, scatter_sum


def _n_systems(inputs: dict[str, torch.Tensor]) -> int:
    return int(inputs[keys.n_atoms].shape[0])


class ElectrostaticEnergy(nn.Module):
    """Damped Coulomb / Ewald energy of latent charges (see the module docstring)."""

    def __init__(
        self,
        cutoff_angstrom: float = 10.0,
        damping_cutoff_angstrom: float = 2.0,
        damping_length_angstrom: float = 1.0,
        ewald_beta: float | None = None,
        ewald_kmax: int = 6,
        length_unit: str = "Ang",
        energy_unit: str = "eV",
        charges_key: str = keys.partial_charges,
        output_key: str = "electrostatic_energy",
    ):
        super().__init__()
        if not cutoff_angstrom > 0 or not damping_cutoff_angstrom > 0 or not damping_length_angstrom > 0:
            raise ValueError("cutoff_angstrom, damping_cutoff_angstrom and damping_length_angstrom must be > 0")
        if damping_cutoff_angstrom > cutoff_angstrom:
            raise ValueError(f"damping_cutoff_angstrom {damping_cutoff_angstrom} exceeds cutoff_angstrom {cutoff_angstrom}")
        L = units.factor("Angstrom", length_unit)
        self.cutoff = float(cutoff_angstrom) * L
        self.r_switch = float(damping_cutoff_angstrom) * L
        self.a2 = (float(damping_length_angstrom) * L) ** 2
        #: Ewald splitting parameter (1/length); default 3.2 / cutoff (erfc(3.2) ~ 3e-6)
        self.beta = float(ewald_beta) if ewald_beta else 3.2 / self.cutoff
        self.kmax = int(ewald_kmax)
        # k_e = 1 Hartree Bohr / e^2
        self.ke = units.factor("Hartree", energy_unit) * units.factor("Bohr", length_unit)
        self.charges_key = charges_key
        self.output_key = output_key

    def damped_inverse(self, d: torch.Tensor) -> torch.Tensor:
        """chi(r): 1/r beyond the damping cutoff, 1/sqrt(r^2 + a^2) at short range."""
        x = (d / self.r_switch).clamp(max=1.0)
        s = 0.5 * (torch.cos(math.pi * x) + 1.0)
        safe = torch.where(d > 0, d, torch.ones_like(d))
        return s / torch.sqrt(d * d + self.a2) + (1.0 - s) / safe

    def forward(
        self, inputs: dict[str, torch.Tensor], features: dict[str, torch.Tensor], results: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if self.charges_key not in results:
            raise ValueError(
                f"ElectrostaticEnergy needs per-atom charges {self.charges_key!r} from an earlier head "
                f"(e.g. dipole_moment); have {sorted(results)}"
            )
        q = results[self.charges_key]  # [N]
        idx_i, idx_j = features[PAIR_I], features[PAIR_J]
        d = features[PAIR_DISTANCES]
        n_sys = _n_systems(inputs)
        idx_m = inputs[keys.idx_m]
        periodic = inputs[keys.pbc].all(dim=1)  # [S]
        inside = (d < self.cutoff).to(d.dtype)
        chi = self.damped_inverse(d)
        periodic_pair = periodic[idx_m[idx_i]]
        safe = torch.where(d > 0, d, torch.ones_like(d))
        real = torch.where(periodic_pair, torch.erfc(self.beta * d) / safe + chi - 1.0 / safe, chi)
        e_pair = 0.5 * self.ke * q[idx_i] * q[idx_j] * real * inside
        energy = scatter_sum(scatter_sum(e_pair, idx_i, q.shape[0]), idx_m, n_sys)  # [S]
        if bool(periodic.any()):
            extra = [torch.zeros((), dtype=q.dtype, device=q.device)] * n_sys
            R = inputs[keys.R]
            for s in torch.nonzero(periodic).flatten().tolist():
                sel = idx_m == s
                extra[s] = self._reciprocal(q[sel], R[sel], inputs[keys.cell][s])
            energy = energy + torch.stack(extra)
        return {self.output_key: energy}

    def _reciprocal(self, q: torch.Tensor, R: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Reciprocal-space, self and background terms of one periodic system."""
        volume = torch.abs(torch.det(cell))
        recip = 2 * math.pi * torch.linalg.inv(cell).T  # rows b_i with a_i . b_j = 2 pi delta_ij
        rng = torch.arange(-self.kmax, self.kmax + 1, dtype=R.dtype, device=R.device)
        n = torch.stack(torch.meshgrid(rng, rng, rng, indexing="ij"), dim=-1).reshape(-1, 3)
        n = n[(n != 0).any(dim=1)]
        k = n @ recip  # [K, 3]
        k2 = (k * k).sum(1)
        phase = R @ k.T  # [n, K]
        s_re = (q[:, None] * torch.cos(phase)).sum(0)
        s_im = (q[:, None] * torch.sin(phase)).sum(0)
        e_rec = 2 * math.pi / volume * (torch.exp(-k2 / (4 * self.beta**2)) / k2 * (s_re**2 + s_im**2)).sum()
        e_self = -self.beta / math.sqrt(math.pi) * (q * q).sum()
        e_bg = -math.pi * q.sum() ** 2 / (2 * volume * self.beta**2)
        return self.ke * (e_rec + e_self + e_bg)
