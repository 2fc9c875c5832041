"""Path-integral estimators (physical temperature T, P beads; atomic units).

All take a :class:`~spkmd.system.System` whose replicas are the beads and whose
``forces``/``energy``/``stress`` come from the last calculator call. Per-molecule
results have shape [M]; dof counts 3 per atom.

* primitive kinetic energy  K_prim = 3N P k_BT/2 − (1/P) Σ_j ½ m ω_P² |q_j − q_{j+1}|²
* centroid-virial           K_cv   = 3N k_BT/2 − 1/(2P) Σ_j (q_j − q̄)·F_j
* quantum potential energy  V̄ = (1/P) Σ_j V(q_j);  total energy K_cv + V̄
* centroid-virial pressure  p_cv = 2 K_cv/(3V) − (1/P) Σ_j tr σ_j / 3
  (σ = (1/V) ∂E/∂ε, the calculator's stress), and its instantaneous version with
  the centroid momenta in place of 3N k_BT that drives the ring-polymer barostats.
"""

from __future__ import annotations

import torch

from spkserve import units
from spkmd.hooks.base import Hook
from spkmd.rpmd.normal_modes import ring_polymer_frequency, spring_energy
from spkmd.system import System


def _kT(temperature_K: float) -> float:
    return temperature_K * units.KB_HARTREE_PER_K


def _n_atoms(system: System) -> torch.Tensor:
    return system.n_atoms.to(system.dtype)


def kinetic_energy_primitive(system: System, temperature_K: float) -> torch.Tensor:
    """Primitive (thermodynamic) kinetic-energy estimator per molecule, Hartree.  [M]"""
    P = system.n_replicas
    springs = system.sum_molecules(spring_energy(system.positions, system.masses3, ring_polymer_frequency(P, temperature_K)))
    return 1.5 * _n_atoms(system) * P * _kT(temperature_K) - springs.sum(0) / P


def centroid_displacements(system: System) -> torch.Tensor:
    """q_j − q̄.  [P, N, 3]"""
    return system.positions - system.positions.mean(0, keepdim=True)


def kinetic_energy_centroid_virial(system: System, temperature_K: float) -> torch.Tensor:
    """Centroid-virial kinetic-energy estimator per molecule, Hartree.  [M]"""
    if system.forces is None:
        raise ValueError("the centroid-virial estimator needs forces; call the calculator first")
    P = system.n_replicas
    xi_f = (centroid_displacements(system) * system.forces).sum(-1)  # [P, N]
    return 1.5 * _n_atoms(system) * _kT(temperature_K) - 0.5 * system.sum_molecules(xi_f).sum(0) / P


def potential_energy(system: System) -> torch.Tensor:
    """Bead-averaged potential energy per molecule, Hartree.  [M]"""
    return system.energy.mean(0)


def total_energy(system: System, temperature_K: float) -> torch.Tensor:
    """K_cv + V̄ per molecule, Hartree.  [M]"""
    return kinetic_energy_centroid_virial(system, temperature_K) + potential_energy(system)


def centroid_positions(system: System) -> torch.Tensor:
    """Bohr.  [N, 3]"""
    return system.positions.mean(0)


def centroid_velocities(system: System) -> torch.Tensor:
    """Bohr/au_time.  [N, 3]"""
    return system.momenta.mean(0) / system.masses.view(-1, 1)


def _virial_pressure(system: System) -> torch.Tensor:
    if system.stress is None:
        raise ValueError("the pressure estimator needs the stress; request it from the calculator (stress=True)")
    return -torch.diagonal(system.stress, dim1=-2, dim2=-1).sum(-1).mean(0) / 3.0  # [M]


def pressure_centroid_virial(system: System, temperature_K: float) -> torch.Tensor:
    """Centroid-virial pressure estimator per molecule (periodic), Hartree/Bohr³.  [M]"""
    V = system.volume()[0]
    return 2.0 * kinetic_energy_centroid_virial(system, temperature_K) / (3.0 * V) + _virial_pressure(system)


