"""HDF5 logging and loading, extended-XYZ export, TensorBoard, spectra."""

import ase.io
import h5py
import numpy as np
import pytest
import torch

from spkserve import units
from spkmd.data import HDF5Loader
from spkmd.hooks import FileLogger, Hook, TensorBoardLogger
from spkmd.initializers import MaxwellBoltzmann
from spkmd.integrators import VelocityVerlet
from spkmd.simulator import Simulator
from spkmd.spectra import power_spectrum
from spkmd.system import System
from spkmd.testing import argon_cluster, lj_argon_calculator, trap_calculator, trapped_atoms
from spkmd.thermostats import Langevin

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def calc(tmp_path_factory):
    return lj_argon_calculator(tmp_path_factory.mktemp("lj"), cutoff_angstrom=8.0)


def make_sim(calc, path, replicas=3, **logger_kw):
    s = System.from_atoms([argon_cluster(seed=0), argon_cluster(seed=1)[:7]], n_replicas=replicas)
    s.positions[1] += 0.02
    MaxwellBoltzmann(50.0)(s, torch.Generator().manual_seed(0))
    log = FileLogger(path, **logger_kw)
    return Simulator(s, VelocityVerlet(5.0), calc, hooks=[Langevin(50.0), log], seed=0), log


class Peek(Hook):
    """Read the log file while the run is writing it (SWMR reader)."""

    def __init__(self, path):
        self.path, self.seen = path, []

    def on_step_finalize(self, sim):
        if sim.step in (3, 5, 10):
            self.seen.append((sim.step, len(HDF5Loader(self.path))))


