"""SchNetPack's Python spellings of the data APIs (issue 12): ASEAtomsData.add_systems in its
argument order, HDF5Loader.get_property(name, atomistic, mol_idx, replica_idx)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

from spkserve import keys

pytest.importorskip("pytorch_lightning", reason="pytorch-lightning (extra 'train') is not installed")

from training.data import ASEAtomsData, AtomsDataError  # noqa: E402


def _systems():
    atoms = [Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]),
             Atoms("CO", positions=[[0, 0, 0], [1.13, 0, 0]])]
    props = [{"energy": np.array([-1.5]), "forces": np.full((3, 3), 0.1)},
             {"energy": np.array([-2.5]), "forces": np.full((2, 3), -0.2)}]
    return atoms, props


def _db(tmp_path, name):
    return ASEAtomsData.create(tmp_path / name, distance_unit="Ang",
                               property_unit_dict={"energy": "eV", "forces": "eV/Ang"})


def _rows(db):
    return [(db[i][keys.Z].tolist(), float(db[i]["energy"]), db[i]["forces"].numpy().copy()) for i in range(len(db))]


def test_add_systems_in_both_orders_writes_the_same_rows(tmp_path):
    atoms, props = _systems()
    ours = _db(tmp_path, "ours.db")
    ours.add_systems(atoms, props)
    spk = _db(tmp_path, "spk.db")
    spk.add_systems(props, atoms)  # SchNetPack: add_systems(property_list, atoms_list)
    kw = _db(tmp_path, "kw.db")
    kw.add_systems(property_list=props, atoms_list=atoms)
    # SchNetPack without atoms: the structure in the property dicts
    inline = _db(tmp_path, "inline.db")
    inline.add_systems(property_list=[{**p, "_atomic_numbers": a.numbers, "_positions": a.positions}
                                      for a, p in zip(atoms, props)])
    ref = _rows(ours)
    assert [r[0] for r in ref] == [a.numbers.tolist() for a in atoms]
    for other in (spk, kw, inline):
        got = _rows(other)
        assert len(got) == 2
        for (z1, e1, f1), (z2, e2, f2) in zip(ref, got):
            assert z1 == z2 and e1 == e2 and np.array_equal(f1, f2)
    assert float(spk[1]["energy"]) == -2.5


def test_add_systems_without_structure_names_both_orders(tmp_path):
    _, props = _systems()
    with pytest.raises(AtomsDataError, match=r"add_systems\(atoms_list, property_list\)"):
        _db(tmp_path, "x.db").add_systems(props)


def test_hdf5_get_property_schnetpack_order(tmp_path):
    from spkmd.calculators import BundleCalculator
    from spkmd.hooks import FileLogger
    from spkmd.integrators import VelocityVerlet
    from spkmd.simulator import Simulator
    from spkmd.system import System
    from spkmd.data import HDF5Loader
    from spkserve.potentials import reference_bundle

    trap = reference_bundle("harmonic_trap", tmp_path / "trap.bundle", k=0.5)
    mols = [Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]),
            Atoms("CO", positions=[[0, 0, 0], [1.13, 0, 0]])]
    system = System.from_atoms(mols, n_replicas=2)
    system.momenta = torch.randn_like(system.positions, generator=torch.Generator().manual_seed(0)) * 0.1
    log = tmp_path / "log.hdf5"
    sim = Simulator(system, VelocityVerlet(time_step_fs=0.5), BundleCalculator(trap), hooks=[FileLogger(log, forces=True)])
    sim.simulate(3)
    sim.flush()
    h = HDF5Loader(log)
    np.testing.assert_array_equal(h.get_property("forces", True), h.get_property("forces", 0))
    np.testing.assert_array_equal(h.get_property("forces", True, 1), h.get_property("forces", 1))
    np.testing.assert_array_equal(h.get_property("forces", True, 1, 0), h.get_property("forces", 1, 0))
    assert h.get_property("forces", True, 1).shape[1] == 2  # CO: 2 atoms
    np.testing.assert_array_equal(h.get_property("energy", False, mol_idx=1), h.get_property("energy", 1))
    np.testing.assert_array_equal(h.get_property("energy", atomistic=False, molecule=1, replica=1),
                                  h.get_property("energy", 1, 1))
    with pytest.raises(ValueError, match="logged per molecule"):
        h.get_property("energy", True)
    with pytest.raises(ValueError, match="logged per atom"):
        h.get_property("forces", atomistic=False)
