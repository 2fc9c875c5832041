"""SchNetPack spellings of ``spkmd`` overrides, mapped onto this project's config.

SchNetPack users type group options (``+dynamics/thermostat=pi_nhc_local``,
``dynamics/integrator=md``) and keys (``dynamics.thermostat.temperature_bath=500``,
``callbacks.hdf5.data_streams.1.target_properties=[energy,dipole_moment]``) from its
documentation. :func:`translate_override` rewrites one such override into ours
before hydra composes the config; our own spellings pass through unchanged.
Where no equivalent exists the error names the nearest one (:data:`NO_EQUIVALENT`).

The tables are plain dicts; docs/migration.md lists them for people.
"""

from __future__ import annotations

import re

#: group -> {SchNetPack option: our option}
GROUP_OPTION_ALIASES: dict[str, dict[str, str]] = {
    "dynamics/thermostat": {"pi_nhc_local": "nhc_rpmd", "pi_gle": "rpmd_gle"},
    "dynamics/barostat": {"nhc_iso": "mtk", "nhc_aniso": "nhc_anisotropic", "pile_rpmd": "pile"},
    "dynamics/integrator": {"md": "verlet"},
    "calculator": {"spk": "bundle", "spk_ensemble": "ensemble", "schnetpack": "bundle",
                   "schnetpack_ensemble": "ensemble"},
}

#: (group, SchNetPack option) -> what to use here instead (no faithful mapping exists)
NO_EQUIVALENT: dict[tuple[str, str], str] = {
    ("dynamics/thermostat", "pi_nhc_global"): (
        "SchNetPack's global ring-polymer NHC (one chain on the whole centroid) has no counterpart here; "
        "use +dynamics/thermostat=nhc_rpmd (massive NHC on every normal mode, SchNetPack's pi_nhc_local) "
        "or +dynamics/thermostat=pile_global (global stochastic rescaling of the centroid)"
    ),
    ("calculator", "orca"): (
        "there is no ORCA calculator; drive an external code over the i-PI socket "
        "(calculator=provider calculator.provider=spkserve.ipi.server:IPIServerProvider, see docs/ipi.md) "
        "or train a bundle on its data"
    ),
    ("calculator", "lj"): (
        "use a Lennard-Jones bundle: `spkserve reference lj ...` (see --help), then calculator.model_file=lj.bundle"
    ),
    ("system/initializer", "uniform"): (
        "only Maxwell-Boltzmann initial velocities exist here (system.initializer.type=maxwell_boltzmann, the default)"
    ),
}

#: neighbor-list options of SchNetPack (``calculator/neighbor_list=torch``) -> our backend names
NEIGHBOR_LIST_ALIASES: dict[str, str] = {"torch": "torch", "ase": "ase", "matscipy": "matscipy"}

#: SchNetPack key path -> our key path (dotted, as typed on the command line)
KEY_ALIASES: dict[str, str] = {
    "dynamics.thermostat.temperature_bath": "dynamics.thermostat.temperature",
    "dynamics.thermostat.gle_file": "dynamics.thermostat.matrix_file",
    "dynamics.barostat.temperature_bath": "dynamics.barostat.temperature",
    "dynamics.barostat.target_pressure": "dynamics.barostat.pressure",
    "dynamics.barostat.time_constant_barostat": "dynamics.barostat.time_constant",
    "calculator.required_properties": "calculator.properties",
    "calculator.neighbor_list.cutoff_shell": "calculator.neighbor_list.skin",
    "callbacks.checkpoint.checkpoint_file": "callbacks.checkpoint.file",
    "callbacks.hdf5.filename": "callbacks.hdf5.file",
    # SchNetPack's default hdf5 streams: 0 = MoleculeStream, 1 = PropertyStream
    "callbacks.hdf5.data_streams.0.store_velocities": "callbacks.hdf5.velocities",
    "callbacks.hdf5.data_streams.1.target_properties": "callbacks.hdf5.properties",
    "system.position_unit_input": "system.length_unit",
}

#: SchNetPack keys without a counterpart -> what to do instead
KEY_NO_EQUIVALENT: dict[str, str] = {
    "system.mass_unit_input": "masses come from the elements (ASE atomic masses in u); there is no mass unit to set",
    "calculator.force_key": "outputs use fixed names (energy, forces, stress); a bundle states its own outputs",
    "calculator.energy_key": "outputs use fixed names (energy, forces, stress); a bundle states its own outputs",
    "calculator.stress_key": "set calculator.stress=true (or add stress to calculator.properties)",
    "calculator.script_model": "bundles are rebuilt from their spec; use calculator.compile=true for a compiled model",
    "callbacks.hdf5.precision": "use callbacks.hdf5.float64=true|false",
    "dynamics.progress": "use +callbacks=progress / ~callbacks.progress",
}

_GROUP_RE = re.compile(r"^(?P<prefix>[+~]{0,2})(?P<group>[a-z_]+(?:/[a-z_]+)*)=(?P<option>[^=]*)$")


class AliasError(ValueError):
    """A SchNetPack spelling without an equivalent here (the message names what to use)."""


def translate_override(override: str) -> list[str]:
    """Our spelling of one override (a list: one SchNetPack override may become several)."""
    m = _GROUP_RE.match(override)
    if m is not None and "/" in m["group"]:
        group, option = m["group"], m["option"]
        if (group, option) in NO_EQUIVALENT:
            raise AliasError(f"{override!r}: {NO_EQUIVALENT[group, option]}")
        if group == "calculator/neighbor_list":
            if option not in NEIGHBOR_LIST_ALIASES:
                raise AliasError(f"{override!r}: unknown neighbor list; known: {sorted(NEIGHBOR_LIST_ALIASES)}")
            return [f"calculator.neighbor_list.backend={NEIGHBOR_LIST_ALIASES[option]}"]
        if group == "system/initializer":
            return [f"system.initializer.type={option}"]
        new = GROUP_OPTION_ALIASES.get(group, {}).get(option)
        return [f"{m['prefix']}{group}={new}"] if new else [override]
    if m is not None and m["group"] == "calculator" and m["prefix"] == "":
        option = m["option"]
        if ("calculator", option) in NO_EQUIVALENT:
            raise AliasError(f"{override!r}: {NO_EQUIVALENT['calculator', option]}")
        new = GROUP_OPTION_ALIASES["calculator"].get(option)
        return [f"calculator={new}"] if new else [override]
    if "=" not in override:
        return [override]
    key, value = override.split("=", 1)
    prefix = key[: len(key) - len(key.lstrip("+~"))]
    bare = key[len(prefix):]
    if bare in KEY_NO_EQUIVALENT:
        raise AliasError(f"{override!r}: {KEY_NO_EQUIVALENT[bare]}")
    if bare in KEY_ALIASES:
        return [f"{prefix}{KEY_ALIASES[bare]}={value}"]
    return [override]


def translate_overrides(overrides: list[str]) -> list[str]:
    """:func:`translate_override` over a list."""
    return [o for override in overrides for o in translate_override(override)]
