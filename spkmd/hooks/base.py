"""The hook base class: named points of the MD step (see :mod:`spkmd.integrators`).

Hooks are called in list order, except :meth:`Hook.on_step_end`, which the
simulator calls in *reverse* list order so that a thermostat's (or barostat's)
two half-steps wrap the integrator symmetrically: with hooks ``[A, B]`` one
step runs ``A.begin B.begin | integrator | B.end A.end``.

Every point receives the :class:`~spkmd.simulator.Simulator`; hooks read and
change ``simulator.system`` in place. A hook with state that must survive a
restart implements :meth:`state_dict` / :meth:`load_state_dict`; a hook that
buffers output implements :meth:`flush` (the checkpoint calls it before it
saves so that a restart never loses or duplicates logged steps).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from spkmd.simulator import Simulator


class Hook:
    """Base class with no-op implementations of every hook point."""

    def on_simulation_start(self, simulator: "Simulator") -> None:
        """Once per :meth:`Simulator.simulate` call, after the initial force call."""

    def on_step_begin(self, simulator: "Simulator") -> None:
        """Before the integrator's ``main_step`` (first thermostat half-step)."""

    def on_step_middle(self, simulator: "Simulator") -> None:
        """After the force call, before the second half-kick."""

    def on_step_end(self, simulator: "Simulator") -> None:
        """After the second half-kick (second thermostat half-step; called in reverse order)."""

    def on_step_finalize(self, simulator: "Simulator") -> None:
        """After ``on_step_end`` and the step counter increment (logging, checkpoints)."""

    def on_step_failed(self, simulator: "Simulator", error: BaseException) -> None:
        """A step raised ``error`` (NaN forces, calculator error, interrupt); flush and save."""

    def on_simulation_end(self, simulator: "Simulator") -> None:
        """Once per ``simulate`` call, on success or failure (close files)."""

    def bath_energy(self):
        """Energy this hook has taken out of the system so far (thermostats, barostats),
        Hartree [R, M], added to the conserved quantity; ``None`` if it exchanges none."""
        return None

    def flush(self) -> None:
        """Write buffered output now."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def to(self, device=None, dtype=None) -> "Hook":
        """Move internal tensors; returns self."""
        return self
