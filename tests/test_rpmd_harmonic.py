"""Quantum harmonic oscillator with the reference harmonic-trap bundle.

64 independent hydrogen-mass atoms (1 amu) in an isotropic trap, T = 100 K, k chosen so
that βħω = 3. The centroid-virial kinetic energy per degree of freedom must

* equal the exact discretised value for P beads, (k_BT/2) Σ_k ω²/(ω_k² + ω²), within 4 block
  standard errors (20 blocks) — for P = 4 and P = 32;
* at P = 32 agree with the exact quantum value ħω/4·coth(βħω/2) within 4 standard errors
  plus the remaining discretisation error (0.1 % at P = 32), while P = 4 is visibly off.

Also: estimator hook output, NVE conservation of the ring-polymer Hamiltonian (exact and
Cayley), stability-limit and bead-parity errors before the run starts.
"""

from __future__ import annotations

import math

import ase
import numpy as np
import pytest
import torch

from spkserve import units
from spkserve.potentials import reference_bundle
from spkmd.calculators import BundleCalculator
from spkmd.rpmd import PILELocal, RingPolymerError, RingPolymerEstimators, RingPolymerIntegrator
from spkmd.rpmd.normal_modes import normal_mode_frequencies, stability_limit_fs
from spkmd.simulator import Simulator
from spkmd.system import System

from rpmd_helpers import block_average

T_K = 100.0
BETA_HBAR_OMEGA = 3.0
MASS_AMU = 1.0
KT_EV = units.KB_EV_PER_K * T_K
OMEGA_PER_FS = BETA_HBAR_OMEGA * KT_EV / units.HBAR_EV_FS
K_EV_A2 = MASS_AMU * OMEGA_PER_FS**2 * units.factor("amu*Angstrom^2/fs^2", "eV")
N_MOL = 64


def exact_kinetic_per_dof_eV() -> float:
    hw = BETA_HBAR_OMEGA * KT_EV
    return hw / 4.0 / math.tanh(BETA_HBAR_OMEGA / 2.0)


def discretised_kinetic_per_dof_eV(n_beads: int) -> float:
    """Centroid-virial = ⟨V⟩ for a harmonic potential; exact for P beads."""
    w = OMEGA_PER_FS
    wk = normal_mode_frequencies(n_beads, T_K).numpy() * units.factor("1/au_time", "1/fs")
    return 0.5 * KT_EV * float(np.sum(w**2 / (wk**2 + w**2)))


@pytest.fixture(scope="module")
def trap(tmp_path_factory):
    return reference_bundle("harmonic_trap", tmp_path_factory.mktemp("trap") / "trap.bundle", k=K_EV_A2)


def _system(n_beads, seed=0):
    atoms = [ase.Atoms("H", positions=[[0.0, 0.0, 0.0]], masses=[MASS_AMU]) for _ in range(N_MOL)]
    s = System.from_atoms(atoms, n_replicas=n_beads)
    g = torch.Generator().manual_seed(seed)
    kT_P = n_beads * T_K * units.KB_HARTREE_PER_K
    s.momenta = torch.randn(s.momenta.shape, generator=g, dtype=s.dtype) * torch.sqrt(kT_P * s.masses3)
    return s


def _run_kcv(trap, n_beads, n_equil, n_steps, seed):
    system = _system(n_beads, seed)
    dt_fs = 0.1 / OMEGA_PER_FS
    est = RingPolymerEstimators(T_K)
    sim = Simulator(system, RingPolymerIntegrator(dt_fs, T_K), BundleCalculator(trap),
                    hooks=[PILELocal(T_K, time_constant_fs=1.0 / OMEGA_PER_FS), est], seed=seed)
    sim.simulate(n_equil)
    to_eV = units.factor("Hartree", "eV")
    kcv, kprim = [], []
    for _ in range(n_steps):
        sim.simulate(1)
        kcv.append(float(system.properties["kinetic_energy_centroid_virial"].mean()) * to_eV / 3.0)
        kprim.append(float(system.properties["kinetic_energy_primitive"].mean()) * to_eV / 3.0)
    return block_average(kcv, 20), block_average(kprim, 20)


