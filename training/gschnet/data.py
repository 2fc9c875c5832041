"""Molecules and their conditions for cG-SchNet training.

:func:`load_molecules` reads an ASE-readable file (extxyz, ASE db, ...) into
:class:`Molecule` records (positions centred on the centre of mass, which becomes the
origin token's position) and checks them: periodic systems, atom types outside
``atom_types``, empty molecules and molecules whose atoms are not connected within the
placement cutoff (they cannot be built atom by atom) are refused with a message naming
the molecule; single-atom molecules are dropped with a warning.

Conditions come from ``atoms.info[key]`` (or the calculator energy for ``key: energy``),
mapped to condition names by ``properties`` (e.g. ``{"gap": "gap_gfn2xtb_eV"}``).
``relative_atomic_energy`` is derived as in cG-SchNet: the energy per atom minus a linear
fit of the energy per atom on the concentrations of the atom types, fitted on the
training molecules (:func:`fit_relative_atomic_energy`).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

RELATIVE_ATOMIC_ENERGY = "relative_atomic_energy"


class GSchNetDataError(ValueError):
    """The data cannot be used to train cG-SchNet; the message names the molecule and the fix."""


@dataclass
class Molecule:
    """One training molecule: numbers [n], positions [n, 3] in Å relative to its centre of mass."""

    numbers: np.ndarray
    positions: np.ndarray
    properties: dict[str, float] = field(default_factory=dict)
    energy: float | None = None  # eV, the file's energy (for relative_atomic_energy)
    #: cached distance matrix [n, n] (Å); the three cutoffs' neighbour lists derive from it
    distances: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_atoms(self) -> int:
        return int(self.numbers.shape[0])


def _energy_of(atoms) -> float | None:
    try:
        return float(atoms.get_potential_energy())
    except Exception:  # no calculator attached: no energy in the file (checked where it is needed)
        return None


def _connected(d: np.ndarray, cutoff: float) -> bool:
    n = d.shape[0]
    seen = np.zeros(n, dtype=bool)
    seen[0] = True
    frontier = [0]
    adj = d < cutoff
    while frontier:
        i = frontier.pop()
        for j in np.nonzero(adj[i] & ~seen)[0]:
            seen[j] = True
            frontier.append(int(j))
    return bool(seen.all())


def load_molecules(
    path: str | Path,
    atom_types: Sequence[int],
    placement_cutoff: float,
    properties: dict[str, str] | None = None,
    covalent_radius_factor: float | None = None,
) -> list[Molecule]:
    """Read and check the molecules of ``path`` (see module docstring)."""
    from ase.io import read

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist (set data.datapath=...)")
    frames = read(str(path), index=":")
    if not frames:
        raise GSchNetDataError(f"{path} holds no structures")
    allowed = set(int(z) for z in atom_types)
    properties = dict(properties or {})
    mols: list[Molecule] = []
    singles = 0
    for k, atoms in enumerate(frames):
        if atoms.pbc.any():
            raise GSchNetDataError(f"{path}: structure {k} is periodic (pbc={atoms.pbc.tolist()}); "
                                   "cG-SchNet generates isolated molecules only")
        z = atoms.numbers.astype(np.int64)
        if z.shape[0] == 0:
            raise GSchNetDataError(f"{path}: structure {k} has no atoms; remove it from the data")
        extra = sorted(set(z.tolist()) - allowed)
        if extra:
            raise GSchNetDataError(f"{path}: structure {k} ({atoms.get_chemical_formula()}) contains atomic numbers "
                                   f"{extra} missing from globals.atom_types={sorted(allowed)}; add them there")
        if z.shape[0] == 1:
            singles += 1
            continue
        r = atoms.positions.astype(np.float64)
        com = atoms.get_center_of_mass()
        r = r - com
        d = np.linalg.norm(r[:, None] - r[None], axis=-1)
        reach = d
        if covalent_radius_factor:
            from ase.data import covalent_radii

            rc = covalent_radii[z]
            reach = np.where(d < covalent_radius_factor * (rc[:, None] + rc[None, :]), d, np.inf)
        if not _connected(reach, placement_cutoff):
            raise GSchNetDataError(
                f"{path}: structure {k} ({atoms.get_chemical_formula()}) is not connected within the placement "
                f"cutoff {placement_cutoff} Å" + (f" and {covalent_radius_factor} x covalent radii" if covalent_radius_factor
                                                   else "") + ", so it cannot be built atom by atom; raise "
                "globals.placement_cutoff / globals.covalent_radius_factor or remove it"
            )
        props = {}
        for name, key in properties.items():
            if key == "energy":
                e = _energy_of(atoms)
                if e is None:
                    raise GSchNetDataError(f"{path}: structure {k} has no energy for condition {name!r}")
                props[name] = e
            elif key in atoms.info:
                props[name] = float(atoms.info[key])
            else:
                raise GSchNetDataError(f"{path}: structure {k} has no property {key!r} for condition {name!r} "
                                       f"(info keys: {sorted(atoms.info)})")
        mols.append(Molecule(z, r, props, _energy_of(atoms), d.astype(np.float32)))
    if singles:
        warnings.warn(f"{path}: dropped {singles} single-atom structure(s); there is nothing to place around them",
                      stacklevel=2)
    if not mols:
        raise GSchNetDataError(f"{path}: no molecule with at least two atoms")
    return mols


def fingerprint(mols: Sequence[Molecule]) -> str:
    """sha256 over numbers and positions (what a neighbour cache and a run are keyed on)."""
    h = hashlib.sha256()
    for m in mols:
        h.update(m.numbers.tobytes())
        h.update(np.round(m.positions, 6).tobytes())
    return h.hexdigest()[:16]


def concentrations(mols: Sequence[Molecule], atom_types: Sequence[int]) -> np.ndarray:
    """Fractions of each atom type per molecule.  [M, T]"""
    types = list(atom_types)
    out = np.zeros((len(mols), len(types)))
    for k, m in enumerate(mols):
        for t, z in enumerate(types):
            out[k, t] = np.count_nonzero(m.numbers == z)
        out[k] /= m.n_atoms
    return out


def fit_relative_atomic_energy(train: Sequence[Molecule], atom_types: Sequence[int]) -> dict[str, Any]:
    """Least-squares fit E/N ≈ w · concentration + b on ``train`` (eV).  Returns ``{"weights", "bias"}``."""
    if any(m.energy is None for m in train):
        raise GSchNetDataError("relative_atomic_energy needs an energy for every molecule (none in the file)")
    c = concentrations(train, atom_types)
    y = np.array([m.energy / m.n_atoms for m in train])
    A = np.concatenate([c, np.ones((len(train), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    return {"weights": coef[:-1].tolist(), "bias": float(coef[-1]), "atom_types": [int(z) for z in atom_types]}


def relative_atomic_energy(mols: Sequence[Molecule], fit: dict[str, Any]) -> np.ndarray:
    """E/N minus the fitted E/N of the molecule's composition (eV per atom).  [M]"""
    c = concentrations(mols, fit["atom_types"])
    pred = c @ np.asarray(fit["weights"]) + fit["bias"]
    return np.array([m.energy / m.n_atoms for m in mols]) - pred


def attach_relative_atomic_energy(mols: Sequence[Molecule], fit: dict[str, Any]) -> None:
    """Store ``relative_atomic_energy`` in every molecule's properties."""
    for m, v in zip(mols, relative_atomic_energy(mols, fit)):
        m.properties[RELATIVE_ATOMIC_ENERGY] = float(v)


def neighbor_cache(mols: Sequence[Molecule], cache_file: str | Path | None) -> None:
    """Load the distance matrices of ``mols`` from ``cache_file`` (if it matches) or store them there."""
    if cache_file is None:
        return
    cache_file = Path(cache_file)
    fp = fingerprint(mols)
    if cache_file.exists():
        with np.load(cache_file) as z:
            if str(z["fingerprint"]) == fp:
                flat, offsets = z["flat"], z["offsets"]
                for k, m in enumerate(mols):
                    n = m.n_atoms
                    m.distances = flat[offsets[k] : offsets[k] + n * n].reshape(n, n)
                return
    sizes = np.array([m.n_atoms**2 for m in mols])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    flat = np.concatenate([m.distances.reshape(-1) for m in mols])
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache_file, fingerprint=fp, flat=flat, offsets=offsets)
