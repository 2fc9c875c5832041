"""The simulator: a system, an integrator, a calculator and hooks, stepped together.

One step (see :mod:`spkmd.integrators` for the integrator's part)::

    for h in hooks:            h.on_step_begin(sim)      # thermostat half-step
    integrator.main_step(system)                         # half-kick + drift
    calculator.calculate(system)                         # forces, energy, stress
    (non-finite forces or positions -> NonFiniteError)
    for h in hooks:            h.on_step_middle(sim)
    integrator.half_step(system)                         # half-kick
    for h in reversed(hooks):  h.on_step_end(sim)        # thermostat half-step
    sim.step += 1
    for h in hooks:            h.on_step_finalize(sim)   # logging, checkpoints

If anything raises inside the loop, every hook's ``on_step_failed`` runs (loggers
flush, the checkpoint hook saves) and the error propagates; ``on_simulation_end``
always runs. :meth:`Simulator.simulate` can be called again and continues from
``simulator.step``.

Random numbers: the simulator owns one ``torch.Generator`` (:attr:`Simulator.generator`,
seeded with ``seed``); stochastic hooks draw from it, and its state is part of
:meth:`Simulator.state_dict`, so a restarted run continues bit for bit.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from spkmd.hooks.base import Hook
from spkmd.integrators import Integrator
from spkmd.system import System

CHECKPOINT_FORMAT = 1


class SimulationError(RuntimeError):
    """The simulation cannot continue (message names the step and the cause)."""


class NonFiniteError(SimulationError):
    """Forces or positions became NaN or infinite."""


def _overrides(method_name: str, hooks: Sequence[Hook]) -> list:
    """Bound methods of the hooks that override ``method_name`` (skips the no-op base)."""
    base = getattr(Hook, method_name)
    return [getattr(h, method_name) for h in hooks if getattr(type(h), method_name) is not base]


class Simulator:
    """Run MD on ``system`` with ``integrator`` and ``calculator``.

    Args:
        system: the state (moved/changed in place).
        integrator: e.g. :class:`~spkmd.integrators.VelocityVerlet`.
        calculator: anything with ``calculate(system)`` (see :mod:`spkmd.calculators`).
        hooks: thermostats, loggers, checkpoints ... called at the step's hook points.
        step: the step counter to start from.
        seed: seed of the simulator's random generator (``None``: a random seed).
    """

    def __init__(
        self,
        system: System,
        integrator: Integrator,
        calculator,
        hooks: Sequence[Hook] = (),
        step: int = 0,
        seed: int | None = None,
    ) -> None:
        self.system = system
        self.integrator = integrator
        self.calculator = calculator
        self.hooks = list(hooks)
        self.step = int(step)
        self.seed = int(seed) if seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        #: True while a step is part-way done (positions/momenta not at a full step)
        self.in_step = False

    # ------------------------------------------------------------------ properties
    @property
    def time_fs(self) -> float:
        """Simulated time so far in fs."""
        return self.step * self.integrator.time_step_fs

    def temperature(self) -> torch.Tensor:
        """Physical temperature per replica and molecule in K, by the integrator's estimator
        (``integrator.temperature_estimator``; for ring polymers the bead temperature / P).  [R, M]"""
        return self.integrator.temperature(self.system)

    def bath_energy(self) -> torch.Tensor:
        """Energy the hooks (thermostats, barostats) took from the system, Hartree.  [R, M]"""
        total = torch.zeros_like(self.system.energy)
        for h in self.hooks:
            e = h.bath_energy()
            if e is not None:
                total = total + e
        return total

    def conserved_energy(self) -> torch.Tensor:
        """KE + PE + integrator extra energy + bath energy, Hartree.  [R, M]

        Constant (up to the integration error) for every thermostat and for NVE.
        """
        system = self.system
        e = system.kinetic_energy() + system.energy + self.bath_energy()
        extra = self.integrator.energy_contribution(system)
        if extra is not None:
            e = e + extra
        return e

    # ------------------------------------------------------------------ running
    def _check_finite(self) -> None:
        s = self.system
        if not bool(torch.isfinite(s.forces.sum() + s.positions.sum())):
            bad_f = ~torch.isfinite(s.forces).all(-1)  # [R, N]
            bad_r = ~torch.isfinite(s.positions).all(-1)
            what = []
            for name, bad in (("forces", bad_f), ("positions", bad_r)):
                if bool(bad.any()):
                    rep, atom = torch.nonzero(bad, as_tuple=True)
                    atoms = sorted(set(atom.tolist()))[:10]
                    mols = sorted(set(s.molecule_index[atom].tolist()))[:10]
                    what.append(f"{name} of atoms {atoms} (molecules {mols}, replicas {sorted(set(rep.tolist()))[:10]})")
            raise NonFiniteError(
                f"non-finite {' and '.join(what)} at step {self.step}; the time step may be too large, "
                "atoms may overlap, or the model is outside its training domain"
            )

    def compute_forces(self) -> None:
        """Call the calculator on the current state and check the result."""
        self.calculator.calculate(self.system)
        self._check_finite()

    def simulate(self, n_steps: int) -> None:
        """Run ``n_steps`` more steps, continuing from :attr:`step`."""
        if n_steps < 0:
            raise ValueError(f"n_steps must be non-negative, got {n_steps}")
        hooks = self.hooks
        system, integrator, calculator = self.system, self.integrator, self.calculator
        try:
            if system.forces is None:
                self.compute_forces()
            for h in hooks:
                h.on_simulation_start(self)
            begin = _overrides("on_step_begin", hooks)
            middle = _overrides("on_step_middle", hooks)
            end = _overrides("on_step_end", hooks[::-1])
            finalize = _overrides("on_step_finalize", hooks)
            check = self._check_finite
            for _ in range(n_steps):
                self.in_step = True
                for f in begin:
                    f(self)
                integrator.main_step(system)
                calculator.calculate(system)
                check()
                for f in middle:
                    f(self)
                integrator.half_step(system)
                for f in end:
                    f(self)
                self.step += 1
                self.in_step = False
                for f in finalize:
                    f(self)
        except BaseException as error:
            for h in hooks:
                try:
                    h.on_step_failed(self, error)
                except Exception as hook_error:  # keep the original error visible
                    error.add_note(f"also: {type(h).__name__}.on_step_failed raised {hook_error!r}")
            raise
        finally:
            for h in hooks:
                h.on_simulation_end(self)

    # ------------------------------------------------------------------ device, state
    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Simulator":
        """Move system, integrator, calculator and hooks to ``device``/``dtype``; returns self."""
        self.system.to(device, dtype)
        self.integrator.to(device, dtype)
        self.calculator.to(device, dtype)
        for h in self.hooks:
            h.to(device, dtype)
        return self

    def state_dict(self) -> dict:
        """Everything a bit-for-bit restart needs (tensors, numbers, strings only)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "seed": self.seed,
            "generator": self.generator.get_state(),
            "system": self.system.state_dict(),
            "integrator": self.integrator.state_dict(),
            "calculator": self.calculator.state_dict(),
            "hooks": [{"type": type(h).__name__, "state": h.state_dict()} for h in self.hooks],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; hooks must be the same kinds in the same order."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unknown checkpoint format {state.get('format')!r} (this spkmd reads {CHECKPOINT_FORMAT})")
        saved = [h["type"] for h in state["hooks"]]
        have = [type(h).__name__ for h in self.hooks]
        if saved != have:
            raise ValueError(
                f"checkpoint hooks {saved} differ from this simulator's hooks {have}; "
                "restart with the configuration the checkpoint was written with"
            )
        self.system.load_state_dict(state["system"])
        self.integrator.load_state_dict(state["integrator"])
        self.calculator.load_state_dict(state["calculator"])
        for h, s in zip(self.hooks, state["hooks"]):
            h.load_state_dict(s["state"])
        self.step = int(state["step"])
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])

    def flush(self) -> None:
        """Flush every hook's buffered output."""
        for h in self.hooks:
            h.flush()

    def save_checkpoint(self, path: str | Path) -> Path:
        """Flush logs, then write :meth:`state_dict` atomically (temp file + rename)."""
        self.flush()
        return save_state(self.state_dict(), path)

    def load_checkpoint(self, path: str | Path) -> None:
        self.load_state_dict(load_state(path))


def save_state(state: dict, path: str | Path) -> Path:
    """``torch.save`` to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_state(path: str | Path) -> dict:
    """Load a checkpoint without unpickling code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)
