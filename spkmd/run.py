"""Compose a config (hydra Compose API), build a simulation from it, run or restart it.

The ``spkmd`` command is a thin click layer over :func:`load_config` and
:func:`run_simulation`; both work from plain Python too::

    cfg = load_config(["simulation_dir=/tmp/x", "dynamics.n_steps=100"])
    sim = run_simulation(cfg)
"""

from __future__ import annotations

import random
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from spkmd.factory import (
    ConfigError,
    build_barostat,
    build_calculator,
    build_callbacks,
    build_initializer,
    build_integrator,
    build_system,
    build_thermostat,
    check_keys,
    config_root,
    resolve_file,
)
from spkmd.aliases import translate_overrides
from spkmd.simulator import Simulator, load_state
from spkmd.thermostats import Thermostat

CONFIG_NAME = "config"
TOP_LEVEL_KEYS = {"calculator", "system", "dynamics", "callbacks", "simulation_dir", "device", "precision", "seed",
                  "overwrite", "num_threads", "plots", "restart"}
SAVED_CONFIG = "config.yaml"
#: with num_threads null, systems with fewer atoms × replicas than this run on one thread
SMALL_SYSTEM_ATOMS = 200
_TOP_LEVEL_DEFAULTS = {"device": "cpu", "precision": 64, "seed": None, "overwrite": False, "num_threads": None,
                       "plots": True, "callbacks": {}, "restart": None}


def _default_groups(config_dir: Path) -> set[str]:
    """Groups selected in the primary config's defaults list (e.g. ``dynamics/thermostat``)."""
    raw = OmegaConf.load(config_dir / f"{CONFIG_NAME}.yaml")
    groups = set()
    for item in raw.get("defaults", []):
        if isinstance(item, (dict, DictConfig)):
            groups.update(str(k) for k in item)
    return groups


def _normalise_overrides(overrides: Sequence[str], groups: set[str]) -> list[str]:
    """``+group=option`` for a group already in the defaults means "select this option"
    (SchNetPack spelling, e.g. ``+dynamics/thermostat=nhc``)."""
    out = []
    for o in overrides:
        if o.startswith("+") and not o.startswith("++") and "=" in o and o[1:].split("=", 1)[0] in groups:
            o = o[1:]
        out.append(o)
    return out


