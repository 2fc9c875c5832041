"""Small hooks: centre-of-mass motion removal, checkpoints, progress display."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from spkserve import units
from spkmd.hooks.base import Hook


class RemoveCOMMotion(Hook):
    """Remove centre-of-mass translation (and optionally rotation) every ``every_n_steps``.

    The kinetic energy removed is booked as bath energy so the conserved quantity stays flat.
    """

    def __init__(self, every_n_steps: int = 10, remove_rotation: bool = False) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)
        self.remove_rotation = bool(remove_rotation)
        self.energy: torch.Tensor | None = None

    def on_simulation_start(self, simulator) -> None:
        s = simulator.system
        if self.energy is None:
            self.energy = torch.zeros(s.n_replicas, s.n_molecules, dtype=s.dtype, device=s.device)
        else:
            self.energy = self.energy.to(device=s.device, dtype=s.dtype)

    def on_step_finalize(self, simulator) -> None:
        if simulator.step % self.every_n_steps:
            return
        s = simulator.system
        ke0 = s.kinetic_energy()
        s.remove_com_translation()
        if self.remove_rotation:
            s.remove_com_rotation()
        self.energy += ke0 - s.kinetic_energy()

    def bath_energy(self):
        return self.energy

    def to(self, device=None, dtype=None):
        if self.energy is not None:
            self.energy = self.energy.to(device=device, dtype=dtype)
        return self

    def state_dict(self) -> dict:
        return {} if self.energy is None else {"energy": self.energy.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.energy = state.get("energy")


class Checkpoint(Hook):
    """Save the whole simulator state every ``every_n_steps`` and at the end of a run.

    Writes are atomic (temp file + rename) and preceded by a flush of all loggers,
    so the checkpoint and the log files always agree. When a step fails with
    non-finite numbers the broken state goes to ``<name>.failed.pt`` for inspection
    and the last good checkpoint is kept; on other failures (interrupts, calculator
    errors) the current, finite state is checkpointed.
    """

    def __init__(self, path: str | Path, every_n_steps: int = 100) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.path = Path(path)
        self.every_n_steps = int(every_n_steps)
        self.failed = False
        self.last_saved_step: int | None = None

    @property
    def failed_path(self) -> Path:
        return self.path.with_name(self.path.stem + ".failed" + self.path.suffix)

    def on_simulation_start(self, simulator) -> None:
        self.failed = False

    def on_step_finalize(self, simulator) -> None:
        if simulator.step % self.every_n_steps == 0:
            self.save(simulator)

    def save(self, simulator, path: Path | None = None) -> None:
        simulator.save_checkpoint(path or self.path)
        if path is None:
            self.last_saved_step = simulator.step

    def on_step_failed(self, simulator, error: BaseException) -> None:
        self.failed = True
        s = simulator.system
        finite = s.forces is not None and bool(torch.isfinite(s.positions).all()) and bool(torch.isfinite(s.forces).all())
        from spkmd.simulator import NonFiniteError

        if isinstance(error, NonFiniteError) or not finite:
            self.save(simulator, self.failed_path)
        else:
            # the step was interrupted part-way: positions/momenta may be mid-step, so only the
            # last completed step (already checkpointed) is a valid restart point unless the
            # failure happened between steps
            if not simulator.in_step and self.last_saved_step != simulator.step:
                self.save(simulator)

    def on_simulation_end(self, simulator) -> None:
        if not self.failed and self.last_saved_step != simulator.step:
            self.save(simulator)


class ProgressBar(Hook):
    """Show steps, steps/s, mean temperature and energies every ``every_n_steps``.

    The temperature is the integrator's physical estimate (``T_phys`` for ring polymers: the
    bead temperature / P, not the P·T the beads move at).

    Uses a rich progress bar on a terminal and plain lines otherwise.
    """

    def __init__(self, n_steps: int | None = None, every_n_steps: int = 10, stream=None, use_rich: bool | None = None) -> None:
        self.n_steps = n_steps
        self.every_n_steps = max(1, int(every_n_steps))
        self.stream = stream or sys.stdout
        self.use_rich = self.stream.isatty() if use_rich is None else use_rich
        self._progress = None

    def on_simulation_start(self, simulator) -> None:
        self._t0 = time.perf_counter()
        self._step0 = simulator.step
        total = self.n_steps if self.n_steps is not None else None
        if self.use_rich:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(), transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("md", total=total, completed=simulator.step, info="")

    def _info(self, simulator) -> str:
        s = simulator.system
        elapsed = time.perf_counter() - self._t0
        rate = (simulator.step - self._step0) / elapsed if elapsed > 0 else math.nan
        T = float(simulator.temperature().mean())
        t_name = "T_phys" if simulator.integrator.temperature_estimator != "kinetic" else "T"
        to_eV = units.factor("Hartree", "eV")
        epot = float(s.energy.mean()) * to_eV
        econs = float(simulator.conserved_energy().mean()) * to_eV
        return f"{rate:8.1f} steps/s  {t_name} = {T:8.2f} K  E_pot = {epot:.6f} eV  E_cons = {econs:.6f} eV"

    def on_step_finalize(self, simulator) -> None:
        if simulator.step % self.every_n_steps:
            return
        info = self._info(simulator)
        if self._progress is not None:
            self._progress.update(self._task, completed=simulator.step, info=info)
        else:
            t = simulator.time_fs
            print(f"step {simulator.step:8d}  t = {t:10.2f} fs  {info}", file=self.stream, flush=True)

    def on_simulation_end(self, simulator) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
