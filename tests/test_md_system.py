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
    """The whole distribution, not only its mean: without rescaling every Cartesian momentum
    component divided by √(m k_B T) is standard normal (Kolmogorov–Smirnov, for light and heavy
    atoms separately: a mass-blind width fails), and the kinetic energy of each 4-atom molecule
    follows k_B T/2 · χ²(12). A uniform or mean-matched wrong shape fails the KS tests."""
    from scipy import stats

    T_K = 400.0
    mols = [ase.Atoms("ArH2O", positions=np.eye(4, 3))] * 300  # 4 atoms, masses 40 / 1 / 1 / 16
    s = System.from_atoms(mols, n_replicas=2)
    MaxwellBoltzmann(T_K, remove_translation=False, rescale=False)(s, torch.Generator().manual_seed(0))
    kT = T_K * units.KB_HARTREE_PER_K
    x = (s.momenta / torch.sqrt(s.masses3 * kT)).numpy()  # [R, N, 3]
    z = s.atomic_numbers.numpy()
    for element in (18, 1, 8):
        assert stats.kstest(x[:, z == element].ravel(), "norm").pvalue > 1e-3, element
    ke = (s.kinetic_energy() / (0.5 * kT)).numpy().ravel()  # [R·M] ~ χ²(12)
    assert stats.kstest(ke, stats.chi2(df=12).cdf).pvalue > 1e-3
    # a wrong shape with the right mean: uniform momenta rescaled to T fail the same test
    Uniform(T_K, remove_translation=False, rescale=True)(s, torch.Generator().manual_seed(0))
    xu = (s.momenta / torch.sqrt(s.masses3 * kT)).numpy().ravel()
    assert stats.kstest(xu, "norm").pvalue < 1e-6


@pytest.mark.parametrize("com_thermalised", [False, True])
def test_rescaled_start_is_at_the_target_in_the_counted_dof(com_thermalised):
    """With COM translation and rotation removed the temperature counts 3N - 6 dof; under a per-atom
    thermostat (com_thermalised) the COM modes are kept and 3N are counted. Either way the start is
    exactly at the target in the dof that the run reports (it was 300·21/27 = 233 K for ethanol)."""
    s = System.from_atoms([ase.build.molecule("CH3CH2OH")] * 3, n_replicas=2)
    MaxwellBoltzmann(300.0, remove_translation=True, remove_rotation=True)(
        s, torch.Generator().manual_seed(2), com_thermalised=com_thermalised)
    assert s.dof.tolist() == [27.0 if com_thermalised else 21.0] * 3
    torch.testing.assert_close(s.temperature(), torch.full((2, 3), 300.0, dtype=torch.float64))
    p_com = s.sum_molecules(s.momenta)
    assert (float(p_com.abs().max()) > 1e-6) == com_thermalised


def test_ring_polymer_start_draws_at_the_bead_temperature():
    s = System.from_atoms([ase.build.molecule("H2O")] * 2, n_replicas=4)
    MaxwellBoltzmann(300.0)(s, torch.Generator().manual_seed(0), temperature_factor=4.0)
    torch.testing.assert_close(s.temperature(), torch.full((4, 2), 1200.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="temperature_factor"):
        MaxwellBoltzmann(300.0)(s, temperature_factor=0.0)


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
