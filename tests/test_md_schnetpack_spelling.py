"""spkmd accepts SchNetPack's commands and config spellings (issue 12): default NVE, --cfg job,
load_config, restart, load_system_state, group/option and key aliases, unit checks.

Every alias is checked by the object it builds or the value it resolves to, so a broken mapping
(e.g. pi_nhc_local building a plain NHC, or data_streams landing nowhere) fails."""

import pytest
import torch
from click.testing import CliRunner
from omegaconf import OmegaConf

from spkmd.aliases import GROUP_OPTION_ALIASES, KEY_ALIASES, AliasError, translate_override
from spkmd.cli import main
from spkmd.data import HDF5Loader
from spkmd.run import build_simulation, load_config
from spkmd.simulator import load_state
from spkserve.potentials import reference_bundle

pytestmark = pytest.mark.timeout(300)
torch.set_num_threads(1)


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def hook_types(sim):
    return [type(h).__name__ for h in sim.hooks]


def test_default_is_nve_and_thermostat_is_added(tmp_path):
    cfg = load_config([f"simulation_dir={tmp_path / 'a'}"])
    assert "thermostat" not in cfg.dynamics and "barostat" not in cfg.dynamics
    sim, _ = build_simulation(cfg)
    assert not any(t in hook_types(sim) for t in ("Langevin", "NoseHooverChain", "StochasticVelocityRescaling"))
    for spelling in ("+dynamics/thermostat=langevin", "dynamics/thermostat=langevin"):
        cfg = load_config([f"simulation_dir={tmp_path / 'b'}", spelling])
        assert cfg.dynamics.thermostat.type == "langevin"
        sim, _ = build_simulation(cfg)
        assert "Langevin" in hook_types(sim)


def test_make_demo_names_its_thermostat():
    from pathlib import Path

    make = (Path(__file__).parents[1] / "Makefile").read_text()
    demo = [line for line in make.splitlines() if "spkmd simulation_dir=runs/demo" in line]
    assert demo and "dynamics/thermostat=langevin" in demo[0]


def test_nve_default_run_conserves_energy(tmp_path):
    trap = reference_bundle("harmonic_trap", tmp_path / "trap.bundle", k=0.5)
    d = tmp_path / "nve"
    r = invoke(f"simulation_dir={d}", f"calculator.model_file={trap}", "dynamics.n_steps=40", "plots=false",
               "dynamics.integrator.time_step=0.25", "seed=3")
    assert r.exit_code == 0, r.output
    e = HDF5Loader(d / "simulation.hdf5").get_property("conserved_energy")
    assert float(abs(e - e[0]).max()) < 1e-4 * max(1.0, float(abs(e[0]).max()))
    # no thermostat: the bath account stays exactly zero
    assert float(abs(HDF5Loader(d / "simulation.hdf5").get_property("bath_energy")).max()) == 0.0


def test_cfg_job_prints_the_resolved_config(tmp_path):
    r = invoke(f"simulation_dir={tmp_path / 'x'}", "+dynamics/thermostat=nhc", "--cfg", "job")
    assert r.exit_code == 0, r.output
    cfg = OmegaConf.create(r.output)
    assert cfg.dynamics.thermostat.type == "nhc" and cfg.dynamics.thermostat.temperature == 300.0
    assert cfg.simulation_dir == str(tmp_path / "x") and not (tmp_path / "x").exists()
    r = invoke("--cfg", "job", f"simulation_dir={tmp_path / 'x'}")  # before the overrides, as hydra allows
    assert r.exit_code == 0 and OmegaConf.create(r.output).calculator.type == "bundle"
    r = invoke("--cfg", "hydra", f"simulation_dir={tmp_path / 'x'}")
    assert r.exit_code != 0 and "--cfg job" in r.output


def test_load_config_runs_a_saved_config(tmp_path):
    trap = reference_bundle("harmonic_trap", tmp_path / "trap.bundle", k=0.5)
    r = invoke(f"simulation_dir={tmp_path / 'ignored'}", f"calculator.model_file={trap}", "+dynamics/thermostat=svr",
               "dynamics.thermostat.temperature_bath=123", "dynamics.n_steps=6", "plots=false", "--cfg", "job")
    assert r.exit_code == 0, r.output
    f = tmp_path / "md_input.yaml"
    f.write_text(r.output)
    d = tmp_path / "from_config"
    r = invoke(f"simulation_dir={d}", f"load_config={f}")
    assert r.exit_code == 0, r.output
    saved = OmegaConf.load(d / "config.yaml")
    assert saved.simulation_dir == str(d)  # the command line's directory, not the file's
    assert saved.dynamics.thermostat.type == "svr" and saved.dynamics.thermostat.temperature == 123.0
    assert HDF5Loader(d / "simulation.hdf5").steps[-1] == 6
    assert not (tmp_path / "ignored").exists()


