"""Public benchmark datasets: download from the original hosts, convert into an ASE database.

Each class is an :class:`~training.data.AtomsDataModule` whose
:meth:`prepare_data` builds ``datapath`` (an ASE ``.db``) from the raw files
when it does not exist yet. Raw files are looked up in ``raw_dir`` (default:
``<datapath folder>/raw``) and downloaded there only if missing. Values are
stored in the dataset's own units (MD17/rMD17/MD22: kcal/mol, kcal/mol/Å;
QM9: Hartree etc.; ISO17: eV, eV/Å) with the units in the metadata; pass
``property_units={"energy": "eV", ...}`` to read them in other units.

Offline machines: download the file named in the error message elsewhere and
put it at the path given there (or pass ``raw_dir``).

``fetch(url, dest_path)`` can replace the HTTP download (tests use a local copy;
``file://`` URLs also work with the default downloader).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
import urllib.request
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from spkserve import keys

from .atoms_db import ASEAtomsData, AtomsDataError
from .datamodule import AtomsDataModule
from .importers import MD17_KEYS, RMD17_KEYS, from_ase_db, from_atoms_list, from_npz

Fetch = Callable[[str, Path], None]

__all__ = ["DownloadError", "ReferenceDataset", "MD17", "RMD17", "MD22", "QM9", "ISO17", "download_file"]


class DownloadError(RuntimeError):
    """A raw file could neither be found locally nor downloaded."""


def download_file(url: str, dest: Path, fetch: Fetch | None = None, timeout_s: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (atomically); raise :class:`DownloadError` saying where to put the file."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        if fetch is not None:
            fetch(url, tmp)
        else:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(tmp, "wb") as fh:
                shutil.copyfileobj(resp, fh)
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise OSError("empty download")
        os.replace(tmp, dest)
    except Exception as err:  # network errors come in many types; all end here with a clear message
        if tmp.exists():
            tmp.unlink()
        raise DownloadError(
            f"could not download {url} ({type(err).__name__}: {err}). If this machine is offline, download "
            f"that file elsewhere and put it at {dest} (or pass raw_dir=<a folder holding {dest.name}>), "
            "then run again."
        ) from err
    return dest


def _extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Extract one file of a tar archive (any compression) to ``dest``."""
    with tarfile.open(archive, "r:*") as tar:
        try:
            info = tar.getmember(member)
        except KeyError:
            names = [n for n in tar.getnames() if not n.endswith("/")]
            raise AtomsDataError(
                f"{archive} has no member {member!r} (it holds {names[:10]}{' ...' if len(names) > 10 else ''})"
            ) from None
        if not info.isfile():
            raise AtomsDataError(f"{archive}: member {member!r} is not a regular file")
        src = tar.extractfile(info)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "wb") as fh:
            shutil.copyfileobj(src, fh)
    return dest


class ReferenceDataset(AtomsDataModule):
    """Base of the downloadable datasets: ``raw_files()`` + ``convert()`` build the database.

    Args (beyond :class:`AtomsDataModule`'s):
        raw_dir: where raw files are looked for and downloaded to.
        download: allow downloading missing raw files.
        fetch: replacement for the HTTP download, ``fetch(url, dest_path)``.
    """

    #: citation shown in docs and errors
    reference: str = ""

    def __init__(
        self,
        datapath: str | os.PathLike,
        batch_size: int,
        num_train: int | float,
        num_val: int | float,
        num_test: int | float | None = None,
        *,
        raw_dir: str | os.PathLike | None = None,
        download: bool = True,
        fetch: Fetch | None = None,
        **kwargs,
    ) -> None:
        super().__init__(datapath, batch_size, num_train, num_val, num_test, **kwargs)
        self.raw_dir = Path(raw_dir) if raw_dir is not None else self.datapath.parent / "raw"
        self.download = download
        self.fetch = fetch

    def raw_files(self) -> dict[str, str]:
        """File name in ``raw_dir`` -> download URL."""
        raise NotImplementedError

    def convert(self, raw: dict[str, Path], db_path: Path) -> None:
        """Write the database ``db_path`` from the raw files."""
        raise NotImplementedError

    def raw_path(self, name: str) -> Path:
        """Local path of raw file ``name``, downloaded if missing and allowed."""
        path = self.raw_dir / name
        if path.exists():
            return path
        url = self.raw_files()[name]
        if not self.download:
            raise DownloadError(
                f"raw file {name} is missing and download=False: get it from {url} and put it at {path}"
            )
        return download_file(url, path, self.fetch)

    def prepare_data(self) -> None:
        """Build ``datapath`` from the raw files unless it exists."""
        if self.datapath.exists():
            return
        raw = {name: self.raw_path(name) for name in self.raw_files()}
        self.convert(raw, self.datapath)