def test_values_units_and_buffering(calc, tmp_path):
    path = tmp_path / "log.hdf5"
    sim, log = make_sim(calc, path, buffer_size=5, forces=True)
    peek = Peek(path)
    sim.hooks.append(peek)
    sim.simulate(12)
    # initial state + 12 steps; buffer of 5 -> flushed at steps 4 and 9 (entries 0-4, 0-9)
    assert peek.seen == [(3, 0), (5, 5), (10, 10)]
    data = HDF5Loader(path)
    assert data.steps.tolist() == list(range(13))
    np.testing.assert_allclose(data.times_fs, 5.0 * np.arange(13))
    s = sim.system
    to_A = units.factor("Bohr", "Angstrom")
    # last frame, replica 1, molecule 1 (positions stored as float32)
    sl = s.molecule_slice(1)
    np.testing.assert_allclose(data.get_positions(1, replica=1)[-1], s.positions[1, sl].numpy() * to_A, atol=2e-5)
    np.testing.assert_allclose(data.get_positions(None)[-1], s.positions.mean(0).numpy() * to_A, atol=2e-5)
    np.testing.assert_allclose(data.get_forces(0, 2)[-1], s.forces[2, s.molecule_slice(0)].numpy() * units.factor("Hartree/Bohr", "eV/Angstrom"), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(data.get_temperature(0)[-1], float(s.temperature()[:, 0].mean()), rtol=1e-12)
    np.testing.assert_allclose(data.get_potential_energy(1, 0)[-1], float(s.energy[0, 1]) * units.factor("Hartree", "eV"), rtol=1e-12)
    np.testing.assert_allclose(data.get_property("conserved_energy", 0, 0)[-1], float(sim.conserved_energy()[0, 0]) * units.factor("Hartree", "eV"), rtol=1e-12)
    assert data.units["positions"] == "Angstrom" and data.units["temperature"] == "K"
    # a second simulate() call appends
    sim.simulate(3)
    assert HDF5Loader(path).steps.tolist() == list(range(16))


def test_flush_on_exception(calc, tmp_path):
    path = tmp_path / "log.hdf5"
    sim, log = make_sim(calc, path, buffer_size=1000)

    class Boom(Hook):
        def on_step_finalize(self, sim):
            if sim.step == 6:
                raise RuntimeError("boom")

    sim.hooks.append(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        sim.simulate(20)
    with h5py.File(path, "r") as f:
        assert f.attrs["entries"] == 7
    assert HDF5Loader(path).steps.tolist() == list(range(7))


def test_export_extxyz_and_atoms(calc, tmp_path):
    path = tmp_path / "log.hdf5"
    sim, log = make_sim(calc, path, forces=True)
    sim.simulate(4)
    data = HDF5Loader(path)
    out = tmp_path / "frames.extxyz"
    n = data.write_extxyz(out, replica=2, every=2)
    assert n == 3 * 2  # frames 0, 2, 4 for two molecules
    frames = ase.io.read(out, index=":")
    last = frames[-1]  # step 4, molecule 1, replica 2
    s = sim.system
    sl = s.molecule_slice(1)
    assert last.info["step"] == 4 and len(last) == 7
    np.testing.assert_allclose(last.get_forces(), s.forces[2, sl].numpy() * units.factor("Hartree/Bohr", "eV/Angstrom"), rtol=1e-4, atol=1e-6)
    assert abs(last.get_potential_energy() - float(s.energy[2, 1]) * units.factor("Hartree", "eV")) < 1e-9
    v_ase = last.get_velocities() * units.factor("(eV/amu)^0.5", "Bohr/au_time")
    np.testing.assert_allclose(v_ase, s.velocities[2, sl].numpy(), rtol=1e-4, atol=1e-9)
    with pytest.raises(IndexError, match="replica"):
        data.to_atoms(0, 0, replica=7)
    with pytest.raises(KeyError, match="not logged"):
        data.get_property("dipole_moment")


def test_tensorboard_writes_events(calc, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed")
    sim, log = make_sim(calc, tmp_path / "log.hdf5")
    sim.hooks.append(TensorBoardLogger(tmp_path / "tb", every_n_steps=2))
    sim.simulate(4)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_power_spectrum_peak_of_harmonic_trap(tmp_path):
    # carbon atoms in a trap: omega = sqrt(k/m); NVE so the peak is sharp
    k = 0.1
    calc = trap_calculator(tmp_path, k_eV_per_A2=k)
    s = trapped_atoms(8, seed=0)
    MaxwellBoltzmann(300.0, remove_translation=False)(s, torch.Generator().manual_seed(0))
    sim = Simulator(s, VelocityVerlet(2.0), calc, hooks=[FileLogger(tmp_path / "t.hdf5", every_n_steps=2, float64=True)])
    sim.simulate(2000)
    data = HDF5Loader(tmp_path / "t.hdf5")
    freq, spec = power_spectrum(data, molecule=3)
    omega = np.sqrt(k * units.factor("eV/Angstrom^2", "Hartree/Bohr^2") / float(s.masses[3]))  # 1/au_time
    expected = omega / (2 * np.pi) * units.factor("1/au_time", "1/fs") / (units.SPEED_OF_LIGHT_M_PER_S * units.factor("m/s", "cm/fs"))
    peak = freq[np.argmax(spec)]
    resolution = freq[1] - freq[0]
    assert abs(peak - expected) <= 2 * resolution, (peak, expected, resolution)


def test_ir_spectrum_peak_of_oscillating_dipole():
    from spkmd.spectra import ir_spectrum

    class FakeLog:
        """A dipole oscillating at 1000 cm^-1 sampled every 1 fs."""

        available = ["dipole_moment"]
        times_fs = np.arange(4000) * 1.0

        def get_property(self, name, molecule, replica):
            c = units.SPEED_OF_LIGHT_M_PER_S * units.factor("m/s", "cm/fs")
            nu = 1000.0 * c  # 1/fs
            mu = np.zeros((len(self.times_fs), 3))
            mu[:, 2] = np.cos(2 * np.pi * nu * self.times_fs)
            return mu

    freq, spec = ir_spectrum(FakeLog(), resolution=2048)
    assert abs(freq[np.argmax(spec)] - 1000.0) <= 2 * (freq[1] - freq[0])
    FakeLog.available = []
    with pytest.raises(KeyError, match="dipole_moment"):
        ir_spectrum(FakeLog())


_KILLED_RUN = r"""
import sys, time, pathlib
import torch
from spkmd.hooks import FileLogger, Hook
from spkmd.initializers import MaxwellBoltzmann
from spkmd.integrators import VelocityVerlet
from spkmd.simulator import Simulator
from spkmd.system import System
from spkmd.testing import argon_cluster, lj_argon_calculator

torch.set_num_threads(1)
out = pathlib.Path(sys.argv[1])
calc = lj_argon_calculator(out, cutoff_angstrom=8.0)
s = System.from_atoms([argon_cluster(seed=0)])
MaxwellBoltzmann(50.0)(s, torch.Generator().manual_seed(0))


class Stall(Hook):  # after the logger's flush at step 8: tell the test, then wait to be killed
    def on_step_finalize(self, sim):
        if sim.step == 8:
            (out / "flushed").write_text("8")
            time.sleep(600)


Simulator(s, VelocityVerlet(5.0), calc, hooks=[FileLogger(out / "log.hdf5", buffer_size=3), Stall()]).simulate(20)
"""


def _wait_for(path, proc, what, timeout_s=300.0):
    """Event-driven wait (generous bound for a loaded machine): until ``path`` exists."""
    import time

    t_end = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the child exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > t_end:
            proc.kill()
            raise AssertionError(f"no {what} within {timeout_s} s")
        time.sleep(0.05)


def test_log_of_a_sigkilled_run_opens_in_any_hdf5_reader(tmp_path):
    """SIGKILL (no hook runs) between flushes: plain h5py (not SWMR) opens the log, with every
    flushed entry. With the file held open in SWMR mode it failed until `h5clear`."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(tmp_path)], stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(tmp_path / "flushed", proc, "flush at step 8")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with h5py.File(tmp_path / "log.hdf5", "r") as f:  # any reader, no SWMR, no h5clear
        assert int(f.attrs["entries"]) == 9
        assert f["properties/step"][:].tolist() == list(range(9))
    assert HDF5Loader(tmp_path / "log.hdf5").steps.tolist() == list(range(9))


_KILLED_IN_FLUSH = r"""
import sys, time, pathlib
from spkmd.hooks import FileLogger
log = FileLogger(sys.argv[1])
f = log._open_for_writing()  # what a flush holds for a few milliseconds
pathlib.Path(sys.argv[2]).write_text("open")
time.sleep(600)
"""


def test_kill_during_a_flush_loader_reads_and_restart_clears_the_flag(calc, tmp_path):
    """The one window left: killed inside a flush. HDF5Loader still reads the log, and the restart
    (logger reopened from a checkpoint) rewrites it so that plain readers open it again."""
    import signal
    import subprocess
    import sys

    path = tmp_path / "log.hdf5"
    sim, log = make_sim(calc, path, buffer_size=2)
    sim.simulate(5)
    state = sim.state_dict()
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_IN_FLUSH, str(path), str(tmp_path / "open")],
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(tmp_path / "open", proc, "the SWMR write open")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with pytest.raises(OSError, match="open for write"):
        h5py.File(path, "r")
    assert HDF5Loader(path).steps.tolist() == list(range(6))
    sim2, log2 = make_sim(calc, path, buffer_size=2)
    sim2.load_state_dict(state)
    sim2.simulate(2)
    with h5py.File(path, "r") as f:
        assert f["properties/step"][:].tolist() == list(range(8))
