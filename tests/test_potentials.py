"""Reference potentials: agreement with ASE, finite differences, invariances, torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.lj import LennardJones as AseLJ
from ase.stress import full_3x3_to_voigt_6_stress

from spkserve import keys
from spkserve.ase import BundleCalculator
from spkserve.batch import Structure, collate
from spkserve.bundle import load_bundle
from spkserve.neighbors import add_neighbor_pairs
from spkserve.runtime import ModelRunner


def _argon_crystal(seed=0, triclinic=True):
    a = bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 2)
    if triclinic:
        cell = a.cell.array.copy()
        cell[1, 0] += 0.7
        cell[2, 1] -= 0.4
        a.set_cell(cell, scale_atoms=True)
    a.rattle(0.15, seed=seed)
    return a


def _cluster(n=13, seed=0):
    rng = np.random.default_rng(seed)
    pos = []
    while len(pos) < n:
        p = rng.uniform(-5, 5, 3)
        if all(np.linalg.norm(p - q) > 3.2 for q in pos):
            pos.append(p)
    return Atoms(f"Ar{n}", positions=pos)


@pytest.mark.parametrize("make", [_argon_crystal, _cluster])
def test_lj_matches_ase(lj_bundle, make):
    atoms = make()
    ref = atoms.copy()
    ref.calc = AseLJ(sigma=3.4, epsilon=0.0104, rc=8.5)
    atoms.calc = BundleCalculator(lj_bundle, skin_angstrom=0.5)
    e_ref = ref.get_potential_energy()
    assert atoms.get_potential_energy() == pytest.approx(e_ref, rel=1e-10)
    f_ref = ref.get_forces()
    np.testing.assert_allclose(atoms.get_forces(), f_ref, rtol=1e-10, atol=1e-10 * np.abs(f_ref).max())
    if atoms.pbc.all():
        s_ref = ref.get_stress()
        np.testing.assert_allclose(atoms.get_stress(), s_ref, rtol=1e-10, atol=1e-10 * np.abs(s_ref).max())


def _energy(runner, atoms):
    return float(runner.compute([Structure.from_atoms(atoms)], ["energy"])["energy"][0])


@pytest.mark.parametrize("bundle_name", ["lj_bundle", "morse_bundle"])
def test_forces_finite_differences(request, bundle_name):
    runner = ModelRunner(request.getfixturevalue(bundle_name), skin_angstrom=0.0)
    atoms = _argon_crystal(seed=3)
    f = runner.compute([Structure.from_atoms(atoms)], ["energy", "forces"])["forces"].numpy()
    h = 1e-5
    rng = np.random.default_rng(0)
    for i in rng.choice(len(atoms), 4, replace=False):
        for d in range(3):
            ap, am = atoms.copy(), atoms.copy()
            ap.positions[i, d] += h
            am.positions[i, d] -= h
            fd = -(_energy(runner, ap) - _energy(runner, am)) / (2 * h)
            assert f[i, d] == pytest.approx(fd, abs=1e-7 + 1e-6 * abs(fd))


@pytest.mark.parametrize("bundle_name", ["lj_bundle", "morse_bundle"])
def test_stress_finite_differences(request, bundle_name):
    """stress = (1/V) dE/dε under a homogeneous strain of cell and positions."""
    runner = ModelRunner(request.getfixturevalue(bundle_name), skin_angstrom=0.0)
    atoms = _argon_crystal(seed=4)
    s = runner.compute([Structure.from_atoms(atoms)], ["energy", "stress"])["stress"][0].numpy()
    V = atoms.get_volume()
    h = 1e-6
    for a in range(3):
        for b in range(a, 3):
            eps = np.zeros((3, 3))
            eps[a, b] = eps[b, a] = h / (2 if a != b else 1)
            vals = []
            for sign in (1, -1):
                x = atoms.copy()
                x.set_cell(atoms.cell.array @ (np.eye(3) + sign * eps), scale_atoms=True)
                vals.append(_energy(runner, x))
            # dE/dε_ab for symmetric strain (off-diagonal counted twice -> divide)
            fd = (vals[0] - vals[1]) / (2 * h) / V
            assert s[a, b] == pytest.approx(fd, rel=1e-5, abs=1e-9)


def _random_rotation(seed):
    q = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))[0]
    return q * np.sign(np.linalg.det(q))


@pytest.mark.parametrize("bundle_name", ["lj_bundle", "morse_bundle", "trap_bundle"])
def test_invariances(request, bundle_name):
    runner = ModelRunner(request.getfixturevalue(bundle_name), skin_angstrom=0.0)
    atoms = _cluster(seed=7)
    if bundle_name == "trap_bundle":
        atoms.positions *= 0.2  # a trap is not translation invariant; test rotation about its centre only
    base = runner.compute([Structure.from_atoms(atoms)], ["energy", "forces"])
    Q = _random_rotation(11)
    rot = atoms.copy()
    rot.positions = atoms.positions @ Q.T
    out = runner.compute([Structure.from_atoms(rot)], ["energy", "forces"])
    assert float(out["energy"][0]) == pytest.approx(float(base["energy"][0]), rel=1e-12)
    np.testing.assert_allclose(out["forces"].numpy(), base["forces"].numpy() @ Q.T, atol=1e-12)
    perm = np.random.default_rng(5).permutation(len(atoms))
    p = atoms[perm]
    out = runner.compute([Structure.from_atoms(p)], ["energy", "forces"])
    assert float(out["energy"][0]) == pytest.approx(float(base["energy"][0]), rel=1e-12)
    np.testing.assert_allclose(out["forces"].numpy(), base["forces"].numpy()[perm], atol=1e-12)
    if bundle_name != "trap_bundle":
        t = atoms.copy()
        t.positions += np.array([3.3, -1.2, 7.7])
        out = runner.compute([Structure.from_atoms(t)], ["energy", "forces"])
        assert float(out["energy"][0]) == pytest.approx(float(base["energy"][0]), rel=1e-12)


def test_periodic_translation_and_wrapping(lj_bundle):
    runner = ModelRunner(lj_bundle, skin_angstrom=0.0)
    atoms = _argon_crystal(seed=8)
    e0 = _energy(runner, atoms)
    t = atoms.copy()
    t.positions += np.array([1.1, 2.2, -3.3])
    assert _energy(runner, t) == pytest.approx(e0, rel=1e-12)
    t.wrap()
    assert _energy(runner, t) == pytest.approx(e0, rel=1e-12)


def test_batch_equals_separate(lj_bundle):
    runner = ModelRunner(lj_bundle, skin_angstrom=0.0)
    systems = [_argon_crystal(seed=1), _cluster(seed=2), _argon_crystal(seed=3, triclinic=False)]
    out = runner.compute([Structure.from_atoms(a) for a in systems], ["energy", "forces"])
    start = 0
    for s, a in enumerate(systems):
        one = runner.compute([Structure.from_atoms(a)], ["energy", "forces"])
        assert float(out["energy"][s]) == pytest.approx(float(one["energy"][0]), rel=1e-13)
        np.testing.assert_allclose(out["forces"][start : start + len(a)].numpy(), one["forces"].numpy(), atol=1e-14)
        start += len(a)


def test_harmonic_trap_is_exact(trap_bundle):
    runner = ModelRunner(trap_bundle)
    atoms = _cluster(seed=9)
    out = runner.compute([Structure.from_atoms(atoms)], ["energy", "forces"])
    assert float(out["energy"][0]) == pytest.approx(0.5 * 1.0 * (atoms.positions**2).sum(), rel=1e-13)
    np.testing.assert_allclose(out["forces"].numpy(), -1.0 * atoms.positions, atol=1e-13)


def test_harmonic_bonds_finite_differences(tmp_path):
    from spkserve.potentials import reference_bundle

    p = reference_bundle("harmonic_bonds", tmp_path / "b.bundle", bonds=[[0, 1], [0, 2]], k=[30.0, 20.0], r0=[0.96, 0.97], n_atoms=3)
    runner = ModelRunner(p)
    from ase.build import molecule

    w = molecule("H2O")
    w.rattle(0.05, seed=1)
    f = runner.compute([Structure.from_atoms(w)])["forces"].numpy()
    h = 1e-6
    for i in range(3):
        for d in range(3):
            ap, am = w.copy(), w.copy()
            ap.positions[i, d] += h
            am.positions[i, d] -= h
            assert f[i, d] == pytest.approx(-(_energy(runner, ap) - _energy(runner, am)) / (2 * h), abs=1e-6)
    np.testing.assert_allclose(f.sum(0), 0.0, atol=1e-12)


def test_pairs_beyond_cutoff_are_masked(lj_bundle):
    """A skin list (pairs out to cutoff + skin) gives exactly the same result."""
    b = load_bundle(lj_bundle)
    atoms = _argon_crystal(seed=5)
    batch = collate([Structure.from_atoms(atoms)])
    exact = b.model(add_neighbor_pairs(batch, 8.5), properties=["energy", "forces", "stress"])
    skin = b.model(add_neighbor_pairs(batch, 10.5), properties=["energy", "forces", "stress"])
    for k in exact:
        torch.testing.assert_close(skin[k], exact[k], rtol=1e-13, atol=1e-15)


@pytest.mark.timeout(300)
def test_torch_compile_same_outputs(lj_bundle):
    b = load_bundle(lj_bundle)
    batch = add_neighbor_pairs(collate([Structure.from_atoms(_argon_crystal(seed=6))]), 8.5)
    eager = b.model(batch, properties=["energy", "forces", "stress"])
    compiled = torch.compile(b.model)
    got = compiled(batch, properties=["energy", "forces", "stress"])
    for k in ("energy", "forces", "stress"):
        torch.testing.assert_close(got[k], eager[k], rtol=1e-12, atol=1e-14)


def test_ase_calculator_reuses_skin_list(lj_bundle):
    atoms = _argon_crystal(seed=2)
    calc = BundleCalculator(lj_bundle, skin_angstrom=1.0)
    atoms.calc = calc
    atoms.get_potential_energy()
    for _ in range(5):
        atoms.positions += 0.01
        atoms.get_forces()
    assert calc.runner.neighbors.n_builds == 1
    assert calc.runner.neighbors.n_calls == 6


def test_ase_calculator_stress_only_periodic(lj_bundle):
    from ase.calculators.calculator import PropertyNotImplementedError

    c = _cluster()
    c.calc = BundleCalculator(lj_bundle)
    with pytest.raises(PropertyNotImplementedError, match="periodic"):
        c.get_stress()
