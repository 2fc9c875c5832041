"""``train_gschnet(cfg)``: one cG-SchNet training run from a composed config (``configs/gschnet/``).

Writes into the run directory::

    RUN_DIR/config.yaml                resolved config (``gschnet_train resume RUN_DIR`` reads it)
    RUN_DIR/split.npz                  train/val indices into the data file
    RUN_DIR/data/neighbors.npz         cached distance matrices (the three cutoffs' neighbour lists)
    RUN_DIR/checkpoints/{best,last}.ckpt
    RUN_DIR/logs/csv/metrics.csv
    RUN_DIR/best_model.bundle          the generator (best checkpoint) as a bundle
    RUN_DIR/metrics.json               best val loss, epochs, timings, condition statistics

An existing ``checkpoints/last.ckpt`` is resumed when ``run.resume`` is true.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from spkserve.nn.gschnet import COMPOSITION, N_ATOMS_TARGET
from training.gschnet.data import (
    RELATIVE_ATOMIC_ENERGY,
    GSchNetDataError,
    attach_relative_atomic_energy,
    fingerprint,
    fit_relative_atomic_energy,
    load_molecules,
    neighbor_cache,
)
from training.run import TrainingConfigError, run_directory, to_container

BUNDLE_NAME = "best_model.bundle"


def model_spec(cfg: DictConfig) -> dict[str, Any]:
    """The cG-SchNet architecture spec from ``cfg.model`` and ``cfg.globals``."""
    m = to_container(cfg.model)
    g = cfg.globals
    rep = m["representation"]
    rep.setdefault("params", {})
    rep["params"]["cutoff_angstrom"] = float(g.model_cutoff)
    rep["params"].setdefault("max_z", 125)
    cond = m.get("conditioning") or {}
    return {
        "name": "cgschnet",
        "params": {
            "representation": rep,
            "atom_types": [int(z) for z in g.atom_types],
            "model_cutoff_angstrom": float(g.model_cutoff),
            "prediction_cutoff_angstrom": float(g.prediction_cutoff),
            "placement_cutoff_angstrom": float(g.placement_cutoff),
            "conditions": list(cond.get("conditions") or []),
            "n_conditional_features": int(cond.get("n_features", 128)),
            "type_prediction_n_layers": int(m.get("type_prediction_n_layers", 3)),
            "distance_prediction_n_layers": int(m.get("distance_prediction_n_layers", 3)),
        },
    }


def _split(n: int, num_train: float, num_val: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    def count(x: float) -> int:
        return int(round(x * n)) if 0 < x < 1 else int(x)

    nt, nv = count(num_train), count(num_val)
    if nt < 1 or nv < 1 or nt + nv > n:
        raise TrainingConfigError(f"data.num_train={num_train}, data.num_val={num_val} do not fit {n} molecules")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[:nt]), np.sort(perm[nt : nt + nv])


def prepare_data(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Molecules, split, conditions (relative atomic energy fitted on the training split)."""
    g, d = cfg.globals, cfg.data
    datapath = d.get("datapath")
    if datapath in (None, "???"):
        raise TrainingConfigError("config value 'data.datapath' is required (set it with data.datapath=...)")
    props = dict(to_container(d.get("properties")) or {})
    cond_names = [c.get("name", COMPOSITION) if c.get("type") == "scalar" else COMPOSITION
                  for c in (to_container(cfg.model.get("conditioning") or {}).get("conditions") or [])]
    for name in cond_names:
        if name not in (COMPOSITION, RELATIVE_ATOMIC_ENERGY) and name not in props:
            raise TrainingConfigError(f"condition {name!r} has no data key: set data.properties.{name}=<info key>")
    load_props = {k: v for k, v in props.items() if k in cond_names}
    mols = load_molecules(Path(str(datapath)).expanduser(), list(g.atom_types), float(g.placement_cutoff), load_props,
                          _covalent_factor(cfg))
    if d.get("cache_neighbors", True):
        neighbor_cache(mols, run_dir / "data" / "neighbors.npz")
    split_file = run_dir / "split.npz"
    if split_file.exists():
        with np.load(split_file) as z:
            train_idx, val_idx = z["train_idx"], z["val_idx"]
    else:
        train_idx, val_idx = _split(len(mols), float(d.num_train), float(d.num_val), int(cfg.run.seed))
        split_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(split_file, train_idx=train_idx, val_idx=val_idx)
    train = [mols[i] for i in train_idx]
    val = [mols[i] for i in val_idx]
    stats: dict[str, Any] = {"n_molecules": len(mols), "fingerprint": fingerprint(mols)}
    if RELATIVE_ATOMIC_ENERGY in cond_names:
        fit = fit_relative_atomic_energy(train, list(g.atom_types))
        attach_relative_atomic_energy(mols, fit)
        stats["relative_atomic_energy_fit"] = fit
    for name in cond_names:
        if name != COMPOSITION:
            v = np.array([m.properties[name] for m in train])
            stats[name] = {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean())}
    condition_keys = []
    for name in cond_names:
        condition_keys += [COMPOSITION, N_ATOMS_TARGET] if name == COMPOSITION else [name]
    return {"train": train, "val": val, "stats": stats, "condition_keys": condition_keys,
            "train_idx": train_idx, "val_idx": val_idx}


