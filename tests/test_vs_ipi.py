"""Against i-PI 3.3: the same quantum harmonic oscillator under the same PIMD settings.

32 hydrogen atoms (i-PI's hydrogen mass) in the isotropic trap E = ½ k |r|² with
k = 0.2 eV/Å², T = 100 K, 8 beads, PILE-L thermostat (τ₀ = 25 fs, λ = 0.5), dt = 1 fs.
i-PI runs with its own Python driver (``i-pi-py_driver -m harmonic``) over a unix socket
in a temporary directory; spkmd runs the reference harmonic-trap bundle. The centroid-
virial and primitive kinetic-energy averages of the two codes agree within 4 combined
standard errors (20 block averages each), and both agree with the exact discretised
(P = 8) value, which lies 25 % above the classical one.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ase
import numpy as np
import pytest
import torch

from spkserve import units
from spkserve.potentials import reference_bundle
from spkmd.calculators import BundleCalculator
from spkmd.rpmd import PILELocal, RingPolymerEstimators, RingPolymerIntegrator
from spkmd.rpmd.normal_modes import normal_mode_frequencies
from spkmd.simulator import Simulator
from spkmd.system import System

from rpmd_helpers import block_average

BIN = Path(sys.executable).parent
IPI, DRIVER = BIN / "i-pi", BIN / "i-pi-py_driver"
pytestmark = pytest.mark.skipif(not (IPI.exists() and DRIVER.exists()), reason="i-PI (i-pi, i-pi-py_driver) is not installed in this venv")

T_K, N_BEADS, N_ATOMS, DT_FS, TAU_FS = 100.0, 8, 32, 1.0, 25.0
K_EV_A2 = 0.2
N_STEPS, N_EQUIL = 3000, 300


def _mass_amu() -> float:
    from ipi.utils.units import Elements

    return Elements.mass("H") * units.factor("me", "amu")


def _positions(seed=0):
    return np.random.default_rng(seed).normal(0.0, 0.1, (N_ATOMS, 3))


def _ipi_input(workdir: Path, prefix: str) -> Path:
    pos = _positions()
    lines = [str(N_ATOMS), "# CELL(abcABC): 50.0 50.0 50.0 90.0 90.0 90.0 cell{angstrom} positions{angstrom}"]
    lines += [f"H {x:.10f} {y:.10f} {z:.10f}" for x, y, z in pos]
    (workdir / "init.xyz").write_text("\n".join(lines) + "\n")
    text = f"""<simulation verbosity="low" safe_stride="1000000" sockets_prefix="{prefix}">
  <output prefix="sim">
    <properties stride="1" filename="out" flush="100">[step, kinetic_cv, kinetic_td]</properties>
  </output>
  <total_steps>{N_STEPS}</total_steps>
  <prng><seed>2718</seed></prng>
  <ffsocket name="harm" mode="unix" pbc="false">
    <address>harm</address><latency>1e-4</latency><timeout>60</timeout><batch_size>{N_BEADS}</batch_size>
  </ffsocket>
  <system>
    <initialize nbeads="{N_BEADS}">
      <file mode="xyz" units="angstrom">init.xyz</file>
      <velocities mode="thermal" units="kelvin">{T_K}</velocities>
    </initialize>
    <forces><force forcefield="harm"/></forces>
    <ensemble><temperature units="kelvin">{T_K}</temperature></ensemble>
    <motion mode="dynamics">
      <dynamics mode="nvt">
        <timestep units="femtosecond">{DT_FS}</timestep>
        <thermostat mode="pile_l"><tau units="femtosecond">{TAU_FS}</tau><pile_lambda>0.5</pile_lambda></thermostat>
      </dynamics>
    </motion>
  </system>
