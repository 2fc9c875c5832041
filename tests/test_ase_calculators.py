"""ASE calculators on a bundle, local (BundleCalculator) and remote (RemoteCalculator over spkserve serve).

Both must agree with ASE's own LennardJones on the same potential, and pass
through ASE's optimizers (BFGS, FIRE), NEB and VelocityVerlet MD with the
energy conserved. The reference bundle is LJ argon (σ 3.4 Å, ε 0.0104 eV,
rc 8.5 Å, energy shifted to zero at rc like ASE's ``smooth=False``).
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.calculators.lj import LennardJones

from server_support import argon_cluster, argon_crystal, running_server

pytestmark = pytest.mark.timeout(150)
SIGMA, EPS, RC = 3.4, 0.0104, 8.5
KINDS = ["local", "remote"]


@pytest.fixture(scope="module")
def server(lj_bundle):
    with running_server(lj_bundle) as srv:  # default window: adapts to calculators taking turns
        yield srv


@pytest.fixture(scope="module")
def make_calc(lj_bundle, server):
    """make_calc(kind) -> a fresh ASE calculator of that kind (closed at module end)."""
    from spkserve.ase import BundleCalculator
    from spkserve.ase_remote import RemoteCalculator

    made = []

    def make(kind):
        if kind == "local":
            calc = BundleCalculator(lj_bundle)
        elif kind == "remote":
            calc = RemoteCalculator(unix=server.address)
        else:
            calc = LennardJones(sigma=SIGMA, epsilon=EPS, rc=RC, smooth=False)
        made.append(calc)
        return calc

    yield make
    for c in made:
        if hasattr(c, "close"):
            c.close()


def icosahedron13(seed: int):
    from ase.cluster import Icosahedron

    atoms = Icosahedron("Ar", noshells=2, latticeconstant=1.5496 * SIGMA)
    atoms.rattle(0.1, seed=seed)
    return atoms


@pytest.mark.parametrize("kind", KINDS)
def test_agrees_with_ase_lennard_jones(make_calc, kind):
    calc, ref = make_calc(kind), make_calc("ase")
    for atoms in (argon_cluster(13, seed=1), argon_crystal(seed=2)):
        a, b = atoms.copy(), atoms.copy()
        a.calc, b.calc = calc, ref
        np.testing.assert_allclose(a.get_potential_energy(), b.get_potential_energy(), rtol=1e-10)
        np.testing.assert_allclose(a.get_forces(), b.get_forces(), rtol=1e-8, atol=1e-10)
        if atoms.pbc.all():
            np.testing.assert_allclose(a.get_stress(), b.get_stress(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("optimizer", ["BFGS", "FIRE"])
def test_optimizers_find_the_lj13_icosahedron(make_calc, kind, optimizer):
    import ase.optimize

    atoms = icosahedron13(seed=3)
    atoms.calc = make_calc(kind)
    opt = getattr(ase.optimize, optimizer)(atoms, logfile=None)
    assert opt.run(fmax=1e-4, steps=1000), f"{optimizer} did not converge"
    # the LJ13 global minimum is -44.326801 ε (Wales & Doye 1997); all 78 pairs lie inside
    # rc = 2.5 σ, so the shift adds -78 V(rc) with V(rc) = 4ε(2.5^-12 - 2.5^-6)
    v_rc = 4 * EPS * ((SIGMA / RC) ** 12 - (SIGMA / RC) ** 6)
    expected = -44.326801 * EPS - 78 * v_rc
    assert atoms.get_potential_energy() == pytest.approx(expected, abs=2e-6)
    assert np.abs(atoms.get_forces()).max() < 1e-4


def _adatom_neb(make_calc, kind, n_images=3):
    from ase.build import add_adsorbate, fcc100
    from ase.constraints import FixAtoms
    from ase.mep import NEB
    from ase.optimize import BFGS, FIRE

    slab = fcc100("Ar", size=(3, 3, 2), a=1.5496 * SIGMA, vacuum=8.0)
    slab.set_constraint(FixAtoms(mask=slab.positions[:, 2] < slab.positions[:, 2].min() + 0.1))
    add_adsorbate(slab, "Ar", height=2.6, position="hollow")
    step = slab.cell[0, 0] / 3  # one surface lattice vector: next hollow site
    initial, final = slab.copy(), slab.copy()
    final.positions[-1, 0] += step
    for end in (initial, final):
        end.calc = make_calc(kind)
        BFGS(end, logfile=None).run(fmax=0.005, steps=300)
    images = [initial] + [initial.copy() for _ in range(n_images)] + [final]
    for im in images[1:-1]:
        im.calc = make_calc(kind)
    neb = NEB(images, climb=True, method="improvedtangent")
    neb.interpolate()
    assert FIRE(neb, logfile=None).run(fmax=0.005, steps=1000), "NEB did not converge"
    energies = np.array([im.get_potential_energy() for im in images])
    return energies, images, step


@pytest.fixture(scope="module")
def neb_results(make_calc):
    return {kind: _adatom_neb(make_calc, kind) for kind in KINDS + ["ase"]}


@pytest.mark.parametrize("kind", KINDS)
def test_neb_adatom_hop_saddle_at_bridge(neb_results, kind):
    energies, images, step = neb_results[kind]
    barrier = energies.max() - energies[0]
    saddle = images[int(np.argmax(energies))]
    assert int(np.argmax(energies)) == 2 and barrier > 0.005  # the middle image climbs to the saddle
    # by symmetry the saddle is the bridge site halfway between the two hollow sites
    x0 = images[0].positions[-1, 0]
    assert saddle.positions[-1, 0] - x0 == pytest.approx(step / 2, abs=0.02)
    ref_energies, *_ = neb_results["ase"]
    np.testing.assert_allclose(energies, ref_energies, atol=1e-6)


def _nve(make_calc, kind):
    from ase import units
    from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta
    from ase.md.verlet import VelocityVerlet

    atoms = icosahedron13(seed=4)
    atoms.calc = make_calc(kind)
    thermalize_momenta(atoms, temperature_K=30, rng=np.random.default_rng(5))
    Stationary(atoms)
    ZeroRotation(atoms)
    md = VelocityVerlet(atoms, timestep=5 * units.fs, logfile=None)
    etot, epot = [], []

    def record():
        epot.append(atoms.get_potential_energy())
        etot.append(epot[-1] + atoms.get_kinetic_energy())

    md.attach(record, interval=1)
    md.run(200)
    return np.array(etot), np.array(epot), atoms.positions.copy()


@pytest.fixture(scope="module")
def md_runs(make_calc):
    return {kind: _nve(make_calc, kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_velocity_verlet_conserves_energy(md_runs, kind):
    etot, epot, _ = md_runs[kind]
    assert np.ptp(epot) > 5e-3  # the cluster really moves: potential energy swings by > 5 meV
    assert np.ptp(etot) < 2e-3 * np.ptp(epot), (np.ptp(etot), np.ptp(epot))
    assert abs(etot[-1] - etot[0]) < 1e-4


def test_remote_and_local_md_trajectories_coincide(md_runs):
    np.testing.assert_allclose(md_runs["remote"][2], md_runs["local"][2], atol=1e-8)
    np.testing.assert_allclose(md_runs["remote"][0], md_runs["local"][0], atol=1e-10)


def test_remote_calculator_reports_server_errors(make_calc):
    from ase import Atoms
    from ase.calculators.calculator import CalculatorSetupError

    calc = make_calc("remote")
    assert calc.server_metadata["cutoff_angstrom"] == pytest.approx(RC)
    atoms = Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 0]])  # r = 0: infinite energy
    atoms.calc = calc
    with pytest.raises(CalculatorSetupError, match="non-finite"):
        atoms.get_potential_energy()
