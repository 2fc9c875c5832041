"""Restart: a run killed with SIGKILL after a checkpoint and restarted continues bit for bit
like an uninterrupted run (Langevin + SVR thermostats, skin neighbor list); its HDF5 log
stays readable up to the last flush; NaN forces stop with a checkpoint and flushed logs."""

import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

from spkmd.data import HDF5Loader
from spkmd.hooks import Checkpoint, FileLogger
from spkmd.initializers import MaxwellBoltzmann
from spkmd.integrators import VelocityVerlet
from spkmd.simulator import NonFiniteError, Simulator, load_state
from spkmd.system import System
from spkmd.testing import argon_cluster, lj_argon_calculator
from spkmd.thermostats import Langevin

pytestmark = pytest.mark.timeout(240)
torch.set_num_threads(1)

DRIVER = textwrap.dedent('"""Subprocess driver for tests/test_md_restart.py: a small Langevin + checkpoint + HDF5 run.\n\nusage: python md_restart_driver.py DIR N_STEPS [--restart] [--sleep-after-checkpoint STEP]\n"""\n\nimport sys\nimport time\nfrom pathlib import Path\n\nimport torch\n\ntorch.set_num_threads(1)\n\nfrom spkmd.hooks import Checkpoint, FileLogger, Hook  # noqa: E402\nfrom spkmd.initializers import MaxwellBoltzmann  # noqa: E402\nfrom spkmd.integrators import VelocityVerlet  # noqa: E402\nfrom spkmd.simulator import Simulator  # noqa: E402\nfrom spkmd.system import System  # noqa: E402\nfrom spkmd.testing import argon_cluster, lj_argon_calculator  # noqa: E402\nfrom spkmd.thermostats import Langevin, StochasticVelocityRescaling  # noqa: E402\n\n\nclass Stall(Hook):\n    """Announce a checkpoint step on stdout and hang there (to be killed)."""\n\n    def __init__(self, step):\n        self.step = step\n\n    def on_step_finalize(self, sim):\n        if sim.step == self.step:\n            print("CHECKPOINTED", flush=True)\n            time.sleep(600)\n\n\ndef build(directory: Path, stall: int | None):\n    s = System.from_atoms([argon_cluster(seed=0), argon_cluster(seed=1)], n_replicas=2)\n    MaxwellBoltzmann(50.0)(s, torch.Generator().manual_seed(0))\n    hooks = [\n        Langevin(80.0, time_constant_fs=100.0),\n        StochasticVelocityRescaling(80.0, time_constant_fs=200.0),\n        FileLogger(directory / "log.hdf5", buffer_size=7, forces=True),\n        Checkpoint(directory / "checkpoint.pt", every_n_steps=20),\n    ]\n    hooks.append(Stall(-1 if stall is None else stall))  # same hook list in every run\n    calc = lj_argon_calculator(directory, cutoff_angstrom=8.0, skin_angstrom=0.5)\n    return Simulator(s, VelocityVerlet(5.0), calc, hooks=hooks, seed=42)\n\n\ndef main():\n    directory = Path(sys.argv[1])\n    n_steps = int(sys.argv[2])\n    stall = int(sys.argv[sys.argv.index("--stall") + 1]) if "--stall" in sys.argv else None\n    sim = build(directory, stall)\n    if "--restart" in sys.argv:\n        sim.load_checkpoint(directory / "checkpoint.pt")\n    sim.simulate(n_steps - sim.step)\n    torch.save({"positions": sim.system.positions, "momenta": sim.system.momenta, "step": sim.step},\n               directory / "final.pt")\n\n\nif __name__ == "__main__":\n    main()\n')

N_STEPS = 100