@pytest.mark.timeout(600)
def test_centroid_virial_kinetic_energy_converges_to_exact(trap):
    (k4, e4), (p4, pe4) = _run_kcv(trap, 4, 150, 400, seed=1)
    ref4 = discretised_kinetic_per_dof_eV(4)
    assert abs(k4 - ref4) < 4 * e4, f"P=4: K_cv {k4:.6g} ± {e4:.2g} eV, discretised exact {ref4:.6g}"
    assert abs(p4 - ref4) < 4 * pe4, f"P=4: K_prim {p4:.6g} ± {pe4:.2g} eV, discretised exact {ref4:.6g}"
    (k32, e32), _ = _run_kcv(trap, 32, 150, 600, seed=2)
    ref32 = discretised_kinetic_per_dof_eV(32)
    exact = exact_kinetic_per_dof_eV()
    assert abs(ref32 - exact) < 1e-3 * exact  # the stated bead number is converged to 0.1 %
    assert abs(k32 - ref32) < 4 * e32, f"P=32: K_cv {k32:.6g} ± {e32:.2g} eV, discretised exact {ref32:.6g}"
    assert abs(k32 - exact) < 4 * e32 + 1e-3 * exact, f"P=32: K_cv {k32:.6g} ± {e32:.2g} eV, exact {exact:.6g}"
    # P=4 is measurably away from the exact value: the convergence is real
    assert abs(k4 - exact) > 4 * e4 and abs(k4 - exact) > abs(k32 - exact)
    classical = 0.5 * KT_EV
    assert k32 > 1.5 * classical  # strong quantum effect at βħω = 3


@pytest.mark.parametrize("scheme", ["exact", "cayley"])
def test_nve_ring_polymer_conserves_energy(trap, scheme):
    """Without thermostat Σ_beads (KE + V) + springs is conserved (relative fluctuation < 1e-3)."""
    system = _system(8, seed=3)
    sim = Simulator(system, RingPolymerIntegrator(0.05 / OMEGA_PER_FS, T_K, scheme=scheme), BundleCalculator(trap), seed=0)
    e = []
    for _ in range(40):
        sim.simulate(5)
        e.append(float(sim.conserved_energy().sum()))
    ke = float(system.kinetic_energy().sum())
    assert (max(e) - min(e)) < 1e-3 * ke, f"{scheme}: energy varies by {max(e) - min(e):.3g} (KE {ke:.3g})"


def test_time_step_above_stability_limit_is_refused_before_the_run(trap):
    limit = stability_limit_fs(32, T_K, "exact")
    assert math.isfinite(limit) and stability_limit_fs(32, T_K, "cayley") == math.inf
    system = _system(32)
    x0 = system.positions.clone()
    sim = Simulator(system, RingPolymerIntegrator(1.05 * limit, T_K), BundleCalculator(trap), seed=0)
    with pytest.raises(RingPolymerError, match="stability limit"):
        sim.simulate(1)
    assert torch.equal(system.positions, x0)
    with pytest.raises(RingPolymerError, match="stability limit.*scheme=cayley"):
        RingPolymerIntegrator(1.05 * limit, T_K, n_beads=32)
    # the Cayley scheme is stable there
    sim = Simulator(_system(32), RingPolymerIntegrator(1.05 * limit, T_K, scheme="cayley"), BundleCalculator(trap), seed=0)
    sim.simulate(5)
    assert torch.isfinite(sim.system.positions).all()


def test_odd_bead_number_refused_where_even_needed(trap):
    with pytest.raises(RingPolymerError, match="even number of beads"):
        RingPolymerIntegrator(1.0, T_K, n_beads=7, require_even=True)
    sim = Simulator(_system(5), RingPolymerIntegrator(1.0, T_K, require_even=True), BundleCalculator(trap), seed=0)
    with pytest.raises(RingPolymerError, match="system.n_replicas=5"):
        sim.simulate(1)
    with pytest.raises(RingPolymerError, match="unknown ring-polymer scheme"):
        RingPolymerIntegrator(1.0, T_K, scheme="leapfrog")