@pytest.mark.parametrize(
    "override, path, expected, hook",
    [
        ("+dynamics/thermostat=pi_nhc_local", "dynamics.thermostat.type", "nhc_rpmd", "NHCNormalModes"),
        # the shipped memory_100fs.dat does not parse for rpmd_gle today (a GLE-file defect owned elsewhere):
        # only the mapping is checked here
        ("+dynamics/thermostat=pi_gle", "dynamics.thermostat.type", "rpmd_gle", None),
        ("+dynamics/thermostat=gle", "dynamics.thermostat.type", "gle", None),
        ("+dynamics/thermostat=nhc", "dynamics.thermostat.type", "nhc", "NoseHooverChain"),
        ("+dynamics/thermostat=pile_local", "dynamics.thermostat.type", "pile_local", "PILELocal"),
        ("+dynamics/thermostat=pile_global", "dynamics.thermostat.type", "pile_global", "PILEGlobal"),
        ("+dynamics/thermostat=trpmd", "dynamics.thermostat.type", "trpmd", "TRPMD"),
        ("+dynamics/thermostat=berendsen", "dynamics.thermostat.type", "berendsen", "Berendsen"),
        ("+dynamics/barostat=nhc_iso", "dynamics.barostat.type", "mtk", "MTKIsotropic"),
        ("+dynamics/barostat=nhc_aniso", "dynamics.barostat.type", "nhc_anisotropic", "MTKAnisotropic"),
        ("+dynamics/barostat=pile_rpmd", "dynamics.barostat.type", "pile", "PILEBarostat"),
    ],
)
def test_schnetpack_group_options_build_the_mapped_hook(tmp_path, override, path, expected, hook):
    from spkmd.factory import build_barostat, build_thermostat

    cfg = load_config([f"simulation_dir={tmp_path}", override])
    assert OmegaConf.select(cfg, path) == expected
    if hook is None:
        return
    section = path.rsplit(".", 1)[0]
    part = dict(OmegaConf.to_container(OmegaConf.select(cfg, section), resolve=True))
    built = (build_thermostat if "thermostat" in path else build_barostat)(part)
    assert type(built).__name__ == hook


def test_integrator_md_and_calculator_spk(tmp_path):
    cfg = load_config([f"simulation_dir={tmp_path}", "dynamics/integrator=md", "calculator=spk"])
    assert cfg.dynamics.integrator.type == "verlet" and cfg.calculator.type == "bundle"
    sim, _ = build_simulation(cfg)
    assert type(sim.integrator).__name__ == "VelocityVerlet"
    cfg = load_config([f"simulation_dir={tmp_path}", "calculator/neighbor_list=torch"])
    assert cfg.calculator.neighbor_list.backend == "torch"


def test_no_equivalent_names_ours(tmp_path):
    with pytest.raises(AliasError, match="nhc_rpmd"):
        load_config([f"simulation_dir={tmp_path}", "+dynamics/thermostat=pi_nhc_global"])
    with pytest.raises(AliasError, match="maxwell_boltzmann"):
        load_config([f"simulation_dir={tmp_path}", "system/initializer=uniform"])
    with pytest.raises(AliasError, match="masses come from the elements"):
        load_config([f"simulation_dir={tmp_path}", "system.mass_unit_input=1.0"])
    r = invoke(f"simulation_dir={tmp_path}", "calculator=orca")
    assert r.exit_code != 0 and "i-PI" in r.output


def test_key_aliases_land_on_our_keys(tmp_path):
    cfg = load_config([
        f"simulation_dir={tmp_path}", "+dynamics/thermostat=langevin", "dynamics.thermostat.temperature_bath=450",
        "+dynamics/barostat=nhc_iso", "dynamics.barostat.target_pressure=2.5",
        "calculator.required_properties=[energy,forces,dipole_moment]", "calculator.neighbor_list.cutoff_shell=0.7",
        "callbacks.hdf5.data_streams.1.target_properties=[energy,dipole_moment]",
        "callbacks.hdf5.data_streams.0.store_velocities=false", "callbacks.hdf5.filename=md.h5",
        "callbacks.checkpoint.checkpoint_file=state.chk", "system.position_unit_input=Bohr",
    ])
    assert cfg.dynamics.thermostat.temperature == 450.0 and cfg.dynamics.barostat.pressure == 2.5
    assert list(cfg.calculator.properties) == ["energy", "forces", "dipole_moment"]
    assert cfg.calculator.neighbor_list.skin == 0.7
    assert list(cfg.callbacks.hdf5.properties) == ["energy", "dipole_moment"]
    assert cfg.callbacks.hdf5.velocities is False and cfg.callbacks.hdf5.file == "md.h5"
    assert cfg.callbacks.checkpoint.file == "state.chk" and cfg.system.length_unit == "Bohr"
    # every alias target is a key of the shipped configs (a renamed key breaks this table)
    for spk, ours in KEY_ALIASES.items():
        assert translate_override(f"{spk}=1") == [f"{ours}=1"]
    for group, table in GROUP_OPTION_ALIASES.items():
        for option in table.values():
            if group != "calculator":
                from spkmd.factory import config_root

                assert (config_root() / group / f"{option}.yaml").is_file(), (group, option)


