"""Each ring-polymer thermostat samples the free ring polymer's canonical distribution
(normal-mode kinetic and spring energies = k_B·P·T per degree of freedom) and keeps
account of the energy it exchanges (Σ beads (KE + springs) + bath energy constant).

Free ring polymer: 64 hydrogen atoms, 8 beads, 100 K, zero external forces; the exact
normal-mode propagation makes the conserved quantity exact to round-off.
Tolerances: 4 standard errors from 20 block averages (plus 1 % for the finite
time-step of the thermostat splitting), fixed seeds.
"""

from __future__ import annotations

import math

import ase
import numpy as np
import pytest
import torch

from spkserve import units
from spkmd.rpmd import NHCNormalModes, PIGLET, PILEGlobal, PILELocal, RPMDGLE, TRPMD, RingPolymerIntegrator
from spkmd.rpmd.normal_modes import normal_mode_frequencies, normal_mode_matrix, to_normal_modes
from spkmd.simulator import Simulator
from spkmd.system import System
from spkmd.thermostats import ThermostatError

from rpmd_helpers import ZeroForces, block_average

T_K = 100.0
P = 8
M = 64
DT_FS = 2.0


def _system(seed=0, momenta=True):
    sys_ = System.from_atoms([ase.Atoms("H", positions=[[0.0, 0.0, 0.0]]) for _ in range(M)], n_replicas=P)
    if momenta:
        g = torch.Generator().manual_seed(seed)
        kT_P = P * T_K * units.KB_HARTREE_PER_K
        sys_.momenta = torch.randn(sys_.momenta.shape, generator=g, dtype=sys_.dtype) * torch.sqrt(kT_P * sys_.masses3)
    return sys_


def _gle_file(tmp_path, text):
    f = tmp_path / "gle.txt"
    f.write_text(text)
    return f


def _run(thermostat, n_steps=1000, n_equil=200, seed=3):
    system = _system(seed)
    integ = RingPolymerIntegrator(DT_FS, T_K)
    sim = Simulator(system, integ, ZeroForces(), hooks=[thermostat], seed=seed)
    sim.simulate(n_equil)
    C = normal_mode_matrix(P, system.dtype)
    w = normal_mode_frequencies(P, T_K, system.dtype)
    m = system.masses3
    kin, pot, cons = [], [], []
    for _ in range(n_steps):
        sim.simulate(1)
        p = to_normal_modes(system.momenta, C)
        q = to_normal_modes(system.positions, C)
        kin.append((p * p / m).mean((1, 2)).numpy())  # [P]  <p²/m> per dof
        pot.append(((w.view(-1, 1, 1) ** 2) * m * q * q).mean((1, 2)).numpy())  # <m ω² q²>
        cons.append(float(sim.conserved_energy().sum()))
    return np.array(kin), np.array(pot), np.array(cons)


def _kT_P():
    return P * T_K * units.KB_HARTREE_PER_K


def _check_modes(kin, pot, modes, target=None, what=""):
    target = _kT_P() if target is None else target
    mean, err = block_average(kin)
    for k in modes:
        t = target[k] if np.ndim(target) else target
        assert abs(mean[k] - t) < 4 * err[k] + 0.01 * t, f"{what} mode {k}: <p²/m> {mean[k]:.6g} ± {err[k]:.2g}, expected {t:.6g}"
    pm, perr = block_average(pot)
    for k in modes:
        if k == 0:
            continue
        t = _kT_P()
        assert abs(pm[k] - t) < 4 * perr[k] + 0.01 * t, f"{what} mode {k}: <mω²q²> {pm[k]:.6g} ± {perr[k]:.2g}, expected {t:.6g}"


