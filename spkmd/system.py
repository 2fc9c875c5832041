"""The MD state: several molecules × replicas in Hartree atomic units.

A :class:`System` holds everything an integrator, thermostat or barostat needs
and nothing else. Units inside are Hartree atomic units (:data:`spkserve.units.MD_UNITS`:
Bohr, Hartree, electron mass, ħ/E_h); conversion happens only in
:meth:`System.from_atoms` / :meth:`System.to_atoms` and in the calculators.

Shapes (``R`` replicas/beads, ``N`` atoms of all molecules, ``M`` molecules)::

    positions        [R, N, 3]   Bohr
    momenta          [R, N, 3]   me * Bohr / au_time
    masses           [N]         me
    atomic_numbers   [N]         int64
    molecule_index   [N]         int64, molecule of every atom (sorted, 0..M-1)
    n_atoms          [M]         int64
    cells            [R, M, 3, 3] Bohr, lattice vectors as rows (zeros if not periodic)
    pbc              [M, 3]      bool
    dof              [M]         degrees of freedom per molecule (3 n - removed)
    forces           [R, N, 3]   Hartree / Bohr        (last calculator call)
    energy           [R, M]      Hartree               (last calculator call)
    stress           [R, M, 3, 3] Hartree / Bohr^3     (last calculator call, if any)
    properties       dict of further outputs [R, M, ...] or [R, N, ...] (atomic units)

Replicas are the leading dimension of every per-replica tensor, so ring-polymer
integrators work on the same state (replica = bead). Per-molecule reductions are
done with :meth:`System.sum_molecules` (an ``index_add`` over atoms).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from spkserve import units

#: atomic units used inside spkmd for each quantity kind, as unit strings
AU = {
    "length": "Bohr",
    "energy": "Hartree",
    "mass": "me",
    "time": "au_time",
    "forces": "Hartree/Bohr",
    "stress": "Hartree/Bohr^3",
    "velocity": "Bohr/au_time",
    "momentum": "me*Bohr/au_time",
}


class SystemSetupError(ValueError):
    """The system cannot be built or is not physical (message names the problem)."""


def _kb() -> float:
    return units.KB_HARTREE_PER_K


@dataclass
class System:
    """Typed MD state (see module docstring for shapes and units)."""

    positions: torch.Tensor
    momenta: torch.Tensor
    masses: torch.Tensor
    atomic_numbers: torch.Tensor
    molecule_index: torch.Tensor
    n_atoms: torch.Tensor
    cells: torch.Tensor
    pbc: torch.Tensor
    dof: torch.Tensor
    forces: torch.Tensor | None = None
    energy: torch.Tensor | None = None
    stress: torch.Tensor | None = None
    properties: dict[str, torch.Tensor] = field(default_factory=dict)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_atoms(
        cls,
        molecules: "Sequence | object",
        n_replicas: int = 1,
        length_unit: str = "Angstrom",
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ) -> "System":
        """Build from one or several ``ase.Atoms`` (positions and cell in ``length_unit``).

        Masses are taken from the Atoms objects (amu). Momenta start at zero;
        use an initializer from :mod:`spkmd.initializers`.
        """
        if n_replicas < 1:
            raise SystemSetupError(f"n_replicas must be at least 1, got {n_replicas}")
        if not isinstance(molecules, (list, tuple)):
            molecules = [molecules]
        if len(molecules) == 0:
            raise SystemSetupError("no molecules given")
        to_bohr = units.factor(length_unit, "Bohr")
        to_me = units.factor("amu", "me")
        numbers = np.concatenate([np.asarray(m.numbers, dtype=np.int64) for m in molecules])
        if len(numbers) == 0:
            raise SystemSetupError("the molecules hold no atoms")
        pos = np.concatenate([np.asarray(m.positions, dtype=np.float64) for m in molecules]) * to_bohr
        masses = np.concatenate([np.asarray(m.get_masses(), dtype=np.float64) for m in molecules]) * to_me
        if np.any(masses <= 0):
            bad = np.flatnonzero(masses <= 0)
            raise SystemSetupError(f"atoms {bad.tolist()} have non-positive masses; set masses on the Atoms objects")
        n_atoms = np.array([len(m) for m in molecules], dtype=np.int64)
        if np.any(n_atoms == 0):
            raise SystemSetupError(f"molecule {int(np.flatnonzero(n_atoms == 0)[0])} has no atoms")
        cells = np.stack([np.asarray(m.cell.array, dtype=np.float64) for m in molecules]) * to_bohr
        pbc = np.stack([np.asarray(m.pbc, dtype=bool) for m in molecules])
        for k in range(len(molecules)):
            if pbc[k].any() and abs(np.linalg.det(cells[k])) < 1e-8:
                raise SystemSetupError(f"molecule {k} is periodic ({pbc[k].tolist()}) but its cell has zero volume")
        kw = dict(dtype=dtype, device=device)
        R = n_replicas
        positions = torch.as_tensor(pos, **kw).unsqueeze(0).repeat(R, 1, 1).contiguous()
        system = cls(
            positions=positions,
            momenta=torch.zeros_like(positions),
            masses=torch.as_tensor(masses, **kw),
            atomic_numbers=torch.as_tensor(numbers, device=device),
            molecule_index=torch.repeat_interleave(torch.arange(len(molecules)), torch.as_tensor(n_atoms)).to(device),
            n_atoms=torch.as_tensor(n_atoms, device=device),
            cells=torch.as_tensor(cells, **kw).unsqueeze(0).repeat(R, 1, 1, 1).contiguous(),
            pbc=torch.as_tensor(pbc, device=device),
            dof=torch.as_tensor(3.0 * n_atoms, **kw),
        )
        return system

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        n_replicas: int = 1,
        length_unit: str = "Angstrom",
        index: str | int = ":",
        n_molecules: int = 1,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ) -> "System":
        """Read molecules from any file ASE reads (all frames by default) in ``length_unit``.

        ``n_molecules`` copies of the (list of) frames are simulated side by side.
        """
        import ase.io

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"molecule file {str(path)!r} does not exist")
        frames = ase.io.read(str(path), index=index)
        if not isinstance(frames, list):
            frames = [frames]
        if n_molecules < 1:
            raise SystemSetupError(f"n_molecules must be at least 1, got {n_molecules}")
        return cls.from_atoms(
            [f.copy() for _ in range(n_molecules) for f in frames], n_replicas, length_unit, dtype, device
        )

    # ------------------------------------------------------------------ sizes
    @property
    def n_replicas(self) -> int:
        return self.positions.shape[0]

    @property
    def n_molecules(self) -> int:
        return self.n_atoms.shape[0]

    @property
    def n_atoms_total(self) -> int:
        return self.positions.shape[1]

    @property
    def device(self) -> torch.device:
        return self.positions.device

    @property
    def dtype(self) -> torch.dtype:
        return self.positions.dtype

    @property
    def masses3(self) -> torch.Tensor:
        """Masses broadcastable against positions (a view).  [1, N, 1]"""
        return self.masses.view(1, -1, 1)

    # ------------------------------------------------------------------ reductions
    def sum_molecules(self, x: torch.Tensor) -> torch.Tensor:
        """Sum a per-atom tensor [R, N, ...] over the atoms of each molecule -> [R, M, ...]."""
        out = x.new_zeros((x.shape[0], self.n_molecules) + tuple(x.shape[2:]))
        return out.index_add_(1, self.molecule_index, x)

    def expand_molecules(self, x: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-molecule tensor [R, M, ...] to the atoms -> [R, N, ...]."""
        return x.index_select(1, self.molecule_index)

    @property
    def velocities(self) -> torch.Tensor:
        """Bohr / au_time.  [R, N, 3]"""
        return self.momenta / self.masses3

    def kinetic_energy_atoms(self, momenta: torch.Tensor | None = None) -> torch.Tensor:
        """0.5 p²/m per atom in Hartree.  [R, N]"""
        p = self.momenta if momenta is None else momenta
        return 0.5 * (p * p).sum(-1) / self.masses.view(1, -1)

    def kinetic_energy(self, momenta: torch.Tensor | None = None) -> torch.Tensor:
        """Kinetic energy per replica and molecule in Hartree.  [R, M]"""
        ke = self.kinetic_energy_atoms(momenta)
        return ke.new_zeros((ke.shape[0], self.n_molecules)).index_add_(1, self.molecule_index, ke)

    def temperature(self) -> torch.Tensor:
        """Instantaneous temperature per replica and molecule in K: 2 KE / (dof k_B).  [R, M]"""
        return 2.0 * self.kinetic_energy() / (self.dof * _kb())

    @property
    def centroid_momenta(self) -> torch.Tensor:
        """Mean momenta over replicas.  [1, N, 3]"""
        return self.momenta.mean(0, keepdim=True)

    @property
    def centroid_positions(self) -> torch.Tensor:
        """Mean positions over replicas.  [1, N, 3]"""
        return self.positions.mean(0, keepdim=True)

    def centroid_temperature(self) -> torch.Tensor:
        """Temperature of the centroid momenta in K.  [1, M]"""
        return 2.0 * self.kinetic_energy(self.centroid_momenta) / (self.dof * _kb())

    def volume(self) -> torch.Tensor:
        """Cell volume per replica and molecule in Bohr³ (NaN if not fully periodic).  [R, M]"""
        v = torch.abs(torch.linalg.det(self.cells))
        periodic = self.pbc.all(-1).unsqueeze(0)
        return torch.where(periodic, v, torch.full_like(v, float("nan")))

    def pressure(self) -> torch.Tensor:
        """Instantaneous pressure in Hartree/Bohr³: 2 KE/(3V) - tr(stress)/3.  [R, M]

        Needs ``stress`` from the calculator (else only the kinetic part is
        used); NaN for molecules that are not periodic in all directions.
        """
        V = self.volume()
        p = 2.0 * self.kinetic_energy() / (3.0 * V)
        if self.stress is not None:
            p = p - torch.diagonal(self.stress, dim1=-2, dim2=-1).sum(-1) / 3.0
        return p

    def total_mass(self) -> torch.Tensor:
        """Mass per molecule.  [M]"""
        return torch.zeros(self.n_molecules, dtype=self.dtype, device=self.device).index_add_(
            0, self.molecule_index, self.masses
        )

    def center_of_mass(self) -> torch.Tensor:
        """Centre of mass per replica and molecule in Bohr.  [R, M, 3]"""
        return self.sum_molecules(self.positions * self.masses3) / self.total_mass().view(1, -1, 1)

    def remove_com_translation(self) -> None:
        """Remove the centre-of-mass momentum of every molecule and replica (in place)."""
        p_com = self.sum_molecules(self.momenta) / self.total_mass().view(1, -1, 1)  # COM velocity [R, M, 3]
        self.momenta -= self.expand_molecules(p_com) * self.masses3

    def remove_com_rotation(self) -> None:
        """Remove the angular momentum about the centre of mass of every molecule and replica (in place)."""
        r = self.positions - self.expand_molecules(self.center_of_mass())  # [R, N, 3]
        L = self.sum_molecules(torch.cross(r, self.momenta, dim=-1))  # [R, M, 3]
        m = self.masses3
        r2 = (r * r).sum(-1, keepdim=True)
        eye = torch.eye(3, dtype=self.dtype, device=self.device)
        inertia_atoms = m.unsqueeze(-1) * (r2.unsqueeze(-1) * eye - r.unsqueeze(-1) * r.unsqueeze(-2))
        inertia = self.sum_molecules(inertia_atoms)  # [R, M, 3, 3]
        omega = _solve_inertia(inertia, L)
        v_rot = torch.cross(self.expand_molecules(omega), r, dim=-1)
        self.momenta -= v_rot * m

    def is_linear(self, molecule: int, tolerance_bohr: float = 1e-3) -> bool:
        """True if molecule ``molecule`` (first replica) is linear (or a single atom / pair)."""
        sel = self.molecule_index == molecule
        x = self.positions[0, sel]
        if x.shape[0] <= 2:
            return True
        x = x - x.mean(0)
        s = torch.linalg.svdvals(x)
        return bool(s[1] < tolerance_bohr)

    def set_dof(self, remove_translation: bool, remove_rotation: bool) -> None:
        """Set the degrees of freedom used by the temperature: 3n, minus 3 (translation),
        minus 3 (or 2 for linear molecules, 0 for single atoms) for rotation."""
        dof = []
        for k, n in enumerate(self.n_atoms.tolist()):
            d = 3 * n
            if remove_translation:
                d -= 3
            if remove_rotation and n > 1:
                d -= 2 if self.is_linear(k) else 3
            if d <= 0:
                raise SystemSetupError(f"molecule {k} ({n} atoms) has no degrees of freedom left after removing COM motion")
            dof.append(float(d))
        self.dof = torch.tensor(dof, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ conversion
    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "System":
        """Move (in place) to ``device`` and/or float ``dtype``; returns self."""
        for name in ("positions", "momenta", "masses", "cells", "dof", "forces", "energy", "stress"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device=device, dtype=dtype))
        for name in ("atomic_numbers", "molecule_index", "n_atoms", "pbc"):
            setattr(self, name, getattr(self, name).to(device=device))
        self.properties = {
            k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device=device))
            for k, v in self.properties.items()
        }
        return self

    def state_dict(self) -> dict[str, torch.Tensor | dict]:
        """Everything needed to continue bit-for-bit (tensors only)."""
        out = {}
        for name in (
            "positions", "momenta", "masses", "atomic_numbers", "molecule_index", "n_atoms",
            "cells", "pbc", "dof", "forces", "energy", "stress",
        ):
            t = getattr(self, name)
            if t is not None:
                out[name] = t.detach().clone()
        out["properties"] = {k: v.detach().clone() for k, v in self.properties.items()}
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore the state written by :meth:`state_dict` (keeps this system's device and dtype)."""
        dev, dt = self.device, self.dtype
        for name in ("positions", "momenta", "masses", "cells", "dof"):
            setattr(self, name, state[name].to(device=dev, dtype=dt))
        for name in ("atomic_numbers", "molecule_index", "n_atoms", "pbc"):
            setattr(self, name, state[name].to(device=dev))
        for name in ("forces", "energy", "stress"):
            setattr(self, name, state[name].to(device=dev, dtype=dt) if name in state else None)
        self.properties = {
            k: (v.to(device=dev, dtype=dt) if v.is_floating_point() else v.to(device=dev))
            for k, v in state.get("properties", {}).items()
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "System":
        s = cls(**{k: state[k] for k in (
            "positions", "momenta", "masses", "atomic_numbers", "molecule_index", "n_atoms", "cells", "pbc", "dof"
        )})
        s.load_state_dict(state)
        return s

    def molecule_slice(self, molecule: int) -> slice:
        """Atom range of one molecule in the concatenated atom axis."""
        starts = np.concatenate([[0], np.cumsum(self.n_atoms.cpu().numpy())])
        if not 0 <= molecule < self.n_molecules:
            raise IndexError(f"molecule {molecule} out of range (system has {self.n_molecules})")
        return slice(int(starts[molecule]), int(starts[molecule + 1]))

    def to_atoms(self, replica: int | None = None, molecule: int | None = None) -> list:
        """ASE Atoms (Å, momenta in ASE units, energies eV, forces eV/Å) for each molecule.

        ``replica=None`` gives the centroid (mean over replicas).
        """
        import ase
        from ase.calculators.singlepoint import SinglePointCalculator

        if replica is None:
            R = self.positions.mean(0)
            P = self.momenta.mean(0)
            C = self.cells.mean(0)
            E = None if self.energy is None else self.energy.mean(0)
            F = None if self.forces is None else self.forces.mean(0)
        else:
            R, P, C = self.positions[replica], self.momenta[replica], self.cells[replica]
            E = None if self.energy is None else self.energy[replica]
            F = None if self.forces is None else self.forces[replica]
        to_A = units.factor("Bohr", "Angstrom")
        to_ase_p = units.factor("me*Bohr/au_time", "(amu*eV)^0.5")  # ASE momentum unit
        to_eV = units.factor("Hartree", "eV")
        to_eVA = units.factor("Hartree/Bohr", "eV/Angstrom")
        mols = range(self.n_molecules) if molecule is None else [molecule]
        out = []
        for k in mols:
            sl = self.molecule_slice(k)
            atoms = ase.Atoms(
                numbers=self.atomic_numbers[sl].cpu().numpy(),
                positions=R[sl].detach().cpu().double().numpy() * to_A,
                cell=C[k].detach().cpu().double().numpy() * to_A,
                pbc=self.pbc[k].cpu().numpy(),
                masses=self.masses[sl].detach().cpu().double().numpy() * units.factor("me", "amu"),
            )
            atoms.set_momenta(P[sl].detach().cpu().double().numpy() * to_ase_p)
            if E is not None:
                res = {"energy": float(E[k]) * to_eV}
                if F is not None:
                    res["forces"] = F[sl].detach().cpu().double().numpy() * to_eVA
                atoms.calc = SinglePointCalculator(atoms, **res)
            out.append(atoms)
        return out


def _solve_inertia(inertia: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """ω with I ω = L for symmetric 3x3 inertia tensors [..., 3, 3] (pseudo-inverse for linear
    molecules, 0 for single atoms), in closed form.

    Elementwise arithmetic only: LAPACK solvers (MKL) can differ in the last bit from call to
    call depending on memory alignment, which made seeded initial states irreproducible.
    """
    a, b, c = inertia[..., 0, 0], inertia[..., 0, 1], inertia[..., 0, 2]
    d, e, f = inertia[..., 1, 1], inertia[..., 1, 2], inertia[..., 2, 2]
    A00, A01, A02 = d * f - e * e, c * e - b * f, b * e - c * d
    A11, A12, A22 = a * f - c * c, b * c - a * e, a * d - b * b
    det = a * A00 + b * A01 + c * A02
    L0, L1, L2 = L[..., 0], L[..., 1], L[..., 2]
    adj_L = torch.stack(
        [A00 * L0 + A01 * L1 + A02 * L2, A01 * L0 + A11 * L1 + A12 * L2, A02 * L0 + A12 * L1 + A22 * L2], dim=-1
    )
    trace = a + d + f
    regular = det.abs() > 1e-10 * trace**3
    # linear molecule along u: I = (trace/2)(1 - u u^T) and L is perpendicular to u
    linear = 2.0 * L / torch.where(trace > 0, trace, torch.ones_like(trace)).unsqueeze(-1)
    linear = torch.where((trace > 0).unsqueeze(-1), linear, torch.zeros_like(L))
    safe_det = torch.where(regular, det, torch.ones_like(det)).unsqueeze(-1)
    return torch.where(regular.unsqueeze(-1), adj_L / safe_det, linear)