def _covalent_factor(cfg: DictConfig) -> float | None:
    g = cfg.globals
    return float(g.get("covalent_radius_factor", 1.1)) if g.get("use_covalent_radii", True) else None


def _loaders(cfg: DictConfig, data: dict[str, Any]):
    from training.gschnet.sequences import StepCollate, StepDataset

    g, d = cfg.globals, cfg.data
    collate = StepCollate(float(g.model_cutoff), float(g.prediction_cutoff), list(g.atom_types), data["condition_keys"])
    draw = int(d.get("draw_random_samples", 0) or 0)
    cf = _covalent_factor(cfg)
    tr = StepDataset(data["train"], float(g.placement_cutoff), draw, str(d.get("ordering", "random")),
                     covalent_radius_factor=cf)
    va = StepDataset(data["val"], float(g.placement_cutoff), draw, str(d.get("ordering", "random")), fixed_seed=12345,
                     covalent_radius_factor=cf)
    bs = int(d.batch_size)
    nw = int(d.get("num_workers", 0))
    return (torch.utils.data.DataLoader(tr, batch_size=bs, shuffle=True, collate_fn=collate, num_workers=nw),
            torch.utils.data.DataLoader(va, batch_size=bs, shuffle=False, collate_fn=collate, num_workers=nw))


def export_generator(model: torch.nn.Module, path: Path, cfg: DictConfig, stats: dict[str, Any],
                     metrics: dict[str, Any]) -> Path:
    """Write the generator as a bundle (``model_kind: generative``)."""
    from spkserve.bundle import write_bundle

    meta = {
        "model_kind": "generative",
        "species": [int(z) for z in cfg.globals.atom_types],
        "cutoff": float(cfg.globals.model_cutoff),
        "units": {"length": "Angstrom", "energy": "eV"},
        "outputs": {"log_p_type": {"unit": "1", "per": "system"}, "log_p_distance": {"unit": "1", "per": "atom"}},
        "provenance": {"config": to_container(cfg), "data": stats, "metrics": metrics},
    }
    return write_bundle(path, model.float(), meta)


def train_gschnet(cfg: DictConfig) -> dict[str, Any]:
    """Train cG-SchNet as configured; returns ``{"run_dir", "bundle", "metrics"}``."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from spkserve.registry import build
    from training.gschnet.task import GenerativeTask

    run_dir = run_directory(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    threads = cfg.run.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    pl.seed_everything(int(cfg.run.seed), workers=True, verbose=False)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    try:
        data = prepare_data(cfg, run_dir)
    except GSchNetDataError as err:
        raise TrainingConfigError(str(err)) from err
    spec = model_spec(cfg)
    try:
        model = build(spec)
    except ValueError as err:
        raise TrainingConfigError(f"cannot build the cG-SchNet model: {err}") from err
    t = cfg.task
    task = GenerativeTask(model, lr=float(cfg.globals.lr), weight_decay=float(t.get("weight_decay", 0.0)),
                          scheduler_patience=int(t.get("scheduler_patience", 10)),
                          scheduler_factor=float(t.get("scheduler_factor", 0.5)))
    train_loader, val_loader = _loaders(cfg, data)
    tr = to_container(cfg.trainer)
    patience = tr.pop("early_stopping_patience", None)
    cbs = [ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val_loss", mode="min",
                           save_top_k=1, save_last=True, enable_version_counter=False)]
    if patience:
        cbs.append(EarlyStopping(monitor="val_loss", mode="min", patience=int(patience)))
    trainer = pl.Trainer(default_root_dir=str(run_dir), callbacks=cbs,
                         logger=[CSVLogger(run_dir / "logs", name="csv", version="")], **tr)
    last = run_dir / "checkpoints" / "last.ckpt"
    resume = bool(cfg.run.get("resume", True)) and last.exists()
    t0 = time.perf_counter()
    trainer.fit(task, train_loader, val_loader, ckpt_path=str(last) if resume else None)
    seconds = time.perf_counter() - t0
    best = run_dir / "checkpoints" / "best.ckpt"
    if best.exists():
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        task.load_state_dict(state)
    score = cbs[0].best_model_score
    metrics = {"best_val_loss": float(score) if score is not None else None, "epochs": int(trainer.current_epoch),
               "fit_seconds": seconds, "resumed": resume, "n_train": len(data["train"]), "n_val": len(data["val"])}
    bundle = export_generator(task.model, run_dir / BUNDLE_NAME, cfg, data["stats"], metrics)
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "data": data["stats"]}, indent=2))
    return {"run_dir": run_dir, "bundle": bundle, "metrics": metrics}
