"""``train(cfg)``: one training run from a composed config, importable without the CLI.

Builds, in order, from the config groups (see ``configs/train/``):

* the data module (``cfg.data``) and its transforms,
* the model (``cfg.model``, an architecture spec for :func:`spkserve.registry.build`,
  energy offsets set from the training data),
* the :class:`~training.task.AtomisticTask` (``cfg.task``),
* the Lightning trainer (``cfg.trainer``) with best/last checkpoints, early
  stopping, CSV and TensorBoard loggers,

checks the data before the first step (missing property, NaN/inf target, empty
split), trains, tests the best checkpoint on the test split and writes into
the run directory::

    RUN_DIR/config.yaml          resolved config
    RUN_DIR/split.npz            train/val/test indices
    RUN_DIR/checkpoints/{best,last}.ckpt
    RUN_DIR/logs/csv/..., RUN_DIR/logs/tensorboard/...
    RUN_DIR/metrics.json         test metrics of the best checkpoint, data fingerprint, timings

If ``RUN_DIR/checkpoints/last.ckpt`` exists and ``run.resume`` is true, the run
continues from it (epoch counter, optimizer, scheduler and EMA state).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from spkserve import keys

RUN_DIR_ENV = "SPKTRAIN_RUN_DIR"


class TrainingConfigError(ValueError):
    """The config or the data cannot start a training run; the message names the problem."""


# --------------------------------------------------------------------- config helpers
def to_container(cfg: Any) -> Any:
    """Plain Python containers from an OmegaConf node (interpolations resolved)."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_list(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _require(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    if value is None or value == "???":
        raise TrainingConfigError(f"config value {key!r} is required (set it with {key}=...)")
    return value


def run_directory(cfg: DictConfig) -> Path:
    """The run directory: ``run.dir`` or ``run.root/<experiment>_<UTC time>`` (shared by DDP ranks)."""
    if cfg.run.get("dir"):
        return Path(str(cfg.run.dir)).expanduser().resolve()
    env = os.environ.get(RUN_DIR_ENV)
    if env and os.environ.get("LOCAL_RANK") not in (None, "0"):
        return Path(env)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = cfg.run.get("name") or "run"
    return (Path(str(cfg.run.get("root") or "runs")).expanduser() / f"{name}_{stamp}").resolve()


# ---------------------------------------------------------------------- factories
def build_transforms(specs: list[dict[str, Any]] | None) -> list[Any]:
    """Transforms from ``[{"name": "neighbor_list", "cutoff": 5.0}, ...]``."""
    from training import data as tdata

    table = {
        "neighbor_list": tdata.NeighborList,
        "remove_offsets": tdata.RemoveOffsets,
        "cast_to_32": tdata.CastTo32,
        "cast_to_64": tdata.CastTo64,
    }
    out = []
    for spec in specs or []:
        spec = dict(spec)
        name = spec.pop("name", None)
        if name not in table:
            raise TrainingConfigError(f"unknown transform {name!r}; choose one of {sorted(table)}")
        try:
            out.append(table[name](**spec))
        except TypeError as err:
            raise TrainingConfigError(f"transform {name!r} cannot take {sorted(spec)}: {err}") from err
    return out


def ensure_database(datapath: Path, file_units: dict[str, str] | None, run_dir: Path) -> Path:
    """A database :class:`training.data.ASEAtomsData` can read for ``datapath``.

    Databases with unit metadata (ours or SchNetPack's) are used as they are.
    Other files (extxyz, ASE .traj, plain ASE databases with calculator results)
    are imported once into ``RUN_DIR/data/<name>.db`` (reused on resume), with
    their values in ``file_units`` (``energy``, ``forces``, ``distance``;
    default eV, eV/Ang, Ang).
    """
    from training.data import from_ase_db, from_ase_file

    if datapath.suffix == ".db":
        from ase.db import connect

        meta = connect(str(datapath)).metadata
        if "_distance_unit" in meta:
            return datapath
    target = run_dir / "data" / f"{datapath.stem}.db"
    if target.exists():
        return target
    meta_units = data_file_units(datapath)
    u = {"energy": "eV", "distance": "Ang", **meta_units, **{k: v for k, v in (file_units or {}).items() if v}}
    extra = {k: v for k, v in u.items() if k not in _STANDARD_FILE_UNITS}
    target.parent.mkdir(parents=True, exist_ok=True)
    if datapath.suffix == ".db":
        from_ase_db(datapath, target, u["energy"], u.get("forces"), u["distance"], extra_units=extra or None)
    else:
        from_ase_file(datapath, target, u["energy"], u.get("forces"), u["distance"], extra_units=extra or None)
    return target


