"""NPT integrators: velocity Verlet and ring-polymer MD whose drift moves positions and cell
together through a barostat (:mod:`spkmd.barostats`).

Use the same barostat object in the integrator and in the simulator's hooks::

    baro = MTKIsotropic(pressure_bar=1.0, temperature_K=300.0)
    sim = Simulator(system, NPTVelocityVerlet(0.5, baro), calculator, hooks=[Langevin(300.0), baro])
"""

from __future__ import annotations

import torch

from spkmd.barostats import Barostat, BarostatError
from spkmd.integrators import VelocityVerlet
from spkmd.rpmd.integrator import RingPolymerIntegrator
from spkmd.system import System


def _check_barostat(barostat) -> Barostat:
    if not isinstance(barostat, Barostat):
        raise BarostatError(f"an NPT integrator needs a barostat from spkmd.barostats, got {type(barostat).__name__}")
    return barostat


class NPTVelocityVerlet(VelocityVerlet):
    """Velocity Verlet with the barostat's coupled position/cell drift.

    Args:
        time_step_fs: time step.
        barostat: a :class:`~spkmd.barostats.Barostat` (also add it to the hooks).
    """

    def __init__(self, time_step_fs: float, barostat: Barostat) -> None:
        super().__init__(time_step_fs)
        self.barostat = _check_barostat(barostat)

    def drift(self, system: System) -> None:
        if system.n_replicas != 1:
            raise BarostatError(
                f"NPTVelocityVerlet propagates one replica, the system has {system.n_replicas}; "
                "use RingPolymerNPT for ring polymers"
            )
        self.barostat.drift(system, self.time_step)


class RingPolymerNPT(RingPolymerIntegrator):
    """Ring-polymer NPT: internal normal modes propagate freely (exact or Cayley), the centroid
    and the cell by the barostat.

    Args:
        time_step_fs, temperature_K, scheme, n_beads: as :class:`~spkmd.rpmd.RingPolymerIntegrator`.
        barostat: a :class:`~spkmd.barostats.Barostat` (also add it to the hooks).
    """

    def __init__(self, time_step_fs: float, temperature_K: float, barostat: Barostat, scheme: str = "exact",
                 n_beads: int | None = None) -> None:
        super().__init__(time_step_fs, temperature_K, scheme=scheme, n_beads=n_beads)
        self.barostat = _check_barostat(barostat)
        if abs(barostat.temperature_K - self.temperature_K) > 1e-9 * self.temperature_K:
            raise BarostatError(
                f"barostat temperature {barostat.temperature_K} K differs from the ring-polymer temperature "
                f"{self.temperature_K} K; use one temperature"
            )

    def drift(self, system: System) -> None:
        self.barostat.drift(system, self.time_step, self.setup(system))


NPT_INTEGRATORS = {"npt": NPTVelocityVerlet, "rpmd_npt": RingPolymerNPT}
