"""Integrators: how positions and momenta advance over one time step.

The :class:`~spkmd.simulator.Simulator` drives one step as::

    hooks.on_step_begin          # thermostat / barostat half-step
    integrator.main_step(system) # p += dt/2 F ; then propagate positions (drift)
    calculator.calculate(system) # new forces, energy, stress
    hooks.on_step_middle
    integrator.half_step(system) # p += dt/2 F
    reversed(hooks).on_step_end  # thermostat / barostat half-step (mirror order)
    hooks.on_step_finalize       # logging, checkpoints

An integrator implements exactly two narrow methods, :meth:`Integrator.main_step`
and :meth:`Integrator.half_step`, both acting in place on a
:class:`~spkmd.system.System` in atomic units. A ring-polymer integrator
replaces the drift with the exact free ring-polymer propagation in normal
modes; an NPT integrator replaces the drift with the coupled position/cell
propagation of its barostat. Both can subclass :class:`VelocityVerlet` and
override :meth:`VelocityVerlet.drift` only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from spkserve import units
from spkmd.system import System


class Integrator(ABC):
    """One abstract base: ``main_step`` (half-kick + drift) and ``half_step`` (half-kick).

    Attributes:
        time_step: time step in atomic time units (ħ/E_h).
    """

    time_step: float

    @abstractmethod
    def main_step(self, system: System) -> None:
        """First half-kick then position propagation (before the force call)."""

    @abstractmethod
    def half_step(self, system: System) -> None:
        """Second half-kick (after the force call)."""

    @property
    def time_step_fs(self) -> float:
        return self.time_step * units.factor("au_time", "fs")

    def energy_contribution(self, system: System):
        """Extra energy of the integrator's Hamiltonian (e.g. ring-polymer springs), Hartree
        [R, M], added to the conserved quantity; ``None`` for plain Newtonian dynamics."""
        return None

    #: name of the estimator :meth:`temperature` returns (shown in progress lines, logs, plots)
    temperature_estimator = "kinetic"

    def kinetic_temperature_factor(self, system: System) -> float:
        """Ratio of the temperature the momenta move at to the physical one (1; ring polymers P)."""
        return 1.0

    def temperature(self, system: System) -> torch.Tensor:
        """Physical temperature estimate per replica and molecule in K.  [R, M]

        The kinetic temperature 2 K / (dof k_B) of every replica divided by
        :meth:`kinetic_temperature_factor` (1 for plain dynamics).
        """
        return system.temperature() / self.kinetic_temperature_factor(system)

    def to(self, device=None, dtype=None) -> "Integrator":
        """Move internal tensors (none for plain Verlet); returns self."""
        return self

    def state_dict(self) -> dict:
        return {"time_step": self.time_step}

    def load_state_dict(self, state: dict) -> None:
        if abs(state["time_step"] - self.time_step) > 1e-12 * abs(self.time_step):
            raise ValueError(
                f"checkpoint was written with time step {state['time_step']} au, this integrator has "
                f"{self.time_step} au; use the same dynamics.integrator.time_step to restart"
            )


class VelocityVerlet(Integrator):
    """Velocity Verlet: p += dt/2 F; q += dt p/m; (forces); p += dt/2 F.

    Args:
        time_step_fs: time step in femtoseconds.
    """

    def __init__(self, time_step_fs: float) -> None:
        if not time_step_fs > 0:
            raise ValueError(f"time_step_fs must be positive, got {time_step_fs}")
        self.time_step = float(time_step_fs) * units.factor("fs", "au_time")

    def kick(self, system: System, dt: float) -> None:
        """p += dt F (in place)."""
        system.momenta.add_(system.forces, alpha=dt)

    def drift(self, system: System) -> None:
        """q += dt p / m (in place). Override for ring polymers / NPT."""
        system.positions.addcdiv_(system.momenta, system.masses3, value=self.time_step)

    def main_step(self, system: System) -> None:
        self.kick(system, 0.5 * self.time_step)
        self.drift(system)

    def half_step(self, system: System) -> None:
        self.kick(system, 0.5 * self.time_step)


INTEGRATORS = {"verlet": VelocityVerlet, "velocity_verlet": VelocityVerlet}
