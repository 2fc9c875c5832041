"""Electrostatic energy of latent charges: Ewald sum vs the NaCl Madelung constant and a direct
lattice sum, independence of the splitting parameter (also for charged cells, through the
neutralising background), the damped molecular Coulomb sum, and charge-neutral latent charges."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms

from spkserve import keys, registry, units
from spkserve.nn import models  # noqa: F401
from spkserve.nn.electrostatics import ElectrostaticEnergy
from spkserve.nn.geometry import pair_geometry

from test_nn_models import ethanol, make_batch

pytestmark = pytest.mark.timeout(120)
KE = units.factor("Hartree", "eV") * units.factor("Bohr", "Angstrom")  # eV Å / e^2


def energy(head: ElectrostaticEnergy, atoms: Atoms, charges) -> float:
    b = make_batch([atoms], cutoff=head.cutoff)
    geo = pair_geometry(b, head.cutoff)
    q = torch.as_tensor(np.asarray(charges, dtype=np.float64))
    return float(head(b, geo, {keys.partial_charges: q})["electrostatic_energy"][0])


def test_ewald_gives_the_madelung_constant_of_rock_salt():
    from ase.build import bulk

    a = 4.0
    nacl = bulk("NaCl", "rocksalt", a=a, cubic=True)  # 8 ions, nearest neighbours a/2
    q = np.where(nacl.numbers == 11, 1.0, -1.0)
    head = ElectrostaticEnergy(cutoff_angstrom=8.0, damping_cutoff_angstrom=1e-3)
    e = energy(head, nacl, q)
    madelung = -e / 4 / (KE / (a / 2))
    assert abs(madelung - 1.747565) < 2e-5, madelung


def centrosymmetric_cell(seed: int, L: float = 5.0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-L / 2 + 0.3, -0.3, size=(3, 3))
    pos = np.concatenate([x, -x])
    q = np.array([1.0, -0.3, -0.7] * 2)
    return Atoms("H6", positions=pos, cell=np.eye(3) * L, pbc=True), q


def test_ewald_matches_a_direct_lattice_sum():
    atoms, q = centrosymmetric_cell(0)
    L = atoms.cell[0, 0]
    head = ElectrostaticEnergy(cutoff_angstrom=9.0, damping_cutoff_angstrom=1e-3)
    e_ewald = energy(head, atoms, q)
    # neutral, dipole-free cell: summing whole cells in growing spheres converges to Ewald (tin foil)
    r = atoms.positions
    n = 16
    g = np.arange(-n, n + 1)
    shifts = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    shifts = shifts[(shifts**2).sum(1) <= n * n] * L
    d = r[None, :, None, :] - r[None, None, :, :] + shifts[:, None, None, :]  # [C, i, j, 3]
    dist = np.linalg.norm(d, axis=-1)
    qq = np.broadcast_to(q[:, None] * q[None, :], dist.shape)
    ok = dist > 1e-9
    e_direct = 0.5 * KE * float((qq[ok] / dist[ok]).sum())
    assert abs(e_ewald - e_direct) < 2e-3 * abs(e_direct), (e_ewald, e_direct)


@pytest.mark.parametrize("charged", [False, True])
def test_ewald_is_independent_of_the_splitting_parameter(charged):
    atoms, q = centrosymmetric_cell(1)
    atoms.positions += np.array([0.2, -0.1, 0.3])  # not centred any more
    if charged:
        q = q + 0.25  # net charge 1.5 e: needs the neutralising background term
    e1 = energy(ElectrostaticEnergy(cutoff_angstrom=9.0, ewald_beta=0.45, ewald_kmax=8, damping_cutoff_angstrom=1.5), atoms, q)
    e2 = energy(ElectrostaticEnergy(cutoff_angstrom=9.0, ewald_beta=0.38, ewald_kmax=8, damping_cutoff_angstrom=1.5), atoms, q)
    assert abs(e1 - e2) < 1e-5 * max(1.0, abs(e1)), (e1, e2)


def test_damped_coulomb_of_a_molecule_is_the_pair_sum():
    mol = ethanol()
    rng = np.random.default_rng(3)
    q = rng.normal(size=len(mol))
    q -= q.mean()
    head = ElectrostaticEnergy(cutoff_angstrom=10.0, damping_cutoff_angstrom=2.0, damping_length_angstrom=1.0)
    e = energy(head, mol, q)
    ref = 0.0
    for i in range(len(mol)):
        for j in range(i + 1, len(mol)):
            r = mol.get_distance(i, j)
            s = 0.5 * (np.cos(np.pi * min(r / 2.0, 1.0)) + 1)
            ref += KE * q[i] * q[j] * (s / np.sqrt(r * r + 1.0) + (1 - s) / r)
    assert abs(e - ref) < 1e-10 * max(1, abs(ref))
    # beyond the damping cutoff the pair energy is plain Coulomb; at r -> 0 it stays finite
    d = torch.tensor([0.0, 0.5, 2.5, 7.0], dtype=torch.float64)
    chi = head.damped_inverse(d)
    assert torch.isfinite(chi).all() and abs(float(chi[0]) - 1.0) < 1e-12
    torch.testing.assert_close(chi[2:], 1.0 / d[2:])


def test_model_with_latent_charges_and_electrostatics():
    torch.manual_seed(0)
    spec = {"name": "neural_network_potential", "params": {
        "representation": {"name": "painn", "params": dict(n_atom_basis=8, n_interactions=1, n_rbf=6, cutoff_angstrom=3.0)},
        "outputs": [
            {"name": "atomwise", "params": {"output_key": "short_range_energy"}},
            {"name": "dipole_moment", "params": {}},
            {"name": "electrostatics", "params": {"cutoff_angstrom": 8.0}},
            {"name": "energy_sum", "params": {"input_keys": ["short_range_energy", "electrostatic_energy"]}},
        ]}}
    model = registry.build(spec).double().eval()
    assert model.cutoff == 8.0  # the neighbor list covers the Coulomb pairs
    b = make_batch([ethanol(), Atoms("OH", positions=[[0, 0, 0], [0.97, 0, 0]])], cutoff=8.0)
    b[keys.total_charge] = torch.tensor([0.0, -1.0], dtype=torch.float64)
    out = model(b, (keys.energy, keys.forces, keys.partial_charges))
    q = out[keys.partial_charges]
    torch.testing.assert_close(q[:9].sum(), torch.tensor(0.0, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(q[9:].sum(), torch.tensor(-1.0, dtype=torch.float64), atol=1e-12, rtol=0)
    # forces include the electrostatic term: compare with finite differences of the energy
    h = 1e-5
    for atom, axis in ((0, 0), (2, 1), (10, 2)):
        p, m = dict(b), dict(b)
        p[keys.R] = b[keys.R].clone()
        m[keys.R] = b[keys.R].clone()
        p[keys.R][atom, axis] += h
        m[keys.R][atom, axis] -= h
        fd = -(model(p)[keys.energy].sum() - model(m)[keys.energy].sum()) / (2 * h)
        assert abs(float(fd) - float(out[keys.forces][atom, axis])) < 1e-6
