"""Datasets of atomic systems stored in an ASE database (``ase.db``, SQLite).

Layout of a database written by :meth:`ASEAtomsData.create`:

* each row holds one system (numbers, positions, cell, pbc); its properties
  are numpy arrays in ``row.data`` (per-system ones with a leading dimension of
  1 or none, per-atom ones ``[n_atoms, ...]``);
* the database metadata holds ``_distance_unit`` (str), ``_property_units``
  (dict name -> unit string), optionally ``atomrefs`` (dict name -> list of
  single-atom reference values indexed by atomic number, in the property's
  unit) and ``_per_atom_properties`` (list of names).

Databases written by SchNetPack (``_property_unit_dict`` metadata, properties
in ``row.data``) are read as well.

Row ``i`` of the dataset is the database row with ``id = i + 1`` (databases
are written append-only; a database with deleted rows is refused).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from spkserve import keys, units

Sample = dict[str, torch.Tensor]
Transform = Callable[[Sample], Sample]

#: key of the row index of a sample (0-based) in the database
IDX = "_idx"

#: properties that are given per atom unless a database says otherwise
DEFAULT_PER_ATOM = frozenset(keys.PER_ATOM_OUTPUTS)

#: per-system properties that are one number per system (stored and returned as [1])
SCALAR_PROPERTIES = frozenset({keys.energy, keys.energy_uncertainty, keys.total_charge})

#: ASE calculator result names that differ from our keys
_ASE_RESULT_NAMES = {keys.dipole_moment: "dipole", keys.energy: "energy", keys.forces: "forces", keys.stress: "stress"}


class AtomsDataError(ValueError):
    """A dataset is missing properties, has bad shapes, NaNs or unknown units."""


def _voigt_to_matrix(v: np.ndarray) -> np.ndarray:
    """ASE Voigt order (xx, yy, zz, yz, xz, xy) -> symmetric 3x3."""
    xx, yy, zz, yz, xz, xy = v
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def normalize_property(
    name: str, value: Any, n_atoms: int, per_atom: bool, where: str
) -> np.ndarray:
    """Check one property value and bring it to its stored shape.

    Per-atom values must have a leading dimension ``n_atoms``; per-system
    values are stored as ``[1, ...]``. Stress given in Voigt form (6,) becomes
    3x3. Raises :class:`AtomsDataError` naming ``where`` (e.g. ``"frame 12"``)
    and the property for NaNs, infinities and wrong shapes.
    """
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise AtomsDataError(f"{where}: property {name!r} is not numeric ({err})") from None
    if name == keys.stress and arr.size == 6:
        arr = _voigt_to_matrix(arr.reshape(6))
    if name == keys.polarizability and arr.size == 9:
        arr = arr.reshape(3, 3)  # row-major 9 values (extxyz)
    if name == keys.nuclear_magnetic_shielding and arr.shape == (n_atoms, 9):
        arr = arr.reshape(n_atoms, 3, 3)  # row-major 9 values per atom (extxyz)
    if per_atom:
        if arr.ndim == 0 or arr.shape[0] != n_atoms:
            raise AtomsDataError(
                f"{where}: per-atom property {name!r} has shape {arr.shape}, expected leading dimension "
                f"n_atoms={n_atoms}"
            )
        if name == keys.nuclear_magnetic_shielding and arr.shape != (n_atoms, 3, 3):
            raise AtomsDataError(
                f"{where}: property 'nuclear_magnetic_shielding' must be one 3x3 tensor (or 9 row-major values) "
                f"per atom, shape ({n_atoms}, 3, 3); got {arr.shape}"
            )
    else:
        if arr.ndim >= 1 and arr.shape[0] == 1:
            arr = arr[0]
        if name in SCALAR_PROPERTIES:
            if arr.size != 1:
                raise AtomsDataError(f"{where}: property {name!r} must be one number per system, got shape {arr.shape}")
            arr = arr.reshape(())
        if name == keys.stress and arr.shape != (3, 3):
            raise AtomsDataError(f"{where}: property 'stress' must be 3x3 or Voigt (6,), got shape {arr.shape}")
        if name == keys.polarizability and arr.shape != (3, 3):
            raise AtomsDataError(
                f"{where}: property 'polarizability' must be a 3x3 tensor or 9 row-major values, got shape {arr.shape}"
            )
        if name == keys.dipole_moment and arr.shape != (3,):
            raise AtomsDataError(f"{where}: property 'dipole_moment' must be a 3-vector, got shape {arr.shape}")
        arr = arr.reshape((1,) + arr.shape)
    if not np.all(np.isfinite(arr)):
        raise AtomsDataError(f"{where}: property {name!r} contains NaN or infinite values")
    return arr


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


class ASEAtomsData(torch.utils.data.Dataset):
    """A dataset of atomic systems in an ASE database.

    Args:
        path: the ``.db`` file.
        load_properties: properties to load (default: all in the metadata).
        property_units: requested units by property name (others stay in the
            database's units), e.g. ``{"energy": "eV", "forces": "eV/Ang"}``.
        distance_unit: requested length unit of positions and cells
            (default: the database's).
        transforms: callables ``sample -> sample`` applied in order.

    ``dataset[i]`` is a dict of tensors for one system: ``atomic_numbers``
    [n] int64, ``positions`` [n, 3], ``cell`` [1, 3, 3], ``pbc`` [1, 3] bool,
    ``n_atoms`` [1], ``_idx`` [1] (row index), per-system properties [1, ...]
    and per-atom properties [n, ...] (float64 unless a transform casts).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        load_properties: Sequence[str] | None = None,
        property_units: Mapping[str, str] | None = None,
        distance_unit: str | None = None,
        transforms: Sequence[Transform] = (),
        *,
        indices: Sequence[int] | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"dataset file {self.path} does not exist (create it with an importer or ASEAtomsData.create)")
        self.transforms = list(transforms)
        self._conn = None
        self._conn_pid: int | None = None
        self._read_conn = None
        self._read_pid: int | None = None
        self._output_cache: dict[int, Sample] | None = None
        self._memory: dict[int, Sample] | None = None
        self._fingerprint: str | None = None
        meta = self.metadata
        self._db_len = len(self._db())
        self._check_ids()
        db_units = self.db_property_units
        self.db_distance_unit = meta.get("_distance_unit")
        if self.db_distance_unit is None:
            raise AtomsDataError(
                f"{self.path}: the database metadata has no '_distance_unit'; import the data with "
                "training.data.importers (which records units) or call update_metadata(distance_unit=...)"
            )
        self.distance_unit = distance_unit or self.db_distance_unit
        try:
            self._dist_factor = units.factor(self.db_distance_unit, self.distance_unit)
        except units.UnitError as err:
            raise AtomsDataError(f"{self.path}: distance unit: {err}") from None
        if load_properties is None:
            load_properties = list(db_units)
        missing = [p for p in load_properties if p not in db_units]
        if missing:
            raise AtomsDataError(
                f"{self.path}: properties {missing} are not in the database; available: {sorted(db_units)}"
            )
        self.load_properties = list(load_properties)
        requested = dict(property_units or {})
        unknown = [p for p in requested if p not in self.load_properties]
        if unknown:
            raise AtomsDataError(
                f"{self.path}: units requested for properties {unknown} that are not loaded "
                f"(loaded: {self.load_properties})"
            )
        self.property_units = {p: requested.get(p, db_units[p]) for p in self.load_properties}
        self._prop_factor = {}
        for p in self.load_properties:
            try:
                self._prop_factor[p] = units.factor(db_units[p], self.property_units[p])
            except units.UnitError as err:
                raise AtomsDataError(f"{self.path}: property {p!r}: {err}") from None
        per_atom = set(DEFAULT_PER_ATOM) | set(meta.get("_per_atom_properties", []))
        self.per_atom_properties = frozenset(p for p in self.load_properties if p in per_atom)
        self.indices = np.arange(self._db_len, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= self._db_len):
            raise IndexError(f"{self.path}: subset indices must lie in [0, {self._db_len}), got {self.indices.min()}..{self.indices.max()}")

    # --- creation ----------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        distance_unit: str,
        property_unit_dict: Mapping[str, str],
        atomrefs: Mapping[str, Sequence[float]] | None = None,
        per_atom_properties: Iterable[str] = (),
        **kwargs: Any,
    ) -> "ASEAtomsData":
        """Create an empty database with the given units; refuses an existing file.

        ``property_unit_dict`` maps property names to unit strings (checked by
        :mod:`spkserve.units`); ``atomrefs`` maps property names to lists of
        single-atom values indexed by atomic number (in the property's unit).
        ``per_atom_properties`` names per-atom properties beyond the standard
        ones (``forces``, ``partial_charges``, ...).
        """
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} exists already; remove it or open it with ASEAtomsData({str(path)!r})")
        if path.suffix != ".db":
            raise ValueError(f"an ASE database path must end in '.db', got {path}")
        _check_unit(distance_unit, "Ang", "distance unit")
        for name, unit in property_unit_dict.items():
            try:
                units.parse(unit)
            except units.UnitError as err:
                raise AtomsDataError(f"property {name!r}: {err}") from None
        for name in atomrefs or {}:
            if name not in property_unit_dict:
                raise AtomsDataError(f"atomrefs given for {name!r}, which is not in property_unit_dict")
        from ase.db import connect

        path.parent.mkdir(parents=True, exist_ok=True)
        db = connect(str(path), type="db", use_lock_file=False)
        meta = {"_distance_unit": distance_unit, "_property_units": dict(property_unit_dict)}
        if atomrefs:
            meta["atomrefs"] = {k: [float(x) for x in v] for k, v in atomrefs.items()}
        extra = sorted(set(per_atom_properties))
        if extra:
            meta["_per_atom_properties"] = extra
        db.metadata = meta
        return cls(path, **kwargs)

    def add_systems(
        self,
        atoms_list: Sequence[Any] | None = None,
        property_list: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Append systems (``ase.Atoms``) with their properties.

        Properties come from ``property_list[i]`` (dicts) or, if it is None,
        from ``atoms.calc`` results (``energy``, ``forces``, ``stress``,
        ``dipole`` as ``dipole_moment``). Every property in the metadata must be
        given; values are checked (shape, NaN) before anything is written.
        """
        if atoms_list is None:  # SchNetPack: add_systems(property_list=[...]) with the structure in the dicts
            atoms_list, property_list = property_list, None
        if atoms_list is None:
            raise TypeError("add_systems needs atoms_list (and property_list, or results on atoms.calc)")
        atoms_list, property_list = _schnetpack_order(atoms_list, property_list)
        if property_list is not None and len(property_list) != len(atoms_list):
            raise ValueError(f"{len(atoms_list)} systems but {len(property_list)} property dicts")
        db_units = self.db_property_units
        per_atom = set(DEFAULT_PER_ATOM) | set(self.metadata.get("_per_atom_properties", []))
        rows = []
        start = self._db_len
        for k, atoms in enumerate(atoms_list):
            where = f"system {k} (row {start + k})"
            if property_list is not None:
                props = dict(property_list[k])
            else:
                props = _properties_from_calc(atoms, db_units, where)
            extra = [p for p in props if p not in db_units]
            if extra:
                raise AtomsDataError(f"{where}: properties {extra} have no unit in the database metadata ({sorted(db_units)})")
            missing = [p for p in db_units if p not in props]
            if missing:
                raise AtomsDataError(f"{where}: property {missing[0]!r} is missing (needed: {sorted(db_units)})")
            n = len(atoms)
            if n == 0:
                raise AtomsDataError(f"{where}: a system without atoms")
            if not np.all(np.isfinite(atoms.positions)):
                raise AtomsDataError(f"{where}: positions contain NaN or infinite values")
            data = {p: normalize_property(p, v, n, p in per_atom, where) for p, v in props.items()}
            rows.append((atoms, data))
        db = self._db()
        with db:
            for atoms, data in rows:
                plain = atoms.copy()
                plain.calc = None
                db.write(plain, data=data)
        self._db_len += len(rows)
        if len(self.indices) == start:  # a full view grows with the database
            self.indices = np.arange(self._db_len, dtype=np.int64)
        self._memory = None
        self._fingerprint = None

    # --- metadata ----------------------------------------------------------------
    def _db(self):
        from ase.db import connect

        pid = os.getpid()
        if self._conn is None or self._conn_pid != pid:  # one connection per process (workers fork)
            self._conn = connect(str(self.path), type="db", use_lock_file=False)
            self._conn_pid = pid
        return self._conn

    def _reader(self):
        """A read-only connection kept open (one per process): no reconnect per row."""
        from ase.db import connect

        pid = os.getpid()
        if self._read_conn is None or self._read_pid != pid:
            self._read_conn = connect(str(self.path), type="db", use_lock_file=False)
            self._read_conn.__enter__()  # ASE keeps the sqlite connection open inside a with-block
            self._read_pid = pid
        return self._read_conn

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_conn"] = state["_read_conn"] = None
        state["_conn_pid"] = state["_read_pid"] = None
        return state

    def _check_ids(self) -> None:
        if self._db_len == 0:
            return
        import sqlite3
        from contextlib import closing

        with closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)) as con:
            lo, hi = con.execute("SELECT MIN(id), MAX(id) FROM systems").fetchone()
        if lo != 1 or hi != self._db_len:
            raise AtomsDataError(
                f"{self.path}: row ids run from {lo} to {hi} for {self._db_len} rows; the dataset needs ids 1..N "
                "(rows were deleted?). Re-import it into a new database."
            )

    @property
    def metadata(self) -> dict:
        """The database metadata (a copy)."""
        return dict(self._db().metadata)

    def update_metadata(
        self,
        distance_unit: str | None = None,
        property_units: Mapping[str, str] | None = None,
        atomrefs: Mapping[str, Sequence[float]] | None = None,
        **extra: Any,
    ) -> None:
        """Update database metadata (units of stored values, atomrefs, other keys)."""
        meta = self.metadata
        if distance_unit is not None:
            _check_unit(distance_unit, "Ang", "distance unit")
            meta["_distance_unit"] = distance_unit
        if property_units is not None:
            pu = dict(meta.get("_property_units", meta.get("_property_unit_dict", {})))
            for name, unit in property_units.items():
                try:
                    units.parse(unit)
                except units.UnitError as err:
                    raise AtomsDataError(f"property {name!r}: {err}") from None
                pu[name] = unit
            meta["_property_units"] = pu
            meta.pop("_property_unit_dict", None)
        if atomrefs is not None:
            ar = dict(meta.get("atomrefs", {}))
            ar.update({k: [float(x) for x in v] for k, v in atomrefs.items()})
            meta["atomrefs"] = ar
        meta.update(extra)
        self._db().metadata = meta

    @property
    def db_property_units(self) -> dict[str, str]:
        """Units of the properties as stored in the database."""
        meta = self.metadata
        pu = meta.get("_property_units", meta.get("_property_unit_dict"))
        if pu is None:
            raise AtomsDataError(
                f"{self.path}: the database metadata has no '_property_units'; import the data with "
                "training.data.importers (which records units) or call update_metadata(property_units=...)"
            )
        # SchNetPack marks unit-less properties with None or "arb. unit": dimensionless here
        return {k: ("1" if v is None or v == "arb. unit" else v) for k, v in pu.items()}

    @property
    def available_properties(self) -> list[str]:
        """Names of all properties in the database."""
        return list(self.db_property_units)

    @property
    def atomrefs(self) -> dict[str, torch.Tensor]:
        """Single-atom references of loaded properties in the requested units, [max_z+1] float64."""
        out = {}
        for name, values in self.metadata.get("atomrefs", {}).items():
            if name in self._prop_factor:
                out[name] = torch.tensor(values, dtype=torch.float64) * self._prop_factor[name]
        return out

    @property
    def fingerprint(self) -> str:
        """sha256 of the database file bytes (hex)."""
        if self._fingerprint is None:
            self._fingerprint = file_sha256(self.path)
        return self._fingerprint

    # --- access ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, indices: Sequence[int]) -> "ASEAtomsData":
        """A view of the rows ``self.indices[indices]`` sharing database, units, transforms and memory cache."""
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"subset indices out of range for a dataset of {len(self)} systems")
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._conn, new._conn_pid = None, None
        new._read_conn, new._read_pid = None, None
        new.transforms = list(self.transforms)
        new.indices = self.indices[idx]
        new._output_cache = None  # positions differ from the parent's: never share
        return new

    def with_transforms(self, transforms: Sequence[Transform]) -> "ASEAtomsData":
        """The same rows with other transforms."""
        new = self.subset(np.arange(len(self)))
        new.transforms = list(transforms)
        return new

    def load_into_memory(self) -> None:
        """Read every row of the database once (one SQL pass) and keep the untransformed samples."""
        if self._memory is not None:
            return
        memory: dict[int, Sample] = {}
        for row in self._reader().select():
            memory[row.id - 1] = self._row_to_sample(row)
        self._memory = memory

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    def get_raw(self, i: int) -> Sample:
        """Sample ``i`` without transforms (tensors may be shared with the memory cache: do not modify)."""
        row_idx = int(self.indices[i])
        if self._memory is not None:
            return dict(self._memory[row_idx])
        return self._row_to_sample(self._reader().get(id=row_idx + 1))

    def __getitem__(self, i: int) -> Sample:
        cache = self._output_cache
        if cache is not None:
            hit = cache.get(i)
            if hit is not None:
                return dict(hit)
        sample = self.get_raw(i)
        for t in self.transforms:
            sample = t(sample)
        if cache is not None:
            cache[i] = sample
            return dict(sample)
        return sample

    def cache_transformed(self) -> bool:
        """Keep transformed samples in memory from now on (each is computed once).

        Only done if every transform declares ``deterministic = True`` (see
        :class:`training.data.transforms.Transform`); returns whether caching is on.
        Cached tensors are shared between epochs: never modify a sample in place.
        """
        if not all(getattr(t, "deterministic", False) is True for t in self.transforms):
            self._output_cache = None
            return False
        if self._output_cache is None:
            self._output_cache = {}
        return True

    def iter_raw(self) -> Iterable[Sample]:
        """All samples of this view without transforms, in order (one SQL pass if not in memory)."""
        if self._memory is not None:
            for r in self.indices:
                yield dict(self._memory[int(r)])
            return
        wanted = set(int(r) for r in self.indices)
        if len(wanted) == self._db_len and np.all(self.indices == np.arange(self._db_len)):
            for row in self._reader().select():
                yield self._row_to_sample(row)
        else:
            cache = {}
            for row in self._reader().select():
                if row.id - 1 in wanted:
                    cache[row.id - 1] = self._row_to_sample(row)
            for r in self.indices:
                yield dict(cache[int(r)])

    def _row_to_sample(self, row) -> Sample:
        n = row.natoms
        where = f"{self.path.name} row {row.id - 1}"
        f = self._dist_factor
        sample: Sample = {
            keys.Z: torch.from_numpy(np.asarray(row.numbers, dtype=np.int64)),
            keys.R: torch.from_numpy(np.asarray(row.positions, dtype=np.float64) * f),
            keys.cell: torch.from_numpy(np.asarray(row.cell, dtype=np.float64).reshape(1, 3, 3) * f),
            keys.pbc: torch.from_numpy(np.asarray(row.pbc, dtype=bool).reshape(1, 3)),
            keys.n_atoms: torch.tensor([n], dtype=torch.int64),
            IDX: torch.tensor([row.id - 1], dtype=torch.int64),
        }
        data = row.data
        for p in self.load_properties:
            if p in data:
                value = data[p]
            elif p in row.key_value_pairs:
                value = row.key_value_pairs[p]
            elif (alias := _ASE_RESULT_NAMES.get(p)) is not None and row.get(alias) is not None:
                value = row.get(alias)
            else:
                raise AtomsDataError(f"{where}: property {p!r} is missing")
            arr = np.asarray(value, dtype=np.float64)
            per_atom = p in self.per_atom_properties
            if per_atom:
                if arr.ndim == 0 or arr.shape[0] != n:
                    raise AtomsDataError(f"{where}: per-atom property {p!r} has shape {arr.shape}, expected ({n}, ...)")
            else:
                if p == keys.stress and arr.shape == (6,):
                    arr = _voigt_to_matrix(arr)
                if p in SCALAR_PROPERTIES and arr.size == 1:
                    arr = arr.reshape(())
                if arr.ndim >= 1 and arr.shape[0] == 1:
                    arr = arr[0]
                arr = arr.reshape((1,) + arr.shape)
            fac = self._prop_factor[p]
            sample[p] = torch.from_numpy(arr * fac if fac != 1.0 else np.array(arr))
        return sample

    def validate(self) -> None:
        """Read every row of this view and raise :class:`AtomsDataError` for missing properties,
        per-atom shapes that do not match the atoms, inconsistent per-system shapes or NaN values."""
        shapes: dict[str, tuple] = {}
        for k, s in enumerate(self.iter_raw()):
            where = f"{self.path.name} row {int(s[IDX][0])}"
            if not torch.isfinite(s[keys.R]).all():
                raise AtomsDataError(f"{where}: positions contain NaN or infinite values")
            for p in self.load_properties:
                v = s[p]
                if not torch.isfinite(v).all():
                    raise AtomsDataError(f"{where}: property {p!r} contains NaN or infinite values")
                shape = tuple(v.shape[1:])
                if p not in shapes:
                    shapes[p] = shape
                elif shapes[p] != shape:
                    raise AtomsDataError(
                        f"{where}: property {p!r} has shape {tuple(v.shape)}, other rows have [..., {shapes[p]}]"
                    )

    def __repr__(self) -> str:
        return (
            f"ASEAtomsData({str(self.path)!r}, n={len(self)}, properties={self.load_properties}, "
            f"units={self.property_units}, distance_unit={self.distance_unit!r})"
        )


#: SchNetPack's structure keys in a property dict (``add_systems(property_list)`` without atoms)
_STRUCTURE_KEYS = ("_atomic_numbers", "_positions", "_cell", "_pbc")


def _schnetpack_order(atoms_list, property_list):
    """Accept SchNetPack's ``add_systems(property_list, atoms_list=None)``: dicts first, and
    without atoms the structure from the dicts' ``_atomic_numbers``/``_positions``[/``_cell``/``_pbc``]."""
    from ase import Atoms

    def dicts(x) -> bool:
        return x is not None and len(x) > 0 and all(isinstance(p, Mapping) for p in x)

    if not dicts(atoms_list):
        return atoms_list, property_list
    props = [dict(p) for p in atoms_list]
    if property_list is not None:  # (property_list, atoms_list) positionally
        return property_list, props
    atoms = []
    for k, p in enumerate(props):
        if "_atomic_numbers" not in p or "_positions" not in p:
            raise AtomsDataError(
                f"add_systems: property dict {k} has no structure (_atomic_numbers, _positions); give "
                "add_systems(atoms_list, property_list) or SchNetPack's add_systems(property_list, atoms_list)"
            )
        cell = p.pop("_cell", None)
        pbc = p.pop("_pbc", None)
        atoms.append(Atoms(numbers=np.asarray(p.pop("_atomic_numbers")).reshape(-1),
                           positions=np.asarray(p.pop("_positions")).reshape(-1, 3),
                           cell=None if cell is None else np.asarray(cell).reshape(3, 3),
                           pbc=False if pbc is None else np.asarray(pbc).reshape(-1)))
        props[k] = p
    return atoms, props


def _check_unit(unit: str, like: str, what: str) -> None:
    try:
        units.check_dimension(unit, like)
    except units.UnitError as err:
        raise AtomsDataError(f"{what}: {err}") from None


def _properties_from_calc(atoms, wanted: Mapping[str, str], where: str) -> dict[str, Any]:
    calc = atoms.calc
    results = dict(getattr(calc, "results", {}) or {})
    props = {}
    for p in wanted:
        name = _ASE_RESULT_NAMES.get(p, p)
        if name in results and results[name] is not None:
            props[p] = results[name]
        elif p in atoms.info:
            props[p] = atoms.info[p]
        elif p in atoms.arrays:
            props[p] = atoms.arrays[p]
        else:
            raise AtomsDataError(
                f"{where}: property {p!r} is missing (calculator results: {sorted(results)}, "
                f"info: {sorted(atoms.info)}, arrays: {sorted(atoms.arrays)})"
            )
    return props
