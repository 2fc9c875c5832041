"""Ring-polymer integrator: velocity Verlet whose drift is the free ring-polymer flow.

Beads are the replicas of :class:`~spkmd.system.System` (``positions [P, N, 3]``),
so one calculator call evaluates all beads of all molecules. The bead number is
``system.n_replicas``; the integrator builds its normal-mode propagator for it on
the first step (or at construction when ``n_beads`` is given) and refuses time
steps above the scheme's stability limit before anything moves.
"""

from __future__ import annotations

import math

import torch

from spkserve import units
from spkmd.integrators import VelocityVerlet
from spkmd.rpmd.normal_modes import (
    SCHEMES,
    FreeRingPolymerPropagator,
    ring_polymer_frequency,
    spring_energy,
    stability_limit_fs,
)
from spkmd.system import System


class RingPolymerError(ValueError):
    """Bad ring-polymer setup (bead number, time step, scheme); message names the fix."""


def check_ring_polymer_setup(n_beads: int, temperature_K: float, time_step_fs: float, scheme: str,
                             require_even: bool = False) -> None:
    """Raise :class:`RingPolymerError` for an unusable bead number / time step / scheme."""
    if scheme not in SCHEMES:
        raise RingPolymerError(f"unknown ring-polymer scheme {scheme!r}; use one of {SCHEMES}")
    if n_beads < 1:
        raise RingPolymerError(f"the number of beads (system.n_replicas) must be at least 1, got {n_beads}")
    if require_even and n_beads % 2:
        raise RingPolymerError(
            f"this setup needs an even number of beads, got system.n_replicas={n_beads}; use {n_beads + 1} or {n_beads - 1}"
        )
    limit = stability_limit_fs(n_beads, temperature_K, scheme)
    if time_step_fs >= limit:
        raise RingPolymerError(
            f"time step {time_step_fs:g} fs is at or above the stability limit {limit:.4g} fs of the {scheme!r} "
            f"free ring-polymer propagation for {n_beads} beads at {temperature_K:g} K (ω_max Δt ≥ π); "
            "use a smaller dynamics.integrator.time_step or scheme=cayley"
        )


class RingPolymerIntegrator(VelocityVerlet):
    """RPMD / PIMD integrator (i-PI conventions: beads at temperature P·T).

    Args:
        time_step_fs: time step.
        temperature_K: physical temperature T (sets the spring frequency ω_P = P k_B T/ħ);
            thermostats for ring polymers act at the bead temperature P·T.
        scheme: ``"exact"`` free ring-polymer propagation or ``"cayley"`` (strongly stable).
        n_beads: if given, the setup is checked now; else on the first step.
        require_even: refuse odd bead numbers (for schemes or analyses that pair beads).
        estimators: write the path-integral estimators (:mod:`spkmd.rpmd.estimators`) into
            ``system.properties`` after every force call, so loggers record them.
    """

    def __init__(self, time_step_fs: float, temperature_K: float, scheme: str = "exact",
                 n_beads: int | None = None, require_even: bool = False, estimators: bool = True) -> None:
        super().__init__(time_step_fs)
        if not (isinstance(temperature_K, (int, float)) and temperature_K > 0 and math.isfinite(temperature_K)):
            raise RingPolymerError(f"temperature_K must be a positive number, got {temperature_K!r}")
        if scheme not in SCHEMES:
            raise RingPolymerError(f"unknown ring-polymer scheme {scheme!r}; use one of {SCHEMES}")
        self.temperature_K = float(temperature_K)
        self.scheme = scheme
        self.require_even = bool(require_even)
        self.estimators = bool(estimators)
        self.propagator: FreeRingPolymerPropagator | None = None
        if n_beads is not None:
            check_ring_polymer_setup(n_beads, self.temperature_K, self.time_step_fs, scheme, self.require_even)

    @property
    def kT(self) -> float:
        """Physical k_B T in Hartree."""
        return self.temperature_K * units.KB_HARTREE_PER_K

    def check(self, system: System) -> None:
        """Raise before the run if bead number or time step do not suit the scheme."""
        check_ring_polymer_setup(system.n_replicas, self.temperature_K, self.time_step_fs, self.scheme, self.require_even)

    def omega_p(self, system: System) -> float:
        return ring_polymer_frequency(system.n_replicas, self.temperature_K)

    def setup(self, system: System) -> FreeRingPolymerPropagator:
        p = self.propagator
        if p is None or p.n_beads != system.n_replicas or p.C.dtype != system.dtype or p.C.device != system.device:
            self.check(system)
            p = FreeRingPolymerPropagator(system.n_replicas, self.temperature_K, self.time_step, self.scheme,
                                          dtype=system.dtype, device=system.device)
            self.propagator = p
        return p

    def drift(self, system: System) -> None:
        self.setup(system).propagate(system.positions, system.momenta, system.masses3)

    def half_step(self, system: System) -> None:
        super().half_step(system)
        if self.estimators:
            self.update_estimators(system)

    def update_estimators(self, system: System) -> None:
        """Add the estimators to ``system.properties`` (after a force call)."""
        from spkmd.rpmd.estimators import estimate

        props = dict(system.properties)
        props.update(estimate(system, self.temperature_K))
        system.properties = props

    #: the beads move at P·T; their kinetic temperature divided by P estimates T (i-PI's "temperature")
    temperature_estimator = "ring-polymer kinetic (bead temperature / P)"

    def kinetic_temperature_factor(self, system: System) -> float:
        """P: the beads move at P·T, so :meth:`temperature` (each bead's kinetic temperature
        2 K_j / (dof k_B) divided by P) averages to the physical T."""
        return float(system.n_replicas)

    def energy_contribution(self, system: System) -> torch.Tensor:
        """Spring energy ½ m ω_P² |q_j − q_{j+1}|² of bead j, per molecule, Hartree.  [P, M]

        (Workaround for the first logged frame, which follows a bare calculator call:
        if the estimators are missing from ``system.properties`` they are added here.)
        """
        if self.estimators and system.forces is not None and "kinetic_energy_centroid_virial" not in system.properties:
            self.update_estimators(system)
        return system.sum_molecules(spring_energy(system.positions, system.masses3, self.omega_p(system)))

    def to(self, device=None, dtype=None) -> "RingPolymerIntegrator":
        if self.propagator is not None:
            self.propagator.to(device, dtype)
        return self

    def state_dict(self) -> dict:
        return {"time_step": self.time_step, "temperature_K": self.temperature_K, "scheme": self.scheme}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("scheme", self.scheme) != self.scheme or abs(state.get("temperature_K", self.temperature_K) - self.temperature_K) > 1e-9:
            raise RingPolymerError(
                f"checkpoint was written with scheme {state.get('scheme')!r} at {state.get('temperature_K')} K, "
                f"this integrator uses {self.scheme!r} at {self.temperature_K} K"
            )
