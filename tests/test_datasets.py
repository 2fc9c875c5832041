"""Public datasets: each is built from a small local file in the original format.

The original hosts cannot be reached here; the tests write raw files in the
published formats (npz, tar archives, QM9 xyz + atomref.txt, ISO17 ASE db)
from real reference data and hand them over through a fake ``fetch``, a
``file://`` URL or ``raw_dir``.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pytorch_lightning", reason="pytorch-lightning (training extra) is not installed")

from ase import units as ase_units  # noqa: E402
from ase.db import connect  # noqa: E402
from ase.io import read  # noqa: E402

from spkserve import keys, units  # noqa: E402
from training.data import (  # noqa: E402
    ISO17,
    MD17,
    MD22,
    QM9,
    RMD17,
    ASEAtomsData,
    AtomsDataError,
    DownloadError,
    RemoveOffsets,
    download_file,
)

from testdata import data_file  # noqa: E402

pytestmark = pytest.mark.timeout(60)

# the small set shipped in tests/data (leading frames of ../shared/data; see tests/testdata.py)
ASPIRIN_KCAL = data_file("public/md17_aspirin_15frames_nequip_kcalmol.xyz")
ASPIRIN_EV = data_file("public/md17_aspirin_15frames_eV.extxyz")
ETHANOL_SPK = data_file("public/md17_ethanol_20frames_schnetpack_kcalmol.db")
ETHANOL_EV = data_file("public/md17_ethanol_20frames_eV.extxyz")
QM9_EV = data_file("public/qm9_500mols_U0_eV.extxyz")  # first 300 molecules
ISO17_EV = data_file("public/iso17_C7H10O2_40frames_eV.extxyz")  # first 12 frames

KCAL_MOL_IN_EV = ase_units.kcal / ase_units.mol


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data file {path} is missing")
    return path


class FakeNet:
    """``fetch(url, dest)`` serving local files by URL; records requests."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self.requests: list[str] = []

    def __call__(self, url: str, dest: Path) -> None:
        self.requests.append(url)
        if url not in self.files:
            raise OSError(f"no route to host for {url}")
        shutil.copyfile(self.files[url], dest)


def md17_npz(path: Path, frames, E_key="E", R_key="R", z_key="z", F_key="F", e_shape=(-1, 1)) -> Path:
    np.savez(
        path,
        **{
            R_key: np.stack([a.positions for a in frames]),
            z_key: frames[0].numbers.astype(np.int64),
            E_key: np.array([a.get_potential_energy() for a in frames]).reshape(e_shape),
            F_key: np.stack([a.get_forces() for a in frames]),
        },
    )
    return path


def test_md17_download_convert_and_units(tmp_path):
    frames = read(str(need(ASPIRIN_KCAL)), index=":")  # MD17 aspirin, kcal/mol as published
    raw = md17_npz(tmp_path / "src.npz", frames)
    url = "http://www.quantum-machine.org/gdml/data/npz/md17_aspirin.npz"
    net = FakeNet({url: raw})
    dm = MD17(tmp_path / "md17_aspirin.db", "aspirin", 5, 10, 3, 2, fetch=net,
              property_units={"energy": "eV", "forces": "eV/Ang"})
    dm.prepare_data()
    assert net.requests == [url]
    assert (tmp_path / "raw" / "md17_aspirin.npz").exists()
    dm.setup()
    ref = read(str(need(ASPIRIN_EV)), index=":")  # converted by the data provider with ASE's constants
    ds = dm.dataset
    assert ds.db_property_units == {"energy": "kcal/mol", "forces": "kcal/mol/Ang"}
    for i in (0, 14):
        assert ds[i][keys.energy].item() == pytest.approx(ref[i].get_potential_energy(), rel=1e-6)
        np.testing.assert_allclose(ds[i][keys.forces].numpy(), ref[i].get_forces(), rtol=1e-6, atol=1e-8)
    # a second prepare reuses the database and downloads nothing
    MD17(tmp_path / "md17_aspirin.db", "aspirin", 5, 10, 3, fetch=net).prepare_data()
    assert len(net.requests) == 1
    with pytest.raises(ValueError, match="unknown MD17 molecule"):
        MD17(tmp_path / "x.db", "water", 5, 10, 3)


def test_md22_via_file_url(tmp_path, monkeypatch):
    frames = read(str(need(ETHANOL_EV)), index=":8")  # any real frames in the npz layout
    raw = md17_npz(tmp_path / "src.npz", frames, e_shape=(-1,))
    import training.data.datasets as datasets

    monkeypatch.setattr(datasets, "_GDML_URL", raw.parent.as_uri() + "/")
    shutil.copyfile(raw, tmp_path / "md22_DHA.npz")
    dm = MD22(tmp_path / "db" / "dha.db", "DHA", 2, 4, 2, raw_dir=tmp_path / "rawdir")
    dm.prepare_data()  # default downloader with a file:// URL
    ds = ASEAtomsData(tmp_path / "db" / "dha.db")
    assert len(ds) == 8 and ds.metadata["source"] == "MD22:DHA"
    assert ds.db_property_units["energy"] == "kcal/mol"