#: file_units keys that are not property names
_STANDARD_FILE_UNITS = ("energy", "forces", "distance", "positions", "stress")


def data_file_units(datapath: Path) -> dict[str, str]:
    """Units stated by a data file's metadata sidecar ``<stem>.meta.json`` (``{"units": {...}}``),
    as ``file_units`` keys: ``positions`` becomes ``distance``; other names are property names
    (e.g. ``polarizability: e*Angstrom^2/V``, ``nuclear_magnetic_shielding: ppm``), imported with
    these units. Empty if there is no sidecar."""
    side = datapath.with_name(datapath.name.split(".")[0] + ".meta.json")
    if not side.is_file():
        return {}
    try:
        stated = json.loads(side.read_text()).get("units") or {}
    except (json.JSONDecodeError, AttributeError) as err:
        raise TrainingConfigError(f"{side} is not a JSON object with a 'units' mapping: {err}") from err
    out = {}
    for name, unit in stated.items():
        out["distance" if name == "positions" else name] = str(unit)
    return out


def build_datamodule(cfg: DictConfig, run_dir: Path) -> Any:
    """The :class:`training.data.AtomsDataModule` of ``cfg.data``."""
    from training.data import AtomsDataModule

    d = to_container(cfg.data)
    datapath = d.pop("datapath", None)
    if not datapath or datapath == "???":
        raise TrainingConfigError("no data set given: set data.datapath=PATH (an ASE .db or .extxyz file)")
    datapath = Path(datapath).expanduser()
    if not datapath.exists():
        raise TrainingConfigError(f"data.datapath {str(datapath)!r} does not exist")
    for key in ("num_train", "num_val"):
        n = d.get(key)
        if n is None or (isinstance(n, (int, float)) and n <= 0):
            raise TrainingConfigError(f"data.{key} must be > 0 (got {n!r}): an empty split cannot train or validate")
    if d.get("num_test") is not None and d["num_test"] < 0:
        raise TrainingConfigError(f"data.num_test must be >= 0, got {d['num_test']!r}")
    datapath = ensure_database(datapath, d.pop("file_units", None), run_dir)
    if d.get("property_units"):
        d["property_units"] = {k: v for k, v in d["property_units"].items() if v}
    transforms = build_transforms(d.pop("transforms", None))
    for key in ("train_transforms", "val_transforms", "test_transforms"):
        if d.get(key) is not None:
            d[key] = build_transforms(d[key])
    if not d.get("split_file"):
        d["split_file"] = str(run_dir / "split.npz")
    return AtomsDataModule(str(datapath), transforms=transforms, **d)


def build_outputs(cfg: DictConfig, available: set[str] | None = None) -> list[Any]:
    """The task's outputs; with ``task.only_present_outputs: true`` and the data's property
    names in ``available``, outputs whose target the data lacks are left out (a response
    experiment trains on whatever of dipole / polarizability / shielding a data set has)."""
    from training.losses import ModelOutput

    outs = []
    only_present = bool(cfg.task.get("only_present_outputs", False)) and available is not None
    for spec in to_container(cfg.task.outputs) or []:
        spec = dict(spec)
        target = spec.get("target_name") or spec.get("name")
        if only_present and target not in available:
            print(f"spktrain: the data has no {target!r}; not training it")
            continue
        try:
            outs.append(ModelOutput(**spec))
        except TypeError as err:
            raise TrainingConfigError(f"task.outputs entry {spec} is invalid: {err}") from err
    if not outs:
        raise TrainingConfigError("task.outputs is empty: name at least one output to train (e.g. energy, forces)")
    return outs


