"""Compose cG-SchNet configs (``configs/gschnet/``) with Hydra's Compose API.

    cfg = compose_gschnet_config(["experiment=gschnet_qm9_gap_relenergy", "data.datapath=qm9.extxyz"])

``config_dir`` adds a user directory to the search path (its ``experiment/`` and
``model/conditioning/`` files become selectable); a ``gschnet.yaml`` there replaces ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from training.config import ConfigError, builtin_config_dir

PRIMARY = "gschnet"


def gschnet_config_dir() -> Path:
    """The shipped cG-SchNet configs (``spk_configs/gschnet``)."""
    return builtin_config_dir().parent / "gschnet"


def compose_gschnet_config(overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> DictConfig:
    """Compose the ``gschnet`` config with ``overrides`` (not yet resolved)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    primary = gschnet_config_dir()
    if config_dir is not None:
        user = Path(config_dir).expanduser().resolve()
        if not user.is_dir():
            raise ConfigError(f"--config-dir {str(config_dir)!r} is not a directory")
        if (user / f"{PRIMARY}.yaml").exists():
            primary, extra = user, gschnet_config_dir()
        else:
            extra = user
        overrides.append(f"hydra.searchpath=[file://{extra}]")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(primary), version_base=None):
            return compose(config_name=PRIMARY, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"cannot compose the cG-SchNet config: {str(err).strip()}") from err
    finally:
        GlobalHydra.instance().clear()