</simulation>
"""
    path = workdir / "input.xml"
    path.write_text(text)
    return path


def _stop(proc):
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def run_ipi() -> np.ndarray:
    """[steps, 2] total kinetic_cv, kinetic_td in Hartree."""
    workdir = Path(tempfile.mkdtemp(prefix="spkrp", dir="/tmp"))  # short path for the unix socket
    ipi = drv = None
    try:
        prefix = str(workdir) + "/"
        inp = _ipi_input(workdir, prefix)
        ipi = subprocess.Popen([str(IPI), str(inp)], cwd=workdir, stdout=open(workdir / "ipi.log", "w"),
                               stderr=subprocess.STDOUT)
        sock = workdir / "harm"
        deadline = time.monotonic() + 60
        while not sock.exists():
            if ipi.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("i-PI did not open its socket:\n" + (workdir / "ipi.log").read_text()[-2000:])
            time.sleep(0.05)
        k_au = K_EV_A2 * units.factor("eV/Angstrom^2", "Hartree/Bohr^2")
        drv = subprocess.Popen([str(DRIVER), "-u", "-a", "harm", "-S", prefix, "-m", "harmonic", "-o", repr(k_au)],
                               cwd=workdir, stdout=open(workdir / "driver.log", "w"), stderr=subprocess.STDOUT)
        ipi.wait(timeout=400)
        drv.wait(timeout=30)
        data = np.loadtxt(workdir / "sim.out", comments="#", ndmin=2)
        return data[:, 1:3]
    finally:
        _stop(drv)
        _stop(ipi)
        shutil.rmtree(workdir, ignore_errors=True)


def run_spkmd(bundle: Path) -> np.ndarray:
    m = _mass_amu()
    atoms = ase.Atoms(["H"] * N_ATOMS, positions=_positions(), masses=[m] * N_ATOMS)
    # 4 independent copies of the 32-atom system in one batch: better statistics for free
    system = System.from_atoms([atoms.copy() for _ in range(4)], n_replicas=N_BEADS)
    g = torch.Generator().manual_seed(5)
    kT_P = N_BEADS * T_K * units.KB_HARTREE_PER_K
    system.momenta = torch.randn(system.momenta.shape, generator=g, dtype=system.dtype) * torch.sqrt(kT_P * system.masses3)
    est = RingPolymerEstimators(T_K)
    sim = Simulator(system, RingPolymerIntegrator(DT_FS, T_K), BundleCalculator(bundle),
                    hooks=[PILELocal(T_K, time_constant_fs=TAU_FS, damping_factor=0.5), est], seed=11)
    out = []
    for _ in range(N_STEPS // 2):
        sim.simulate(1)
        p = system.properties
        out.append([float(p["kinetic_energy_centroid_virial"].mean()), float(p["kinetic_energy_primitive"].mean())])
    return np.array(out)  # per 32-atom system, Hartree


def discretised_kcv_per_dof_hartree() -> float:
    m_au = _mass_amu() * units.factor("amu", "me")
    k_au = K_EV_A2 * units.factor("eV/Angstrom^2", "Hartree/Bohr^2")
    w2 = k_au / m_au
    wk = normal_mode_frequencies(N_BEADS, T_K).numpy()
    return 0.5 * T_K * units.KB_HARTREE_PER_K * float(np.sum(w2 / (wk**2 + w2)))


@pytest.mark.peer
@pytest.mark.timeout(600)
def test_kinetic_energy_estimators_match_ipi(tmp_path):
    bundle = reference_bundle("harmonic_trap", tmp_path / "trap.bundle", k=K_EV_A2)
    ipi = run_ipi()[N_EQUIL:] / (3 * N_ATOMS)
    spk = run_spkmd(bundle)[N_EQUIL // 2:] / (3 * N_ATOMS)
    ref = discretised_kcv_per_dof_hartree()
    classical = 0.5 * T_K * units.KB_HARTREE_PER_K
    assert ref > 1.2 * classical
    for col, name in ((0, "centroid-virial"), (1, "primitive")):
        a, ea = block_average(ipi[:, col], 20)
        b, eb = block_average(spk[:, col], 20)
        err = math.sqrt(ea**2 + eb**2)
        assert abs(a - b) < 4 * err, f"{name}: i-PI {a:.6e} ± {ea:.1e}, spkmd {b:.6e} ± {eb:.1e} Hartree/dof"
        assert abs(a - ref) < 4 * ea + 0.005 * ref, f"{name}: i-PI {a:.6e} ± {ea:.1e}, exact P=8 {ref:.6e}"
        assert abs(b - ref) < 4 * eb + 0.005 * ref, f"{name}: spkmd {b:.6e} ± {eb:.1e}, exact P=8 {ref:.6e}"
