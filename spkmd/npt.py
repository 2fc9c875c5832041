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


def _check_barostat(barostat) -> Barostat | None:
    if barostat is not None and not isinstance(barostat, Barostat):
        raise BarostatError(f"an NPT integrator needs a barostat from spkmd.barostats, got {type(barostat).__name__}")
    return barostat


def check_temperatures(integrator, barostat: Barostat) -> None:
    T = getattr(integrator, "temperature_K", None)
    if T is not None and abs(barostat.temperature_K - T) > 1e-9 * T:
        raise BarostatError(
            f"barostat temperature {barostat.temperature_K} K differs from the ring-polymer temperature {T} K; use one temperature"
        )


def _require(integrator) -> None:
    if integrator.barostat is None:
        raise BarostatError(
            f"{type(integrator).__name__} has no barostat: pass one, or add it to the hooks "
            "(CLI: +dynamics/barostat=mtk, pile, scr or nhc_anisotropic)"
        )


class NPTVelocityVerlet(VelocityVerlet):
    """Velocity Verlet with the barostat's coupled position/cell drift.

    Args:
        time_step_fs: time step.
        barostat: a :class:`~spkmd.barostats.Barostat` (also add it to the hooks); ``None``:
            the barostat hook attaches itself when the simulation starts.
    """

    def __init__(self, time_step_fs: float, barostat: Barostat | None) -> None:
        super().__init__(time_step_fs)
        self.barostat = _check_barostat(barostat)

    def drift(self, system: System) -> None:
        _require(self)
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

    def __init__(self, time_step_fs: float, temperature_K: float, barostat: Barostat | None, scheme: str = "exact",
                 n_beads: int | None = None, estimators: bool = True) -> None:
        super().__init__(time_step_fs, temperature_K, scheme=scheme, n_beads=n_beads, estimators=estimators)
        self.barostat = _check_barostat(barostat)
        if barostat is not None:
            check_temperatures(self, barostat)

    def drift(self, system: System) -> None:
        _require(self)
        self.barostat.drift(system, self.time_step, self.setup(system))


NPT_INTEGRATORS = {"npt": NPTVelocityVerlet, "rpmd_npt": RingPolymerNPT}
