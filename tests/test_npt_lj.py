"""NPT on a Lennard-Jones fluid (reference LJ bundle, truncated and shifted at 2.5 σ).

* Mean density and pressure at T* = 2.0, P* from the Johnson–Zollweg–Gubbins equation of
  state (Mol. Phys. 78, 591 (1993), MBWR fit, Table 10 coefficients) at ρ* = 0.8, corrected
  for the truncation by the standard tail term (16/3)πρ*²[(2/3)r_c*⁻⁹ − r_c*⁻³]:
  the NPT run must give ⟨ρ*⟩ = 0.8 within 4 block standard errors + 1 % (EOS fit accuracy,
  truncation effects beyond the tail term) and ⟨P_inst⟩ = P_ext within 4 errors + 2 %.
  A dense state point (κ_T small) so a short run suffices (100 atoms — not commensurate with FCC —
  melted at constant volume, then 150 + 450 NPT steps of 15 fs).
* The pressure estimator equals −dE/dV at fixed scaled coordinates (central finite difference),
  also the stress tensor against strain derivatives and the ring-polymer centroid-virial
  pressure against −d⟨E⟩/dV at fixed centroid displacements.
* Deterministic NPH (MTK without particle thermostat) conserves H + barostat energy.
* Bad input: a barostat on a non-periodic system.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ase.lattice.cubic import FaceCenteredCubic

from spkserve import units
from spkserve.potentials import reference_bundle
from spkmd.barostats import BarostatError, MTKAnisotropic, MTKIsotropic, PILEBarostat, StochasticCellRescaling
from spkmd.calculators import BundleCalculator
from spkmd.initializers import MaxwellBoltzmann
from spkmd.integrators import VelocityVerlet
from spkmd.npt import NPTVelocityVerlet, RingPolymerNPT
from spkmd.rpmd import PILELocal
from spkmd.rpmd.estimators import pressure_centroid_virial, pressure_instantaneous, pressure_tensor_instantaneous
from spkmd.simulator import Simulator
from spkmd.system import System
from spkmd.thermostats import Langevin

from rpmd_helpers import block_average

SIGMA_A, EPS_K, MASS_AMU = 3.405, 119.8, 39.948
EPS_EV = EPS_K * units.KB_EV_PER_K
RC = 2.5  # cutoff in σ

# Johnson, Zollweg, Gubbins, Mol. Phys. 78, 591 (1993), Table 10 (x1..x32), γ = 3
JZG_X = [
    0.8623085097507421, 2.976218765822098, -8.402230115796038, 0.1054136629203555, -0.8564583828174598,
    1.582759470107601, 0.7639421948305453, 1.753173414312048, 2.798291772190376e03, -4.8394220260857657e-02,
    0.9963265197721935, -3.698000291272493e01, 2.084012299434647e01, 8.305402124717285e01, -9.574799715203068e02,
    -1.477746229234994e02, 6.398607852471505e01, 1.603993673294834e01, 6.805916615864377e01, -2.791293578795945e03,
    -6.245128304568454, -8.116836104958410e03, 1.488735559561229e01, -1.059346754655084e04, -1.131607632802822e02,
    -8.867771540418822e03, -3.986982844450543e01, -4.689270299917261e03, 2.593535277438717e02, -2.694523589434903e03,
    -7.218487631550215e02, 1.721802063863269e02,
]


def jzg_pressure(T: float, rho: float) -> float:
    """Reduced pressure of the full LJ fluid from the JZG MBWR equation of state."""
    x = [None] + JZG_X
    a = [x[1] * T + x[2] * math.sqrt(T) + x[3] + x[4] / T + x[5] / T**2, x[6] * T + x[7] + x[8] / T + x[9] / T**2,
         x[10] * T + x[11] + x[12] / T, x[13], x[14] / T + x[15] / T**2, x[16] / T, x[17] / T + x[18] / T**2,
         x[19] / T**2]
    b = [x[20] / T**2 + x[21] / T**3, x[22] / T**2 + x[23] / T**4, x[24] / T**2 + x[25] / T**3,
         x[26] / T**2 + x[27] / T**4, x[28] / T**2 + x[29] / T**3, x[30] / T**2 + x[31] / T**3 + x[32] / T**4]
    F = math.exp(-3.0 * rho**2)
    return rho * T + sum(a[i] * rho ** (i + 2) for i in range(8)) + F * sum(b[i] * rho ** (2 * i + 3) for i in range(6))


def tail_pressure(rho: float, rc: float = RC) -> float:
    return 16.0 / 3.0 * math.pi * rho**2 * (2.0 / 3.0 * rc**-9 - rc**-3)


def test_jzg_implementation_against_kolafa_nezbeda():
    """Cross-check of the coefficients: the Kolafa–Nezbeda EOS (Fluid Phase Equilib. 100, 1 (1994))
    gives P*(T*=1.3, ρ*=0.2) = 0.121479; two independent fits agree to 1 % away from the critical point."""
    assert jzg_pressure(1.3, 0.2) == pytest.approx(0.121479, rel=0.01)


P_RED_TO_BAR = EPS_EV / SIGMA_A**3 * units.factor("eV/Angstrom^3", "bar")
RED_PRESS_AU = EPS_EV / SIGMA_A**3 * units.factor("eV/Angstrom^3", "Hartree/Bohr^3")


@pytest.fixture(scope="module")
def lj_bundle(tmp_path_factory):
    return reference_bundle("lj", tmp_path_factory.mktemp("lj") / "lj.bundle", sigma=SIGMA_A, epsilon=EPS_EV,
                            cutoff=RC * SIGMA_A)


def _boxes(rho, n_boxes, size=3, seed=0, jitter=0.05, remove=0):
    """FCC boxes at density ρ*; ``remove`` random atoms are taken out afterwards (the cell is shrunk
    to keep ρ*), so that the small periodic box is not commensurate with the FCC crystal."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boxes):
        n = 4 * size**3
        a = (4.0 / rho * (n - remove) / n) ** (1.0 / 3.0) * SIGMA_A
        at = FaceCenteredCubic("Ar", size=(size,) * 3, latticeconstant=a, pbc=True)
        if remove:
            del at[sorted(rng.choice(n, remove, replace=False).tolist())]
        at.positions += rng.normal(0.0, jitter, at.positions.shape)
        out.append(at)
    return out