def run(directory, *args, timeout=120):
    script = directory / "driver.py"
    script.write_text(DRIVER)
    return subprocess.run([sys.executable, str(script), str(directory), str(N_STEPS), *args],
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_sigkill_and_restart_is_bit_for_bit(tmp_path):
    # the uninterrupted reference runs in this process (same code as the driver)
    ref = tmp_path / "ref"
    ref.mkdir()
    namespace = {"__name__": "driver"}
    exec(compile(DRIVER, "driver.py", "exec"), namespace)
    sim = namespace["build"](ref, None)
    sim.simulate(N_STEPS)
    torch.save({"positions": sim.system.positions, "momenta": sim.system.momenta, "step": sim.step}, ref / "final.pt")

    killed = tmp_path / "killed"
    killed.mkdir()
    script = killed / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(script), str(killed), str(N_STEPS), "--stall", "40"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        line = proc.stdout.readline()
        assert "CHECKPOINTED" in line, proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    # the log is readable after the kill, up to its last flush (the checkpoint at step 40)
    log = HDF5Loader(killed / "log.hdf5")
    assert len(log) == 41 and log.steps[-1] == 40
    assert load_state(killed / "checkpoint.pt")["step"] == 40

    r = run(killed, "--restart")
    assert r.returncode == 0, r.stderr
    a = torch.load(ref / "final.pt")
    b = torch.load(killed / "final.pt")
    assert a["step"] == b["step"] == N_STEPS
    assert torch.equal(a["positions"], b["positions"])
    assert torch.equal(a["momenta"], b["momenta"])
    # the log continues with the next step numbers, no gaps or duplicates, same values
    la, lb = HDF5Loader(ref / "log.hdf5"), HDF5Loader(killed / "log.hdf5")
    assert lb.steps.tolist() == list(range(N_STEPS + 1)) == la.steps.tolist()
    for name in ("energy", "temperature", "conserved_energy", "positions", "forces"):
        np.testing.assert_array_equal(la.get_property(name, None, 1), lb.get_property(name, None, 1))


def test_nan_forces_checkpoint_and_flush(tmp_path):
    calc = lj_argon_calculator(tmp_path, cutoff_angstrom=8.0)
    s = System.from_atoms([argon_cluster(seed=0)])
    MaxwellBoltzmann(50.0)(s, torch.Generator().manual_seed(0))
    log = FileLogger(tmp_path / "log.hdf5", buffer_size=1000)
    ckpt = Checkpoint(tmp_path / "checkpoint.pt", every_n_steps=5)
    sim = Simulator(s, VelocityVerlet(5.0), calc, hooks=[Langevin(50.0), log, ckpt], seed=0)
    sim.simulate(7)
    original = calc.calculate

    def poisoned(system):
        original(system)
        system.forces[0, 3, 1] = float("nan")

    calc.calculate = poisoned
    with pytest.raises(NonFiniteError, match=r"non-finite forces of atoms \[3\].*step 7"):
        sim.simulate(5)
    # logs flushed (steps 0..7), last good checkpoint kept, failed state saved aside
    assert HDF5Loader(tmp_path / "log.hdf5").steps.tolist() == list(range(8))
    assert load_state(tmp_path / "checkpoint.pt")["step"] == 7  # written when the first simulate() ended
    failed = load_state(tmp_path / "checkpoint.failed.pt")
    assert torch.isnan(failed["system"]["forces"]).any()
    with h5py.File(tmp_path / "log.hdf5", "r") as f:
        assert f.attrs["entries"] == 8


def test_checkpoint_refuses_other_hooks(tmp_path):
    calc = lj_argon_calculator(tmp_path, cutoff_angstrom=8.0)
    s = System.from_atoms([argon_cluster(seed=0)])
    sim = Simulator(s, VelocityVerlet(5.0), calc, hooks=[Langevin(50.0)], seed=0)
    sim.simulate(3)
    sim.save_checkpoint(tmp_path / "c.pt")
    other = Simulator(System.from_atoms([argon_cluster(seed=0)]), VelocityVerlet(5.0), calc, hooks=[], seed=0)
    with pytest.raises(ValueError, match="hooks"):
        other.load_checkpoint(tmp_path / "c.pt")
    other = Simulator(System.from_atoms([argon_cluster(seed=0)]), VelocityVerlet(2.0), calc, hooks=[Langevin(50.0)])
    with pytest.raises(ValueError, match="time step"):
        other.load_checkpoint(tmp_path / "c.pt")