def _check_conserved(cons):
    drift = np.abs(cons - cons[0]).max()
    assert drift < 1e-9 * max(1.0, abs(cons).max()), f"conserved quantity drifts by {drift:.3g} Hartree"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda tmp: PILELocal(T_K, time_constant_fs=50.0), id="pile_local"),
        pytest.param(lambda tmp: PILEGlobal(T_K, time_constant_fs=50.0), id="pile_global"),
        pytest.param(lambda tmp: NHCNormalModes(T_K, time_constant_fs=20.0, chain_length=4), id="nhc_rpmd"),
        pytest.param(
            lambda tmp: RPMDGLE(T_K, A_file=_gle_file(tmp, "# A MATRIX: (fs^-1)\n0.0 0.08\n-0.08 0.2\n")), id="rpmd_gle"
        ),
    ],
)
def test_thermostat_samples_free_ring_polymer(make, tmp_path):
    thermostat = make(tmp_path)
    # the massive chains need sub-steps (slower): a shorter run
    n = 500 if isinstance(thermostat, NHCNormalModes) else 1000
    kin, pot, cons = _run(thermostat, n_steps=n)
    _check_modes(kin, pot, range(P))
    _check_conserved(cons)


@pytest.mark.timeout(120)
def test_trpmd_leaves_centroid_alone():
    system = _system(5)
    p0 = system.momenta.mean(0).clone()
    kin, pot, cons = _run(TRPMD(T_K), n_steps=800, n_equil=200, seed=5)
    _check_modes(kin, pot, range(1, P), what="TRPMD")
    _check_conserved(cons)
    # a free centroid is not touched: its momentum stays what it was
    s2 = _system(5)
    sim = Simulator(s2, RingPolymerIntegrator(DT_FS, T_K), ZeroForces(), hooks=[TRPMD(T_K)], seed=5)
    sim.simulate(50)
    torch.testing.assert_close(s2.momenta.mean(0), p0, rtol=1e-10, atol=1e-12)


@pytest.mark.timeout(120)
def test_piglet_targets_per_mode_covariance(tmp_path):
    """PIGLET matrices: centroid (a free particle) driven to the non-equilibrium target
    C₀[0,0] = 2.5·k_B·P·T; internal modes canonical."""
    kT_P_K = P * T_K
    a = [[0.0, 0.08], [-0.08, 0.2]]
    blocks_A = "\n".join(" ".join(str(x) for x in row) for _ in range(P) for row in a)
    c0 = [[2.5 * kT_P_K, 0.0], [0.0, 2.5 * kT_P_K]]
    cc = [[kT_P_K, 0.0], [0.0, kT_P_K]]
    blocks_C = "\n".join(" ".join(str(x) for x in row) for k in range(P) for row in (c0 if k == 0 else cc))
    f = _gle_file(tmp_path, f"# A MATRIX: (fs^-1)\n{blocks_A}\n# C MATRIX: (K)\n{blocks_C}\n")
    kin, pot, cons = _run(PIGLET(T_K, f))
    target = np.full(P, _kT_P())
    target[0] *= 2.5
    _check_modes(kin, pot, range(P), target=target, what="PIGLET")
    _check_conserved(cons)


def test_gle_matrix_errors(tmp_path):
    with pytest.raises(ThermostatError, match="not positive-definite"):
        RPMDGLE(T_K, A_file=_gle_file(tmp_path, "0.0 1.0\n-1.0 -0.5\n"))
    with pytest.raises(ThermostatError, match="C.*positive-definite"):
        RPMDGLE(T_K, A=np.array([[1.0, 0.0], [0.0, 1.0]]), C=np.array([[1.0, 0.0], [0.0, -1.0]]))
    f = _gle_file(tmp_path, "# A MATRIX: (fs^-1)\n" + "1 0\n0 1\n" * 3 + "# C MATRIX: (K)\n" + "100 0\n0 100\n" * 3)
    th = PIGLET(T_K, f)
    sim = Simulator(_system(), RingPolymerIntegrator(DT_FS, T_K), ZeroForces(), hooks=[th], seed=0)
    with pytest.raises(ThermostatError, match="3 normal modes but the system has 8 beads"):
        sim.simulate(1)
    with pytest.raises(ThermostatError, match="needs C"):
        PIGLET(T_K, _gle_file(tmp_path, "1 0\n0 1\n"))
