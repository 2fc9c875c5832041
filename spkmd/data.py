"""Read the HDF5 files written by :class:`spkmd.hooks.FileLogger`.

Units out are those stored in the file (Å, fs, eV, eV/Å, K, bar; see the logger's
docstring). Per-replica quantities are averaged over replicas (the ring-polymer
centroid) unless a ``replica`` is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from spkserve import units


def _open_log(path: Path, attempts: int = 30):
    """Open a log for reading: as a plain HDF5 file, else (a run writing it right now, or one
    killed during a flush, which leaves the "open for writing" flag) in SWMR read mode."""
    import time

    import h5py

    errors = []
    for k in range(attempts):
        for kw in ({}, {"libver": "latest", "swmr": True}):
            try:
                return h5py.File(path, "r", locking=False, **kw)
            except OSError as err:
                if "signature" in str(err):  # not an HDF5 file at all: no point in waiting
                    raise OSError(f"cannot open {path} as an spkmd HDF5 log: {err}") from err
                errors.append(err)
        time.sleep(min(0.01 * 2**k, 0.2))  # the writer holds the file only for a flush
    raise OSError(
        f"cannot open {path} as an spkmd HDF5 log ({errors[-2]}; in SWMR mode: {errors[-1]}); if the run "
        "crashed, restarting it or `h5clear -s` clears the flag"
    ) from errors[-1]


class HDF5Loader:
    """Load a simulation log (also while the run is writing it, and after a crash).

    Args:
        path: the HDF5 file.
        skip_initial: drop this many first entries (equilibration).
    """

    def __init__(self, path: str | Path, skip_initial: int = 0) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"simulation log {str(self.path)!r} does not exist")
        f = _open_log(self.path)
        with f:
            if "properties" not in f or "entries" not in f.attrs:
                raise ValueError(f"{self.path} is not an spkmd HDF5 log (no 'properties' group / 'entries')")
            self.entries = int(f.attrs["entries"])
            a = f.attrs
            self.n_replicas = int(a["n_replicas"])
            self.n_molecules = int(a["n_molecules"])
            self.n_atoms = np.asarray(a["n_atoms"], dtype=np.int64)
            self.atomic_numbers = np.asarray(a["atomic_numbers"], dtype=np.int64)
            self.masses_amu = np.asarray(a["masses_amu"], dtype=np.float64)
            self.pbc = np.asarray(a["pbc"], dtype=bool)
            self.time_step_fs = float(a["time_step_fs"])
            self.dof = np.asarray(a["dof"], dtype=np.float64)
            n = self.entries
            s = slice(min(skip_initial, n), n)
            self._data: dict[str, np.ndarray] = {}
            self.units: dict[str, str] = {}
            #: how the logged temperature was estimated ("kinetic"; ring polymers: bead T / P)
            self.temperature_estimator = str(f["properties"]["temperature"].attrs.get("estimator", "kinetic")) \
                if "temperature" in f["properties"] else "kinetic"
            for group in ("properties", "molecules"):
                for name, d in f[group].items():
                    self._data[name] = d[s]
                    self.units[name] = d.attrs.get("unit", "")
        self.starts = np.concatenate([[0], np.cumsum(self.n_atoms)])

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self._data["step"])

    @property
    def available(self) -> list[str]:
        return sorted(self._data)

    @property
    def steps(self) -> np.ndarray:
        return self._data["step"]

    @property
    def times_fs(self) -> np.ndarray:
        return self._data["time"]

    def _select_replica(self, x: np.ndarray, replica: int | None) -> np.ndarray:
        if replica is None:
            return x.mean(axis=1)
        if not 0 <= replica < self.n_replicas:
            raise IndexError(f"replica {replica} out of range (the log has {self.n_replicas})")
        return x[:, replica]

    def atoms_of(self, molecule: int) -> slice:
        if not 0 <= molecule < self.n_molecules:
            raise IndexError(f"molecule {molecule} out of range (the log has {self.n_molecules})")
        return slice(int(self.starts[molecule]), int(self.starts[molecule + 1]))

    def get_property(self, name: str, molecule: int | None = 0, replica: int | None = None,
                     replica_idx: int | None = None, *, atomistic: bool | None = None,
                     mol_idx: int | None = None) -> np.ndarray:
        """A logged property [T, ...] for one molecule (``None``: all molecules / atoms),
        centroid (mean over replicas) unless ``replica`` is given.

        SchNetPack's spelling ``get_property(name, atomistic, mol_idx, replica_idx)`` works too:
        a bool in second place is ``atomistic`` (checked against how the property was logged;
        here that is known, so it can be left out)."""
        if isinstance(molecule, bool):  # SchNetPack order: (name, atomistic, mol_idx, replica_idx)
            if atomistic is not None:
                raise TypeError("atomistic given twice (second positional argument and keyword)")
            atomistic, molecule, replica = molecule, (0 if replica is None else replica), replica_idx
        elif replica_idx is not None:
            raise TypeError("replica_idx (SchNetPack's 4th argument) goes with get_property(name, atomistic, mol_idx, "
                            "replica_idx); here use get_property(name, molecule, replica)")
        if mol_idx is not None:
            molecule = mol_idx
        if name not in self._data:
            raise KeyError(f"{name!r} was not logged; available: {self.available}")
        x = self._data[name]
        if name in ("step", "time"):
            return x
        x = self._select_replica(x, replica)
        per_atom = not (x.shape[1] == self.n_molecules and name not in ("positions", "velocities", "forces"))
        if atomistic is not None and bool(atomistic) != per_atom:
            raise ValueError(f"{name!r} is logged per {'atom' if per_atom else 'molecule'}, "
                             f"but atomistic={atomistic} was given (leave atomistic out: it is known here)")
        if molecule is None:
            return x
        if not per_atom:
            return x[:, molecule]
        return x[:, self.atoms_of(molecule)]

    def get_temperature(self, molecule: int | None = 0, replica: int | None = None) -> np.ndarray:
        """Temperature in K (mean of the replica temperatures by default)."""
        return self.get_property("temperature", molecule, replica)

    def get_potential_energy(self, molecule: int | None = 0, replica: int | None = None) -> np.ndarray:
        return self.get_property("energy", molecule, replica)

    def get_pressure(self, molecule: int | None = 0, replica: int | None = None) -> np.ndarray:
        return self.get_property("pressure", molecule, replica)

    def get_positions(self, molecule: int | None = 0, replica: int | None = None) -> np.ndarray:
        return self.get_property("positions", molecule, replica)

    def get_velocities(self, molecule: int | None = 0, replica: int | None = None) -> np.ndarray:
        return self.get_property("velocities", molecule, replica)

    def get_forces(self, molecule: int | None = 0, replica: int | None = None) -> np.ndarray:
        return self.get_property("forces", molecule, replica)

    # ------------------------------------------------------------------ ASE
    def to_atoms(self, index: int, molecule: int = 0, replica: int | None = None):
        """One logged frame as ``ase.Atoms`` (Å, momenta, cell, energy and forces in eV, eV/Å)."""
        import ase
        from ase.calculators.singlepoint import SinglePointCalculator

        sl = self.atoms_of(molecule)
        pos = self.get_positions(molecule, replica)[index]
        atoms = ase.Atoms(numbers=self.atomic_numbers[sl], positions=pos, masses=self.masses_amu[sl], pbc=self.pbc[molecule])
        if "cells" in self._data:
            atoms.cell = self._select_replica(self._data["cells"], replica)[index, molecule]
        if "velocities" in self._data:
            v = self.get_velocities(molecule, replica)[index]  # Å/fs
            atoms.set_velocities(v * units.factor("Angstrom/fs", "(eV/amu)^0.5"))
        res = {"energy": float(self.get_potential_energy(molecule, replica)[index])}
        if "forces" in self._data:
            res["forces"] = self.get_forces(molecule, replica)[index]
        atoms.calc = SinglePointCalculator(atoms, **res)
        atoms.info.update(step=int(self.steps[index]), time_fs=float(self.times_fs[index]), molecule=molecule,
                          replica=-1 if replica is None else replica)
        return atoms

    def iter_atoms(self, molecule: int | None = None, replica: int | None = None, every: int = 1) -> Iterator:
        mols = range(self.n_molecules) if molecule is None else [molecule]
        for i in range(0, len(self), every):
            for m in mols:
                yield self.to_atoms(i, m, replica)

    def write_extxyz(self, path: str | Path, molecule: int | None = None, replica: int | None = None, every: int = 1) -> int:
        """Write frames (centroid unless ``replica``; all molecules unless ``molecule``) to
        extended XYZ; returns the number of frames written."""
        import ase.io

        frames = list(self.iter_atoms(molecule, replica, every))
        ase.io.write(str(path), frames, format="extxyz")
        return len(frames)
