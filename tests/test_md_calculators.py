"""Calculators: units at the border, fast vs generic provider path, agreement with ASE's
Lennard-Jones, virial pressure vs finite differences, ensembles, errors before the run."""

import ase
import ase.build
import numpy as np
import pytest
import torch
from ase.calculators.lj import LennardJones as AseLJ

from spkserve import units
from spkserve.potentials import reference_bundle
from spkserve.runtime import ModelRunner
from spkmd.calculators import (
    BundleCalculator,
    CalculatorError,
    EnsembleCalculator,
    ProviderCalculator,
    UncertaintyExceeded,
    load_provider,
)
from spkmd.initializers import MaxwellBoltzmann
from spkmd.integrators import VelocityVerlet
from spkmd.simulator import Simulator
from spkmd.system import System
from spkmd.testing import argon_cluster

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)

EV_A = units.factor("Hartree/Bohr", "eV/Angstrom")
EV = units.factor("Hartree", "eV")


@pytest.fixture(scope="module")
def lj_path(tmp_path_factory):
    return reference_bundle("lj", tmp_path_factory.mktemp("b") / "lj.bundle", sigma=3.4, epsilon=0.0104, cutoff=7.0)


def argon_box(seed=0):
    rng = np.random.default_rng(seed)
    a = ase.build.bulk("Ar", "fcc", a=5.3, cubic=True).repeat(2)
    a.positions += rng.normal(scale=0.1, size=a.positions.shape)
    return a


class ComputeOnly:
    """A provider without the tensor fast path (like remote providers)."""

    def __init__(self, runner):
        self.runner = runner
        self.available_properties = runner.available_properties

    def compute(self, structures, properties=("energy", "forces")):
        return self.runner.compute(structures, properties)

    def close(self):
        pass