def _melt(system, calc, T, n_steps=100):
    """Disorder the start lattice at constant volume (3 T, then T) before NPT."""
    Simulator(system, VelocityVerlet(10.0), calc, hooks=[Langevin(3 * T, 30.0)], seed=3).simulate(n_steps)
    Simulator(system, VelocityVerlet(10.0), calc, hooks=[Langevin(T, 30.0)], seed=4).simulate(n_steps // 3)


def _density(system):
    V = system.volume()[0] * units.factor("Bohr^3", "Angstrom^3")
    return (system.n_atoms.to(V.dtype) / V * SIGMA_A**3).numpy()


@pytest.mark.timeout(300)
def test_npt_lj_density_and_pressure_match_jzg_eos(lj_bundle):
    T_red, rho0 = 2.0, 0.8
    T = T_red * EPS_K
    p_ext_red = jzg_pressure(T_red, rho0) - tail_pressure(rho0)  # truncated-shifted fluid
    system = System.from_atoms(_boxes(rho0, 1, remove=8))
    MaxwellBoltzmann(T, remove_translation=False)(system, torch.Generator().manual_seed(1))
    baro = MTKIsotropic(p_ext_red * P_RED_TO_BAR, T, time_constant_fs=600.0)
    calc = BundleCalculator(lj_bundle, stress=True)
    _melt(system, calc, T)
    sim = Simulator(system, NPTVelocityVerlet(15.0, baro), calc, hooks=[Langevin(T, 150.0), baro], seed=2)
    sim.simulate(150)
    rho, press = [], []
    for _ in range(450):
        sim.simulate(1)
        rho.append(_density(system))
        press.append((pressure_instantaneous(system) / RED_PRESS_AU).numpy())
    r, r_err = block_average(np.mean(rho, 1), 10)
    p, p_err = block_average(np.mean(press, 1), 10)
    assert abs(r - rho0) < 4 * r_err + 0.01 * rho0, f"<ρ*> = {r:.4f} ± {r_err:.4f}, JZG EOS: {rho0}"
    assert abs(p - p_ext_red) < 4 * p_err + 0.02 * p_ext_red, f"<P*> = {p:.3f} ± {p_err:.3f}, target {p_ext_red:.3f}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["pile", "scr", "anisotropic"])
def test_other_barostats_reach_eos_density(lj_bundle, kind):
    """Shorter runs (one box of 100 atoms melted at constant volume, then 150 + 150 NPT steps
    of 15 fs): the mean density within 3 % of the EOS value (it fluctuates by about 2 % at this size)."""
    T_red, rho0 = 2.0, 0.8
    T = T_red * EPS_K
    p_bar = (jzg_pressure(T_red, rho0) - tail_pressure(rho0)) * P_RED_TO_BAR
    baro = {
        "pile": lambda: PILEBarostat(p_bar, T, time_constant_fs=1500.0),
        "scr": lambda: StochasticCellRescaling(p_bar, T, time_constant_fs=500.0, compressibility_per_bar=1.7e-4),
        "anisotropic": lambda: MTKAnisotropic(p_bar, T, time_constant_fs=600.0),
    }[kind]()
    system = System.from_atoms(_boxes(rho0, 1, seed=3, remove=8))
    MaxwellBoltzmann(T, remove_translation=False)(system, torch.Generator().manual_seed(1))
    calc = BundleCalculator(lj_bundle, stress=True)
    # melt the start lattice first (at fixed volume): a fast first-order barostat would otherwise
    # compress the FCC lattice (negative pressure at this density) into a metastable crystal
    _melt(system, calc, T)
    sim = Simulator(system, NPTVelocityVerlet(15.0, baro), calc, hooks=[Langevin(T, 150.0), baro], seed=4)
    sim.simulate(150)
    rho = []
    for _ in range(15):
        sim.simulate(10)
        rho.append(_density(system)[0])
    assert abs(np.mean(rho) - rho0) < 0.03 * rho0, f"{kind}: <ρ*> = {np.mean(rho):.4f}, EOS {rho0}"
    if kind == "anisotropic":
        cell = system.cells[0, 0]
        assert torch.isfinite(cell).all()
        assert float(torch.linalg.det(cell)) > 0


def _lj_system(lj_bundle, n_beads=1, seed=0):
    system = System.from_atoms(_boxes(0.8, 1, size=2, seed=seed, jitter=0.15), n_replicas=n_beads)
    if n_beads > 1:
        g = torch.Generator().manual_seed(seed)
        system.positions += 0.05 * torch.randn(system.positions.shape, generator=g, dtype=system.dtype)
    calc = BundleCalculator(lj_bundle, stress=True, skin_angstrom=0.0)
    calc.calculate(system)
    return system, calc


def _energy_at_strain(system, calc, strain, centroid_only=False):
    s = System.from_state_dict(system.state_dict())
    F = torch.eye(3, dtype=s.dtype) + strain
    if centroid_only:
        c = s.positions.mean(0, keepdim=True)
        s.positions = (s.positions - c) + c @ F.T
    else:
        s.positions = s.positions @ F.T
    s.cells = s.cells @ F.T
    calc.calculate(s)
    return s.energy.mean(0).sum().item(), s


def test_pressure_estimator_equals_volume_derivative(lj_bundle):
    """-dE/dV at fixed scaled coordinates (isotropic strain) equals the virial part of the pressure,
    and the stress tensor equals (1/V) dE/dε for each strain component (relative 1e-6)."""
    system, calc = _lj_system(lj_bundle)
    system.momenta.zero_()
    V = float(system.volume()[0, 0])
    h = 1e-5
    ep, _ = _energy_at_strain(system, calc, h / 3 * torch.eye(3, dtype=system.dtype))
    em, _ = _energy_at_strain(system, calc, -h / 3 * torch.eye(3, dtype=system.dtype))
    dV = V * ((1 + h / 3) ** 3 - (1 - h / 3) ** 3)
    p_fd = -(ep - em) / dV
    p_est = float(pressure_instantaneous(system)[0])  # momenta zero: only the virial part
    assert p_est == pytest.approx(p_fd, rel=1e-6)
    stress = system.stress[0, 0]
    for a, b in [(0, 0), (1, 2), (0, 1)]:
        e = torch.zeros(3, 3, dtype=system.dtype)
        e[a, b] = e[b, a] = h / 2 if a != b else h
        ep, _ = _energy_at_strain(system, calc, e)
        em, _ = _energy_at_strain(system, calc, -e)
        fd = (ep - em) / (2 * h) / V  # symmetric strain: dE = V σ_ab h also off the diagonal
        assert float(stress[a, b]) == pytest.approx(fd, rel=1e-5, abs=1e-12)


def test_ring_polymer_pressure_estimator_equals_centroid_volume_derivative(lj_bundle):
    """Centroid-virial pressure: −d⟨E⟩_beads/dV scaling the centroid only (fixed displacements)
    equals the virial part of :func:`pressure_tensor_instantaneous`."""
    system, calc = _lj_system(lj_bundle, n_beads=4, seed=2)
    system.momenta.zero_()
    V = float(system.volume()[0, 0])
    h = 1e-5
    I = torch.eye(3, dtype=system.dtype)
    ep, _ = _energy_at_strain(system, calc, h / 3 * I, centroid_only=True)
    em, _ = _energy_at_strain(system, calc, -h / 3 * I, centroid_only=True)
    dV = V * ((1 + h / 3) ** 3 - (1 - h / 3) ** 3)
    p_fd = -(ep - em) / dV
    p_est = float(torch.diagonal(pressure_tensor_instantaneous(system)[0]).sum() / 3)
    assert p_est == pytest.approx(p_fd, rel=1e-6)
    # and the thermodynamic centroid-virial estimator = instantaneous one with 3N k_BT for the centroid KE
    T = 240.0
    kin = 3 * system.n_atoms_total * T * units.KB_HARTREE_PER_K / (3 * V)
    assert float(pressure_centroid_virial(system, T)[0]) == pytest.approx(p_est + kin, rel=1e-9)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n_beads,aniso", [(1, False), (1, True), (4, False)])
def test_nph_conserves_extended_energy(lj_bundle, n_beads, aniso):
    """MTK without particle thermostat: Σ_beads(KE + PE + springs) + barostat energy is conserved
    (drift below 2 % of the kinetic-energy fluctuation over 100 steps of 4 fs, 32 atoms)."""
    T = 240.0
    system = System.from_atoms(_boxes(0.8, 1, size=2, seed=5), n_replicas=n_beads)
    MaxwellBoltzmann(T * n_beads, remove_translation=False)(system, torch.Generator().manual_seed(1))
    p_bar = 2000.0
    baro = MTKAnisotropic(p_bar, T, 300.0, 100.0) if aniso else MTKIsotropic(p_bar, T, 300.0, 100.0)
    integ = NPTVelocityVerlet(4.0, baro) if n_beads == 1 else RingPolymerNPT(4.0, T, baro)
    sim = Simulator(system, integ, BundleCalculator(lj_bundle, stress=True), hooks=[baro], seed=1)
    cons, ke, vol = [], [], []
    for _ in range(25):
        sim.simulate(4)
        cons.append(float(sim.conserved_energy().sum()))
        ke.append(float(system.kinetic_energy().sum()))
        vol.append(float(system.volume()[0, 0]))
    assert np.std(vol) > 0  # the cell moved
    drift = max(cons) - min(cons)
    assert drift < 0.02 * (max(ke) - min(ke)), f"conserved quantity varies by {drift:.3g}, KE by {max(ke) - min(ke):.3g}"


def test_pile_barostat_ring_polymer_runs_and_accounts(lj_bundle):
    """Ring-polymer NPT with the PILE barostat and PILE-L: the conserved quantity with the bath
    energies stays within 5 % of the KE fluctuation over 60 steps of 4 fs (32 atoms × 4 beads)."""
    T = 240.0
    system = System.from_atoms(_boxes(0.8, 1, size=2, seed=6), n_replicas=4)
    MaxwellBoltzmann(T * 4, remove_translation=False)(system, torch.Generator().manual_seed(1))
    baro = PILEBarostat(2000.0, T, 1000.0, 100.0)
    sim = Simulator(system, RingPolymerNPT(4.0, T, baro), BundleCalculator(lj_bundle, stress=True),
                    hooks=[PILELocal(T, 100.0), baro], seed=1)
    cons, ke = [], []
    for _ in range(20):
        sim.simulate(3)
        cons.append(float(sim.conserved_energy().sum()))
        ke.append(float(system.kinetic_energy().sum()))
    assert max(cons) - min(cons) < 0.05 * (max(ke) - min(ke))


def test_barostat_on_non_periodic_system_is_refused(lj_bundle):
    at = _boxes(0.8, 1, size=2)[0]
    at.pbc = False
    system = System.from_atoms(at)
    baro = MTKIsotropic(1.0, 300.0)
    sim = Simulator(system, NPTVelocityVerlet(1.0, baro), BundleCalculator(lj_bundle), hooks=[baro], seed=0)
    x0 = system.positions.clone()
    with pytest.raises(BarostatError, match="fully periodic"):
        sim.simulate(1)
    assert torch.equal(system.positions, x0)  # nothing moved
    with pytest.raises(BarostatError, match="barostat"):
        NPTVelocityVerlet(1.0, Langevin(300.0))
