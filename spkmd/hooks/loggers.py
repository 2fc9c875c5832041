"""Loggers: an HDF5 file logger (buffered, crash-safe) and a TensorBoard logger.

HDF5 layout (units in every dataset's ``unit`` attribute; T = logged entries,
R replicas, M molecules, N atoms)::

    /                     attrs: entries, n_replicas, n_molecules, n_atoms [M],
                                 atomic_numbers [N], masses_amu [N], pbc [M, 3],
                                 time_step_fs, every_n_steps, format
    /properties/step            [T]          int64
    /properties/time            [T]          fs
    /properties/energy          [T, R, M]    eV   (potential energy)
    /properties/kinetic_energy  [T, R, M]    eV
    /properties/temperature     [T, R, M]    K    (physical: the integrator's estimator, named in
                                             the ``estimator`` attribute; ring polymers: bead T / P)
    /properties/conserved_energy[T, R, M]    eV
    /properties/bath_energy     [T, R, M]    eV   (thermostat/barostat account)
    /properties/pressure        [T, R, M]    bar  (when the calculator gives stress)
    /properties/<extra>         [T, R, M, ...] or [T, R, N, ...]  (dipole_moment in e*Å, ...)
    /molecules/positions        [T, R, N, 3] Å
    /molecules/velocities       [T, R, N, 3] Å/fs
    /molecules/forces           [T, R, N, 3] eV/Å  (optional)
    /molecules/cells            [T, R, M, 3, 3] Å  (periodic systems)

Every dataset is resizable; the root attribute ``entries`` says how many rows are
complete. Entries are buffered in memory and written every ``buffer_size`` logged
steps, at checkpoints and on any exit (including errors).

Crash safety: the file is open only while a flush writes it (opened, switched to
HDF5 SWMR mode, written, closed). Between flushes it is a closed, consistent HDF5
file, so a run killed at any moment, SIGKILL included, leaves a log that every HDF5
reader opens (plain ``h5py.File(path, "r")``, h5dump, ...) up to its last flush. Only a
kill during a flush itself (milliseconds) can leave the "open for writing" flag set;
:class:`~spkmd.data.HDF5Loader` still reads such a file (SWMR read), and a restart
rewrites it without the flag (the same as ``h5clear -s``). The log can be read while
the run goes on. On restart from a checkpoint the datasets are cut back to the
checkpoint's entry count and continue from there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from spkserve import units
from spkmd.hooks.base import Hook

FORMAT = 1

# atomic unit -> file unit for known quantities
_FILE_UNITS = {
    "energy": ("Hartree", "eV"),
    "kinetic_energy": ("Hartree", "eV"),
    "conserved_energy": ("Hartree", "eV"),
    "bath_energy": ("Hartree", "eV"),
    "energy_uncertainty": ("Hartree", "eV"),
    "forces_uncertainty": ("Hartree/Bohr", "eV/Angstrom"),
    "temperature": ("K", "K"),
    "pressure": ("Hartree/Bohr^3", "bar"),
    "dipole_moment": ("e*Bohr", "e*Angstrom"),
    "partial_charges": ("e", "e"),
    "polarizability": ("e^2*Bohr^2/Hartree", "e*Angstrom^2/V"),
    "nuclear_magnetic_shielding": ("ppm", "ppm"),
    "positions": ("Bohr", "Angstrom"),
    "velocities": ("Bohr/au_time", "Angstrom/fs"),
    "forces": ("Hartree/Bohr", "eV/Angstrom"),
    "cells": ("Bohr", "Angstrom"),
    "time": ("fs", "fs"),
}


def _file_unit(name: str) -> tuple[float, str]:
    if name in _FILE_UNITS:
        src, dst = _FILE_UNITS[name]
        return units.factor(src, dst), dst
    return 1.0, "atomic units"


class FileLogger(Hook):
    """Buffered HDF5 logger (see module docstring).

    Args:
        path: HDF5 file.
        every_n_steps: log every n-th step.
        buffer_size: entries held in memory between writes.
        positions / velocities / forces: which molecule streams to write.
        properties: extra system properties to log (``None``: all the calculator returns).
        float64: write molecule streams in float64 (default float32).
    """

    def __init__(
        self,
        path: str | Path,
        every_n_steps: int = 1,
        buffer_size: int = 100,
        positions: bool = True,
        velocities: bool = True,
        forces: bool = False,
        properties: list[str] | None = None,
        float64: bool = False,
    ) -> None:
        if every_n_steps < 1 or buffer_size < 1:
            raise ValueError(f"every_n_steps and buffer_size must be at least 1, got {every_n_steps}, {buffer_size}")
        self.path = Path(path)
        self.every_n_steps = int(every_n_steps)
        self.buffer_size = int(buffer_size)
        self.streams = {"positions": positions, "velocities": velocities, "forces": forces}
        self.extra = properties
        self.mol_dtype = np.float64 if float64 else np.float32
        #: True between on_simulation_start and close() (the file itself is open only in flush())
        self.file_ready = False
        self.entries = 0
        self._restored_entries: int | None = None
        self._n_buf = 0

    # ------------------------------------------------------------------ values logged
    def _values(self, simulator) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        s = simulator.system
        ke = s.kinetic_energy()
        vals = {
            "energy": s.energy,
            "kinetic_energy": ke,
            "temperature": simulator.temperature(),  # the integrator's estimator (ring polymers: / P)
            "conserved_energy": simulator.conserved_energy(),
            "bath_energy": simulator.bath_energy(),
        }
        if s.stress is not None:
            vals["pressure"] = s.pressure()
        names = list(s.properties) if self.extra is None else self.extra
        for name in names:
            if name not in s.properties:
                raise KeyError(f"property {name!r} to log is not computed by the calculator (it gives {sorted(s.properties)})")
            vals[name] = s.properties[name]
        mol = {}
        if self.streams["positions"]:
            mol["positions"] = s.positions
        if self.streams["velocities"]:
            mol["velocities"] = s.velocities
        if self.streams["forces"]:
            mol["forces"] = s.forces
        if bool(s.pbc.any()):
            mol["cells"] = s.cells
        return vals, mol

    # ------------------------------------------------------------------ file handling
    def _create(self, simulator) -> None:
        import h5py

        s = simulator.system
        vals, mol = self._values(simulator)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(self.path, "w", libver="latest")
        f.attrs.update(
            format=FORMAT, entries=0, n_replicas=s.n_replicas, n_molecules=s.n_molecules,
            n_atoms=s.n_atoms.cpu().numpy(), atomic_numbers=s.atomic_numbers.cpu().numpy(),
            masses_amu=s.masses.detach().cpu().double().numpy() * units.factor("me", "amu"),
            pbc=s.pbc.cpu().numpy(), time_step_fs=simulator.integrator.time_step_fs,
            every_n_steps=self.every_n_steps, dof=s.dof.detach().cpu().double().numpy(),
        )
        gp, gm = f.create_group("properties"), f.create_group("molecules")
        chunk = min(self.buffer_size, 1000)
        gp.create_dataset("step", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(chunk,))
        d = gp.create_dataset("time", shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(chunk,))
        d.attrs["unit"] = "fs"
        for name, v in vals.items():
            shp = tuple(v.shape)
            d = gp.create_dataset(name, shape=(0,) + shp, maxshape=(None,) + shp, dtype=np.float64, chunks=(chunk,) + shp)
            d.attrs["unit"] = _file_unit(name)[1]
            if name == "temperature":
                d.attrs["estimator"] = simulator.integrator.temperature_estimator
        for name, v in mol.items():
            shp = tuple(v.shape)
            d = gm.create_dataset(name, shape=(0,) + shp, maxshape=(None,) + shp, dtype=self.mol_dtype,
                                  chunks=(max(1, min(chunk, 2**20 // max(1, v.numel()))),) + shp)
            d.attrs["unit"] = _file_unit(name)[1]
        f.close()
        self.file_ready = True
        self.entries = 0

    def _open_for_writing(self):
        """Open the log for one write, in SWMR mode (readers may be reading it meanwhile)."""
        import h5py

        f = h5py.File(self.path, "a", libver="latest", locking=False)
        f.swmr_mode = True
        return f

    def _reopen(self, entries: int) -> None:
        import h5py

        if not self.path.is_file():
            raise FileNotFoundError(f"log file {str(self.path)!r} to continue from the checkpoint is missing")
        try:
            f = h5py.File(self.path, "a", libver="latest", locking=False)
        except OSError:
            # a writer killed during a flush leaves the file marked "open for writing"; SWMR
            # readers still work, so rewrite it without the flag (temp file + rename)
            self._rewrite_after_crash()
            f = h5py.File(self.path, "a", libver="latest", locking=False)
        with f:
            have = int(f.attrs["entries"])
            if have < entries:
                raise RuntimeError(f"log file {self.path} holds {have} entries, the checkpoint expects {entries}")
            for group in ("properties", "molecules"):
                for d in f[group].values():
                    d.resize(entries, axis=0)
            f.attrs["entries"] = entries
        self.file_ready = True
        self.entries = entries

    def _rewrite_after_crash(self) -> None:
        import os
        import tempfile

        import h5py

        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        try:
            with h5py.File(self.path, "r", libver="latest", swmr=True) as src, h5py.File(tmp, "w", libver="latest") as dst:
                dst.attrs.update(dict(src.attrs))
                for group in ("properties", "molecules"):
                    src.copy(src[group], dst, name=group)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _make_buffers(self, simulator) -> None:
        vals, mol = self._values(simulator)
        B = self.buffer_size
        self._buf = {k: torch.empty((B,) + tuple(v.shape), dtype=v.dtype, device=v.device) for k, v in {**vals, **mol}.items()}
        self._group = {**{k: "properties" for k in vals}, **{k: "molecules" for k in mol}}
        self._steps = np.zeros(B, dtype=np.int64)
        self._times = np.zeros(B, dtype=np.float64)
        self._n_buf = 0

    def on_simulation_start(self, simulator) -> None:
        if not self.file_ready:
            if self._restored_entries is not None:
                self._reopen(self._restored_entries)
                self._restored_entries = None
            else:
                self._create(simulator)
        self._make_buffers(simulator)
        if simulator.step == 0 and self.entries == 0:
            self._record(simulator)  # the initial state

    def _record(self, simulator) -> None:
        vals, mol = self._values(simulator)
        i = self._n_buf
        for k, v in vals.items():
            self._buf[k][i].copy_(v)
        for k, v in mol.items():
            self._buf[k][i].copy_(v)
        self._steps[i] = simulator.step
        self._times[i] = simulator.time_fs
        self._n_buf += 1
        if self._n_buf == self.buffer_size:
            self.flush()

    def on_step_finalize(self, simulator) -> None:
        if simulator.step % self.every_n_steps == 0:
            self._record(simulator)

    def flush(self) -> None:
        """Write the buffered entries and update ``entries``."""
        n = self._n_buf
        if not self.file_ready or n == 0:
            return
        new = self.entries + n
        with self._open_for_writing() as f:  # closed again at once: no flag stays set on disk
            for k, buf in self._buf.items():
                d = f[self._group[k]][k]
                d.resize(new, axis=0)
                fac = _file_unit(k)[0]
                arr = buf[:n].detach().cpu().double().numpy()
                d[self.entries : new] = arr * fac if fac != 1.0 else arr
            for k, arr in (("step", self._steps), ("time", self._times)):
                d = f["properties"][k]
                d.resize(new, axis=0)
                d[self.entries : new] = arr[:n]
            f.attrs["entries"] = new
        self.entries = new
        self._n_buf = 0

    def on_step_failed(self, simulator, error) -> None:
        self.flush()

    def on_simulation_end(self, simulator) -> None:
        self.close()

    def close(self) -> None:
        if self.file_ready:
            self.flush()
            self.file_ready = False
            self._restored_entries = self.entries  # a later simulate() call appends

    def state_dict(self) -> dict:
        return {"entries": self.entries + self._n_buf}

    def load_state_dict(self, state: dict) -> None:
        if self.file_ready:
            raise RuntimeError("load the checkpoint before the logger's file is opened")
        self._restored_entries = int(state["entries"])


class TensorBoardLogger(Hook):
    """Scalars (mean over replicas) per molecule to TensorBoard every ``every_n_steps``.

    Needs the ``tensorboard`` package (``pip install tensorboard``).
    """

    def __init__(self, log_dir: str | Path, every_n_steps: int = 10) -> None:
        self.log_dir = Path(log_dir)
        self.every_n_steps = max(1, int(every_n_steps))
        self.writer = None

    def on_simulation_start(self, simulator) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("the TensorBoard logger needs the 'tensorboard' package: pip install tensorboard") from err
        self.writer = SummaryWriter(str(self.log_dir))

    def on_step_finalize(self, simulator) -> None:
        if simulator.step % self.every_n_steps:
            return
        s = simulator.system
        to_eV = units.factor("Hartree", "eV")
        T = simulator.temperature().mean(0)
        E = s.energy.mean(0) * to_eV
        C = simulator.conserved_energy().mean(0) * to_eV
        for m in range(s.n_molecules):
            self.writer.add_scalar(f"temperature/molecule_{m}", float(T[m]), simulator.step)
            self.writer.add_scalar(f"energy/molecule_{m}", float(E[m]), simulator.step)
            self.writer.add_scalar(f"conserved_energy/molecule_{m}", float(C[m]), simulator.step)
        if s.stress is not None:
            P = s.pressure().mean(0) * units.factor("Hartree/Bohr^3", "bar")
            for m in range(s.n_molecules):
                self.writer.add_scalar(f"pressure_bar/molecule_{m}", float(P[m]), simulator.step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def on_simulation_end(self, simulator) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
