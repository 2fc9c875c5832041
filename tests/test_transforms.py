"""Per-sample transforms: neighbor lists (against ASE), caching, offsets, casts, geometry."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from ase.io import read
from ase.neighborlist import neighbor_list as ase_neighbor_list

from spkserve import keys
from training.data import (
    IDX,
    AddOffsets,
    AtomsDataError,
    CastTo32,
    CastTo64,
    NeighborList,
    RemoveOffsets,
    ScaleProperty,
    SubtractCenterOfMass,
    WrapPositions,
    collate_atoms,
)

from testdata import data_file  # noqa: E402

pytestmark = pytest.mark.timeout(60)

# the small set shipped in tests/data (leading frames of ../shared/data; see tests/testdata.py)
WATER = data_file("xtb/water16_pbc_gfn1xtb_300K.extxyz")
ETHANOL = data_file("xtb/ethanol_gfn2xtb_500K.extxyz")


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data file {path} is missing")
    return path


def sample_of(atoms, idx: int) -> dict[str, torch.Tensor]:
    """A sample as ASEAtomsData builds it (float64, per-system leading 1)."""
    return {
        keys.Z: torch.tensor(atoms.numbers, dtype=torch.int64),
        keys.R: torch.tensor(atoms.positions, dtype=torch.float64),
        keys.cell: torch.tensor(atoms.cell.array, dtype=torch.float64).reshape(1, 3, 3),
        keys.pbc: torch.tensor(atoms.pbc).reshape(1, 3),
        keys.n_atoms: torch.tensor([len(atoms)]),
        IDX: torch.tensor([idx]),
        keys.energy: torch.tensor([atoms.get_potential_energy()], dtype=torch.float64),
        keys.forces: torch.tensor(atoms.get_forces(), dtype=torch.float64),
    }


@pytest.fixture(scope="module")
def water():
    return [sample_of(a, k) for k, a in enumerate(read(str(need(WATER)), index=":3"))]


@pytest.fixture(scope="module")
def ethanol():
    return [sample_of(a, k) for k, a in enumerate(read(str(need(ETHANOL)), index=":6"))]


def pair_vectors(s):
    cell = s[keys.cell].reshape(3, 3)
    R = s[keys.R]
    return R[s[keys.idx_j]] - R[s[keys.idx_i]] + s[keys.shifts].to(R.dtype) @ cell


def pair_set(s):
    v = pair_vectors(s)
    return {
        (i, j, tuple(np.round(d, 6)))
        for i, j, d in zip(s[keys.idx_i].tolist(), s[keys.idx_j].tolist(), v.numpy())
    }


def test_neighbor_list_matches_ase_in_small_periodic_box(water):
    # box 7.82 Å < 2 x cutoff: several images of the same atom are neighbours
    s = water[0]
    cutoff = 5.0
    out = NeighborList(cutoff)(s)
    from ase import Atoms

    a = Atoms(numbers=s[keys.Z].numpy(), positions=s[keys.R].numpy(), cell=s[keys.cell][0].numpy(), pbc=True)
    i, j, D = ase_neighbor_list("ijD", a, cutoff)
    want = {(int(p), int(q), tuple(np.round(d, 6))) for p, q, d in zip(i, j, D)}
    assert pair_set(out) == want
    assert torch.linalg.norm(pair_vectors(out), dim=1).max() < cutoff
    assert out[keys.shifts].dtype == s[keys.R].dtype


def test_neighbor_list_molecule_all_pairs(ethanol):
    s = ethanol[0]
    out = NeighborList(10.0)(s)
    n = int(s[keys.n_atoms])
    assert out[keys.idx_i].shape[0] == n * (n - 1)  # every ordered pair, no self pairs
    assert torch.all(out[keys.shifts] == 0)
    assert out[keys.shifts].stride(0) == 0  # molecules: a zero view, no memory per pair
    assert CastTo32()(out)[keys.shifts].stride(0) == 0
    batch = collate_atoms([out, NeighborList(10.0)(ethanol[1])])
    assert batch[keys.shifts].shape == (2 * n * (n - 1), 3) and torch.all(batch[keys.shifts] == 0)


def test_neighbor_list_cache_memory_and_disk(ethanol, tmp_path, monkeypatch):
    calls = []
    real = NeighborList.compute

    def counting(self, sample):
        calls.append(int(sample[IDX][0]))
        return real(self, sample)

    monkeypatch.setattr(NeighborList, "compute", counting)
    nl = NeighborList(4.0, cache_dir=tmp_path, fingerprint="abc123")
    first = [nl(s) for s in ethanol]
    again = [nl(s) for s in ethanol]
    assert calls == list(range(len(ethanol)))
    for a, b in zip(first, again):
        assert torch.equal(a[keys.idx_i], b[keys.idx_i]) and torch.equal(a[keys.shifts], b[keys.shifts])
    # a new instance (another run / worker) reads the on-disk cache
    calls.clear()
    nl2 = NeighborList(4.0, cache_dir=tmp_path, fingerprint="abc123")
    for a, s in zip(first, ethanol):
        assert torch.equal(nl2(s)[keys.idx_j], a[keys.idx_j])
    assert calls == []
    assert len(list(nl2.cache_path.glob("*.npz"))) == len(ethanol)
    # changed positions for the same index are recomputed, not served stale
    moved = dict(ethanol[0])
    moved[keys.R] = ethanol[0][keys.R] * 1.5
    out = nl2(moved)
    assert calls == [0]
    assert torch.linalg.norm(pair_vectors(out), dim=1).max() < 4.0
    # another fingerprint or cutoff is another cache
    assert NeighborList(4.0, cache_dir=tmp_path, fingerprint="zzz").cache_path != nl2.cache_path
    assert NeighborList(4.5, cache_dir=tmp_path, fingerprint="abc123").cache_path != nl2.cache_path


def test_neighbor_list_degenerate_cells_are_refused(water):
    s = dict(water[0])
    s[keys.cell] = torch.zeros(1, 3, 3, dtype=torch.float64)
    with pytest.raises(AtomsDataError, match="degenerate"):
        NeighborList(5.0)(s)
    thin = dict(water[0])
    cell = torch.eye(3, dtype=torch.float64) * 7.82
    cell[2, 2] = 0.05
    thin[keys.cell] = cell.reshape(1, 3, 3)
    with pytest.raises(AtomsDataError, match="cutoff 5.0 is larger than allowed"):
        NeighborList(5.0)(thin)
    with pytest.raises(ValueError, match="positive"):
        NeighborList(0.0)


ALL_TRANSFORMS = [
    NeighborList(4.0),
    RemoveOffsets("energy", atomref=torch.linspace(-5, -1, 10, dtype=torch.float64), mean_per_atom=0.3),
    AddOffsets("energy", atomref=torch.linspace(-5, -1, 10, dtype=torch.float64), mean_per_atom=0.3),
    CastTo32(),
    CastTo64(),
    SubtractCenterOfMass(),
    WrapPositions(),
    ScaleProperty("forces", 2.0),
]


@pytest.mark.parametrize("t", ALL_TRANSFORMS, ids=lambda t: type(t).__name__)
def test_transforms_never_modify_their_input(t, water):
    s = NeighborList(3.0)(water[1])
    s[keys.R] = s[keys.R] + torch.tensor([7.9, -3.0, 12.0], dtype=torch.float64)  # partly outside the box
    before = copy.deepcopy(s)
    out = t(s)
    assert out is not s
    assert set(s) == set(before)
    for k in before:
        assert torch.equal(s[k], before[k]), k


def test_remove_and_add_offsets_invert_each_other_on_samples_and_batches(ethanol, water):
    ref = torch.zeros(9, dtype=torch.float64)
    ref[[1, 6, 8]] = torch.tensor([-10.0, -40.0, -60.0], dtype=torch.float64)
    rm = RemoveOffsets("energy", atomref=ref, mean_per_atom=-0.25)
    add = AddOffsets.from_remove(rm)
    s = ethanol[2]
    expected = s[keys.energy] - (ref[s[keys.Z]].sum() - 0.25 * 9)
    torch.testing.assert_close(rm(s)[keys.energy], expected)
    torch.testing.assert_close(add(rm(s))[keys.energy], s[keys.energy])
    batch = collate_atoms([ethanol[0], ethanol[3], ethanol[5]])
    per_sample = torch.cat([rm(x)[keys.energy] for x in (ethanol[0], ethanol[3], ethanol[5])])
    torch.testing.assert_close(rm(batch)[keys.energy], per_sample)
    not_ext = RemoveOffsets("energy", remove_atomrefs=False, is_extensive=False, mean_per_atom=2.0)
    torch.testing.assert_close(not_ext(batch)[keys.energy], batch[keys.energy] - 2.0)
    with pytest.raises(RuntimeError, match="no statistics"):
        RemoveOffsets("energy")(s)
    with pytest.raises(AtomsDataError, match="atomic number 8"):
        RemoveOffsets("energy", atomref=torch.zeros(7), mean_per_atom=0.0)(s)


def test_casts(ethanol):
    s = NeighborList(4.0)(ethanol[0])
    f = CastTo32()(s)
    assert f[keys.R].dtype == f[keys.energy].dtype == f[keys.shifts].dtype == torch.float32
    assert f[keys.Z].dtype == f[keys.idx_i].dtype == torch.int64 and f[keys.pbc].dtype == torch.bool
    d = CastTo64()(f)
    assert d[keys.R].dtype == torch.float64
    torch.testing.assert_close(d[keys.R], s[keys.R], rtol=1e-6, atol=1e-6)


def test_subtract_center_of_mass(ethanol):
    from ase.data import atomic_masses

    s = NeighborList(5.0)(ethanol[1])
    out = SubtractCenterOfMass()(s)
    m = torch.as_tensor(atomic_masses[s[keys.Z].numpy()])
    com = (m[:, None] * out[keys.R]).sum(0) / m.sum()
    assert torch.linalg.norm(com) < 1e-12
    torch.testing.assert_close(pair_vectors(out), pair_vectors(s))


def test_wrap_positions_keeps_pair_vectors(water):
    s = NeighborList(5.0)(water[2])
    rng = np.random.default_rng(3)
    cell = s[keys.cell][0]
    jumps = torch.as_tensor(rng.integers(-2, 3, size=(s[keys.R].shape[0], 3)), dtype=torch.float64)
    moved = dict(s)
    moved[keys.R] = s[keys.R] + jumps @ cell  # same structure, atoms in other images
    # shifts of the moved structure so that pair vectors are unchanged
    moved[keys.shifts] = s[keys.shifts] - (jumps[s[keys.idx_j]] - jumps[s[keys.idx_i]])
    torch.testing.assert_close(pair_vectors(moved), pair_vectors(s))
    out = WrapPositions()(moved)
    frac = out[keys.R] @ torch.linalg.inv(cell)
    assert frac.min() >= -1e-9 and frac.max() < 1 + 1e-9
    torch.testing.assert_close(pair_vectors(out), pair_vectors(s))
    # a molecule without pbc is left alone
    mol = dict(s)
    mol[keys.pbc] = torch.zeros(1, 3, dtype=torch.bool)
    assert WrapPositions()(mol) is mol


def test_scale_property(ethanol):
    s = ethanol[0]
    out = ScaleProperty("forces", 0.5)(s)
    torch.testing.assert_close(out[keys.forces], 0.5 * s[keys.forces])
    with pytest.raises(KeyError, match="stress"):
        ScaleProperty("stress", 2.0)(s)


def test_datamodule_precomputes_and_stores_lists_by_database_fingerprint(tmp_path, ethanol, monkeypatch):
    pytest.importorskip("pytorch_lightning", reason="pytorch-lightning (training extra) is not installed")
    from ase.io import read as ase_read

    from training.data import AtomsDataModule, from_atoms_list

    frames = ase_read(str(need(ETHANOL)), index=":30")
    db = from_atoms_list(frames, tmp_path / "e.db", "Ang", {"energy": "eV", "forces": "eV/Ang"})
    cache = tmp_path / "nbl"
    dm = AtomsDataModule(db.path, 5, 20, 5, 5, transforms=[NeighborList(4.0, cache_dir=cache)])
    dm.setup()
    (folder,) = cache.iterdir()
    assert folder.name.endswith(db.fingerprint[:16])
    assert len(list(folder.glob("*.npz"))) == 30
    calls = []
    monkeypatch.setattr(NeighborList, "_precompute_chunk", lambda self, chunk: calls.append(len(chunk)))
    monkeypatch.setattr(NeighborList, "compute", lambda self, s: calls.append(1))
    other_split = AtomsDataModule(db.path, 5, 10, 10, 10, seed=7, transforms=[NeighborList(4.0, cache_dir=cache)])
    other_split.setup()  # served from disk: nothing computed
    assert calls == []
    batch = next(iter(other_split.train_dataloader()))  # still nothing computed while loading
    assert calls == [] and batch[keys.idx_i].shape[0] > 0
    monkeypatch.undo()
    s0 = other_split.train_dataset.get_raw(0)
    want = NeighborList(4.0)(s0)
    got = other_split.train_dataset[0]
    assert torch.equal(got[keys.idx_i], want[keys.idx_i]) and torch.equal(got[keys.idx_j], want[keys.idx_j])
