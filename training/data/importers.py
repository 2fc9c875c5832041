"""Import reference data into an :class:`ASEAtomsData` database, with units stated by the user.

Every importer checks all frames first (missing properties, shapes, NaN; the
error names the frame and the property) and writes the database to a
temporary file that replaces ``db_path`` only when everything succeeded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from spkserve import keys, units

from .atoms_db import ASEAtomsData, AtomsDataError

__all__ = ["from_atoms_list", "from_extxyz", "from_ase_file", "from_trajectory", "from_ase_db", "from_npz"]

_STANDARD = (keys.energy, keys.forces, keys.stress, keys.dipole_moment)
_CALC_NAME = {keys.energy: "energy", keys.forces: "forces", keys.stress: "stress", keys.dipole_moment: "dipole"}


def default_units(energy_unit: str, distance_unit: str, forces_unit: str | None = None,
                  stress_unit: str | None = None) -> dict[str, str]:
    """Units of energy, forces (energy/length), stress (energy/length^3), dipole (e*length)."""
    out = {
        keys.energy: energy_unit,
        keys.forces: forces_unit or f"{energy_unit}/{distance_unit}",
        keys.stress: stress_unit or f"{energy_unit}/{distance_unit}^3",
        keys.dipole_moment: f"e*{distance_unit}",
    }
    for name, like in ((keys.energy, "eV"), (keys.forces, "eV/Ang"), (keys.stress, "eV/Ang^3")):
        try:
            units.check_dimension(out[name], like)
        except units.UnitError as err:
            raise AtomsDataError(f"unit of {name}: {err}") from None
    return out


def _partial_path(db_path: Path) -> Path:
    return db_path.parent / f".{db_path.stem}.{os.getpid()}.partial.db"


def _prepare_target(db_path: str | os.PathLike, overwrite: bool) -> Path:
    db_path = Path(db_path)
    if db_path.suffix != ".db":
        raise ValueError(f"the target database must end in '.db', got {db_path}")
    if db_path.exists() and not overwrite:
        raise FileExistsError(f"{db_path} exists; pass overwrite=True to replace it")
    db_path.parent.mkdir(parents=True, exist_ok=True)
    return db_path


def from_atoms_list(
    frames: Iterable[Any],
    db_path: str | os.PathLike,
    distance_unit: str,
    property_units: Mapping[str, str],
    property_list: Sequence[Mapping[str, Any]] | None = None,
    atomrefs: Mapping[str, Sequence[float]] | None = None,
    per_atom_properties: Iterable[str] = (),
    overwrite: bool = False,
    chunk_size: int = 2000,
) -> ASEAtomsData:
    """Write ``ase.Atoms`` frames (properties from ``property_list`` or their calculators) to ``db_path``."""
    db_path = _prepare_target(db_path, overwrite)
    tmp = _partial_path(db_path)
    if tmp.exists():
        tmp.unlink()
    try:
        ds = ASEAtomsData.create(tmp, distance_unit, property_units, atomrefs, per_atom_properties)
        frames = list(frames)
        if not frames:
            raise AtomsDataError("no frames to import")
        for start in range(0, len(frames), chunk_size):
            chunk = frames[start : start + chunk_size]
            props = None if property_list is None else property_list[start : start + chunk_size]
            try:
                ds.add_systems(chunk, props)
            except AtomsDataError as err:
                raise AtomsDataError(_renumber(str(err), start)) from None
        del ds
        os.replace(tmp, db_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return ASEAtomsData(db_path)


def _renumber(msg: str, offset: int) -> str:
    """'system k (row r)' of a chunk -> 'frame k+offset'."""
    import re

    return re.sub(r"system (\d+) \(row \d+\)", lambda m: f"frame {int(m.group(1)) + offset}", msg)


def _select_properties(frame0, properties: Sequence[str] | None, extra_units: Mapping[str, str]) -> list[str]:
    if properties is not None:
        return list(properties)
    results = dict(getattr(frame0.calc, "results", {}) or {})
    found = [p for p in _STANDARD if _CALC_NAME[p] in results]
    found += [p for p in extra_units if p not in found]
    if not found:
        raise AtomsDataError(
            "the first frame carries no energy/forces/stress/dipole results; name the properties to import "
            "(properties=[...]) and where they are (property_map)"
        )
    return found


def _frame_properties(atoms, wanted: Sequence[str], property_map: Mapping[str, str], k: int) -> dict[str, Any]:
    results = dict(getattr(atoms.calc, "results", {}) or {})
    out = {}
    for p in wanted:
        src = property_map.get(p, p)
        calc_name = _CALC_NAME.get(src, src)
        if calc_name in results and results[calc_name] is not None:
            out[p] = results[calc_name]
        elif src in atoms.info:
            out[p] = atoms.info[src]
        elif src in atoms.arrays:
            out[p] = atoms.arrays[src]
        else:
            raise AtomsDataError(
                f"frame {k}: property {p!r} (source key {src!r}) is missing; the frame has calculator results "
                f"{sorted(results)}, info {sorted(atoms.info)}, arrays {sorted(atoms.arrays)}"
            )
    return out


def from_ase_file(
    path: str | os.PathLike,
    db_path: str | os.PathLike,
    energy_unit: str,
    forces_unit: str | None = None,
    distance_unit: str = "Ang",
    *,
    properties: Sequence[str] | None = None,
    property_map: Mapping[str, str] | None = None,
    extra_units: Mapping[str, str] | None = None,
    stress_unit: str | None = None,
    index: str | int | slice = ":",
    per_atom_properties: Iterable[str] = (),
    atomrefs: Mapping[str, Sequence[float]] | None = None,
    overwrite: bool = False,
    format: str | None = None,
) -> ASEAtomsData:
    """Import any file ``ase.io.read`` understands (extxyz, ASE ``.traj``, ...).

    Args:
        energy_unit, forces_unit, distance_unit: units of the file's values
            (forces default to energy/length). Values are stored as they are;
            conversion happens when reading.
        properties: our property names to import (default: whatever of
            energy/forces/stress/dipole the first frame's calculator has, plus
            ``extra_units``).
        property_map: our name -> key in the file (calculator result, ``info``
            or ``arrays``), e.g. ``{"energy": "U0"}``.
        extra_units: units of properties other than energy/forces/stress/dipole.
    """
    from ase.io import read

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    frames = read(str(path), index=index, format=format)
    if not isinstance(frames, list):
        frames = [frames]
    if not frames:
        raise AtomsDataError(f"{path} holds no frames")
    extra_units = dict(extra_units or {})
    wanted = _select_properties(frames[0], properties, extra_units)
    all_units = default_units(energy_unit, distance_unit, forces_unit, stress_unit)
    all_units.update(extra_units)
    missing_units = [p for p in wanted if p not in all_units]
    if missing_units:
        raise AtomsDataError(f"no unit given for properties {missing_units}: pass extra_units={{name: unit}}")
    pmap = dict(property_map or {})
    props = [_frame_properties(a, wanted, pmap, k) for k, a in enumerate(frames)]
    return from_atoms_list(
        frames, db_path, distance_unit, {p: all_units[p] for p in wanted}, props,
        atomrefs=atomrefs, per_atom_properties=per_atom_properties, overwrite=overwrite,
    )


def from_extxyz(path, db_path, energy_unit: str = "eV", forces_unit: str | None = None,
                distance_unit: str = "Ang", **kwargs) -> ASEAtomsData:
    """Import an extended-XYZ file (see :func:`from_ase_file` for the keyword arguments)."""
    return from_ase_file(path, db_path, energy_unit, forces_unit, distance_unit, format="extxyz", **kwargs)


def from_trajectory(path, db_path, energy_unit: str = "eV", forces_unit: str | None = None,
                    distance_unit: str = "Ang", **kwargs) -> ASEAtomsData:
    """Import an ASE trajectory (``.traj``) (see :func:`from_ase_file`)."""
    return from_ase_file(path, db_path, energy_unit, forces_unit, distance_unit, format="traj", **kwargs)


def from_ase_db(
    path: str | os.PathLike,
    db_path: str | os.PathLike,
    energy_unit: str,
    forces_unit: str | None = None,
    distance_unit: str = "Ang",
    *,
    properties: Sequence[str] = (keys.energy, keys.forces),
    property_map: Mapping[str, str] | None = None,
    extra_units: Mapping[str, str] | None = None,
    per_atom_properties: Iterable[str] = (),
    overwrite: bool = False,
) -> ASEAtomsData:
    """Import an ASE database whose properties sit in ``row.data``, key-value pairs or calculator
    results (e.g. SchNetPack databases without unit metadata, ISO17)."""
    from ase.db import connect

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    pmap = dict(property_map or {})
    frames, props = [], []
    for k, row in enumerate(connect(str(path)).select()):
        atoms = row.toatoms()
        values = {}
        for p in properties:
            src = pmap.get(p, p)
            if src in row.data:
                values[p] = row.data[src]
            elif src in row.key_value_pairs:
                values[p] = row.key_value_pairs[src]
            elif row.get(_CALC_NAME.get(src, src)) is not None:
                values[p] = row.get(_CALC_NAME.get(src, src))
            else:
                raise AtomsDataError(
                    f"frame {k} (row id {row.id}) of {path}: property {p!r} (source key {src!r}) is missing; "
                    f"row.data has {sorted(row.data)}, key-value pairs {sorted(row.key_value_pairs)}"
                )
        atoms.calc = None
        frames.append(atoms)
        props.append(values)
    all_units = default_units(energy_unit, distance_unit, forces_unit)
    all_units.update(extra_units or {})
    missing_units = [p for p in properties if p not in all_units]
    if missing_units:
        raise AtomsDataError(f"no unit given for properties {missing_units}: pass extra_units={{name: unit}}")
    return from_atoms_list(
        frames, db_path, distance_unit, {p: all_units[p] for p in properties}, props,
        per_atom_properties=per_atom_properties, overwrite=overwrite,
    )


#: key names of MD17-style npz files (sGDML): positions, numbers, energies, forces
MD17_KEYS = {"R": "R", "z": "z", "E": "E", "F": "F"}
#: key names of the revised MD17 npz files
RMD17_KEYS = {"R": "coords", "z": "nuclear_charges", "E": "energies", "F": "forces"}


def read_npz_arrays(path: str | os.PathLike, key_map: Mapping[str, str] = MD17_KEYS) -> dict[str, np.ndarray]:
    """Read and check the arrays of an MD17-style npz: R [F, n, 3], z [n], E [F], F [F, n, 3] (F optional)."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        present = set(z.files)
        for role in ("R", "z", "E"):
            if key_map[role] not in present:
                raise AtomsDataError(f"{path}: key {key_map[role]!r} ({role}) is missing; the file has {sorted(present)}")
        R = np.asarray(z[key_map["R"]], dtype=np.float64)
        Z = np.asarray(z[key_map["z"]]).astype(np.int64).reshape(-1)
        E = np.asarray(z[key_map["E"]], dtype=np.float64)
        F = np.asarray(z[key_map["F"]], dtype=np.float64) if key_map.get("F") in present else None
    if R.ndim != 3 or R.shape[2] != 3:
        raise AtomsDataError(f"{path}: positions {key_map['R']!r} must be [frames, atoms, 3], got {R.shape}")
    n_frames, n_atoms = R.shape[:2]
    if Z.shape[0] != n_atoms:
        raise AtomsDataError(f"{path}: {len(Z)} atomic numbers but positions have {n_atoms} atoms")
    if E.size != n_frames:
        raise AtomsDataError(f"{path}: energies {key_map['E']!r} have shape {E.shape}, expected {n_frames} values")
    E = E.reshape(n_frames)
    if F is not None and F.shape != R.shape:
        raise AtomsDataError(f"{path}: forces {key_map['F']!r} have shape {F.shape}, positions {R.shape}")
    for name, arr in (("positions", R), ("energy", E), ("forces", F)):
        if arr is None:
            continue
        bad = ~np.isfinite(arr.reshape(n_frames, -1)).all(axis=1)
        if bad.any():
            raise AtomsDataError(f"{path}: frame {int(np.flatnonzero(bad)[0])}: {name} contains NaN or infinite values")
    out = {"R": R, "z": Z, "E": E}
    if F is not None:
        out["F"] = F
    return out


def from_npz(
    path: str | os.PathLike,
    db_path: str | os.PathLike,
    energy_unit: str,
    forces_unit: str | None = None,
    distance_unit: str = "Ang",
    *,
    key_map: Mapping[str, str] = MD17_KEYS,
    overwrite: bool = False,
) -> ASEAtomsData:
    """Import an MD17-style npz (keys ``R``, ``z``, ``E``, ``F``; rename with ``key_map``)."""
    from ase import Atoms

    arr = read_npz_arrays(path, key_map)
    frames = [Atoms(numbers=arr["z"], positions=r) for r in arr["R"]]
    has_f = "F" in arr
    props = [
        {keys.energy: arr["E"][k], **({keys.forces: arr["F"][k]} if has_f else {})} for k in range(len(frames))
    ]
    u = default_units(energy_unit, distance_unit, forces_unit)
    punits = {keys.energy: u[keys.energy], **({keys.forces: u[keys.forces]} if has_f else {})}
    return from_atoms_list(frames, db_path, distance_unit, punits, props, overwrite=overwrite)
