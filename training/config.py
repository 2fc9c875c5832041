"""Compose training configs with Hydra's Compose API (SchNetPack override spelling).

    cfg = compose_config(["experiment=md17", "data.datapath=eth.db", "model/representation=painn"])

Overrides: ``key=value``, ``group=option``, ``+key=value`` (add), ``~key`` (delete).
``config_dir`` adds a user directory to the search path (its groups, e.g.
``DIR/experiment/mine.yaml``, become selectable; a ``DIR/train.yaml`` replaces
the primary config).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

PRIMARY_CONFIG = "train"


class ConfigError(ValueError):
    """An override or config file cannot be composed; the message names it."""


def builtin_config_dir() -> Path:
    """Absolute path of the shipped training configs (``spk_configs/train``).

    Falls back to ``configs/train`` of a source checkout when ``spk_configs`` is
    not importable (an editable install made before the package mapping existed).
    """
    try:
        return Path(str(importlib.resources.files("spk_configs") / "train")).resolve()
    except ModuleNotFoundError:
        here = Path(__file__).resolve().parent.parent / "configs" / "train"
        if here.is_dir():
            return here
        raise


#: SchNetPack's override prefixes -> ours (its model config nests representation params directly)
KEY_PREFIX_ALIASES: dict[str, str] = {
    "model.representation.": "model.params.representation.params.",
}
#: SchNetPack's radial-basis group (model/representation/radial_basis=NAME) -> our representation key
RADIAL_BASIS_GROUP = "model/representation/radial_basis"
RADIAL_BASES = ("gaussian", "gaussian_centered", "bessel")


def translate_override(override: str) -> str:
    """Our spelling of one override in SchNetPack's (``model.representation.n_atom_basis=64``,
    ``model/representation/radial_basis=bessel``); ours pass unchanged."""
    prefix = override[: len(override) - len(override.lstrip("+~"))]
    body = override[len(prefix):]
    if body.startswith(RADIAL_BASIS_GROUP + "="):
        name = body.split("=", 1)[1]
        if name not in RADIAL_BASES:
            raise ConfigError(f"{override!r}: unknown radial basis {name!r}; known: {list(RADIAL_BASES)}")
        return f"model.params.representation.params.radial_basis={name}"
    for theirs, ours in KEY_PREFIX_ALIASES.items():
        if body.startswith(theirs):
            return prefix + ours + body[len(theirs):]
    return override


def compose_config(
    overrides: Sequence[str] = (), config_dir: str | Path | None = None, config_name: str = PRIMARY_CONFIG
) -> DictConfig:
    """Compose the training config with ``overrides`` (not yet resolved)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [translate_override(o) for o in overrides]
    primary_dir = builtin_config_dir()
    if config_dir is not None:
        user = Path(config_dir).expanduser().resolve()
        if not user.is_dir():
            raise ConfigError(f"--config-dir {str(config_dir)!r} is not a directory")
        if (user / f"{config_name}.yaml").exists():
            primary_dir, extra = user, builtin_config_dir()
        else:
            extra = user
        overrides.append(f"hydra.searchpath=[file://{extra}]")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(primary_dir), version_base=None):
            cfg = compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        msg = str(err).strip()
        raise ConfigError(f"cannot compose the training config: {msg}") from err
    finally:
        GlobalHydra.instance().clear()
    return cfg


def resolve(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` with every interpolation resolved (errors name the key)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve the training config: {err}") from err
    return OmegaConf.create(container)


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text."""
    return OmegaConf.to_yaml(resolve(cfg))