def compose(overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> DictConfig:
    """Compose ``configs/md/config.yaml`` with hydra overrides (``--config-dir`` adds a search path)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    root = config_root()
    overrides = _normalise_overrides(translate_overrides(list(overrides)), _default_groups(root))
    if config_dir is not None:
        d = Path(config_dir).resolve()
        if not d.is_dir():
            raise ConfigError(f"config directory {str(d)!r} does not exist")
        overrides.append(f"hydra.searchpath=[file://{d}]")
    try:
        with initialize_config_dir(config_dir=str(root), version_base=None):
            return hydra_compose(config_name=CONFIG_NAME, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"invalid configuration: {err}") from err


def _plain_overrides(overrides: Sequence[str]) -> list[str]:
    plain = []
    for o in overrides:
        key = o.split("=", 1)[0]
        if "=" not in o or "/" in key or key.startswith(("~", "+")):
            raise ConfigError(
                f"override {o!r} selects or removes a config group; with a saved config (--config, or a "
                "simulation_dir holding a checkpoint) only key=value overrides apply"
            )
        plain.append(o)
    return plain


def _apply_plain(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    from omegaconf.errors import OmegaConfBaseException

    OmegaConf.set_struct(cfg, True)
    try:
        for o in _plain_overrides(translate_overrides(list(overrides))):
            key, value = o.split("=", 1)
            OmegaConf.update(cfg, key, OmegaConf.create({"v": value} if value == "" else f"v: {value}").v, merge=False)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid override: {err}") from err
    return cfg


def _dir_from_overrides(overrides: Sequence[str]) -> Path | None:
    for o in overrides:
        if o.startswith("simulation_dir="):
            return Path(o.split("=", 1)[1])
    return None


def checkpoint_path(cfg: DictConfig) -> Path | None:
    c = (cfg.get("callbacks") or {}).get("checkpoint")
    if c is None:
        return None
    return Path(cfg.simulation_dir) / c.get("file", "checkpoint.pt")


def load_config(
    overrides: Sequence[str] = (),
    config_file: str | Path | None = None,
    config_dir: str | Path | None = None,
) -> DictConfig:
    """The config of a run: ``config_file`` (+ key=value overrides), else the saved config of a
    ``simulation_dir`` that holds a checkpoint (restart), else configs/md composed with ``overrides``.

    ``load_config=FILE`` among the overrides is SchNetPack's spelling of ``config_file``; the
    ``simulation_dir`` of the command line replaces the one in the file."""
    overrides = list(overrides)
    loads = [o for o in overrides if o.startswith("load_config=")]
    if loads:
        if config_file is not None or len(loads) > 1:
            raise ConfigError("give one config file: load_config=FILE or --config FILE, not both")
        config_file = loads[0].split("=", 1)[1]
        overrides = [o for o in overrides if not o.startswith("load_config=")]
    if config_file is not None:
        p = Path(config_file)
        if not p.is_file():
            raise FileNotFoundError(f"config file {str(p)!r} does not exist")
        loaded = OmegaConf.load(p)
        for key, value in _TOP_LEVEL_DEFAULTS.items():  # short hand-written files
            if key not in loaded:
                loaded[key] = value
        cfg = _apply_plain(loaded, overrides)
    else:
        d = _dir_from_overrides(overrides)
        saved = None if d is None else d / SAVED_CONFIG
        overwrite = any(o in ("overwrite=true", "overwrite=True") for o in overrides)
        if saved is not None and saved.is_file() and not overwrite:
            cfg_saved = OmegaConf.load(saved)
            ck = checkpoint_path(cfg_saved)
            if ck is not None and ck.is_file():
                cfg = _apply_plain(cfg_saved, overrides)
                check_config(cfg)
                return cfg
        cfg = compose(overrides, config_dir)
    check_config(cfg)
    return cfg


def check_config(cfg: DictConfig) -> None:
    check_keys({k: None for k in cfg.keys()}, TOP_LEVEL_KEYS, "config")
    if "simulation_dir" not in cfg or OmegaConf.is_missing(cfg, "simulation_dir"):
        raise ConfigError("simulation_dir must be given (e.g. spkmd simulation_dir=runs/ethanol)")
    for section in ("calculator", "system", "dynamics"):
        if section not in cfg:
            raise ConfigError(f"the config has no {section!r} section")
    if int(cfg.precision) not in (32, 64):
        raise ConfigError(f"precision must be 32 or 64, got {cfg.precision}")


@contextmanager
def _sigterm_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt so hooks flush and checkpoint on `kill`."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def load_system_state(system, path: str | Path) -> None:
    """Replace the state of ``system`` (positions, momenta, cells, ...) by the system saved in the
    checkpoint ``path`` (SchNetPack's ``system.load_system_state``); the layout must agree."""
    state = load_state(path)
    if not isinstance(state, dict) or "system" not in state:
        raise ConfigError(f"{path} is not an spkmd checkpoint (no system state in it)")
    saved = state["system"]
    for name in ("atomic_numbers", "n_atoms"):
        mine, theirs = getattr(system, name).cpu(), saved[name].cpu()
        if mine.shape != theirs.shape or not bool((mine == theirs).all()):
            raise ConfigError(
                f"system.load_system_state={path}: its {name} {theirs.tolist()} differ from the configured "
                f"system's {mine.tolist()}; give the molecule_file/n_molecules the checkpoint was written with"
            )
    if tuple(saved["positions"].shape) != tuple(system.positions.shape):
        raise ConfigError(
            f"system.load_system_state={path}: positions of shape {tuple(saved['positions'].shape)} "
            f"(replicas, atoms, 3), the configured system has {tuple(system.positions.shape)}; set system.n_replicas"
        )
    system.load_state_dict(saved)


def _carry_log(c: dict, checkpoint: Path, sim_dir: Path) -> None:
    """An explicit ``restart=CKPT`` into a directory without the run's HDF5 log copies the log
    found next to the checkpoint (the logger continues it)."""
    hdf5 = (c.get("callbacks") or {}).get("hdf5")
    if hdf5 is None:
        return
    name = hdf5.get("file", "simulation.hdf5")
    dst, src = sim_dir / name, checkpoint.parent / name
    if dst.exists():
        return
    if not src.is_file():
        raise ConfigError(
            f"restart={checkpoint}: the run's log {src} is not next to the checkpoint; copy it to {dst}, "
            "or start a new run from the checkpoint's state with system.load_system_state=CHECKPOINT"
        )
    shutil.copy2(src, dst)


def build_simulation(cfg: DictConfig) -> tuple[Simulator, bool]:
    """Build the simulator from a resolved config; returns (simulator, restarted)."""
    sim_dir = Path(cfg.simulation_dir)
    c = OmegaConf.to_container(cfg, resolve=True)
    dtype = torch.float64 if int(c["precision"]) == 64 else torch.float32
    device = c.get("device", "cpu")
    system_cfg = dict(c["system"])
    init_cfg = system_cfg.get("initializer")
    system = build_system(system_cfg, dtype, device)
    if c.get("num_threads"):
        torch.set_num_threads(int(c["num_threads"]))
    elif system.n_atoms_total * system.n_replicas < SMALL_SYSTEM_ATOMS:
        torch.set_num_threads(1)  # intra-op threads only cost time on tiny tensors
    ck = checkpoint_path(cfg)
    restart = ck is not None and ck.is_file() and not c.get("overwrite", False)
    if c.get("restart") is not None:  # SchNetPack's restart=CHECKPOINT: continue from this file
        ck = resolve_file(c["restart"], [sim_dir], "restart checkpoint")
        restart = True
    if not restart:
        if c.get("overwrite", False) and sim_dir.exists():
            for name in (ck, sim_dir / (c["callbacks"].get("hdf5") or {}).get("file", "simulation.hdf5")):
                if name is not None and Path(name).exists():
                    Path(name).unlink()
            shutil.rmtree(sim_dir / "plots", ignore_errors=True)
    sim_dir.mkdir(parents=True, exist_ok=True)
    if restart and c.get("restart") is not None:
        _carry_log(c, ck, sim_dir)
    dyn = dict(c["dynamics"])
    check_keys(dyn, {"n_steps", "integrator", "thermostat", "barostat"}, "dynamics")
    integrator = build_integrator(dict(dyn.get("integrator") or {"type": "verlet", "time_step": 0.5}), system)
    hooks = []
    if dyn.get("thermostat") is not None:
        hooks.append(build_thermostat(dict(dyn["thermostat"])))
    if dyn.get("barostat") is not None:
        hooks.append(build_barostat(dict(dyn["barostat"])))
    n_steps = int(dyn.get("n_steps", 0))
    hooks += build_callbacks(c.get("callbacks") or {}, sim_dir, n_steps)
    calculator = build_calculator(dict(c["calculator"]), system, dtype, device, sim_dir, n_steps=n_steps)
    calculator.check(system)

    seed = c.get("seed")
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
        cfg.seed = seed
    sim = Simulator(system, integrator, calculator, hooks=hooks, seed=int(seed))
    state_file = system_cfg.get("load_system_state")
    if restart:
        sim.load_checkpoint(ck)
    elif state_file is not None:  # positions, momenta, cells from a checkpoint; step 0, fresh hooks
        load_system_state(system, resolve_file(state_file, [sim_dir], "system state checkpoint"))
    elif init_cfg is not None:
        # a per-atom thermostat thermalises (and counts) the COM modes: start them at T as well
        com_thermalised = any(isinstance(h, Thermostat) and h.acts_per_atom for h in hooks)
        build_initializer(dict(init_cfg))(system, sim.generator, com_thermalised=com_thermalised,
                                          temperature_factor=integrator.kinetic_temperature_factor(system))
    if cfg.get("restart") is not None:
        cfg.restart = None  # the next restart of this directory uses its own checkpoint
    OmegaConf.save(cfg, sim_dir / SAVED_CONFIG)  # resolved seed; on restart e.g. a raised n_steps
    return sim, restart


def run_simulation(cfg: DictConfig, out=None) -> Simulator:
    """Build (or restart) and run up to ``dynamics.n_steps``; write plots; return the simulator."""
    out = out or sys.stdout
    sim, restart = build_simulation(cfg)
    n_total = int(cfg.dynamics.n_steps)
    sim_dir = Path(cfg.simulation_dir)
    if restart:
        print(f"restarting from {checkpoint_path(cfg)} at step {sim.step}", file=out)
    remaining = n_total - sim.step
    try:
        with _sigterm_as_interrupt():
            # simulate(0) on a finished run still starts the hooks, which restore their
            # checkpointed state (bath energies, thermostat dof), so the summary below is right
            sim.simulate(max(remaining, 0))
    finally:
        sim.calculator.close()
    s = sim.system
    from spkserve import units

    to_eV = units.factor("Hartree", "eV")
    print(
        f"done: step {sim.step} ({sim.time_fs:.1f} fs); T = {float(sim.temperature().mean()):.2f} K "
        f"({sim.integrator.temperature_estimator}), "
        f"E_pot = {float(s.energy.mean()) * to_eV:.6f} eV, E_kin = {float(s.kinetic_energy().mean()) * to_eV:.6f} eV, "
        f"E_conserved = {float(sim.conserved_energy().mean()) * to_eV:.6f} eV",
        file=out,
    )
    hdf5 = (cfg.callbacks or {}).get("hdf5")
    if cfg.get("plots", True) and hdf5 is not None:
        from spkmd.plotting import plot_log

        files = plot_log(sim_dir / hdf5.get("file", "simulation.hdf5"), sim_dir / "plots")
        print(f"plots: {', '.join(str(f) for f in files)}", file=out)
    return sim
