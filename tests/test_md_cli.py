"""The spkmd command end to end: overrides in SchNetPack spelling, restart, plot, export, errors."""

import subprocess
import sys

import ase.io
import pytest
import torch
from click.testing import CliRunner
from omegaconf import OmegaConf

from spkserve.potentials import reference_bundle
from spkmd.cli import main
from spkmd.data import HDF5Loader
from spkmd.simulator import load_state

pytestmark = pytest.mark.timeout(180)
torch.set_num_threads(1)


def invoke(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


def test_run_restart_plot_export(tmp_path):
    d = tmp_path / "run"
    r = invoke(f"simulation_dir={d}", "calculator=reference", "dynamics.n_steps=20", "+dynamics/thermostat=svr",
               "system.n_replicas=2", "system.n_molecules=2", "dynamics.integrator.time_step=0.25",
               "system.initializer.temperature=200", "seed=7", "callbacks.checkpoint.every_n_steps=10",
               "callbacks.progress.every_n_steps=10", "precision=64")
    assert r.exit_code == 0, r.output
    assert "done: step 20" in r.output and "T = " in r.output
    assert (d / "plots" / "temperature.png").is_file() and (d / "plots" / "energies.png").is_file()
    cfg = OmegaConf.load(d / "config.yaml")
    assert cfg.dynamics.thermostat.type == "svr" and cfg.dynamics.thermostat.temperature == 200.0
    assert cfg.seed == 7 and cfg.system.n_replicas == 2
    log = HDF5Loader(d / "simulation.hdf5")
    assert log.n_replicas == 2 and log.n_molecules == 2 and log.steps[-1] == 20
    assert abs(log.times_fs[-1] - 5.0) < 1e-12
    # pointed at the directory again: restarts from the checkpoint and continues the log
    r = invoke(f"simulation_dir={d}", "dynamics.n_steps=30")
    assert r.exit_code == 0, r.output
    assert "restarting from" in r.output and "done: step 30" in r.output
    assert HDF5Loader(d / "simulation.hdf5").steps.tolist() == list(range(31))
    assert load_state(d / "checkpoint.pt")["step"] == 30
    # a group override cannot change a run that is being restarted
    r = invoke(f"simulation_dir={d}", "dynamics/thermostat=nhc")
    assert r.exit_code != 0 and "only key=value overrides apply" in r.output
    # plot and export
    r = invoke("plot", str(d), "-o", str(tmp_path / "p"))
    assert r.exit_code == 0 and (tmp_path / "p" / "energies.png").is_file()
    r = invoke("export", str(d), "-o", str(tmp_path / "f.extxyz"), "--replica", "1", "--molecule", "1", "--every", "10")
    assert r.exit_code == 0, r.output
    frames = ase.io.read(tmp_path / "f.extxyz", index=":")
    assert len(frames) == 4 and frames[-1].info["step"] == 30 and frames[-1].info["replica"] == 1
    # --config reruns a saved config elsewhere
    r = invoke("--config" if False else "run", "--config", str(d / "config.yaml"), f"simulation_dir={tmp_path / 'again'}",
               "dynamics.n_steps=5", "plots=false")
    assert r.exit_code == 0, r.output


def test_print_config_and_bundle_options(tmp_path):
    trap = reference_bundle("harmonic_trap", tmp_path / "trap.bundle", k=0.5)
    r = invoke(f"simulation_dir={tmp_path / 'x'}", f"calculator.model_file={trap}", "calculator.neighbor_list.cutoff=5",
               "+dynamics/thermostat=nhc", "--print-config")
    assert r.exit_code == 0, r.output
    cfg = OmegaConf.create(r.output)
    assert cfg.dynamics.thermostat.type == "nhc" and cfg.calculator.neighbor_list.cutoff == 5
    assert not (tmp_path / "x").exists()
    r = invoke("run", f"simulation_dir={tmp_path / 'x'}", f"calculator.model_file={trap}", "~dynamics/thermostat",
               "dynamics.n_steps=5", "precision=32", "plots=false")
    assert r.exit_code == 0, r.output
    assert "thermostat" not in OmegaConf.load(tmp_path / "x" / "config.yaml").dynamics
    # any ForceProvider imported by name (remote servers plug in the same way)
    r = invoke(f"simulation_dir={tmp_path / 'p'}", "calculator=provider", "calculator.provider=spkserve.runtime:ModelRunner",
               f"+calculator.params.bundle={trap}", "dynamics.n_steps=4", "plots=false")
    assert r.exit_code == 0, r.output
    assert HDF5Loader(tmp_path / "p" / "simulation.hdf5").steps[-1] == 4


def test_clear_errors(tmp_path):
    r = invoke(f"simulation_dir={tmp_path}", "dynamics.bogus_key=1")
    assert r.exit_code != 0 and "bogus_key" in r.output
    r = invoke(f"simulation_dir={tmp_path}", "calculator=reference", "system.molecule_file=nope.xyz")
    assert r.exit_code != 0 and "molecule file 'nope.xyz' not found" in r.output
    r = invoke(f"simulation_dir={tmp_path}", "calculator.model_file=missing.bundle")
    assert r.exit_code != 0 and "model bundle 'missing.bundle' not found" in r.output
    r = invoke("dynamics.n_steps=3")
    assert r.exit_code != 0 and "simulation_dir must be given" in r.output
    r = invoke(f"simulation_dir={tmp_path}", "precision=16")
    assert r.exit_code != 0 and "precision must be 32 or 64" in r.output
    saved = tmp_path / "c.yaml"
    base = OmegaConf.create(r"{simulation_dir: x, calculator: {type: reference_bonds, k: 20, wrong: 1}, "
                            r"system: {molecule_file: ethanol.xyz}, dynamics: {n_steps: 2}}")
    OmegaConf.save(base, saved)
    r = invoke("--config", str(saved), f"simulation_dir={tmp_path / 'y'}")
    assert r.exit_code != 0 and "calculator.wrong" in r.output


def test_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "spkmd.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "export" in out.stdout and "run" in out.stdout


def test_calculator_compile_choice():
    """calculator.compile: true/false as given; auto compiles only long runs; anything else is an error."""
    from spkmd.factory import AUTO_COMPILE_MIN_STEPS, ConfigError, compile_choice

    assert compile_choice(True, 10) and not compile_choice(False, 10**9)
    assert not compile_choice("auto", AUTO_COMPILE_MIN_STEPS - 1)
    assert compile_choice("auto", AUTO_COMPILE_MIN_STEPS) and compile_choice(None, AUTO_COMPILE_MIN_STEPS)
    assert not compile_choice("auto", None)
    with pytest.raises(ConfigError, match="calculator.compile must be true, false or auto"):
        compile_choice("yes please", 100)


def _summary(output: str) -> str:
    return next(ln for ln in output.splitlines() if ln.startswith("done: step"))


def test_restart_of_a_finished_run_prints_the_same_summary(tmp_path):
    """A finished run restarted with the same n_steps does no step and must report the state it
    ended in (the thermostat's bath energy was missing: E_conserved off by its account)."""
    d = tmp_path / "run"
    r = invoke(f"simulation_dir={d}", "calculator=reference", "dynamics.n_steps=15", "dynamics/thermostat=langevin",
               "dynamics.thermostat.time_constant=5", "seed=3", "plots=false")
    assert r.exit_code == 0, r.output
    first = _summary(r.output)
    r = invoke(f"simulation_dir={d}", "dynamics.n_steps=15")
    assert r.exit_code == 0, r.output
    assert "restarting from" in r.output and _summary(r.output) == first
    assert HDF5Loader(d / "simulation.hdf5").steps.tolist() == list(range(16))


def test_start_temperature_and_ring_polymer_physical_temperature(tmp_path):
    """Logged step-0 temperature equals the target (Langevin counts 3N dof: was 233 K for 300 K);
    ring polymers show the physical temperature (bead temperature / P), not P·T."""
    d = tmp_path / "lv"
    r = invoke(f"simulation_dir={d}", "calculator=reference", "+dynamics/thermostat=langevin", "dynamics.n_steps=2",
               "seed=1", "plots=false")
    assert r.exit_code == 0, r.output
    log = HDF5Loader(d / "simulation.hdf5")
    assert log.get_temperature(0)[0] == pytest.approx(300.0, rel=1e-10) and log.dof.tolist() == [27.0]
    d = tmp_path / "nve"  # the default run is NVE: translation and rotation removed and not counted
    r = invoke(f"simulation_dir={d}", "calculator=reference", "dynamics.n_steps=2", "seed=1", "plots=false")
    assert r.exit_code == 0, r.output
    log = HDF5Loader(d / "simulation.hdf5")
    assert log.get_temperature(0)[0] == pytest.approx(300.0, rel=1e-10) and log.dof.tolist() == [21.0]
    d = tmp_path / "rp"
    r = invoke(f"simulation_dir={d}", "calculator=reference", "dynamics/integrator=rpmd", "dynamics/thermostat=pile_local",
               "system.n_replicas=4", "dynamics.n_steps=200", "callbacks.progress.every_n_steps=100", "seed=2")
    assert r.exit_code == 0, r.output
    log = HDF5Loader(d / "simulation.hdf5")
    assert log.temperature_estimator.startswith("ring-polymer")
    T = log.get_temperature(0)  # mean over beads
    assert T[0] == pytest.approx(300.0, rel=1e-10)  # started at P·T per bead = 300 K physical
    assert 150.0 < float(T[100:].mean()) < 450.0  # 1200 K (P·T) before
    line = [ln for ln in r.output.splitlines() if ln.startswith("step ")][-1]
    t_shown = float(line.split("T_phys =")[1].split()[0])
    assert t_shown == pytest.approx(float(T[-1]), abs=0.01)
    assert "ring-polymer kinetic" in _summary(r.output)
    assert (d / "plots" / "temperature.png").is_file()