def test_offline_download_says_where_to_put_the_file(tmp_path):
    dm = MD17(tmp_path / "e.db", "ethanol", 5, 10, 3)
    import training.data.datasets as datasets

    # a closed local port stands in for the unreachable host
    url = "http://127.0.0.1:9/gdml/md17_ethanol.npz"
    with pytest.raises(DownloadError, match=r"put it at .*raw/md17_ethanol\.npz"):
        download_file(url, tmp_path / "raw" / "md17_ethanol.npz", timeout_s=5)
    with pytest.raises(DownloadError, match="md17_ethanol.npz"):
        dm.fetch = FakeNet({})
        dm.prepare_data()
    assert not list((tmp_path / "raw").glob("*"))  # no partial files left behind
    off = MD17(tmp_path / "e.db", "ethanol", 5, 10, 3, download=False)
    with pytest.raises(DownloadError, match=r"download=False.*" + datasets._GDML_URL):
        off.prepare_data()


def test_rmd17_archive(tmp_path):
    src = connect(str(need(ETHANOL_SPK)))
    rows = list(src.select())
    raw = tmp_path / "rmd17_ethanol.npz"
    np.savez(
        raw,
        coords=np.stack([r.positions for r in rows]),
        nuclear_charges=rows[0].numbers,
        energies=np.array([r.data["energy"][0] for r in rows]),
        forces=np.stack([r.data["forces"] for r in rows]),
        old_indices=np.arange(len(rows)),
    )
    # official split files: one 0-based frame index per line
    np.savetxt(tmp_path / "index_train_01.csv", np.arange(3, 15), fmt="%d")
    np.savetxt(tmp_path / "index_test_01.csv", np.array([0, 1, 2, 15, 16, 17, 18, 19]), fmt="%d")
    archive = tmp_path / "rmd17.tar.bz2"
    with tarfile.open(archive, "w:bz2") as tar:
        tar.add(raw, arcname="rmd17/npz_data/rmd17_ethanol.npz")
        for name in ("index_train_01.csv", "index_test_01.csv"):
            tar.add(tmp_path / name, arcname=f"rmd17/splits/{name}")
    net = FakeNet({RMD17.url: archive})
    dm = RMD17(tmp_path / "rmd17_ethanol.db", "ethanol", 4, 10, 5, fetch=net,
               property_units={"energy": "eV", "forces": "eV/Ang"})
    dm.setup()
    ref = read(str(need(ETHANOL_EV)), index=":")
    for i in (0, 19):
        assert dm.dataset[i][keys.energy].item() == pytest.approx(ref[i].get_potential_energy(), rel=1e-6)
    official = RMD17(tmp_path / "rmd17_ethanol.db", "ethanol", 4, 8, 4, split_index=1, fetch=net)
    official.setup()
    assert official.split_file.exists() and len(net.requests) == 1  # archive reused from raw/
    assert set(official.train_idx) | set(official.val_idx) <= set(range(3, 15))
    assert (len(official.train_idx), len(official.val_idx)) == (8, 4)
    assert official.test_idx.tolist() == [0, 1, 2, 15, 16, 17, 18, 19]
    with pytest.raises(ValueError, match="official splits 1..5"):
        RMD17(tmp_path / "r.db", "ethanol", 4, 8, 4, split_index=6)
    missing = RMD17(tmp_path / "rmd17_toluene.db", "toluene", 4, 10, 5, raw_dir=tmp_path / "raw")
    with pytest.raises(AtomsDataError, match="rmd17_toluene.npz"):
        missing.prepare_data()


# QM9 single-atom energies as published in atomref.txt (Hartree; Cv in cal/mol/K)
ATOMREF_TXT = """\
   Element   ZPVE         U (0 K)      U (298.15 K)    H (298.15 K)    G (298.15 K)     CV
                  Hartree        Hartree        Hartree         Hartree         Hartree        Cal/(Mol Kelvin)
   H     0.000000     -0.500273      -0.498857       -0.497912       -0.510927       2.981
   C     0.000000    -37.846772     -37.845355      -37.844411      -37.861317       2.981
   N     0.000000    -54.583861     -54.582445      -54.581501      -54.598897       2.981
   O     0.000000    -75.064579     -75.063162      -75.062219      -75.079532       2.981
   F     0.000000    -99.718730     -99.717314      -99.716370      -99.733544       2.981
"""


def qm9_xyz(index: int, atoms, u0_hartree: float) -> str:
    """A QM9 xyz file: real geometry and U0; the other 14 fields are index-derived test values."""
    vals = [0.1 * index + k for k in range(15)]
    vals[10] = u0_hartree
    head = "gdb %d\t" % index + "\t".join(f"{v:.6f}" for v in vals)
    lines = [str(len(atoms)), head]
    for n, (s, p) in enumerate(zip(atoms.get_chemical_symbols(), atoms.positions)):
        # some published files write numbers Mathematica-style ('1.2*^-6'): do so for the first atom
        coords = [f"{x:.10f}" for x in p]
        if n == 0:
            coords = ["{}*^{}".format(*f"{x:.10e}".split("e")) for x in p]
        lines.append(f"{s}\t" + "\t".join(coords) + "\t0.000000")
    lines += ["1.0\t2.0\t3.0", "C\tC", "InChI=1S/x\tInChI=1S/x"]
    return "\n".join(lines) + "\n"