def pressure_tensor_instantaneous(system: System) -> torch.Tensor:
    """Instantaneous pressure tensor (centroid momenta + centroid virial), Hartree/Bohr³.  [M, 3, 3]

    Π = (1/V)[Σ_i m_i v̄_i ⊗ v̄_i − (1/P) Σ_j ξ_j ⊗ F_j (symmetrised)] − (1/P) Σ_j σ_j.
    Its average equals the pressure for one bead (classical) and for ring polymers
    (derivative of the free energy at fixed centroid displacements ξ).
    """
    if system.stress is None:
        raise ValueError("the pressure needs the stress; request it from the calculator (stress=True)")
    P = system.n_replicas
    p_c = system.momenta.mean(0)  # [N, 3]
    kin = p_c.unsqueeze(-1) * p_c.unsqueeze(-2) / system.masses.view(-1, 1, 1)  # [N, 3, 3]
    kin = system.sum_molecules(kin.unsqueeze(0))[0]  # [M, 3, 3]
    if P > 1:
        xi = centroid_displacements(system)
        xf = (xi.unsqueeze(-1) * system.forces.unsqueeze(-2)).sum(0) / P  # [N, 3, 3]
        xf = system.sum_molecules(xf.unsqueeze(0))[0]
        kin = kin - 0.5 * (xf + xf.transpose(-1, -2))
    V = system.volume()[0].view(-1, 1, 1)
    return kin / V - system.stress.mean(0)


def pressure_instantaneous(system: System) -> torch.Tensor:
    """Trace/3 of :func:`pressure_tensor_instantaneous`, Hartree/Bohr³.  [M]"""
    return torch.diagonal(pressure_tensor_instantaneous(system), dim1=-2, dim2=-1).sum(-1) / 3.0


#: property names written by :class:`RingPolymerEstimators` (units in spkmd atomic units)
ESTIMATOR_UNITS = {
    "kinetic_energy_primitive": "Hartree",
    "kinetic_energy_centroid_virial": "Hartree",
    "potential_energy_quantum": "Hartree",
    "total_energy_quantum": "Hartree",
    "centroid_positions": "Bohr",
    "centroid_velocities": "Bohr/au_time",
    "pressure_centroid_virial": "Hartree/Bohr^3",
}


def estimate(system: System, temperature_K: float, pressure: bool | None = None) -> dict[str, torch.Tensor]:
    """All estimators as a dict: per-molecule values [1, M], centroid arrays [1, N, 3]
    (leading replica axis of length 1 so they follow the system's property layout)."""
    out = {
        "kinetic_energy_primitive": kinetic_energy_primitive(system, temperature_K),
        "kinetic_energy_centroid_virial": kinetic_energy_centroid_virial(system, temperature_K),
        "potential_energy_quantum": potential_energy(system),
    }
    out["total_energy_quantum"] = out["kinetic_energy_centroid_virial"] + out["potential_energy_quantum"]
    out["centroid_positions"] = centroid_positions(system)
    out["centroid_velocities"] = centroid_velocities(system)
    if pressure is None:
        pressure = system.stress is not None and bool(system.pbc.all())
    if pressure:
        out["pressure_centroid_virial"] = pressure_centroid_virial(system, temperature_K)
    return {k: v.unsqueeze(0) for k, v in out.items()}


class RingPolymerEstimators(Hook):
    """Put the estimators into ``system.properties`` at the end of every step (and at
    the start) so loggers placed after this hook record them.

    Args:
        temperature_K: physical temperature T of the path integral.
        pressure: also the centroid-virial pressure (``None``: when stress is available).
    """

    def __init__(self, temperature_K: float, pressure: bool | None = None) -> None:
        if not temperature_K > 0:
            raise ValueError(f"temperature_K must be positive, got {temperature_K}")
        self.temperature_K = float(temperature_K)
        self.pressure = pressure

    def update(self, system: System) -> None:
        props = dict(system.properties)
        props.update(estimate(system, self.temperature_K, self.pressure))
        system.properties = props

    def on_simulation_start(self, simulator) -> None:
        self.update(simulator.system)

    def on_step_finalize(self, simulator) -> None:
        self.update(simulator.system)
