"""System state, units at the border, COM utilities, degrees of freedom, initializers."""

import ase
import ase.build
import numpy as np
import pytest
import torch

from spkserve import units
from spkmd.initializers import MaxwellBoltzmann, Uniform
from spkmd.system import System, SystemSetupError

pytestmark = pytest.mark.timeout(60)
torch.set_num_threads(1)


def water_and_co2():
    return [ase.build.molecule("H2O"), ase.build.molecule("CO2"), ase.build.molecule("CH3CH2OH")]


def test_from_atoms_shapes_and_units():
    mols = water_and_co2()
    s = System.from_atoms(mols, n_replicas=3)
    n = sum(len(m) for m in mols)
    assert s.positions.shape == (3, n, 3)
    assert s.cells.shape == (3, 3, 3, 3)
    assert s.pbc.shape == (3, 3)
    assert s.n_atoms.tolist() == [3, 3, 9]
    assert s.molecule_index.tolist() == [0] * 3 + [1] * 3 + [2] * 9
    # Bohr inside
    np.testing.assert_allclose(
        s.positions[1, :3].numpy() * units.factor("Bohr", "Angstrom"), mols[0].positions, rtol=1e-12
    )
    np.testing.assert_allclose(s.masses[:3].numpy() * units.factor("me", "amu"), mols[0].get_masses(), rtol=1e-12)


def test_length_unit_and_file(tmp_path):
    m = ase.build.molecule("H2O")
    m_bohr = m.copy()
    m_bohr.positions *= units.factor("Angstrom", "Bohr")
    a = System.from_atoms(m)
    b = System.from_atoms(m_bohr, length_unit="Bohr")
    torch.testing.assert_close(a.positions, b.positions, rtol=1e-12, atol=1e-12)
    f = tmp_path / "w.xyz"
    ase.io.write(f, [m, m])
    c = System.from_file(f, n_molecules=2)
    assert c.n_molecules == 4
    with pytest.raises(FileNotFoundError, match="does not exist"):
        System.from_file(tmp_path / "missing.xyz")


def test_periodic_zero_cell_rejected():
    m = ase.build.molecule("H2O")
    m.pbc = True
    with pytest.raises(SystemSetupError, match="zero volume"):
        System.from_atoms(m)


def test_kinetic_energy_temperature_match_ase():
    mols = water_and_co2()
    s = System.from_atoms(mols, n_replicas=2)
    MaxwellBoltzmann(300.0, remove_translation=False)(s, torch.Generator().manual_seed(3))
    atoms = s.to_atoms(replica=1)
    for k, a in enumerate(atoms):
        ke_ev = a.get_kinetic_energy()
        assert abs(float(s.kinetic_energy()[1, k]) * units.factor("Hartree", "eV") - ke_ev) < 1e-10
        # ASE temperature uses 3N dof (no constraints)
        assert abs(float(s.temperature()[1, k]) - a.get_temperature()) < 1e-5 * 300  # ASE: CODATA 2014 k_B
    # exactly rescaled to the target per molecule and replica
    torch.testing.assert_close(s.temperature(), torch.full((2, 3), 300.0, dtype=torch.float64))


@pytest.mark.parametrize("init", [MaxwellBoltzmann, Uniform])
def test_com_removal_and_dof(init):
    mols = water_and_co2()
    s = System.from_atoms(mols, n_replicas=2)
    init(250.0, remove_translation=True, remove_rotation=True)(s, torch.Generator().manual_seed(1))
    # CO2 is linear: 9 - 3 - 2; water 9 - 6; ethanol 27 - 6
    assert s.dof.tolist() == [3.0, 4.0, 21.0]
    p_com = s.sum_molecules(s.momenta)
    assert float(p_com.abs().max()) < 1e-10
    r = s.positions - s.expand_molecules(s.center_of_mass())
    L = s.sum_molecules(torch.cross(r, s.momenta, dim=-1))
    assert float(L.abs().max()) < 1e-8
    torch.testing.assert_close(s.temperature(), torch.full((2, 3), 250.0, dtype=torch.float64))


def test_maxwell_boltzmann_distribution():
    # many atoms, no rescaling: <p²/m> per component = kT
    mols = [ase.Atoms("Ar")] * 2000
    s = System.from_atoms(mols)
    MaxwellBoltzmann(400.0, remove_translation=False, rescale=False)(s, torch.Generator().manual_seed(0))
    T = float(s.temperature().mean())
    assert abs(T - 400.0) / 400.0 < 0.03


def test_pressure_ideal_gas():
    # no forces: P = N kT / V
    a = ase.Atoms("Ar64", positions=np.random.default_rng(0).uniform(0, 20, (64, 3)), cell=[20, 20, 20], pbc=True)
    s = System.from_atoms(a)
    MaxwellBoltzmann(300.0, remove_translation=False)(s, torch.Generator().manual_seed(0))
    V = 20.0**3 * units.factor("Angstrom^3", "Bohr^3")
    expected = 64 * units.KB_HARTREE_PER_K * 300.0 / V
    assert abs(float(s.pressure()[0, 0]) - expected) / expected < 1e-10
    s.stress = torch.eye(3, dtype=torch.float64).expand(1, 1, 3, 3) * 1e-6  # tension
    assert abs(float(s.pressure()[0, 0]) - (expected - 1e-6)) < 1e-14
    assert torch.isnan(System.from_atoms(ase.build.molecule("H2O")).pressure()).all()


def test_state_dict_roundtrip_and_to():
    s = System.from_atoms(water_and_co2(), n_replicas=2)
    MaxwellBoltzmann(300.0)(s, torch.Generator().manual_seed(0))
    t = System.from_state_dict(s.state_dict())
    torch.testing.assert_close(t.momenta, s.momenta, rtol=0, atol=0)
    assert t.dof.tolist() == s.dof.tolist()
    s.to(dtype=torch.float32)
    assert s.positions.dtype == torch.float32 and s.masses.dtype == torch.float32
    assert s.temperature().dtype == torch.float32


def test_to_atoms_centroid_and_roundtrip():
    m = ase.build.molecule("CH3CH2OH")
    s = System.from_atoms(m, n_replicas=4)
    s.positions[1] += 0.1
    s.positions[3] -= 0.1
    a = s.to_atoms()[0]
    np.testing.assert_allclose(a.positions, m.positions, atol=1e-12)
    MaxwellBoltzmann(300.0)(s, torch.Generator().manual_seed(0))
    b = s.to_atoms(replica=2)[0]
    s2 = System.from_atoms(b)
    torch.testing.assert_close(s2.positions[0], s.positions[2])
    v = b.get_velocities() * units.factor("(eV/amu)^0.5", "Bohr/au_time")
    np.testing.assert_allclose(v, s.velocities[2].numpy(), rtol=1e-10)
