"""NPT validation that fails for a barostat that does not move the cell, samples the wrong
volume distribution, or loses energy in its bookkeeping.

* Ideal gas (zero forces; exact p(V) ∝ V^N e^{−PV/k_BT}, so ⟨V⟩ = (N+1)k_BT/P and
  ⟨δV²⟩ = k_BT ⟨V⟩ κ_T with κ_T = 1/P): 128 independent 16-atom boxes started at ±10 % of ⟨V⟩,
  for MTK, the PILE/BZP barostat (classical and 2-bead ring polymer) and stochastic cell
  rescaling: mean and variance of V within 4 standard errors + 2 % / + 6 % (time-step bias).
* Lennard-Jones (truncated and shifted at 2.5 σ, T* = 2, P* from the JZG equation of state at
  ρ* = 0.8, as in test_npt_lj.py): 4 + 4 boxes of 29 atoms (32-atom FCC minus 3: a box that fits
  FCC recrystallises and relaxes for picoseconds) in one batch, started at ρ*·(1 ∓ 10 %), must
  meet (groups agree within 3 errors + 2 %) at ρ* = 0.8 (within 3 errors + 2.5 %), for
  MTK isotropic and anisotropic, PILE and SCR. A frozen cell stays 10 % away and fails.
* SCR conserved (effective) energy with a Langevin thermostat: drift over 2 ps well below the
  fluctuation of H + PV (the first-order bookkeeping drifted ~0.5 eV/ps here).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spkserve import units
from spkmd.calculators import BundleCalculator
from spkmd.initializers import MaxwellBoltzmann
from spkmd.simulator import Simulator
from spkmd.system import System

from npt_helpers import (IdealGas, batch_stats, ideal_gas_boxes, ideal_gas_pressure_bar, integrator_and_thermostat,
                         make_barostat, volumes_A3)
from rpmd_helpers import block_average
from test_npt_lj import EPS_K, P_RED_TO_BAR, _boxes, _density, _melt, jzg_pressure, lj_bundle, tail_pressure  # noqa: F401

pytestmark = pytest.mark.timeout(300)

N_IG, T_IG, V_IG = 16, 300.0, 1000.0


def run_ideal_gas(kind: str, n_boxes: int = 128, n_steps: int = 350, time_step_fs: float = 20.0,
                  time_constant_fs: float = 1000.0, seed: int = 1):
    """Volumes [n_steps, n_boxes] Å³ after 120 equilibration steps."""
    P = ideal_gas_pressure_bar(N_IG, T_IG, V_IG)
    nb = 2 if kind == "pile_rpmd" else 1
    system = ideal_gas_boxes(n_boxes, N_IG, V_IG, seed=seed, n_replicas=nb)
    MaxwellBoltzmann(T_IG * nb, remove_translation=False)(system, torch.Generator().manual_seed(seed))
    tau = time_constant_fs / (2 * np.pi) if kind in ("mtk",) else time_constant_fs
    baro = make_barostat(kind, P, T_IG, tau, 1.0 / P)
    integ, thermo = integrator_and_thermostat(kind, baro, time_step_fs, T_IG, 200.0)
    sim = Simulator(system, integ, IdealGas(), hooks=[thermo, baro], seed=seed)
    sim.simulate(120)
    vols = []
    for _ in range(n_steps):
        sim.simulate(1)
        vols.append(volumes_A3(system))
    return np.array(vols)


@pytest.mark.parametrize("kind", ["mtk", "pile", "pile_rpmd", "scr"])
def test_ideal_gas_volume_distribution(kind):
    vols = run_ideal_gas(kind, time_step_fs=15.0 if kind == "pile_rpmd" else 20.0)
    mean, mean_err, var, var_err = batch_stats(vols)
    exact_var = (N_IG + 1) * (V_IG / (N_IG + 1)) ** 2  # k_BT <V> κ_T
    assert abs(mean / V_IG - 1) < 4 * mean_err / V_IG + 0.02, f"{kind}: <V> = {mean:.1f} ± {mean_err:.1f}, exact {V_IG}"
    assert abs(var / exact_var - 1) < 4 * var_err / exact_var + 0.06, (
        f"{kind}: <dV²>/(kT V κ_T) = {var / exact_var:.3f} ± {var_err / exact_var:.3f}")


def run_lj(kind: str, p_bar: float, n_per_start: int = 4, n_eq: int = 150, n_prod: int = 200, seed: int = 0,
           time_step_fs: float = 12.0):
    """Densities ρ* [n_prod, 2·n_per_start] of 29-atom LJ boxes (one batch, each with its own cell
    and barostat state); the first half started at ρ* = 0.8·0.9, the second at 0.8·1.1."""
    T_red, rho0 = 2.0, 0.8
    T = T_red * EPS_K
    tau = {"mtk": 100.0, "anisotropic": 100.0, "pile": 1500.0, "scr": 100.0}[kind]
    baro = make_barostat(kind, p_bar, T, tau, 1.7e-4)
    boxes = []
    for k, f in enumerate([0.9] * n_per_start + [1.1] * n_per_start):
        boxes += _boxes(rho0 * f, 1, size=2, seed=seed + k, jitter=0.15, remove=3)  # 29 atoms: no FCC fit
    system = System.from_atoms(boxes)
    MaxwellBoltzmann(T, remove_translation=False)(system, torch.Generator().manual_seed(seed))
    integ, thermo = integrator_and_thermostat(kind, baro, time_step_fs, T, 100.0)
    calc = BundleCalculator(LJ_PATH[0], stress=True)
    _melt(system, calc, T, 30)  # disorder the FCC start at constant volume (a crystal relaxes slowly)
    sim = Simulator(system, integ, calc, hooks=[thermo, baro], seed=seed + 10)
    sim.simulate(n_eq)
    rho = []
    for _ in range(n_prod):
        sim.simulate(1)
        rho.append(_density(system).copy())
    return np.array(rho)


LJ_PATH: list = []


@pytest.fixture(scope="module")
def lj_path(lj_bundle):
    LJ_PATH[:] = [lj_bundle]
    return lj_bundle


@pytest.mark.parametrize("kind", ["mtk", "anisotropic", "pile", "scr"])
def test_lj_density_arrives_from_10_percent_off(lj_path, kind):
    """At P_ext = P_JZG(ρ* = 0.8) − tail, each start group (4 independent boxes, 0.9 and 1.1·ρ*):
    mean density over the production part (error from the spread of the box means) within
    3 errors + 2.5 % of 0.8 (EOS fit, truncation, 29-atom boxes), and the groups from below and
    above agree within 3 combined errors + 2 %; a frozen cell (0.72 vs 0.88) fails both."""
    rho0 = 0.8
    p_bar = (jzg_pressure(2.0, rho0) - tail_pressure(rho0)) * P_RED_TO_BAR
    rho = run_lj(kind, p_bar)
    n = rho.shape[1] // 2
    res = []
    for f, group in ((0.9, rho[:, :n]), (1.1, rho[:, n:])):
        box_means = group.mean(0)
        r, r_err = box_means.mean(), box_means.std(ddof=1) / np.sqrt(n)
        res.append((r, r_err))
        assert abs(r - rho0) < 3 * r_err + 0.025 * rho0, f"{kind} from {f}·ρ*: <ρ*> = {r:.4f} ± {r_err:.4f}, EOS {rho0}"
    (a, ea), (b, eb) = res
    assert abs(a - b) < 3 * np.hypot(ea, eb) + 0.02 * rho0, f"{kind}: from below {a:.4f}, from above {b:.4f}"


def test_scr_effective_energy_is_conserved(lj_path):
    """SCR + Langevin (both keep their energy account), 32 LJ atoms, 400 steps of 5 fs:
    the fitted drift of the conserved quantity over the run is below 10 % of the standard
    deviation of H + P V, and below 3 meV/ps."""
    from test_npt_lj import EPS_EV  # noqa: F401
    T = 2.0 * EPS_K
    p_bar = (jzg_pressure(2.0, 0.8) - tail_pressure(0.8)) * P_RED_TO_BAR
    baro = make_barostat("scr", p_bar, T, 200.0, 1.7e-4)
    system = System.from_atoms(_boxes(0.8 * 1.05, 1, size=2, seed=4, jitter=0.15))
    MaxwellBoltzmann(T, remove_translation=False)(system, torch.Generator().manual_seed(4))
    integ, thermo = integrator_and_thermostat("scr", baro, 5.0, T, 200.0)
    sim = Simulator(system, integ, BundleCalculator(LJ_PATH[0], stress=True), hooks=[thermo, baro], seed=5)
    sim.simulate(40)
    t, cons, h_pv = [], [], []
    to_eV = units.factor("Hartree", "eV")
    for _ in range(100):
        sim.simulate(4)
        t.append(sim.time_fs / 1000.0)
        cons.append(float(sim.conserved_energy().sum()) * to_eV)
        h_pv.append(float((system.kinetic_energy() + system.energy).sum() + baro.extended_energy(system).sum()) * to_eV)
    slope = np.polyfit(t, cons, 1)[0]  # eV/ps
    span = t[-1] - t[0]
    assert np.std(h_pv) > 0.02, "H + PV hardly fluctuated; the thermostat/barostat did nothing"
    assert abs(slope) * span < 0.1 * np.std(h_pv), f"drift {slope * 1e3:.2f} meV/ps over {span:.2f} ps, std(H+PV) {np.std(h_pv):.3f} eV"
    assert abs(slope) < 3e-3, f"drift {slope * 1e3:.2f} meV/ps"