def test_qm9_tarball_atomrefs_and_uncharacterized(tmp_path):
    frames = read(str(need(QM9_EV)), index=":6")
    xyz_dir = tmp_path / "xyz"
    xyz_dir.mkdir()
    for k, a in enumerate(frames, start=1):
        (xyz_dir / f"dsgdb9nsd_{k:06d}.xyz").write_text(qm9_xyz(k, a, a.info["U0_hartree"]))
    archive = tmp_path / "dsgdb9nsd.xyz.tar.bz2"
    with tarfile.open(archive, "w:bz2") as tar:
        for f in sorted(xyz_dir.iterdir(), reverse=True):  # order in the archive must not matter
            tar.add(f, arcname=f.name)
    (tmp_path / "atomref.txt").write_text(ATOMREF_TXT)
    (tmp_path / "uncharacterized.txt").write_text(
        "Molecules that failed the consistency check\n\n   Index   SMILES\n     4   C#N\n"
    )
    net = FakeNet({QM9.urls["dsgdb9nsd.xyz.tar.bz2"]: archive, QM9.urls["atomref.txt"]: tmp_path / "atomref.txt",
                   QM9.urls["uncharacterized.txt"]: tmp_path / "uncharacterized.txt"})
    dm = QM9(tmp_path / "qm9.db", 2, 3, 1, fetch=net, load_properties=[QM9.U0, QM9.homo, QM9.A],
             property_units={QM9.U0: "eV", QM9.homo: "eV", QM9.A: "1/s"},
             transforms=[RemoveOffsets(QM9.U0, remove_mean=False)])
    dm.setup()
    ds = dm.dataset
    assert len(ds) == 5  # molecule 4 is uncharacterized
    kept = [1, 2, 3, 5, 6]
    for row, k in enumerate(kept):
        s = ds[row]
        a = frames[k - 1]
        np.testing.assert_array_equal(s[keys.Z].numpy(), a.numbers)
        np.testing.assert_allclose(s[keys.R].numpy(), a.positions, atol=1e-7)
        # U0 (Hartree in the file, 5 decimals) against the eV value of the source database
        assert s[QM9.U0].item() == pytest.approx(a.get_potential_energy(), abs=3e-4)
        assert s[QM9.homo].item() == pytest.approx(units.convert(0.1 * k + 5, "Hartree", "eV"))
        assert s[QM9.A].item() == pytest.approx((0.1 * k) * 1e9)  # GHz
    hartree_ev = ase_units.Hartree
    ref = ds.atomrefs[QM9.U0]
    assert ref.shape == (10,)
    assert ref[1].item() == pytest.approx(-0.500273 * hartree_ev, rel=1e-7)
    assert ref[9].item() == pytest.approx(-99.718730 * hartree_ev, rel=1e-7)
    got_ref, mean = dm.get_offsets(QM9.U0, remove_mean=False)
    torch.testing.assert_close(got_ref, ref)  # the published atomrefs are used, not a fit
    e0 = dm.train_dataset[0][QM9.U0].item()  # an atomisation energy now: a few eV to tens of eV below 0
    assert -100 < e0 < -1


def test_qm9_bad_xyz_is_named():
    with pytest.raises(AtomsDataError, match="broken.xyz"):
        QM9.parse_xyz("3\ngdb 1 2 3\nC 0 0 0\n", "broken.xyz")


def test_iso17_archive(tmp_path):
    frames = read(str(need(ISO17_EV)), index=":12")
    raw_db = tmp_path / "reference.db"
    with connect(str(raw_db)) as db:  # the published layout: total_energy + data['atomic_forces']
        for a in frames:
            plain = a.copy()
            plain.calc = None
            db.write(plain, total_energy=a.get_potential_energy(), data={"atomic_forces": a.get_forces()})
    archive = tmp_path / "iso17.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(raw_db, arcname="iso17/reference.db")
    dm = ISO17(tmp_path / "out" / "iso17_reference.db", 4, 6, 3, fetch=FakeNet({ISO17.url: archive}),
               property_units={"energy": "kcal/mol"})
    dm.setup()
    ds = dm.dataset
    assert len(ds) == 12 and ds.db_property_units == {"energy": "eV", "forces": "eV/Ang"}
    for i in (0, 11):
        assert ds[i][keys.energy].item() * KCAL_MOL_IN_EV == pytest.approx(frames[i].get_potential_energy(), rel=1e-7)
    with pytest.raises(ValueError, match="unknown ISO17 fold"):
        ISO17(tmp_path / "x.db", 4, 6, 3, fold="train")