def test_required_properties_and_data_streams_reach_calculator_and_log(tmp_path):
    """required_properties reaches the calculator, target_properties the HDF5 logger."""
    from spkmd.calculators import CalculatorError

    trap = reference_bundle("harmonic_trap", tmp_path / "trap.bundle", k=0.5)
    base = [f"simulation_dir={tmp_path / 'p'}", f"calculator.model_file={trap}"]
    cfg = load_config([*base, "calculator.required_properties=[energy,forces,stress]",
                       "callbacks.hdf5.data_streams.1.target_properties=[energy,forces]"])
    sim, _ = build_simulation(cfg)
    assert sim.calculator.properties == () and sim.calculator.stress is True
    logger = next(h for h in sim.hooks if type(h).__name__ == "FileLogger")
    assert logger.extra == [] and logger.streams["forces"] is True
    cfg = load_config([*base, "calculator.required_properties=[energy,forces,dipole_moment]"])
    with pytest.raises(CalculatorError, match="dipole_moment"):  # the trap has no dipole: the request arrived
        build_simulation(cfg)


def test_unit_keys_checked_against_the_bundle(tmp_path):
    trap = reference_bundle("harmonic_trap", tmp_path / "trap.bundle", k=0.5)
    ok = invoke(f"simulation_dir={tmp_path / 'ok'}", f"calculator.model_file={trap}", "calculator.energy_unit=eV",
                "calculator.position_unit=Angstrom", "dynamics.n_steps=2", "plots=false")
    assert ok.exit_code == 0, ok.output
    bad = invoke(f"simulation_dir={tmp_path / 'bad'}", f"calculator.model_file={trap}", "calculator.energy_unit=kcal/mol",
                 "dynamics.n_steps=2", "plots=false")
    assert bad.exit_code != 0
    assert "calculator.energy_unit='kcal/mol' disagrees" in bad.output and "'eV'" in bad.output
    bad = invoke(f"simulation_dir={tmp_path / 'bad2'}", f"calculator.model_file={trap}", "calculator.position_unit=Bohr",
                 "dynamics.n_steps=2", "plots=false")
    assert bad.exit_code != 0 and "position_unit='Bohr' disagrees" in bad.output
    bad = invoke(f"simulation_dir={tmp_path / 'bad3'}", f"calculator.model_file={trap}", "calculator.energy_unit=Angstrom",
                 "dynamics.n_steps=2", "plots=false")
    assert bad.exit_code != 0 and "energy_unit" in bad.output


def test_restart_from_a_named_checkpoint(tmp_path):
    trap = reference_bundle("harmonic_trap", tmp_path / "trap.bundle", k=0.5)
    a = tmp_path / "a"
    common = [f"calculator.model_file={trap}", "+dynamics/thermostat=langevin", "plots=false", "seed=5"]
    assert invoke(f"simulation_dir={a}", *common, "dynamics.n_steps=10").exit_code == 0
    b = tmp_path / "b"
    r = invoke(f"simulation_dir={b}", *common, "dynamics.n_steps=16", f"restart={a / 'checkpoint.pt'}")
    assert r.exit_code == 0, r.output
    assert "restarting from" in r.output and "done: step 16" in r.output
    assert HDF5Loader(b / "simulation.hdf5").steps.tolist() == list(range(17))
    # the same as continuing in place
    r = invoke(f"simulation_dir={a}", "dynamics.n_steps=16")
    assert r.exit_code == 0, r.output
    sa, sb = load_state(a / "checkpoint.pt"), load_state(b / "checkpoint.pt")
    assert sb["step"] == 16 and torch.equal(sa["system"]["positions"], sb["system"]["positions"])
    assert OmegaConf.load(b / "config.yaml").restart is None


def test_load_system_state_starts_a_new_run_from_a_state(tmp_path):
    trap = reference_bundle("harmonic_trap", tmp_path / "trap.bundle", k=0.5)
    a = tmp_path / "a"
    assert invoke(f"simulation_dir={a}", f"calculator.model_file={trap}", "dynamics.n_steps=8", "plots=false").exit_code == 0
    state = load_state(a / "checkpoint.pt")["system"]
    cfg = load_config([f"simulation_dir={tmp_path / 'b'}", f"calculator.model_file={trap}", "dynamics.n_steps=3",
                       f"system.load_system_state={a / 'checkpoint.pt'}", "+dynamics/thermostat=nhc"])
    sim, restarted = build_simulation(cfg)
    assert not restarted and sim.step == 0 and "NoseHooverChain" in hook_types(sim)
    assert torch.equal(sim.system.positions, state["positions"]) and torch.equal(sim.system.momenta, state["momenta"])
    # a state of another system is refused with the reason
    water = tmp_path / "w.xyz"
    water.write_text("3\n\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n")
    cfg = load_config([f"simulation_dir={tmp_path / 'c'}", f"calculator.model_file={trap}",
                       f"system.molecule_file={water}", f"system.load_system_state={a / 'checkpoint.pt'}"])
    with pytest.raises(ValueError, match="differ from the configured system"):
        build_simulation(cfg)