# --- sGDML npz datasets ------------------------------------------------------------------
_GDML_URL = "http://www.quantum-machine.org/gdml/data/npz/"


class _GDMLDataset(ReferenceDataset):
    files: Mapping[str, str] = {}

    def __init__(self, datapath, molecule: str, batch_size: int, num_train, num_val, num_test=None, **kwargs):
        if molecule not in self.files:
            raise ValueError(f"unknown {type(self).__name__} molecule {molecule!r}; choose from {sorted(self.files)}")
        self.molecule = molecule
        super().__init__(datapath, batch_size, num_train, num_val, num_test, **kwargs)

    def raw_files(self) -> dict[str, str]:
        name = self.files[self.molecule]
        return {name: _GDML_URL + name}

    def convert(self, raw: dict[str, Path], db_path: Path) -> None:
        (path,) = raw.values()
        ds = from_npz(path, db_path, energy_unit="kcal/mol", forces_unit="kcal/mol/Ang", distance_unit="Ang",
                      key_map=MD17_KEYS)
        ds.update_metadata(source=f"{type(self).__name__}:{self.molecule}", reference=self.reference)


class MD17(_GDMLDataset):
    """MD17 (DFT PBE+vdW-TS AIMD at 500 K); energies kcal/mol, forces kcal/mol/Å.

    ``MD17(datapath, molecule, batch_size, num_train, num_val, ...)``, molecules:
    aspirin, benzene, ethanol, malonaldehyde, naphthalene, salicylic_acid, toluene, uracil.
    """

    reference = "Chmiela et al., Sci. Adv. 3, e1603015 (2017)"
    files = {
        "aspirin": "md17_aspirin.npz",
        "benzene": "md17_benzene2017.npz",
        "ethanol": "md17_ethanol.npz",
        "malonaldehyde": "md17_malonaldehyde.npz",
        "naphthalene": "md17_naphthalene.npz",
        "salicylic_acid": "md17_salicylic.npz",
        "toluene": "md17_toluene.npz",
        "uracil": "md17_uracil.npz",
    }


class MD22(_GDMLDataset):
    """MD22 (large molecules, PBE+MBD); energies kcal/mol, forces kcal/mol/Å."""

    reference = "Chmiela et al., Sci. Adv. 9, eadf0873 (2023)"
    files = {
        "Ac-Ala3-NHMe": "md22_Ac-Ala3-NHMe.npz",
        "DHA": "md22_DHA.npz",
        "stachyose": "md22_stachyose.npz",
        "AT-AT": "md22_AT-AT.npz",
        "AT-AT-CG-CG": "md22_AT-AT-CG-CG.npz",
        "buckyball-catcher": "md22_buckyball-catcher.npz",
        "double-walled-nanotube": "md22_dw_nanotube.npz",
    }


class RMD17(ReferenceDataset):
    """Revised MD17 (recomputed with PBE/def2-SVP, tight settings); kcal/mol, kcal/mol/Å.

    The archive ``rmd17.tar.bz2`` (figshare) holds ``rmd17/npz_data/rmd17_<molecule>.npz``
    with keys ``coords``, ``nuclear_charges``, ``energies``, ``forces``.
    """

    reference = "Christensen & von Lilienfeld, Mach. Learn.: Sci. Technol. 1, 045018 (2020)"
    url = "https://figshare.com/ndownloader/files/23950376"
    archive = "rmd17.tar.bz2"
    molecules = (
        "aspirin", "azobenzene", "benzene", "ethanol", "malonaldehyde", "naphthalene", "paracetamol",
        "salicylic", "toluene", "uracil",
    )

    def __init__(self, datapath, molecule: str, batch_size: int, num_train, num_val, num_test=None, *,
                 split_index: int | None = None, **kwargs):
        if molecule not in self.molecules:
            raise ValueError(f"unknown rMD17 molecule {molecule!r}; choose from {list(self.molecules)}")
        if split_index is not None and split_index not in range(1, 6):
            raise ValueError(f"rMD17 has official splits 1..5, got split_index={split_index!r}")
        self.molecule = molecule
        self.split_index = split_index
        super().__init__(datapath, batch_size, num_train, num_val, num_test, **kwargs)
        if split_index is not None and self.split_file is None:
            self.split_file = self.datapath.with_name(f"{self.datapath.stem}_split{split_index:02d}.npz")

    def prepare_data(self) -> None:
        """Build the database; with ``split_index`` also the split file from the official index files
        (train and val drawn from the official 1000 training indices, test = the official test indices)."""
        super().prepare_data()
        if self.split_index is None or self.split_file.exists():
            return
        archive = self.raw_path(self.archive)
        ids = {}
        for part in ("train", "test"):
            name = f"index_{part}_{self.split_index:02d}.csv"
            f = _extract_member(archive, f"rmd17/splits/{name}", self.raw_dir / f"rmd17_{name}")
            ids[part] = np.loadtxt(f, dtype=np.int64, ndmin=1)
        from .splits import resolve_count, save_split

        n_off = len(ids["train"])
        n_train = resolve_count(self.num_train, n_off, "num_train", n_off)
        n_val = resolve_count(self.num_val, n_off, "num_val", n_off - n_train)
        perm = np.random.default_rng(self.seed).permutation(ids["train"])
        test = ids["test"]
        if self.num_test is not None:
            test = test[: resolve_count(self.num_test, len(test), "num_test", len(test))]
        save_split(self.split_file, (np.sort(perm[:n_train]), np.sort(perm[n_train : n_train + n_val]), test))

    def raw_files(self) -> dict[str, str]:
        return {self.archive: self.url}

    def convert(self, raw: dict[str, Path], db_path: Path) -> None:
        member = f"rmd17/npz_data/rmd17_{self.molecule}.npz"
        npz = _extract_member(raw[self.archive], member, self.raw_dir / f"rmd17_{self.molecule}.npz")
        ds = from_npz(npz, db_path, energy_unit="kcal/mol", forces_unit="kcal/mol/Ang", distance_unit="Ang",
                      key_map=RMD17_KEYS)
        ds.update_metadata(source=f"rMD17:{self.molecule}", reference=self.reference)