def test_agrees_with_ase_lennard_jones_and_generic_path(lj_path):
    mols = [argon_box(0), argon_cluster(seed=1)]
    s = System.from_atoms(mols, n_replicas=2)
    s.positions[1] += 0.05 * torch.randn(s.positions[1].shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fast = BundleCalculator(lj_path, skin_angstrom=0.5)
    fast.calculate(s)
    F, E = s.forces.clone(), s.energy.clone()
    ProviderCalculator(ComputeOnly(ModelRunner(lj_path, skin_angstrom=0.0))).calculate(s)
    torch.testing.assert_close(s.forces, F, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s.energy, E, rtol=1e-12, atol=1e-12)
    for r in range(2):
        for m, atoms in enumerate(s.to_atoms(replica=r)):
            atoms.calc = AseLJ(sigma=3.4, epsilon=0.0104, rc=7.0, smooth=False)
            sl = s.molecule_slice(m)
            np.testing.assert_allclose(F[r, sl].numpy() * EV_A, atoms.get_forces(), atol=1e-8)
            assert abs(float(E[r, m]) * EV - atoms.get_potential_energy()) < 1e-8


def test_virial_pressure_matches_volume_derivative(lj_path):
    a = argon_box(1)
    s = System.from_atoms(a)
    calc = BundleCalculator(lj_path, skin_angstrom=0.0)
    calc.calculate(s)
    assert s.stress is not None and s.stress.shape == (1, 1, 3, 3)
    p_virial = float(s.pressure()[0, 0])  # momenta zero: only the virial
    energies = []
    h = 1e-4
    for f in (1 + h, 1 - h):
        t = System.from_atoms(a)
        t.positions *= f
        t.cells *= f
        calc.calculate(t)
        energies.append(float(t.energy[0, 0]))
    V = float(s.volume()[0, 0])
    dV = V * ((1 + h) ** 3 - (1 - h) ** 3)
    p_fd = -(energies[0] - energies[1]) / dV
    assert abs(p_virial - p_fd) < 1e-4 * abs(p_fd), (p_virial, p_fd)  # FD and cutoff-kink error


def test_ensemble_mean_spread_and_stop(tmp_path):
    p1 = reference_bundle("lj", tmp_path / "a.bundle", sigma=3.4, epsilon=0.0104, cutoff=7.0)
    p2 = reference_bundle("lj", tmp_path / "b.bundle", sigma=3.4, epsilon=0.0124, cutoff=7.0)
    s = System.from_atoms([argon_cluster(seed=0), argon_cluster(seed=1)], n_replicas=2)
    singles = []
    for p in (p1, p2):
        BundleCalculator(p).calculate(s)
        singles.append((s.energy.clone(), s.forces.clone()))
    frames = tmp_path / "uncertain.extxyz"
    ens = EnsembleCalculator([p1, p2], threshold_energy_eV=0.01, on_exceed="stop", uncertain_frames_file=frames)
    with pytest.raises(UncertaintyExceeded, match="uncertain.extxyz"):
        ens.calculate(s)
    torch.testing.assert_close(s.energy, 0.5 * (singles[0][0] + singles[1][0]))
    torch.testing.assert_close(s.forces, 0.5 * (singles[0][1] + singles[1][1]))
    torch.testing.assert_close(s.properties["energy_uncertainty"], 0.5 * (singles[0][0] - singles[1][0]).abs())
    saved = ase.io.read(frames, index=":")
    assert len(saved) == 4 and {(f.info["replica"], f.info["molecule"]) for f in saved} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    # flag mode: the run goes on and the spread is logged as a property
    ens = EnsembleCalculator([p1, p2], threshold_energy_eV=10.0, on_exceed="flag")
    MaxwellBoltzmann(30.0)(s, torch.Generator().manual_seed(0))
    Simulator(s, VelocityVerlet(5.0), ens).simulate(3)
    assert s.properties["forces_uncertainty"].shape == (2, 2) and ens.n_flagged == 0


def test_errors_before_the_run(lj_path, tmp_path):
    calc = BundleCalculator(lj_path)
    close = ase.Atoms("Ar3", positions=[[0, 0, 0], [4, 0, 0], [4.3, 0, 0]])
    with pytest.raises(CalculatorError, match=r"atoms 1 and 2 of molecule 1 .* 0.300 Å apart"):
        calc.check(System.from_atoms([argon_cluster(), close]))
    tiny = ase.Atoms("Ar", positions=[[0, 0, 0]], cell=[3.0, 3.0, 3.0], pbc=True)
    with pytest.raises(CalculatorError, match="cutoff 7.000 Å is larger than 2× the cell width 3.000 Å"):
        calc.check(System.from_atoms(tiny))
    only_ar = reference_bundle("lj", tmp_path / "ar.bundle", species=[18], sigma=3.4, epsilon=0.0104, cutoff=7.0)
    with pytest.raises(CalculatorError, match=r"elements \[1, 8\] are not in the bundle's species \[18\]"):
        BundleCalculator(only_ar).check(System.from_atoms(ase.build.molecule("H2O")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BundleCalculator(tmp_path / "missing.bundle")
    with pytest.raises(CalculatorError, match="smaller than the bundle's cutoff"):
        BundleCalculator(lj_path, cutoff_angstrom=5.0)
    with pytest.raises(ValueError, match="module:attribute"):
        load_provider("nonsense")
    with pytest.raises(ValueError, match="cannot import provider"):
        load_provider("spkserve.nowhere:Thing")
    runner = load_provider("spkserve.runtime:ModelRunner", bundle=str(lj_path))
    assert isinstance(runner, ModelRunner)


def test_float32_simulation(lj_path):
    s64 = System.from_atoms([argon_cluster(seed=0)])
    MaxwellBoltzmann(30.0)(s64, torch.Generator().manual_seed(0))
    s = System.from_state_dict(s64.state_dict()).to(dtype=torch.float32)
    sim = Simulator(s, VelocityVerlet(5.0), BundleCalculator(lj_path, dtype="float32"))
    sim.simulate(5)
    assert s.forces.dtype == torch.float32 and s.positions.dtype == torch.float32
    Simulator(s64, VelocityVerlet(5.0), BundleCalculator(lj_path)).simulate(5)
    torch.testing.assert_close(s.positions.double(), s64.positions, rtol=0, atol=1e-4)
