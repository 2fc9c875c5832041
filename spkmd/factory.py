"""Build simulation parts from plain config dicts (the YAML groups of ``configs/md``).

Every builder takes a ``dict`` with the keys of its YAML file, checks that no
unknown key is present, and converts units at this border (``time_step`` fs,
``temperature`` K, ``time_constant`` fs, cutoffs Å). Everything built here can
also be built directly in Python from the classes it calls.

Registries (plain dicts, name -> builder) let other modules add kinds::

    from spkmd.factory import register
    @register("integrator", "ring_polymer")
    def build_rpmd(cfg: dict, system: System) -> Integrator: ...

Kinds: ``integrator`` (builder(cfg, system)), ``thermostat`` (builder(cfg)),
``barostat`` (builder(cfg)). Types not found are looked up after importing the
extension modules :data:`EXTENSIONS` (``spkmd.rpmd``, ``spkmd.barostats``) if installed.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any, Callable

import torch

from spkmd.calculators import BundleCalculator, Calculator, EnsembleCalculator, ProviderCalculator, load_provider
from spkmd.hooks import Checkpoint, FileLogger, Hook, ProgressBar, RemoveCOMMotion, TensorBoardLogger
from spkmd.initializers import INITIALIZERS
from spkmd.integrators import Integrator, VelocityVerlet
from spkmd.system import System
from spkmd.thermostats import GLE, Berendsen, Langevin, NoseHooverChain, StochasticVelocityRescaling

EXTENSIONS = ("spkmd.rpmd", "spkmd.barostats")


class ConfigError(ValueError):
    """A config value or key is wrong (message names the key and the fix)."""


REGISTRY: dict[str, dict[str, Callable]] = {"integrator": {}, "thermostat": {}, "barostat": {}}


def register(kind: str, name: str) -> Callable:
    """Decorator adding a builder to :data:`REGISTRY` ``[kind][name]``."""
    if kind not in REGISTRY:
        raise ValueError(f"unknown registry kind {kind!r}; one of {sorted(REGISTRY)}")

    def deco(fn: Callable) -> Callable:
        REGISTRY[kind][name] = fn
        return fn

    return deco


def _lookup(kind: str, name: str) -> Callable:
    if name not in REGISTRY[kind]:
        for mod in EXTENSIONS:
            if importlib.util.find_spec(mod) is not None:
                importlib.import_module(mod)
    if name not in REGISTRY[kind]:
        raise ConfigError(f"unknown {kind} type {name!r}; known: {sorted(REGISTRY[kind])}")
    return REGISTRY[kind][name]


def check_keys(cfg: dict, allowed: set[str] | tuple, where: str) -> None:
    """Raise :class:`ConfigError` for keys of ``cfg`` not in ``allowed``."""
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[f'{where}.{k}' for k in unknown]}; known keys of {where}: {sorted(allowed)}")


def _required(cfg: dict, key: str, where: str) -> Any:
    if cfg.get(key) is None:
        raise ConfigError(f"{where}.{key} must be set")
    return cfg[key]


def config_root() -> Path:
    """Directory of the shipped spkmd configs (``spk_configs/md``)."""
    from importlib.resources import files

    return Path(str(files("spk_configs"))) / "md"


def resolve_file(name: str | Path, search_dirs: list[Path], what: str) -> Path:
    """``name`` as given (absolute or relative to the working directory), else in ``search_dirs``."""
    p = Path(name).expanduser()
    tried = [p]
    if p.is_file():
        return p.resolve()
    if not p.is_absolute():
        for d in search_dirs:
            q = d / p
            tried.append(q)
            if q.is_file():
                return q.resolve()
    raise FileNotFoundError(f"{what} {str(name)!r} not found (looked at {', '.join(str(t) for t in tried)})")


def bundle_search_dirs() -> list[Path]:
    spec = importlib.util.find_spec("spkserve")
    return [Path(spec.origin).parent / "data"] if spec and spec.origin else []


# ---------------------------------------------------------------------------------- system
def build_system(cfg: dict, dtype: torch.dtype, device: str) -> System:
    """System from ``system`` config (momenta are set later by :func:`build_initializer`)."""
    check_keys(cfg, {"molecule_file", "length_unit", "index", "n_molecules", "n_replicas", "initializer",
                     "load_system_state"}, "system")
    path = resolve_file(_required(cfg, "molecule_file", "system"), [config_root() / "system"], "molecule file")
    index = cfg.get("index", "-1")
    try:
        index = int(index)
    except (TypeError, ValueError):
        pass
    return System.from_file(
        path, n_replicas=int(cfg.get("n_replicas", 1)), length_unit=cfg.get("length_unit", "Angstrom"),
        index=index, n_molecules=int(cfg.get("n_molecules", 1)), dtype=dtype, device=device,
    )


def build_initializer(cfg: dict):
    cfg = dict(cfg)
    check_keys(cfg, {"type", "temperature", "remove_translation", "remove_rotation", "rescale"}, "system.initializer")
    kind = cfg.pop("type", "maxwell_boltzmann")
    if kind not in INITIALIZERS:
        raise ConfigError(f"unknown system.initializer.type {kind!r}; known: {sorted(INITIALIZERS)}")
    return INITIALIZERS[kind](temperature_K=float(_required(cfg, "temperature", "system.initializer")),
                              **{k: bool(v) for k, v in cfg.items() if k != "temperature"})


# ---------------------------------------------------------------------------------- dynamics
@register("integrator", "verlet")
def _verlet(cfg: dict, system: System) -> Integrator:
    check_keys(cfg, {"type", "time_step"}, "dynamics.integrator")
    return VelocityVerlet(time_step_fs=float(_required(cfg, "time_step", "dynamics.integrator")))


def build_integrator(cfg: dict, system: System) -> Integrator:
    return _lookup("integrator", cfg.get("type", "verlet"))(dict(cfg), system)


def _thermo(cls, extra: dict[str, tuple[str, Callable]]):
    """Builder for a thermostat taking temperature (K) and time_constant (fs) plus ``extra``."""

    def build(cfg: dict):
        check_keys(cfg, {"type", "temperature", "time_constant", *extra}, "dynamics.thermostat")
        kw = {"temperature_K": float(_required(cfg, "temperature", "dynamics.thermostat"))}
        if "time_constant" in cfg:
            kw["time_constant_fs"] = float(cfg["time_constant"])
        for key, (arg, conv) in extra.items():
            if key in cfg:
                kw[arg] = conv(cfg[key])
        return cls(**kw)

    return build


register("thermostat", "berendsen")(_thermo(Berendsen, {}))
register("thermostat", "langevin")(_thermo(Langevin, {}))
register("thermostat", "svr")(_thermo(StochasticVelocityRescaling, {}))
register("thermostat", "nhc")(_thermo(NoseHooverChain, {
    "chain_length": ("chain_length", int), "per_atom": ("per_atom", bool),
    "n_yoshida": ("n_yoshida", int), "n_steps": ("n_steps", int),
}))


@register("thermostat", "gle")
def _gle(cfg: dict):
    check_keys(cfg, {"type", "temperature", "matrix_file", "A_unit", "C_unit"}, "dynamics.thermostat")
    path = resolve_file(_required(cfg, "matrix_file", "dynamics.thermostat"), [config_root() / "gle"], "GLE matrix file")
    return GLE(float(_required(cfg, "temperature", "dynamics.thermostat")), A_file=path,
               A_unit=cfg.get("A_unit"), C_unit=cfg.get("C_unit"))


def build_thermostat(cfg: dict) -> Hook:
    return _lookup("thermostat", _required(cfg, "type", "dynamics.thermostat"))(dict(cfg))


def build_barostat(cfg: dict) -> Hook:
    return _lookup("barostat", _required(cfg, "type", "dynamics.barostat"))(dict(cfg))


# ---------------------------------------------------------------------------------- calculator
def _neighbor_kw(cfg: dict, where: str) -> dict:
    nl = dict(cfg.get("neighbor_list") or {})
    check_keys(nl, {"cutoff", "skin", "backend"}, f"{where}.neighbor_list")
    kw = {"skin_angstrom": float(nl.get("skin", 1.0)), "neighbor_backend": nl.get("backend", "vesin")}
    if nl.get("cutoff") is not None:
        kw["cutoff_angstrom"] = float(nl["cutoff"])
    return kw


def reference_bonds_bundle(system: System, path: Path, k_eV_per_A2: float) -> Path:
    """Write a harmonic-bonds bundle for the (identical) molecules of ``system``:
    bonds between atoms closer than 1.2 × the sum of covalent radii, r0 = start distances."""
    import numpy as np
    from ase.data import covalent_radii

    from spkserve.potentials import reference_bundle

    first = system.to_atoms(replica=0, molecule=0)[0]
    for m in range(1, system.n_molecules):
        if not np.array_equal(system.to_atoms(0, m)[0].numbers, first.numbers):
            raise ConfigError("calculator type reference_bonds needs identical molecules (one bond template)")
    d = first.get_all_distances()
    rc = covalent_radii[first.numbers]
    i, j = np.nonzero(np.triu(d < 1.2 * (rc[:, None] + rc[None, :]), 1))
    if len(i) == 0:
        raise ConfigError("reference_bonds: the start structure has no bonded atoms")
    return reference_bundle("harmonic_bonds", path, bonds=[[int(a), int(b)] for a, b in zip(i, j)],
                            k=float(k_eV_per_A2), r0=[float(x) for x in d[i, j]], n_atoms=len(first))


#: ``calculator.compile: auto`` compiles the model for runs of at least this many steps
#: (compilation takes 10-40 s; a compiled small-molecule step is ~2x faster, see benchmarks/results/md.md)
AUTO_COMPILE_MIN_STEPS = 10_000


def compile_choice(value: Any, n_steps: int | None) -> bool:
    """``calculator.compile``: true, false or ``auto`` (compile for runs of at least
    :data:`AUTO_COMPILE_MIN_STEPS` steps)."""
    if isinstance(value, bool):
        return value
    if value is None or value == "auto":
        return n_steps is not None and n_steps >= AUTO_COMPILE_MIN_STEPS
    raise ConfigError(f"calculator.compile must be true, false or auto, got {value!r}")


#: outputs every calculator computes (SchNetPack lists them in ``required_properties``)
ALWAYS_COMPUTED = ("energy", "forces")


def _split_properties(cfg: dict) -> tuple[list[str], bool | None]:
    """``calculator.properties`` without energy/forces; ``stress`` in the list means ``stress: true``."""
    props = [str(p) for p in (cfg.get("properties") or []) if str(p) not in ALWAYS_COMPUTED]
    stress = cfg.get("stress")
    if "stress" in props:
        props.remove("stress")
        if stress is False:
            raise ConfigError("calculator.properties lists stress but calculator.stress is false")
        stress = True
    return props, stress


def check_model_units(cfg: dict, length_unit: str, energy_unit: str, where: str) -> None:
    """``calculator.energy_unit`` / ``position_unit`` (SchNetPack keys) must agree with the units the
    model states (a bundle always states them; the calculator converts from those)."""
    from spkserve import units

    for key, stated, ref in (("position_unit", length_unit, "Angstrom"), ("energy_unit", energy_unit, "eV")):
        given = cfg.get(key)
        if given is None:
            continue
        try:
            units.check_dimension(str(given), ref)
            same = abs(units.factor(str(given), stated) - 1.0) < 1e-9
        except units.UnitError as err:
            raise ConfigError(f"calculator.{key}={given!r}: {err}") from None
        if not same:
            raise ConfigError(
                f"calculator.{key}={given!r} disagrees with {where}, which states {stated!r}; the model's own "
                f"units are used (conversion is automatic): remove calculator.{key} or set it to {stated!r}"
            )


def build_calculator(
    cfg: dict, system: System, dtype: torch.dtype, device: str, simulation_dir: Path, n_steps: int | None = None
) -> Calculator:
    """The calculator of ``cfg``; ``n_steps`` (the run length) decides ``compile: auto``."""
    kind = _required(cfg, "type", "calculator")
    dt_name = "float64" if dtype == torch.float64 else "float32"
    if kind == "bundle":
        check_keys(cfg, {"type", "model_file", "neighbor_list", "properties", "stress", "compile", "energy_unit",
                         "position_unit"}, "calculator")
        try:
            path = resolve_file(_required(cfg, "model_file", "calculator"), bundle_search_dirs(), "model bundle")
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{err}; give calculator.model_file=PATH (a bundle from spktrain or `spkserve reference`), "
                "or calculator=reference for a harmonic-bond stand-in potential"
            ) from None
        props, stress = _split_properties(cfg)
        calc = BundleCalculator(path, dtype=dt_name, device=device, properties=props,
                                stress=stress, compile=compile_choice(cfg.get("compile", "auto"), n_steps),
                                **_neighbor_kw(cfg, "calculator"))
        b = calc.provider.bundle
        check_model_units(cfg, b.length_unit, b.energy_unit, f"the bundle {path.name}")
        return calc
    if kind == "ensemble":
        check_keys(cfg, {"type", "model_files", "neighbor_list", "properties", "threshold_energy", "threshold_forces",
                         "on_exceed", "uncertain_frames_file", "reference", "energy_unit", "position_unit"},
                   "calculator")
        from spkserve.bundle import read_metadata
        from spkserve.ensemble import member_paths

        given = _required(cfg, "model_files", "calculator")
        given = [given] if isinstance(given, str) else list(given)  # a manifest from `spktrain ensemble` or bundles
        files = member_paths([resolve_file(f, bundle_search_dirs(), "model bundle") for f in given])
        for f in files:
            m = read_metadata(f)
            check_model_units(cfg, m["units"]["length"], m["units"]["energy"], f"the bundle {f.name}")
        out = cfg.get("uncertain_frames_file")
        props, _ = _split_properties(cfg)
        return EnsembleCalculator(
            files, properties=props, threshold_energy_eV=cfg.get("threshold_energy"),
            threshold_forces_eV_per_angstrom=cfg.get("threshold_forces"), on_exceed=cfg.get("on_exceed", "flag"),
            uncertain_frames_file=None if out is None else simulation_dir / out, dtype=dt_name, device=device,
            reference=_ase_reference(cfg.get("reference")),
            **_neighbor_kw(cfg, "calculator"),
        )
    if kind == "provider":
        check_keys(cfg, {"type", "provider", "params", "properties", "stress", "energy_unit", "position_unit"},
                   "calculator")
        provider = load_provider(_required(cfg, "provider", "calculator"), **dict(cfg.get("params") or {}))
        # the ForceProvider contract is Å and eV
        check_model_units(cfg, "Angstrom", "eV", "the force-provider contract (spkserve.provider)")
        props, stress = _split_properties(cfg)
        return ProviderCalculator(provider, properties=props, stress=stress)
    if kind == "reference_bonds":
        check_keys(cfg, {"type", "k"}, "calculator")
        path = reference_bonds_bundle(system, simulation_dir / "reference_bonds.bundle", float(cfg.get("k", 20.0)))
        return BundleCalculator(path, dtype=dt_name, device=device, skin_angstrom=0.0)
    raise ConfigError(f"unknown calculator.type {kind!r}; known: bundle, ensemble, provider, reference_bonds")


def _ase_reference(spec):
    """An ASE calculator from ``{"_target_": "package.module.Class", **kwargs}`` (None stays None)."""
    if not spec:
        return None
    spec = dict(spec)
    target = spec.pop("_target_", None)
    if not target:
        raise ConfigError("calculator.reference needs _target_ (an ASE calculator class, e.g. tblite.ase.TBLite)")
    module, sep, attr = target.partition(":")
    if not sep:
        module, _, attr = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot import calculator.reference._target_ {target!r}: {err}") from err
    return cls(**spec)


# ---------------------------------------------------------------------------------- callbacks
def build_callbacks(cfg: dict, simulation_dir: Path, n_steps: int) -> list[Hook]:
    """Loggers and progress first, the checkpoint last (it flushes the loggers)."""
    cfg = dict(cfg or {})
    check_keys(cfg, {"checkpoint", "hdf5", "progress", "tensorboard", "remove_com"}, "callbacks")
    hooks: list[Hook] = []
    if cfg.get("remove_com") is not None:
        c = dict(cfg["remove_com"])
        check_keys(c, {"every_n_steps", "remove_rotation"}, "callbacks.remove_com")
        hooks.append(RemoveCOMMotion(**c))
    if cfg.get("hdf5") is not None:
        c = dict(cfg["hdf5"])
        check_keys(c, {"file", "every_n_steps", "buffer_size", "positions", "velocities", "forces", "float64", "properties"},
                   "callbacks.hdf5")
        if c.get("properties") is not None:  # energy is always logged; forces by the forces flag
            wanted = [str(p) for p in c["properties"]]
            if "forces" in wanted:
                c["forces"] = True
            c["properties"] = [p for p in wanted if p not in ALWAYS_COMPUTED]
        hooks.append(FileLogger(simulation_dir / c.pop("file", "simulation.hdf5"), **c))
    if cfg.get("tensorboard") is not None:
        c = dict(cfg["tensorboard"])
        check_keys(c, {"log_dir", "every_n_steps"}, "callbacks.tensorboard")
        hooks.append(TensorBoardLogger(simulation_dir / c.pop("log_dir", "tensorboard"), **c))
    if cfg.get("progress") is not None:
        c = dict(cfg["progress"])
        check_keys(c, {"every_n_steps"}, "callbacks.progress")
        hooks.append(ProgressBar(n_steps=n_steps, **c))
    if cfg.get("checkpoint") is not None:
        c = dict(cfg["checkpoint"])
        check_keys(c, {"file", "every_n_steps"}, "callbacks.checkpoint")
        hooks.append(Checkpoint(simulation_dir / c.pop("file", "checkpoint.pt"), **c))
    return hooks
