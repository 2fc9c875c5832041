"""Thermostats: canonical kinetic- and potential-energy distributions in a harmonic trap,
Berendsen's mean temperature, a flat conserved quantity for every thermostat, GLE input checks.

Statistics: 64 one-atom molecules × 8 replicas in an isotropic trap (ω ≈ 2π/700 fs),
time step 10 fs. Each molecule's kinetic energy must follow Gamma(3/2, kT): mean within 3 %,
variance within 8 %, Kolmogorov–Smirnov distance below 0.02 (fixed seeds)."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from spkserve import units
from spkmd.initializers import MaxwellBoltzmann
from spkmd.integrators import VelocityVerlet
from spkmd.simulator import Simulator
from spkmd.system import System
from spkmd.testing import argon_cluster, lj_argon_calculator, trap_calculator, trapped_atoms
from spkmd.thermostats import (
    GLE,
    Berendsen,
    Langevin,
    NoseHooverChain,
    StochasticVelocityRescaling,
    ThermostatError,
    read_gle_matrices,
)

pytestmark = pytest.mark.timeout(180)
torch.set_num_threads(1)

T0 = 300.0
TAU_FS = 50.0


def gle_matrix(tau_fs):
    # p coupled to one auxiliary momentum; eigenvalues 0.5 ± 0.87i (1/tau); A + Aᵀ ⪰ 0
    return np.array([[0.0, 1.0], [-1.0, 1.0]]) / (tau_fs * units.factor("fs", "au_time"))


THERMOSTATS = {
    "langevin": lambda T: Langevin(T, time_constant_fs=TAU_FS),
    "svr": lambda T: StochasticVelocityRescaling(T, time_constant_fs=TAU_FS),
    "nhc_massive": lambda T: NoseHooverChain(T, time_constant_fs=TAU_FS, chain_length=4, per_atom=True, n_yoshida=1),
    "gle": lambda T: GLE(T, A=gle_matrix(TAU_FS)),
    "berendsen": lambda T: Berendsen(T, TAU_FS),
    "nhc": lambda T: NoseHooverChain(T, TAU_FS, chain_length=3, n_yoshida=3),
}


@pytest.fixture(scope="module")
def trap(tmp_path_factory):
    return trap_calculator(tmp_path_factory.mktemp("trap"), k_eV_per_A2=0.1)


def run_trap(trap, thermostat, n_steps=1500, skip=300, every=3, start_K=T0):
    s = trapped_atoms(64, n_replicas=8, seed=1)
    MaxwellBoltzmann(start_K, remove_translation=False)(s, torch.Generator().manual_seed(2))
    sim = Simulator(s, VelocityVerlet(10.0), trap, hooks=[thermostat], seed=3)
    sim.simulate(skip)
    ke, pe = [], []
    for _ in range((n_steps - skip) // every):
        sim.simulate(every)
        ke.append(s.kinetic_energy().flatten().clone())
        pe.append(s.energy.flatten().clone())
    kT = T0 * units.KB_HARTREE_PER_K
    return torch.cat(ke).numpy() / kT, torch.cat(pe).numpy() / kT, sim


@pytest.mark.parametrize("name", ["langevin", "svr", "nhc_massive", "gle"])
def test_canonical_energy_distributions(trap, name):
    ke, pe, sim = run_trap(trap, THERMOSTATS[name](T0))
    # Gamma(3/2, 1) in units of kT: mean 1.5, variance 1.5
    assert abs(ke.mean() - 1.5) / 1.5 < 0.03, ke.mean()
    assert abs(ke.var() - 1.5) / 1.5 < 0.08, ke.var()
    D = scipy.stats.kstest(ke, scipy.stats.gamma(1.5).cdf).statistic
    assert D < 0.02, D
    # configurational sampling: harmonic potential energy is Gamma(3/2, kT) too
    assert abs(pe.mean() - 1.5) / 1.5 < 0.04, pe.mean()


def test_svr_and_nhc_per_molecule_mean_temperature(trap):
    # global thermostats on many-atom molecules: mean temperature right
    for th in (StochasticVelocityRescaling(T0, TAU_FS), NoseHooverChain(T0, TAU_FS, chain_length=3)):
        s = System.from_atoms([argon_cluster(seed=k) for k in range(4)], n_replicas=2)
        MaxwellBoltzmann(100.0, remove_translation=False)(s, torch.Generator().manual_seed(0))
        sim = Simulator(s, VelocityVerlet(10.0), trap, hooks=[th], seed=0)
        sim.simulate(200)
        Ts = []
        for _ in range(100):
            sim.simulate(4)
            Ts.append(float(s.temperature().mean()))
        assert abs(np.mean(Ts) - T0) / T0 < 0.05, (type(th).__name__, np.mean(Ts))


def test_berendsen_reaches_target_mean(trap):
    ke, pe, sim = run_trap(trap, Berendsen(T0, time_constant_fs=TAU_FS), n_steps=900, skip=300, start_K=50.0)
    T = float(sim.system.temperature().mean())
    assert abs(ke.mean() - 1.5) / 1.5 < 0.03, ke.mean()
    assert abs(T - T0) / T0 < 0.05


@pytest.fixture(scope="module")
def lj(tmp_path_factory):
    return lj_argon_calculator(tmp_path_factory.mktemp("lj"), cutoff_angstrom=12.0)


@pytest.mark.parametrize("name", ["berendsen", "langevin", "svr", "nhc", "nhc_massive", "gle"])
def test_conserved_quantity_flat(lj, name):
    th = THERMOSTATS[name](60.0)
    if name == "nhc_massive":  # finer chain integration than in the statistics test
        th = NoseHooverChain(60.0, TAU_FS, chain_length=4, per_atom=True, n_yoshida=3, n_steps=2)
    s = System.from_atoms([argon_cluster(seed=0), argon_cluster(seed=1)], n_replicas=2)
    MaxwellBoltzmann(20.0, remove_translation=False)(s, torch.Generator().manual_seed(0))
    sim = Simulator(s, VelocityVerlet(5.0), lj, hooks=[th], seed=1)
    sim.simulate(0)
    e0 = sim.conserved_energy().clone()
    dev, bath = 0.0, 0.0
    for _ in range(40):
        sim.simulate(10)
        dev = max(dev, float((sim.conserved_energy() - e0).abs().max()))
        bath = max(bath, float(th.bath_energy().abs().max()))
    to_eV = units.factor("Hartree", "eV")
    # the bath exchanged a lot of energy, the conserved quantity moved only by the Verlet error
    assert bath * to_eV > 0.01, bath * to_eV
    assert dev * to_eV < 3e-4, dev * to_eV
    assert dev < 0.02 * bath
    if name.startswith("nhc"):
        # the Nosé–Hoover extended energy (zero at the start) gives an independent conserved quantity
        h = s.kinetic_energy() + s.energy + th.extended_energy(s)
        assert float((h - e0).abs().max()) * to_eV < 3e-4


def test_gle_file_and_checks(tmp_path):
    A = gle_matrix(TAU_FS) * units.factor("1/au_time", "1/fs")
    f = tmp_path / "gle.a"
    f.write_text("# A MATRIX: (femtoseconds^-1)\n" + "\n".join(" ".join(f"{x:.12e}" for x in row) for row in A) + "\n")
    A_read, C = read_gle_matrices(f)
    np.testing.assert_allclose(A_read, gle_matrix(TAU_FS), rtol=1e-10)
    assert C is None
    GLE(T0, A_file=f)
    # D given instead of C: canonical D = kT (A + Aᵀ) must give back C = kT·1
    kT = T0 * units.KB_HARTREE_PER_K
    D = kT * (gle_matrix(TAU_FS) + gle_matrix(TAU_FS).T)
    fd = tmp_path / "gle_d.a"
    fd.write_text(f.read_text() + "# D MATRIX: (atomic units)\n" + "\n".join(" ".join(f"{x:.15e}" for x in row) for row in D) + "\n")
    _, C_from_D = read_gle_matrices(fd)
    np.testing.assert_allclose(C_from_D, kT * np.eye(2), rtol=1e-8, atol=1e-12 * kT)
    bad = tmp_path / "bad.a"
    bad.write_text("# A MATRIX: (femtoseconds^-1)\n-1 0\n0 1\n")
    with pytest.raises(ThermostatError, match="positive real parts"):
        GLE(T0, A_file=bad)
    ragged = tmp_path / "ragged.a"
    ragged.write_text("1 0\n0\n")
    with pytest.raises(ThermostatError, match="not square"):
        GLE(T0, A_file=ragged)
    with pytest.raises(ThermostatError, match="positive-definite"):
        GLE(T0, A=gle_matrix(TAU_FS), C=np.array([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(FileNotFoundError):
        GLE(T0, A_file=tmp_path / "nope.a")
    with pytest.raises(ThermostatError, match="temperature_K"):
        Langevin(-5.0)


@pytest.mark.parametrize("name", ["langevin", "svr"])
def test_mean_temperature_after_com_removal(trap, name):
    """Start without COM translation/rotation (3N-6 dof). A local thermostat (Langevin) brings
    them back, so it counts 3N; a global one (SVR) keeps them at zero and 3N-6 stays right."""
    s = System.from_atoms([argon_cluster(seed=k) for k in range(4)], n_replicas=2)
    MaxwellBoltzmann(T0, remove_translation=True, remove_rotation=True)(s, torch.Generator().manual_seed(0))
    th = THERMOSTATS[name](T0)
    sim = Simulator(s, VelocityVerlet(10.0), trap, hooks=[th], seed=0)
    sim.simulate(100)
    assert s.dof.tolist() == ([39.0] * 4 if name == "langevin" else [33.0] * 4)
    Ts = []
    for _ in range(100):
        sim.simulate(4)
        Ts.append(float(s.temperature().mean()))
    assert abs(np.mean(Ts) - T0) / T0 < 0.05, np.mean(Ts)


def test_shipped_gle_matrix_loads_and_prose_comments_are_not_headers(tmp_path):
    """configs/md/gle/memory_100fs.dat: its third line is prose that mentions "C matrix" in
    parentheses; it was read as a C-section header with unit "no C matrix given" and the file failed."""
    from spkmd.factory import config_root

    A, C = read_gle_matrices(config_root() / "gle" / "memory_100fs.dat")
    fs = units.factor("fs", "au_time")
    np.testing.assert_allclose(A, np.array([[0.0, 1.0], [-1.0, 1.0]]) / (100.0 * fs), rtol=1e-12)
    assert C is None
    f = tmp_path / "prose.dat"
    f.write_text("# a D matrix (or C matrix) may follow; this one has none\n# A MATRIX: (femtoseconds^-1)\n"
                 "0 0.01\n-0.01 0.01\n# C MATRIX: (K)\n300 0\n0 300\n")
    A2, C2 = read_gle_matrices(f)
    np.testing.assert_allclose(A2, A, rtol=1e-12)
    np.testing.assert_allclose(C2, 300.0 * units.KB_HARTREE_PER_K * np.eye(2), rtol=1e-12)
    f.write_text("# A MATRIX: (parsecs^-1)\n0 1\n-1 1\n")
    with pytest.raises(ThermostatError, match="unknown unit 'parsecs"):
        read_gle_matrices(f)