def build_model(cfg: DictConfig) -> torch.nn.Module:
    """The model from the architecture spec ``cfg.model`` (``{"name":..., "params":...}``)."""
    from spkserve import registry

    spec = to_container(cfg.model)
    try:
        return registry.build(spec)
    except (ValueError, KeyError) as err:
        raise TrainingConfigError(f"cannot build the model from cfg.model: {err}") from err


def energy_offsets(cfg: DictConfig, dm: Any) -> tuple[torch.Tensor, float] | None:
    """``(atomref, mean_per_atom)`` removed from the energy targets, if a remove_offsets transform is set."""
    specs = to_container(cfg.data.get("transforms")) or []
    for spec in specs:
        if spec.get("name") == "remove_offsets":
            prop = spec.get("property", keys.energy)
            atomref, mean = dm.get_offsets(prop)
            return torch.as_tensor(atomref, dtype=torch.float64), float(mean)
    return None


def build_task(cfg: DictConfig, model: torch.nn.Module, offsets: tuple[torch.Tensor, float] | None,
               outputs: list[Any] | None = None) -> Any:
    from training.task import AtomisticTask

    t = to_container(cfg.task)
    t.pop("outputs", None)
    t.pop("only_present_outputs", None)
    return AtomisticTask(model, outputs if outputs is not None else build_outputs(cfg), energy_offsets=offsets, **t)


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[Any] | None = None) -> Any:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    t = to_container(cfg.trainer)
    patience = t.pop("early_stopping_patience", None)
    monitor = cfg.task.get("monitor", "val_loss")
    cbs: list[Any] = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=monitor, mode="min",
                        save_top_k=1, save_last=True, enable_version_counter=False),
        LearningRateMonitor(logging_interval="epoch"),
    ]
    if patience:
        cbs.append(EarlyStopping(monitor=monitor, mode="min", patience=int(patience)))
    if t.get("enable_progress_bar", True):
        from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar

        try:
            import rich  # noqa: F401

            cbs.append(RichProgressBar(leave=False) if t.pop("rich_progress_bar", False) else TQDMProgressBar())
        except ImportError:
            cbs.append(TQDMProgressBar())
    else:
        t.pop("rich_progress_bar", None)
    cbs.extend(callbacks or [])
    loggers = [CSVLogger(run_dir / "logs", name="csv", version=""),]
    try:
        loggers.append(TensorBoardLogger(run_dir / "logs", name="tensorboard", version="", default_hp_metric=False))
    except ModuleNotFoundError:  # tensorboard is an optional extra
        pass
    t.setdefault("inference_mode", False)  # validation needs autograd for forces
    t.setdefault("num_sanity_val_steps", 0)
    return pl.Trainer(default_root_dir=str(run_dir), callbacks=cbs, logger=loggers, **t)


# -------------------------------------------------------------------- data checks
def check_data(dm: Any, outputs: list[Any]) -> dict[str, Any]:
    """Raise :class:`TrainingConfigError` for empty splits, missing or non-finite targets.

    Every sample of the train/val(/test) splits is read once without transforms
    (cheap next to training). Returns ``{"species": [...], "periodic": bool}``.
    """
    names = sorted({o.target_name for o in outputs})
    species: set[int] = set()
    periodic = False
    for subset in ("train", "val", "test"):
        ds = getattr(dm, f"{subset}_dataset", None)
        n = 0 if ds is None else len(ds)
        if n == 0:
            if subset == "test":
                continue
            raise TrainingConfigError(
                f"the {subset} split is empty: set data.num_{subset} > 0 (and make sure the data set is large enough)"
            )
        samples = ds.iter_raw() if hasattr(ds, "iter_raw") else (ds[i] for i in range(n))
        for idx, sample in enumerate(samples):
            for name in names:
                if name not in sample:
                    have = sorted(k for k in sample if k not in keys.INPUT_KEYS and not k.startswith("_"))
                    raise TrainingConfigError(
                        f"the data set has no property {name!r} (the {subset} split has {have}); "
                        f"remove it from task.outputs or train on data that has it"
                    )
                value = sample[name]
                if value.is_floating_point() and not torch.isfinite(value).all():
                    raise TrainingConfigError(
                        f"property {name!r} of sample {idx} in the {subset} split is not finite (NaN or inf); "
                        f"clean the data set before training"
                    )
            species.update(int(z) for z in sample[keys.Z].unique().tolist())
            periodic = periodic or bool(sample[keys.pbc].any())
    return {"species": sorted(species), "periodic": periodic}