# --- QM9 -------------------------------------------------------------------------------------
class QM9(ReferenceDataset):
    """QM9: 133,885 molecules (B3LYP/6-31G(2df,p)), 15 properties, atomrefs of the energies.

    Raw files (figshare): ``dsgdb9nsd.xyz.tar.bz2`` (one xyz file per molecule),
    ``atomref.txt`` (single-atom energies of H, C, N, O, F), ``uncharacterized.txt``
    (3054 molecules that failed the consistency check; dropped unless
    ``remove_uncharacterized=False``). Stored units: as published (Hartree,
    Debye, Bohr^3, Bohr^2, GHz as 1/ns, cal/mol/K).
    """

    reference = "Ramakrishnan et al., Sci. Data 1, 140022 (2014)"
    A, B, C = "rotational_constant_A", "rotational_constant_B", "rotational_constant_C"
    mu, alpha = "dipole_moment_norm", "isotropic_polarizability"
    homo, lumo, gap, r2, zpve = "homo", "lumo", "gap", "electronic_spatial_extent", "zpve"
    U0, U, H, G, Cv = "energy_U0", "energy_U", "enthalpy_H", "free_energy", "heat_capacity"
    #: properties in the order of the xyz comment line (after "gdb <index>") with their units
    PROPERTIES = (
        (A, "1/ns"), (B, "1/ns"), (C, "1/ns"), (mu, "Debye"), (alpha, "Bohr^3"), (homo, "Hartree"),
        (lumo, "Hartree"), (gap, "Hartree"), (r2, "Bohr^2"), (zpve, "Hartree"), (U0, "Hartree"),
        (U, "Hartree"), (H, "Hartree"), (G, "Hartree"), (Cv, "cal/mol/K"),
    )
    #: atomref.txt columns after the element symbol
    ATOMREF_COLUMNS = (zpve, U0, U, H, G, Cv)
    urls = {
        "dsgdb9nsd.xyz.tar.bz2": "https://ndownloader.figshare.com/files/3195389",
        "atomref.txt": "https://ndownloader.figshare.com/files/3195395",
        "uncharacterized.txt": "https://ndownloader.figshare.com/files/3195404",
    }

    def __init__(self, datapath, batch_size: int, num_train, num_val, num_test=None, *,
                 remove_uncharacterized: bool = True, **kwargs):
        self.remove_uncharacterized = remove_uncharacterized
        super().__init__(datapath, batch_size, num_train, num_val, num_test, **kwargs)

    def raw_files(self) -> dict[str, str]:
        files = dict(self.urls)
        if not self.remove_uncharacterized:
            files.pop("uncharacterized.txt")
        return files

    @staticmethod
    def parse_xyz(text: str, where: str):
        """One QM9 xyz file -> (ase.Atoms, {property: value}, gdb index)."""
        from ase import Atoms

        lines = text.splitlines()
        try:
            n = int(lines[0].split()[0])
            head = lines[1].split()
            if head[0] != "gdb" or len(head) != 2 + len(QM9.PROPERTIES):
                raise ValueError(f"comment line should be 'gdb <index>' and {len(QM9.PROPERTIES)} numbers")
            index = int(head[1])
            values = [float(x.replace("*^", "e")) for x in head[2:]]
            symbols, pos = [], []
            for line in lines[2 : 2 + n]:
                parts = line.split()
                symbols.append(parts[0])
                pos.append([float(x.replace("*^", "e")) for x in parts[1:4]])
            if len(pos) != n:
                raise ValueError(f"{n} atoms announced, {len(pos)} found")
        except (IndexError, ValueError) as err:
            raise AtomsDataError(f"{where}: not a QM9 xyz file ({err})") from None
        props = {name: np.array([v]) for (name, _), v in zip(QM9.PROPERTIES, values)}
        return Atoms(symbols=symbols, positions=pos), props, index

    @staticmethod
    def parse_atomrefs(text: str) -> dict[str, list[float]]:
        """atomref.txt -> {property: values indexed by Z (length 10)} in Hartree (Cv in cal/mol/K)."""
        from ase.data import atomic_numbers

        refs = {name: [0.0] * 10 for name in QM9.ATOMREF_COLUMNS}
        found = set()
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 1 + len(QM9.ATOMREF_COLUMNS) and parts[0] in ("H", "C", "N", "O", "F"):
                try:
                    vals = [float(x) for x in parts[1:]]
                except ValueError:
                    continue
                z = atomic_numbers[parts[0]]
                for name, v in zip(QM9.ATOMREF_COLUMNS, vals):
                    refs[name][z] = v
                found.add(parts[0])
        if found != {"H", "C", "N", "O", "F"}:
            raise AtomsDataError(f"atomref.txt: rows for {sorted({'H', 'C', 'N', 'O', 'F'} - found)} not found")
        return refs

    @staticmethod
    def parse_uncharacterized(text: str) -> set[int]:
        """uncharacterized.txt -> set of gdb indices (first column of the table rows)."""
        out = set()
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit():
                out.add(int(parts[0]))
        return out

    def convert(self, raw: dict[str, Path], db_path: Path) -> None:
        atomrefs = self.parse_atomrefs(raw["atomref.txt"].read_text())
        skip = set()
        if self.remove_uncharacterized:
            skip = self.parse_uncharacterized(raw["uncharacterized.txt"].read_text())
        entries = []
        with tarfile.open(raw["dsgdb9nsd.xyz.tar.bz2"], "r:*") as tar:
            for info in tar:
                if not info.isfile() or not info.name.endswith(".xyz"):
                    continue
                text = tar.extractfile(info).read().decode()
                atoms, props, index = self.parse_xyz(text, info.name)
                if index not in skip:
                    entries.append((index, atoms, props))
        if not entries:
            raise AtomsDataError(f"{raw['dsgdb9nsd.xyz.tar.bz2']} holds no QM9 xyz files")
        entries.sort(key=lambda e: e[0])
        frames = [e[1] for e in entries]
        props = [e[2] for e in entries]
        ds = from_atoms_list(frames, db_path, "Ang", dict(self.PROPERTIES), props, atomrefs=atomrefs)
        ds.update_metadata(source="QM9", reference=self.reference, removed_uncharacterized=len(skip))


