"""Train a committee of models and export it as one ensemble (``spktrain ensemble``).

    spktrain ensemble experiment=ethanol_xtb ensemble.n_models=4 [ensemble.bootstrap=true] [ensemble.dir=DIR]

Every member is an ordinary ``spktrain`` run (``DIR/member_<k>/``) of the same config with
``run.seed = ensemble.seed + k``. All members share one train/val/test split
(``DIR/split.npz``); with ``ensemble.bootstrap=true`` member k trains on a bootstrap
resample (drawn with replacement, seed ``ensemble.seed + k``) of the shared training
indices, so members see different data as well as different initial weights.
Each member is exported to ``DIR/member_<k>.bundle`` and the set is described by
``DIR/ensemble.json`` (:mod:`spkserve.ensemble`), which ``spkmd calculator=ensemble
calculator.model_files=DIR/ensemble.json``, ``spkserve.ase.BundleCalculator``, ``spkserve
serve`` and ``spkserve ipi`` take as one model. Re-running the command resumes: exported
members are kept, interrupted members continue from their last checkpoint.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

MANIFEST_NAME = "ensemble.json"


@dataclass(frozen=True)
class EnsembleOptions:
    """``ensemble.*`` options: committee size, bootstrap, base seed, output directory, export dtype."""

    n_models: int = 4
    bootstrap: bool = False
    seed: int = 0
    dir: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if int(self.n_models) < 2:
            raise ValueError(f"ensemble.n_models must be >= 2 (a committee), got {self.n_models}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"ensemble.dtype must be float32 or float64, got {self.dtype!r}")


def split_overrides(overrides: Sequence[str]) -> tuple[EnsembleOptions, list[str]]:
    """Separate ``ensemble.KEY=VALUE`` overrides from the training overrides."""
    import yaml

    fields = {"n_models", "bootstrap", "seed", "dir", "dtype"}
    opts: dict[str, Any] = {}
    rest = []
    for o in overrides:
        if o.startswith("ensemble."):
            key, sep, value = o[len("ensemble."):].partition("=")
            if not sep or key not in fields:
                raise ValueError(f"unknown ensemble option {o!r}; known: {sorted('ensemble.' + f for f in fields)}")
            opts[key] = yaml.safe_load(value)
        else:
            rest.append(o)
    return EnsembleOptions(**opts), rest


def bootstrap_split(split_file: Path, seed: int, out_file: Path) -> Path:
    """Write ``out_file``: the split of ``split_file`` with its training indices resampled with replacement."""
    with np.load(split_file) as z:
        train, val = z["train_idx"], z["val_idx"]
        test = z["test_idx"] if "test_idx" in z else np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    boot = np.sort(rng.choice(train, size=len(train), replace=True))
    from training.data.splits import save_split

    save_split(out_file, (boot, val, test))
    return out_file


def _member_config(cfg: DictConfig, k: int, opts: EnsembleOptions, out_dir: Path, split_file: Path) -> DictConfig:
    c = copy.deepcopy(cfg)
    OmegaConf.set_struct(c, False)
    c.run.seed = int(opts.seed) + k
    c.run.dir = str(out_dir / f"member_{k}")
    c.run.resume = True
    c.data.split_file = str(split_file)
    return c


def shared_split(cfg: DictConfig, out_dir: Path) -> Path:
    """``out_dir/split.npz``: the split all members share (made once, from member 0's data settings)."""
    from training.run import build_datamodule

    split_file = out_dir / "split.npz"
    if split_file.exists():
        return split_file
    c = copy.deepcopy(cfg)
    OmegaConf.set_struct(c, False)
    c.data.split_file = str(split_file)
    dm = build_datamodule(c, out_dir / "member_0")
    dm.setup("fit")
    if not split_file.exists():
        raise RuntimeError(f"the data module did not write the split file {split_file}")
    return split_file


def train_ensemble(
    cfg: DictConfig,
    opts: EnsembleOptions,
    train_fn: Callable[[DictConfig], dict[str, Any]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``opts.n_models`` members of ``cfg`` and write the ensemble manifest.

    Args:
        cfg: a resolved training config (as ``spktrain train`` composes it).
        opts: ensemble options.
        train_fn: one training run (default :func:`training.run.train`).
        progress: called with one line per member (default: the module logger).
    Returns:
        ``{"dir", "manifest", "members" (bundle paths), "metrics" (per member test metrics)}``.
    """
    from spkserve.ensemble import write_manifest
    from training.export import export_run
    from training.run import train as run_train

    train_fn = train_fn or run_train
    say = progress or log.info
    if opts.dir:
        out_dir = Path(opts.dir).expanduser().resolve()
    else:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        out_dir = (Path(str(cfg.run.get("root") or "runs")) / f"{cfg.run.get('name') or 'run'}_ensemble_{stamp}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    split = shared_split(cfg, out_dir)
    bundles: list[Path] = []
    metrics: list[dict[str, float]] = []
    for k in range(int(opts.n_models)):
        bundle = out_dir / f"member_{k}.bundle"
        member_split = split
        if opts.bootstrap:
            member_split = out_dir / f"split_member_{k}.npz"
            if not member_split.exists():
                bootstrap_split(split, int(opts.seed) + k, member_split)
        if bundle.exists():
            say(f"member {k + 1}/{opts.n_models}: {bundle.name} exists, kept")
        else:
            say(f"member {k + 1}/{opts.n_models}: training (seed {int(opts.seed) + k}{', bootstrap' if opts.bootstrap else ''})")
            result = train_fn(_member_config(cfg, k, opts, out_dir, member_split))
            export_run(result["run_dir"], bundle, dtype=opts.dtype)
            metrics.append(dict(result.get("test_metrics") or {}))
        bundles.append(bundle)
    manifest = write_manifest(
        out_dir / MANIFEST_NAME, bundles,
        info={"n_models": int(opts.n_models), "bootstrap": bool(opts.bootstrap), "seed": int(opts.seed)},
    )
    say(f"ensemble manifest: {manifest}")
    return {"dir": out_dir, "manifest": manifest, "members": bundles, "metrics": metrics}
