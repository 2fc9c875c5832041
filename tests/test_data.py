"""ASEAtomsData, importers, collate_atoms, splits and AtomsDataModule on real reference data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pytorch_lightning", reason="pytorch-lightning (training extra) is not installed")

from ase import Atoms, units as ase_units  # noqa: E402
from ase.calculators.singlepoint import SinglePointCalculator  # noqa: E402
from ase.io import read, write  # noqa: E402

from spkserve import keys  # noqa: E402
from spkserve.neighbors import add_neighbor_pairs  # noqa: E402
from training.data import (  # noqa: E402
    IDX,
    ASEAtomsData,
    AtomsDataError,
    AtomsDataModule,
    CastTo32,
    NeighborList,
    RemoveOffsets,
    collate_atoms,
    from_ase_db,
    from_extxyz,
    from_npz,
    make_split,
)

from testdata import data_file  # noqa: E402

pytestmark = pytest.mark.timeout(60)

# the small set shipped in tests/data (leading frames of ../shared/data; see tests/testdata.py)
ETHANOL = data_file("xtb/ethanol_gfn2xtb_500K.extxyz")  # first 240 frames
MD17_SPK_DB = data_file("public/md17_ethanol_20frames_schnetpack_kcalmol.db")
MD17_EV = data_file("public/md17_ethanol_20frames_eV.extxyz")
QM9 = data_file("public/qm9_500mols_U0_eV.extxyz")  # first 300 molecules
WATER = data_file("xtb/water16_pbc_gfn1xtb_300K.extxyz")  # first 4 frames

KCAL_MOL_IN_EV = ase_units.kcal / ase_units.mol  # independent of spkserve.units


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data file {path} is missing")
    return path


@pytest.fixture(scope="module")
def ethanol_frames():
    return read(str(need(ETHANOL)), index=":240")


@pytest.fixture(scope="module")
def ethanol_db(tmp_path_factory, ethanol_frames):
    path = tmp_path_factory.mktemp("eth") / "ethanol.db"
    write(str(path.with_suffix(".extxyz")), ethanol_frames)
    from_extxyz(path.with_suffix(".extxyz"), path, energy_unit="eV", forces_unit="eV/Ang", distance_unit="Ang")
    return path


# --- ASEAtomsData ------------------------------------------------------------------------
def test_sample_layout_and_values(ethanol_db, ethanol_frames):
    ds = ASEAtomsData(ethanol_db)
    assert len(ds) == len(ethanol_frames)
    assert sorted(ds.available_properties) == ["energy", "forces"]
    assert ds.metadata["_property_units"] == {"energy": "eV", "forces": "eV/Ang"}
    for i in (0, 17, len(ds) - 1):
        s = ds[i]
        a = ethanol_frames[i]
        n = len(a)
        assert s[keys.Z].shape == (n,) and s[keys.Z].dtype == torch.int64
        assert s[keys.R].shape == (n, 3) and s[keys.R].dtype == torch.float64
        assert s[keys.cell].shape == (1, 3, 3) and s[keys.pbc].shape == (1, 3)
        assert s[keys.n_atoms].tolist() == [n] and s[IDX].tolist() == [i]
        assert s[keys.energy].shape == (1,) and s[keys.forces].shape == (n, 3)
        np.testing.assert_array_equal(s[keys.Z].numpy(), a.numbers)
        np.testing.assert_allclose(s[keys.R].numpy(), a.positions, rtol=0, atol=1e-12)
        np.testing.assert_allclose(s[keys.energy].item(), a.get_potential_energy(), rtol=1e-14)
        np.testing.assert_allclose(s[keys.forces].numpy(), a.get_forces(), rtol=1e-14)


def test_unit_conversion_on_read(ethanol_db):
    base = ASEAtomsData(ethanol_db)
    conv = ASEAtomsData(
        ethanol_db, property_units={"energy": "kcal/mol", "forces": "kcal/mol/Bohr"}, distance_unit="Bohr"
    )
    a, b = base[3], conv[3]
    np.testing.assert_allclose(b[keys.energy].numpy() * KCAL_MOL_IN_EV, a[keys.energy].numpy(), rtol=1e-8)
    np.testing.assert_allclose(
        b[keys.forces].numpy() * KCAL_MOL_IN_EV / ase_units.Bohr, a[keys.forces].numpy(), rtol=1e-8
    )
    np.testing.assert_allclose(b[keys.R].numpy() * ase_units.Bohr, a[keys.R].numpy(), rtol=1e-8)
    assert conv.property_units == {"energy": "kcal/mol", "forces": "kcal/mol/Bohr"}


def test_bad_units_and_properties_are_refused(ethanol_db):
    with pytest.raises(AtomsDataError, match="energy"):
        ASEAtomsData(ethanol_db, property_units={"energy": "eV/Ang"})  # wrong dimension
    with pytest.raises(AtomsDataError, match="unknown unit"):
        ASEAtomsData(ethanol_db, property_units={"energy": "kcal/mole"})
    with pytest.raises(AtomsDataError, match="dipole_moment"):
        ASEAtomsData(ethanol_db, load_properties=["energy", "dipole_moment"])


def test_schnetpack_db_without_units_needs_import(tmp_path):
    src = need(MD17_SPK_DB)
    with pytest.raises(AtomsDataError, match="unit"):
        ASEAtomsData(src)
    ds = from_ase_db(src, tmp_path / "md17.db", energy_unit="kcal/mol", forces_unit="kcal/mol/Ang")
    ev = ASEAtomsData(ds.path, property_units={"energy": "eV", "forces": "eV/Ang"})
    ref = read(str(need(MD17_EV)), index=":")  # converted by the data provider with ASE's constants
    assert len(ev) == len(ref) == 20
    for i in (0, 19):
        np.testing.assert_allclose(ev[i][keys.energy].item(), ref[i].get_potential_energy(), rtol=1e-6)
        np.testing.assert_allclose(ev[i][keys.forces].numpy(), ref[i].get_forces(), rtol=1e-6, atol=1e-9)


def test_create_add_systems_shapes_and_errors(tmp_path):
    ds = ASEAtomsData.create(
        tmp_path / "x.db", "Ang",
        {"energy": "eV", "forces": "eV/Ang", "stress": "eV/Ang^3", "dipole_moment": "e*Ang", "charges_x": "e"},
        per_atom_properties=["charges_x"],
    )
    rng = np.random.default_rng(0)
    atoms = [Atoms("H2O", positions=rng.normal(size=(3, 3)), cell=np.eye(3) * 5, pbc=True) for _ in range(3)]
    props = [
        {"energy": -1.0 * k, "forces": rng.normal(size=(3, 3)), "stress": rng.normal(size=6),
         "dipole_moment": rng.normal(size=3), "charges_x": rng.normal(size=3)}
        for k in range(3)
    ]
    ds.add_systems(atoms, props)
    assert len(ds) == 3
    s = ds[1]
    assert s[keys.energy].shape == (1,) and s[keys.stress].shape == (1, 3, 3)
    assert s[keys.dipole_moment].shape == (1, 3) and s["charges_x"].shape == (3,)
    v = props[1]["stress"]  # Voigt xx yy zz yz xz xy
    np.testing.assert_allclose(s[keys.stress][0].numpy(), [[v[0], v[5], v[4]], [v[5], v[1], v[3]], [v[4], v[3], v[2]]])
    assert s[keys.pbc].all()
    bad = dict(props[0])
    del bad["forces"]
    with pytest.raises(AtomsDataError, match=r"system 1 .*'forces'"):
        ds.add_systems(atoms[:2], [props[0], bad])
    nan = dict(props[0], energy=float("nan"))
    with pytest.raises(AtomsDataError, match=r"system 0 .*'energy'.*NaN"):
        ds.add_systems(atoms[:1], [nan])
    wrong = dict(props[0], forces=np.zeros((4, 3)))
    with pytest.raises(AtomsDataError, match=r"'forces' has shape \(4, 3\)"):
        ds.add_systems(atoms[:1], [wrong])
    assert len(ds) == 3  # nothing written by failed calls
    with pytest.raises(FileExistsError):
        ASEAtomsData.create(tmp_path / "x.db", "Ang", {"energy": "eV"})
    with pytest.raises(AtomsDataError, match="unknown unit"):
        ASEAtomsData.create(tmp_path / "y.db", "Ang", {"energy": "eVV"})


def test_add_systems_from_calculator_and_subset(tmp_path, ethanol_frames):
    ds = ASEAtomsData.create(tmp_path / "c.db", "Ang", {"energy": "eV", "forces": "eV/Ang"})
    ds.add_systems(ethanol_frames[:10])
    sub = ds.subset([7, 2])
    assert len(sub) == 2 and sub[0][IDX].item() == 7 and sub[1][IDX].item() == 2
    np.testing.assert_allclose(sub[0][keys.energy].item(), ethanol_frames[7].get_potential_energy())
    sub2 = sub.subset([1])
    assert sub2[0][IDX].item() == 2
    ds.update_metadata(atomrefs={"energy": [0.0, -13.6]}, note="x")
    assert ASEAtomsData(tmp_path / "c.db").atomrefs["energy"].tolist() == [0.0, -13.6]
    assert ASEAtomsData(tmp_path / "c.db", property_units={"energy": "meV"}).atomrefs["energy"][1].item() == pytest.approx(-13600.0)


# --- importers -----------------------------------------------------------------------------
def test_extxyz_import_error_names_frame(tmp_path, ethanol_frames):
    frames = [a.copy() for a in ethanol_frames[:3]]
    for k, a in enumerate(frames):
        a.calc = SinglePointCalculator(a, energy=ethanol_frames[k].get_potential_energy(),
                                       forces=None if k == 2 else ethanol_frames[k].get_forces())
    write(str(tmp_path / "bad.extxyz"), frames)
    with pytest.raises(AtomsDataError, match=r"frame 2: property 'forces'"):
        from_extxyz(tmp_path / "bad.extxyz", tmp_path / "bad.db", energy_unit="eV")
    assert not (tmp_path / "bad.db").exists()
    with pytest.raises(AtomsDataError, match="unit of forces"):
        from_extxyz(tmp_path / "bad.extxyz", tmp_path / "bad.db", energy_unit="eV", forces_unit="eV")


def test_extxyz_info_property_mapping(tmp_path):
    frames = read(str(need(QM9)), index=":5")
    write(str(tmp_path / "q.extxyz"), frames)
    ds = from_extxyz(tmp_path / "q.extxyz", tmp_path / "q.db", energy_unit="Hartree",
                     properties=["energy"], property_map={"energy": "U0_hartree"})
    ev = ASEAtomsData(ds.path, property_units={"energy": "eV"})
    for i in range(5):
        # U0_hartree is printed with 5 decimals in the source file
        assert ev[i][keys.energy].item() == pytest.approx(frames[i].get_potential_energy(), abs=2e-4)


def test_npz_import_and_errors(tmp_path, ethanol_frames):
    R = np.stack([a.positions for a in ethanol_frames[:6]])
    E = np.array([[a.get_potential_energy()] for a in ethanol_frames[:6]])
    F = np.stack([a.get_forces() for a in ethanol_frames[:6]])
    z = ethanol_frames[0].numbers
    np.savez(tmp_path / "ok.npz", R=R, z=z, E=E, F=F)
    ds = from_npz(tmp_path / "ok.npz", tmp_path / "ok.db", energy_unit="eV")
    np.testing.assert_allclose(ds[5][keys.forces].numpy(), F[5])
    assert ds[5][keys.energy].item() == E[5, 0]
    E_nan = E.copy()
    E_nan[4] = np.nan
    np.savez(tmp_path / "nan.npz", R=R, z=z, E=E_nan, F=F)
    with pytest.raises(AtomsDataError, match="frame 4: energy"):
        from_npz(tmp_path / "nan.npz", tmp_path / "nan.db", energy_unit="eV")
    np.savez(tmp_path / "shape.npz", R=R, z=z, E=E, F=F[:, :5])
    with pytest.raises(AtomsDataError, match="forces"):
        from_npz(tmp_path / "shape.npz", tmp_path / "shape.db", energy_unit="eV")
    np.savez(tmp_path / "nokey.npz", R=R, z=z, F=F)
    with pytest.raises(AtomsDataError, match="'E'"):
        from_npz(tmp_path / "nokey.npz", tmp_path / "nokey.db", energy_unit="eV")
    with pytest.raises(FileExistsError):
        from_npz(tmp_path / "ok.npz", tmp_path / "ok.db", energy_unit="eV")


# --- collate -------------------------------------------------------------------------------
def test_collate_matches_batch_neighbor_list(ethanol_db):
    ds = ASEAtomsData(ethanol_db, transforms=[NeighborList(3.0)])
    samples = [ds[i] for i in (4, 0, 9)]
    batch = collate_atoms(samples)
    n = [int(s[keys.n_atoms]) for s in samples]
    assert batch[keys.idx_m].tolist() == sum(([k] * nk for k, nk in enumerate(n)), [])
    assert batch[keys.energy].shape == (3,) and batch[keys.forces].shape == (sum(n), 3)
    assert batch[IDX].tolist() == [4, 0, 9]
    assert batch[keys.cell].shape == (3, 3, 3)
    ref = add_neighbor_pairs({k: batch[k] for k in (keys.R, keys.cell, keys.pbc, keys.n_atoms)}, 3.0)
    got = set(zip(batch[keys.idx_i].tolist(), batch[keys.idx_j].tolist()))
    want = set(zip(ref[keys.idx_i].tolist(), ref[keys.idx_j].tolist()))
    assert got == want and len(got) == batch[keys.idx_i].shape[0]
    # the samples themselves were not changed by collation
    assert samples[1][keys.idx_i].max() < n[1]
    with pytest.raises(ValueError, match="empty"):
        collate_atoms([])


# --- splits and data module ---------------------------------------------------------------
def test_make_split_counts_fractions_blocks():
    tr, va, te = make_split(100, 0.5, 20, None, "random", seed=1)
    assert (len(tr), len(va), len(te)) == (50, 20, 30)
    assert len(np.intersect1d(tr, va)) == len(np.intersect1d(tr, te)) == len(np.intersect1d(va, te)) == 0
    tr, va, te = make_split(100, 60, 10, 10, "blocks", gap=5)
    assert tr.tolist() == list(range(60)) and va.tolist() == list(range(65, 75)) and te.tolist() == list(range(80, 90))
    with pytest.raises(AtomsDataError, match="validation split is empty"):
        make_split(10, 10, 0.0 if False else 0)
    with pytest.raises(AtomsDataError, match="only"):
        make_split(10, 8, 5)


def test_datamodule_split_file_reuse_and_fingerprint(ethanol_db, tmp_path):
    split = tmp_path / "split.npz"
    dm = AtomsDataModule(ethanol_db, 8, 100, 20, 20, split_file=split, seed=3)
    dm.setup()
    assert split.exists()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (100, 20, 20)
    # a reused split file whose sizes disagree with num_train/num_val is an error naming both
    bad = AtomsDataModule(ethanol_db, 8, 50, 20, split_file=split, seed=99)
    with pytest.raises(AtomsDataError, match=r"has 100 train systems but data.num_train=50 asks for 50"):
        bad.setup()
    bad = AtomsDataModule(ethanol_db, 8, 100, 0.5, split_file=split, seed=99)
    with pytest.raises(AtomsDataError, match=r"has 20 val systems but data.num_val=0.5"):
        bad.setup()
    dm2 = AtomsDataModule(ethanol_db, 8, 100, 20, split_file=split, seed=99)  # same sizes: the file wins over the seed
    dm2.setup()
    np.testing.assert_array_equal(dm2.train_idx, dm.train_idx)
    np.testing.assert_array_equal(dm2.test_idx, dm.test_idx)
    assert dm2.fingerprint == dm.fingerprint
    dm3 = AtomsDataModule(ethanol_db, 8, 100, 20, 20, seed=4)
    dm3.setup()
    assert dm3.fingerprint != dm.fingerprint and len(dm.fingerprint) == 64
    idx = [int(b[IDX][0]) for b in dm.val_dataloader()]
    assert idx == [int(i) for i in dm.val_idx[::8]]


def test_offsets_are_fitted_on_train_split_only(ethanol_frames, tmp_path):
    # a database whose later frames are shifted by +3 eV: a block split puts them in val/test only
    shift = 3.0
    frames = []
    for k, a in enumerate(ethanol_frames[:120]):
        b = a.copy()
        b.calc = SinglePointCalculator(b, energy=a.get_potential_energy() + (shift if k >= 80 else 0.0),
                                       forces=a.get_forces())
        frames.append(b)
    write(str(tmp_path / "s.extxyz"), frames)
    db = from_extxyz(tmp_path / "s.extxyz", tmp_path / "s.db", energy_unit="eV").path
    dm = AtomsDataModule(db, 10, 80, 20, 20, split_mode="blocks", transforms=[RemoveOffsets("energy"), CastTo32()])
    dm.setup()
    ref, mean = dm.get_offsets("energy")
    assert ref.shape == (9,) and ref.dtype == torch.float64  # max Z = 8 (O)
    e_train = torch.cat([b[keys.energy] for b in dm.train_dataloader()])
    e_val = torch.cat([b[keys.energy] for b in dm.val_dataloader()])
    assert e_train.dtype == torch.float32
    assert abs(e_train.double().mean().item()) < 1e-4  # residual of the fit on train
    assert e_val.double().mean().item() > shift - 0.5  # the shift was not seen by the fit
    raw_std = np.std([a.get_potential_energy() for a in ethanol_frames[:80]])
    assert e_train.double().std(unbiased=False).item() == pytest.approx(raw_std, rel=1e-3)
    # get_offsets returns what the transform removed: here only a mean per atom
    dm2 = AtomsDataModule(db, 10, 80, 20, 20, split_mode="blocks",
                          transforms=[RemoveOffsets("energy", remove_atomrefs=False)])
    dm2.setup()
    ref2, mean2 = dm2.get_offsets("energy")
    assert torch.all(ref2 == 0)
    assert mean2 == pytest.approx(np.mean([a.get_potential_energy() / len(a) for a in ethanol_frames[:80]]), rel=1e-12)
    assert dm2.get_offset_transform("energy").mean_per_atom == mean2
    e2 = torch.cat([b[keys.energy] for b in dm2.train_dataloader()])
    assert abs(e2.mean().item()) < 1e-9


def test_offsets_least_squares_on_composition():
    frames = read(str(need(QM9)), index=":300")
    from training.data import from_atoms_list

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        db = from_atoms_list(frames, Path(d) / "q.db", "Ang", {"energy": "eV"}).path
        dm = AtomsDataModule(db, 50, 200, 50, 50, transforms=[RemoveOffsets("energy")])
        dm.setup()
        raw = np.array([a.get_potential_energy() for a in frames])
        res_test = torch.cat([b[keys.energy] for b in dm.test_dataloader()]).numpy()
        # per-element references explain almost all of the total energy of unseen molecules
        assert np.std(res_test) < 0.01 * np.std(raw)
        mean, std = dm.get_stats("energy", divide_by_atoms=True, remove_offsets=True)
        assert abs(mean.item()) < 1e-6 and 0 < std.item() < 0.1


def test_setup_errors_name_the_problem(ethanol_frames, tmp_path):
    ds = ASEAtomsData.create(tmp_path / "n.db", "Ang", {"energy": "eV"})
    ds.add_systems(ethanol_frames[:5], [{"energy": a.get_potential_energy()} for a in ethanol_frames[:5]])
    # corrupt one stored value behind the importer's back
    from ase.db import connect

    con = connect(str(tmp_path / "n.db"))
    con.update(4, data={"energy": np.array([np.nan])})
    with pytest.raises(AtomsDataError, match=r"row 3: property 'energy' contains NaN"):
        AtomsDataModule(tmp_path / "n.db", 2, 2, 1).setup()
    with pytest.raises(AtomsDataError, match="forces"):
        AtomsDataModule(tmp_path / "n.db", 2, 2, 1, load_properties=["forces"]).setup()
    with pytest.raises(AtomsDataError, match="training split is empty"):
        AtomsDataModule(tmp_path / "n.db", 2, 0, 1, validate=False).setup()
    with pytest.raises(AtomsDataError, match="unknown unit"):
        AtomsDataModule(tmp_path / "n.db", 2, 2, 1, property_units={"energy": "Kcal/mool"}, validate=False).setup()


def test_dataloader_with_worker_process(ethanol_db):
    dm = AtomsDataModule(ethanol_db, 16, 64, 16, 0, num_workers=1, in_memory=False,
                         transforms=[NeighborList(4.0), CastTo32()])
    dm.setup()
    seen = []
    for b in dm.train_dataloader():
        seen += b[IDX].tolist()
        assert b[keys.R].dtype == torch.float32 and b[keys.idx_i].max() < b[keys.R].shape[0]
    assert sorted(seen) == sorted(dm.train_idx.tolist())


def test_cutoff_problems_are_found_at_setup(tmp_path):
    frames = read(str(need(WATER)), index=":4")
    frames[2].set_cell(np.diag([7.82, 7.82, 0.05]))  # degenerate along c, still periodic
    db = from_ase_file_like(frames, tmp_path / "w.db")
    for in_memory in (True, False):
        dm = AtomsDataModule(db, 2, 2, 1, in_memory=in_memory, transforms=[NeighborList(5.0)])
        with pytest.raises(AtomsDataError, match=r"row 2: cutoff 5.0 is larger than allowed"):
            dm.setup()


def from_ase_file_like(frames, path):
    from training.data import from_atoms_list

    return from_atoms_list(frames, path, "Ang", {"energy": "eV", "forces": "eV/Ang"}).path


def test_reads_schnetpack_metadata_layout(tmp_path, ethanol_frames):
    """SchNetPack 2 databases: ``_property_unit_dict`` metadata, values in row.data."""
    from ase.db import connect

    with connect(str(tmp_path / "spk.db")) as db:
        for a in ethanol_frames[:3]:
            plain = a.copy()
            plain.calc = None
            db.write(plain, data={"energy": np.array([a.get_potential_energy() / KCAL_MOL_IN_EV]),
                                  "forces": a.get_forces() / KCAL_MOL_IN_EV})
    connect(str(tmp_path / "spk.db")).metadata = {
        "_property_unit_dict": {"energy": "kcal/mol", "forces": "kcal/mol/Ang"}, "_distance_unit": "Ang",
        "atomrefs": {},
    }
    ds = ASEAtomsData(tmp_path / "spk.db", property_units={"energy": "eV", "forces": "eV/Ang"})
    assert ds[2][keys.energy].item() == pytest.approx(ethanol_frames[2].get_potential_energy(), rel=1e-7)
    np.testing.assert_allclose(ds[1][keys.forces].numpy(), ethanol_frames[1].get_forces(), rtol=1e-7)


def test_trajectory_import(tmp_path, ethanol_frames):
    from ase.io import Trajectory

    from training.data import from_trajectory

    with Trajectory(str(tmp_path / "md.traj"), "w") as traj:
        for a in ethanol_frames[:5]:
            traj.write(a)
    ds = from_trajectory(tmp_path / "md.traj", tmp_path / "md.db", energy_unit="eV")
    assert ds.db_property_units == {"energy": "eV", "forces": "eV/Ang"}
    for i in range(5):
        assert ds[i][keys.energy].item() == ethanol_frames[i].get_potential_energy()
        np.testing.assert_array_equal(ds[i][keys.forces].numpy(), ethanol_frames[i].get_forces())


def test_transformed_samples_cached_only_for_deterministic_transforms(ethanol_db):
    dm = AtomsDataModule(ethanol_db, 4, 20, 5, 5, transforms=[RemoveOffsets("energy"), NeighborList(4.0), CastTo32()])
    dm.setup()
    ds = dm.train_dataset
    first = [ds[i] for i in range(len(ds))]
    again = [ds[i] for i in range(len(ds))]
    plain = dm.dataset.subset(dm.train_idx).with_transforms(ds.transforms)  # no cache
    for a, b, c in zip(first, again, (plain[i] for i in range(len(plain)))):
        assert a is not b and set(a) == set(c)
        for k in a:
            assert torch.equal(a[k], c[k]) and a[k] is b[k]  # same cached tensors, same values as uncached
    calls = []

    def noisy(sample):  # a random augmentation: a plain callable, not declared deterministic
        calls.append(1)
        out = dict(sample)
        out[keys.R] = sample[keys.R] + 0.01 * torch.randn_like(sample[keys.R])
        return out

    dm2 = AtomsDataModule(ethanol_db, 4, 20, 5, 5, transforms=[noisy, NeighborList(4.0)])
    dm2.setup()
    calls.clear()
    r1, r2 = dm2.train_dataset[3], dm2.train_dataset[3]
    assert len(calls) == 2 and not torch.equal(r1[keys.R], r2[keys.R])


def test_stats_of_per_atom_forces(ethanol_db, ethanol_frames):
    dm = AtomsDataModule(ethanol_db, 10, 100, 20, 20, split_mode="blocks")
    dm.setup()
    mean, std = dm.get_stats("forces")
    assert mean.shape == (3,) and std.shape == (3,)
    # forces of each frame sum to zero (net force < 1e-7 eV/Å), so the mean over atoms vanishes
    assert torch.all(mean.abs() < 1e-8)
    f = np.concatenate([a.get_forces() for a in ethanol_frames[:100]])
    np.testing.assert_allclose(std.numpy(), f.std(0), rtol=1e-10)
