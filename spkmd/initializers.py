"""Initial momenta: Maxwell–Boltzmann or uniform, at a temperature in K.

Both optionally remove the centre-of-mass translation and rotation of every
molecule and replica, set ``system.dof`` accordingly (3N - 3 - 3, or - 2 for
linear molecules) and then rescale so that the instantaneous temperature of
every molecule and replica equals ``temperature_K`` exactly.
"""

from __future__ import annotations

import torch

from spkserve import units
from spkmd.system import System


class Initializer:
    """Set momenta at ``temperature_K`` (in place).

    Args:
        temperature_K: target temperature.
        remove_translation: remove centre-of-mass momentum (and 3 dof).
        remove_rotation: remove angular momentum (and 3, or 2 for linear molecules).
        rescale: rescale to exactly ``temperature_K`` per molecule and replica.
    """

    def __init__(
        self,
        temperature_K: float,
        remove_translation: bool = True,
        remove_rotation: bool = False,
        rescale: bool = True,
    ) -> None:
        if not temperature_K >= 0:
            raise ValueError(f"temperature_K must be non-negative, got {temperature_K}")
        self.temperature_K = float(temperature_K)
        self.remove_translation = remove_translation
        self.remove_rotation = remove_rotation
        self.rescale = rescale

    def sample(self, system: System, generator: torch.Generator, temperature_K: float) -> torch.Tensor:
        """Raw momenta [R, N, 3] at ``temperature_K`` before COM removal and rescaling."""
        raise NotImplementedError

    def __call__(self, system: System, generator: torch.Generator | None = None,
                 com_thermalised: bool = False, temperature_factor: float = 1.0) -> None:
        """Set the momenta (and ``system.dof``).

        ``temperature_factor``: the momenta are drawn (and rescaled) at ``temperature_K`` times
        this (ring polymers: P, the beads move at P·T; ``integrator.kinetic_temperature_factor``).

        ``com_thermalised``: the dynamics puts the centre-of-mass translation and rotation back
        (a per-atom thermostat such as Langevin or GLE counts all 3N degrees of freedom); they are
        then kept, the temperature counts 3N, and the rescaled start is at ``temperature_K`` in
        the dof the run reports (without it ethanol under Langevin started at 300·21/27 = 233 K).
        """
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        remove_translation = self.remove_translation and not com_thermalised
        remove_rotation = self.remove_rotation and not com_thermalised
        system.set_dof(remove_translation, remove_rotation)
        if self.temperature_K == 0:
            system.momenta.zero_()
            return
        if not temperature_factor > 0:
            raise ValueError(f"temperature_factor must be positive, got {temperature_factor}")
        target_K = self.temperature_K * float(temperature_factor)
        system.momenta.copy_(self.sample(system, generator, target_K))
        if remove_translation:
            system.remove_com_translation()
        if remove_rotation:
            system.remove_com_rotation()
        if self.rescale:
            T = system.temperature()  # [R, M]
            scale = torch.sqrt(target_K / torch.clamp(T, min=1e-30))
            system.momenta *= system.expand_molecules(scale).unsqueeze(-1)


class MaxwellBoltzmann(Initializer):
    """p_i ~ N(0, m_i k_B T) per Cartesian component."""

    def sample(self, system: System, generator: torch.Generator, temperature_K: float) -> torch.Tensor:
        kT = temperature_K * units.KB_HARTREE_PER_K
        x = torch.randn(system.momenta.shape, generator=generator, dtype=system.dtype).to(system.device)
        return x * torch.sqrt(system.masses3 * kT)


class Uniform(Initializer):
    """Velocities uniform in [-1, 1] (then rescaled to the temperature)."""

    def sample(self, system: System, generator: torch.Generator, temperature_K: float) -> torch.Tensor:
        u = torch.rand(system.momenta.shape, generator=generator, dtype=system.dtype).to(system.device)
        kT = temperature_K * units.KB_HARTREE_PER_K
        return (2.0 * u - 1.0) * torch.sqrt(3.0 * system.masses3 * kT)


INITIALIZERS = {"maxwell_boltzmann": MaxwellBoltzmann, "uniform": Uniform}
