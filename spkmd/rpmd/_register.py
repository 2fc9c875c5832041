"""Builders for ``configs/md`` (registered into :data:`spkmd.factory.REGISTRY` on import of
:mod:`spkmd.rpmd`): integrators ``rpmd``, ``npt``, ``rpmd_npt``; thermostats ``pile_local``,
``pile_global``, ``trpmd``, ``nhc_rpmd``, ``rpmd_gle``, ``piglet``; barostats ``mtk`` /
``nhc_isotropic``, ``nhc_anisotropic``, ``pile``, ``scr``. Config units: fs, K, bar, 1/bar.

Classes are imported inside the builders (``spkmd.barostats`` imports this package).
"""

from __future__ import annotations

from spkmd.factory import ConfigError, _required, check_keys, config_root, register, resolve_file
from spkmd.system import System

_WHERE = {"integrator": "dynamics.integrator", "thermostat": "dynamics.thermostat", "barostat": "dynamics.barostat"}


def _temperature(cfg: dict, where: str) -> float:
    return float(_required(cfg, "temperature", where))


# --------------------------------------------------------------------------------- integrators
@register("integrator", "rpmd")
def _rpmd(cfg: dict, system: System):
    from spkmd.rpmd.integrator import RingPolymerIntegrator

    w = _WHERE["integrator"]
    check_keys(cfg, {"type", "time_step", "temperature", "scheme", "require_even", "estimators"}, w)
    return RingPolymerIntegrator(float(_required(cfg, "time_step", w)), _temperature(cfg, w),
                                 scheme=str(cfg.get("scheme", "exact")), n_beads=system.n_replicas,
                                 require_even=bool(cfg.get("require_even", False)),
                                 estimators=bool(cfg.get("estimators", True)))


@register("integrator", "npt")
def _npt(cfg: dict, system: System):
    from spkmd.npt import NPTVelocityVerlet

    w = _WHERE["integrator"]
    check_keys(cfg, {"type", "time_step"}, w)
    if system.n_replicas != 1:
        raise ConfigError(f"dynamics.integrator=npt propagates one replica, system.n_replicas={system.n_replicas}; use rpmd_npt")
    return NPTVelocityVerlet(float(_required(cfg, "time_step", w)), barostat=None)


@register("integrator", "rpmd_npt")
def _rpmd_npt(cfg: dict, system: System):
    from spkmd.npt import RingPolymerNPT

    w = _WHERE["integrator"]
    check_keys(cfg, {"type", "time_step", "temperature", "scheme", "estimators"}, w)
    return RingPolymerNPT(float(_required(cfg, "time_step", w)), _temperature(cfg, w), barostat=None,
                          scheme=str(cfg.get("scheme", "exact")), n_beads=system.n_replicas,
                          estimators=bool(cfg.get("estimators", True)))


# --------------------------------------------------------------------------------- thermostats
def _kw(cfg: dict, spec: dict, where: str) -> dict:
    check_keys(cfg, {"type", "temperature", *spec}, where)
    kw = {"temperature_K": _temperature(cfg, where)}
    for key, (arg, conv) in spec.items():
        if key in cfg and cfg[key] is not None:
            kw[arg] = conv(cfg[key])
    return kw


def _thermostat(name: str, cls_name: str, spec: dict):
    def build(cfg: dict):
        from spkmd.rpmd import thermostats

        return getattr(thermostats, cls_name)(**_kw(cfg, spec, _WHERE["thermostat"]))

    register("thermostat", name)(build)


_tc = {"time_constant": ("time_constant_fs", float)}
_thermostat("pile_local", "PILELocal", {**_tc, "damping_factor": ("damping_factor", float)})
_thermostat("pile_global", "PILEGlobal", {**_tc, "damping_factor": ("damping_factor", float)})
_thermostat("trpmd", "TRPMD", {"damping_factor": ("damping_factor", float)})
_thermostat("nhc_rpmd", "NHCNormalModes", {**_tc, "chain_length": ("chain_length", int),
                                           "n_yoshida": ("n_yoshida", int), "n_steps": ("n_steps", int)})


def _matrix(cfg: dict) -> str:
    return str(resolve_file(_required(cfg, "matrix_file", _WHERE["thermostat"]), [config_root() / "gle"], "GLE matrix file"))


@register("thermostat", "rpmd_gle")
def _rpmd_gle(cfg: dict):
    from spkmd.rpmd.thermostats import RPMDGLE

    check_keys(cfg, {"type", "temperature", "matrix_file"}, _WHERE["thermostat"])
    return RPMDGLE(_temperature(cfg, _WHERE["thermostat"]), A_file=_matrix(cfg))


@register("thermostat", "piglet")
def _piglet(cfg: dict):
    from spkmd.rpmd.thermostats import PIGLET

    check_keys(cfg, {"type", "temperature", "matrix_file"}, _WHERE["thermostat"])
    return PIGLET(_temperature(cfg, _WHERE["thermostat"]), _matrix(cfg))


# --------------------------------------------------------------------------------- barostats
def _barostat(names: tuple[str, ...], cls_name: str, spec: dict):
    def build(cfg: dict):
        from spkmd import barostats

        w = _WHERE["barostat"]
        check_keys(cfg, {"type", "pressure", "temperature", "time_constant", *spec}, w)
        kw = {"pressure_bar": float(_required(cfg, "pressure", w)), "temperature_K": _temperature(cfg, w)}
        if cfg.get("time_constant") is not None:
            kw["time_constant_fs"] = float(cfg["time_constant"])
        for key, (arg, conv) in spec.items():
            if cfg.get(key) is not None:
                kw[arg] = conv(cfg[key])
        return getattr(barostats, cls_name)(**kw)

    for n in names:
        register("barostat", n)(build)


_bt = {"thermostat_time_constant": ("thermostat_time_constant_fs", float)}
_barostat(("mtk", "nhc_isotropic"), "MTKIsotropic", {**_bt, "chain_length": ("chain_length", int)})
_barostat(("nhc_anisotropic", "mtk_anisotropic"), "MTKAnisotropic", {**_bt, "chain_length": ("chain_length", int)})
_barostat(("pile", "pile_barostat"), "PILEBarostat", _bt)
_barostat(("scr", "stochastic_cell_rescaling"), "StochasticCellRescaling",
          {"compressibility": ("compressibility_per_bar", float)})
