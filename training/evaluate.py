"""Evaluate a bundle on reference data: MAE/RMSE per output in the bundle's units, parity plot.

    result = evaluate_bundle("ethanol.bundle", "ethanol.db", split_file="run/split.npz", subset="test")
    print(format_metrics(result)); parity_plot(result, "parity.png")

The data are read with :class:`training.data.ASEAtomsData`, converted to the
bundle's length and output units, and evaluated with the bundle's model in
eval mode (offsets included), so the numbers are what a user of the bundle gets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spkserve import keys


class EvaluationError(ValueError):
    """The bundle cannot be evaluated on the data; the message names the problem."""


@dataclass
class EvaluationResult:
    """Predictions and references per output (flattened numpy arrays in ``units``)."""

    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    references: dict[str, np.ndarray] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    n_systems: int = 0

    def metrics(self) -> dict[str, dict[str, float]]:
        """``{output: {"mae": ..., "rmse": ..., "n": ...}}`` in the output's unit."""
        out = {}
        for name, pred in self.predictions.items():
            diff = pred - self.references[name]
            out[name] = {
                "mae": float(np.mean(np.abs(diff))),
                "rmse": float(math.sqrt(np.mean(diff**2))),
                "n": int(diff.size),
            }
        return out


def _load_indices(split_file: str | Path, subset: str) -> np.ndarray:
    with np.load(split_file, allow_pickle=False) as split:
        for key in (f"{subset}_idx", subset):
            if key in split:
                return np.asarray(split[key], dtype=np.int64)
        raise EvaluationError(f"{split_file} has no {subset!r} indices (keys: {sorted(split.files)})")


def evaluate_bundle(
    bundle: str | Path,
    data: str | Path,
    split_file: str | Path | None = None,
    subset: str = "test",
    batch_size: int = 50,
    dtype: str | None = None,
    properties: list[str] | None = None,
    file_units: dict[str, str] | None = None,
) -> EvaluationResult:
    """Evaluate ``bundle`` on the systems of ``data`` (optionally only ``subset`` of ``split_file``).

    ``data`` is a database with unit metadata, or any file ASE reads (extxyz, .traj,
    plain ASE db), whose values are then taken to be in ``file_units`` (``energy``,
    ``forces``, ``distance``; default eV, eV/Ang, Ang) and imported into a temporary database.
    """
    import tempfile

    if not Path(data).exists():
        raise FileNotFoundError(f"data file {str(data)!r} does not exist")
    with tempfile.TemporaryDirectory(prefix="spktrain-eval-") as tmp:
        from training.run import ensure_database

        db = ensure_database(Path(data), file_units, Path(tmp))
        return _evaluate(bundle, db, split_file, subset, batch_size, dtype, properties)


def _evaluate(bundle, data, split_file, subset, batch_size, dtype, properties) -> EvaluationResult:
    from spkserve.bundle import load_bundle
    from training.data import ASEAtomsData, NeighborList, collate_atoms

    if batch_size < 1:
        raise EvaluationError(f"batch size must be >= 1, got {batch_size}")
    loaded = load_bundle(bundle, dtype=dtype)
    model = loaded.model
    wanted = properties or [p for p in loaded.outputs if p != keys.stress]
    probe = ASEAtomsData(data)
    available = set(probe.load_properties)
    props = [p for p in wanted if p in available]
    if not props:
        raise EvaluationError(
            f"{data} has none of the bundle's outputs {wanted} (it has {sorted(available)})"
        )
    units = {p: loaded.outputs[p]["unit"] for p in props}
    indices = _load_indices(split_file, subset) if split_file else None
    ds = ASEAtomsData(
        data,
        load_properties=props,
        property_units=units,
        distance_unit=loaded.length_unit,
        transforms=[NeighborList(loaded.cutoff)],
        indices=indices,
    )
    if len(ds) == 0:
        raise EvaluationError(f"no systems to evaluate in {data}" + (f" ({subset} split of {split_file})" if split_file else ""))
    model_dtype = loaded.dtype
    result = EvaluationResult(units=units, n_systems=len(ds))
    preds: dict[str, list[np.ndarray]] = {p: [] for p in props}
    refs: dict[str, list[np.ndarray]] = {p: [] for p in props}
    for start in range(0, len(ds), batch_size):
        batch = collate_atoms([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
        loaded.check_species(batch[keys.Z])
        inputs = {k: (v.to(model_dtype) if v.is_floating_point() else v) for k, v in batch.items()}
        out = model(inputs, properties=tuple(props))
        for p in props:
            preds[p].append(out[p].detach().double().cpu().numpy().reshape(-1))
            refs[p].append(batch[p].double().cpu().numpy().reshape(-1))
    result.predictions = {p: np.concatenate(v) for p, v in preds.items()}
    result.references = {p: np.concatenate(v) for p, v in refs.items()}
    return result


def format_metrics(result: EvaluationResult) -> str:
    """A small table: output, unit, MAE, RMSE, number of values."""
    lines = [f"{result.n_systems} systems", f"{'output':<16}{'unit':<14}{'MAE':>14}{'RMSE':>14}{'n':>10}"]
    for name, m in result.metrics().items():
        lines.append(f"{name:<16}{result.units[name]:<14}{m['mae']:>14.6g}{m['rmse']:>14.6g}{m['n']:>10d}")
    return "\n".join(lines)


def parity_plot(result: EvaluationResult, path: str | Path) -> Path:
    """Predicted vs reference, one panel per output, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.predictions)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.0), squeeze=False)
    metrics = result.metrics()
    for ax, name in zip(axes[0], names):
        ref, pred = result.references[name], result.predictions[name]
        ax.scatter(ref, pred, s=4, alpha=0.5)
        lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        unit = result.units[name]
        ax.set_xlabel(f"reference {name} [{unit}]")
        ax.set_ylabel(f"predicted {name} [{unit}]")
        ax.set_title(f"{name}: MAE {metrics[name]['mae']:.4g}, RMSE {metrics[name]['rmse']:.4g}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
