"""Evaluate a bundle on i-PI structures given in atomic units.

Shared by the socket client (:mod:`spkserve.ipi.client`) and the in-process
i-PI PES module (:mod:`spkserve.ipi.pes`): cells and positions in Bohr come in,
energies (Hartree), forces (Hartree/Bohr), virials (Hartree) and the JSON extra
strings go out, for B structures of the same atoms in one model call.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import torch

from spkserve import keys, units
from spkserve.ensemble import ENSEMBLE_UNITS
from spkserve.provider import PROVIDER_UNITS

_HANDLED = (keys.energy, keys.forces, keys.stress)


def species_from_template(path: str) -> list[int]:
    """Atomic numbers of a structure file readable by ASE."""
    from ase.io import read

    return [int(z) for z in read(path).numbers]


def species_from_symbols(text: str) -> list[int]:
    """Atomic numbers from ``"C,H,H,O"`` (or space separated)."""
    from ase.data import atomic_numbers

    out = []
    for sym in text.replace(",", " ").split():
        if sym not in atomic_numbers:
            raise ValueError(f"unknown element symbol {sym!r} in species list {text!r}")
        out.append(atomic_numbers[sym])
    if not out:
        raise ValueError("the species list is empty")
    return out


def to_atomic_units(value: np.ndarray, unit: str) -> np.ndarray:
    """Value in ``unit`` -> Hartree atomic units of the same dimension."""
    return value * units.parse(unit).value


class BundleEvaluator:
    """Evaluate a :class:`~spkserve.runtime.ModelRunner` on structures in atomic units.

    Args:
        runner: the model runner (results in provider units Å/eV).
        numbers: atomic numbers of the N atoms (never sent by i-PI).
        pbc: ``"auto"`` (periodic when the cell is non-singular), or True/False.
        extras: also evaluate the bundle's other outputs (dipole, charges, ...)
            and return them as JSON strings in atomic units. An ensemble
            (:class:`spkserve.ensemble.EnsembleRunner`) adds ``committee_pot`` [K] and
            ``committee_force`` [K, 3N] for i-PI's committee tools (no ``committee_virial``:
            i-PI then uses the mean virial).
    """

    def __init__(
        self,
        runner,
        numbers: Sequence[int],
        pbc: str | bool = "auto",
        extras: bool = True,
    ) -> None:
        self.runner = runner
        self.numbers = np.asarray(numbers, dtype=np.int64)
        if self.numbers.ndim != 1 or len(self.numbers) == 0:
            raise ValueError("numbers must be a non-empty list of atomic numbers")
        bundle = getattr(runner, "bundle", None)
        if bundle is not None:  # refuse unknown elements before any server is contacted
            bundle.check_species(self.numbers)
        if pbc not in ("auto", True, False):
            raise ValueError(f"pbc must be 'auto', True or False, got {pbc!r}")
        self.pbc = pbc
        available = tuple(runner.available_properties)
        self.has_stress = keys.stress in available
        self.extra_names = [p for p in available if p not in _HANDLED] if extras else []
        self._bohr_to_A = units.factor("Bohr", "Angstrom")
        self._eV_to_Ha = units.factor("eV", "Hartree")
        self._eVA_to_HaBohr = units.factor("eV/Angstrom", "Hartree/Bohr")
        self._numbers_cache: dict[int, torch.Tensor] = {}
        self.n_calls = 0
        self.n_structures = 0

    @property
    def n_atoms(self) -> int:
        return len(self.numbers)

    def _periodic(self, cells_A: np.ndarray) -> np.ndarray:
        """[B] bool: which structures are periodic."""
        if self.pbc == "auto":
            return np.abs(np.linalg.det(cells_A)) > 1e-9
        return np.full(len(cells_A), bool(self.pbc))

    def __call__(
        self, cells_bohr: np.ndarray, positions_bohr: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """Evaluate B structures.

        Args:
            cells_bohr: [B, 3, 3] lattice vectors as rows.
            positions_bohr: [B, N, 3].
        Returns:
            energies [B] (Ha), forces [B, N, 3] (Ha/Bohr), virials [B, 3, 3] (Ha), extras (JSON strings).
        """
        cells_A = np.asarray(cells_bohr, dtype=np.float64).reshape(-1, 3, 3) * self._bohr_to_A
        b = len(cells_A)
        pos_A = np.asarray(positions_bohr, dtype=np.float64).reshape(b, -1, 3) * self._bohr_to_A
        n = pos_A.shape[1]
        if n != self.n_atoms:
            raise ValueError(f"got {n} atoms per structure but the species list has {self.n_atoms}")
        periodic = self._periodic(cells_A)
        numbers = self._numbers_cache.get(b)
        if numbers is None:
            numbers = torch.from_numpy(np.tile(self.numbers, b))
            self._numbers_cache = {b: numbers}
        want_stress = self.has_stress and bool(periodic.all())
        props = [keys.energy, keys.forces] + ([keys.stress] if want_stress else []) + self.extra_names
        pbc = torch.from_numpy(np.repeat(periodic[:, None], 3, axis=1))
        out = self.runner.compute_tensors(
            numbers,
            torch.from_numpy(pos_A.reshape(-1, 3)),
            torch.from_numpy(np.where(periodic[:, None, None], cells_A, 0.0)),
            pbc,
            torch.full((b,), n, dtype=torch.long),
            props,
        )
        self.n_calls += 1
        self.n_structures += b
        energies = out[keys.energy].detach().to("cpu", torch.float64).numpy().reshape(b) * self._eV_to_Ha
        forces = out[keys.forces].detach().to("cpu", torch.float64).numpy().reshape(b, n, 3) * self._eVA_to_HaBohr
        virials = np.zeros((b, 3, 3))
        if want_stress:
            stress = out[keys.stress].detach().to("cpu", torch.float64).numpy().reshape(b, 3, 3)
            volume_A3 = np.abs(np.linalg.det(cells_A))
            virials = -volume_A3[:, None, None] * stress * self._eV_to_Ha
        extras = self._extras(out, b, n)
        return energies, forces, virials, extras

    def _extras(self, out: dict[str, torch.Tensor], b: int, n: int) -> list[str]:
        if not self.extra_names:
            return [""] * b
        per_struct: list[dict] = [{} for _ in range(b)]
        for name in self.extra_names:
            value = out[name].detach().to("cpu", torch.float64).numpy()
            unit = PROVIDER_UNITS.get(name) or ENSEMBLE_UNITS.get(name)
            if unit is not None:
                value = to_atomic_units(value, unit)
            value = value.reshape(b, n, *value.shape[1:]) if name in keys.PER_ATOM_OUTPUTS else value.reshape(b, *value.shape[1:])
            for s in range(b):
                per_struct[s][name] = value[s].tolist()
                if name == keys.dipole_moment:
                    per_struct[s]["dipole"] = value[s].tolist()  # the key i-PI's dipole tools read
                elif name == keys.committee_energy:  # i-PI's <ffcommittee parse_json="true"> reads these
                    per_struct[s]["committee_pot"] = value[s].tolist()  # [K] Hartree
                elif name == keys.committee_forces:  # [n, K, 3] -> [K, 3n] Hartree/Bohr
                    per_struct[s]["committee_force"] = np.swapaxes(value[s], 0, 1).reshape(value.shape[2], -1).tolist()
        return [json.dumps(d) for d in per_struct]