def _test_metrics(results: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in results:
        out.update({k: float(v) for k, v in r.items()})
    return out


# -------------------------------------------------------------------------- train
def prepare(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Build everything of a run without training: ``{"dm", "model", "task", "outputs", "run_dir"}``."""
    import pytorch_lightning as pl

    run_dir = run_dir or run_directory(cfg)
    pl.seed_everything(int(cfg.run.get("seed", 0)), workers=True)
    dm = build_datamodule(cfg, run_dir)
    dm.setup("fit")  # builds the train, val and test splits at once
    stored = getattr(dm.train_dataset, "property_units", None)
    outputs = build_outputs(cfg, set(stored) if stored else None)
    info = check_data(dm, outputs)
    ds = dm.train_dataset
    info.update(
        datapath=str(cfg.data.datapath),
        database=str(Path(dm.datapath).resolve()),
        split_file=str(getattr(dm, "split_file", None) or cfg.data.get("split_file") or run_dir / "split.npz"),
        fingerprint=getattr(dm, "fingerprint", None),
        distance_unit=getattr(ds, "distance_unit", None) or cfg.data.get("distance_unit"),
        property_units=dict(getattr(ds, "property_units", None) or to_container(cfg.data.get("property_units")) or {}),
    )
    model = build_model(cfg)
    offsets = energy_offsets(cfg, dm)
    if offsets is not None:
        model.set_offsets(*offsets)
    task = build_task(cfg, model, offsets, outputs)
    return {"dm": dm, "model": model, "task": task, "outputs": outputs, "run_dir": run_dir, "data_info": info}


def train(cfg: DictConfig | dict, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train as configured; returns ``{"run_dir", "test_metrics", "best_checkpoint"}``."""
    import pytorch_lightning as pl

    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    run_dir = run_directory(cfg)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # DDP ranks started later agree on the directory
    threads = cfg.run.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    last = run_dir / "checkpoints" / "last.ckpt"
    resume = bool(cfg.run.get("resume", True)) and last.exists()
    rank_zero = os.environ.get("LOCAL_RANK", "0") == "0"
    if rank_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume and (run_dir / "config.yaml").exists():
            old = OmegaConf.load(run_dir / "config.yaml")
            old.run.pop("resume", None)
            new = OmegaConf.create(to_container(cfg))
            new.run.pop("resume", None)
            if to_container(old.model) != to_container(new.model):
                raise TrainingConfigError(
                    f"{run_dir} holds a run with a different model; resume it with the same config or pick a new run.dir"
                )
        OmegaConf.save(OmegaConf.create(to_container(cfg)), run_dir / "config.yaml")
    parts = prepare(cfg, run_dir)
    dm, task = parts["dm"], parts["task"]
    if rank_zero:
        (run_dir / "data_info.json").write_text(json.dumps(parts["data_info"], indent=2, default=_json_default))
    trainer = build_trainer(cfg, run_dir, callbacks)
    t0 = time.perf_counter()
    trainer.fit(task, datamodule=dm, ckpt_path=str(last) if resume else None)
    fit_seconds = time.perf_counter() - t0
    best = run_dir / "checkpoints" / "best.ckpt"
    test_metrics: dict[str, float] = {}
    has_test = getattr(dm, "test_dataset", None) is not None and len(dm.test_dataset) > 0
    if has_test:
        results = trainer.test(task, datamodule=dm, ckpt_path=str(best) if best.exists() else None, verbose=False)
        test_metrics = _test_metrics(results)
    if trainer.is_global_zero:
        summary = {
            "test_metrics": test_metrics,
            "best_checkpoint": str(best) if best.exists() else None,
            "epochs": int(trainer.current_epoch),
            "fit_seconds": fit_seconds,
            "data_fingerprint": getattr(dm, "fingerprint", None),
            "resumed": resume,
        }
        (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    return {"run_dir": run_dir, "test_metrics": test_metrics, "best_checkpoint": best if best.exists() else None}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return str(obj)