# --- ISO17 -----------------------------------------------------------------------------------
class ISO17(ReferenceDataset):
    """ISO17: C7O2H10 isomer MD (PBE+vdW-TS); energies eV, forces eV/Å.

    The archive ``iso17.tar.gz`` holds ASE databases ``iso17/<fold>.db`` with
    ``total_energy`` (key-value pair) and ``atomic_forces`` (``row.data``).
    Folds: reference, reference_eq, test_within, test_other, test_eq.
    """

    reference = "Schütt et al., NeurIPS 30 (2017)"
    url = "http://www.quantum-machine.org/datasets/iso17.tar.gz"
    archive = "iso17.tar.gz"
    folds = ("reference", "reference_eq", "test_within", "test_other", "test_eq")

    def __init__(self, datapath, batch_size: int, num_train, num_val, num_test=None, *, fold: str = "reference",
                 **kwargs):
        if fold not in self.folds:
            raise ValueError(f"unknown ISO17 fold {fold!r}; choose from {list(self.folds)}")
        self.fold = fold
        super().__init__(datapath, batch_size, num_train, num_val, num_test, **kwargs)

    def raw_files(self) -> dict[str, str]:
        return {self.archive: self.url}

    def convert(self, raw: dict[str, Path], db_path: Path) -> None:
        src = _extract_member(raw[self.archive], f"iso17/{self.fold}.db", self.raw_dir / f"iso17_{self.fold}.db")
        ds = from_ase_db(
            src, db_path, energy_unit="eV", forces_unit="eV/Ang", distance_unit="Ang",
            properties=(keys.energy, keys.forces),
            property_map={keys.energy: "total_energy", keys.forces: "atomic_forces"},
        )
        ds.update_metadata(source=f"ISO17:{self.fold}", reference=self.reference)
