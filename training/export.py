"""Export a training run as a model bundle (:func:`spkserve.bundle.write_bundle`).

    export_run("runs/ethanol_xtb_...", "ethanol.bundle")          # best checkpoint, EMA weights

The exported model is rebuilt from the run's resolved ``config.yaml`` (the
architecture spec under ``model``) and loaded with the checkpoint's weights;
when the run used EMA, the averaged weights replace the raw ones. Metadata:
species and units of the training data (``RUN_DIR/data_info.json``), cutoff,
outputs with units and per-system/per-atom, and provenance (resolved config,
data fingerprint, test metrics, package versions).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from spkserve import keys

DATA_INFO = "data_info.json"


class ExportError(ValueError):
    """A run directory cannot be exported; the message names what is missing."""


def _checkpoint_path(run_dir: Path, checkpoint: str) -> Path:
    if checkpoint in ("best", "last"):
        path = run_dir / "checkpoints" / f"{checkpoint}.ckpt"
    else:
        path = Path(checkpoint)
    if not path.exists():
        raise ExportError(f"checkpoint {str(path)!r} does not exist (has the run trained at least one epoch?)")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint of our own runs (tensors and plain containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal is reported the same way
        raise ExportError(f"cannot read checkpoint {str(path)!r} as weights: {err}") from err


def model_state_from_checkpoint(ckpt: dict[str, Any], use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The model's state dict in a task checkpoint, EMA weights substituted if present."""
    if "state_dict" not in ckpt:
        raise ExportError("the checkpoint has no 'state_dict'; is it a spktrain checkpoint?")
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ExportError("the checkpoint holds no model weights (no 'model.*' entries)")
    if use_ema and "ema" in ckpt:
        shadow = ckpt["ema"]["shadow"]
        unknown = set(shadow) - set(state)
        if unknown:
            raise ExportError(f"EMA weights {sorted(unknown)[:5]} do not belong to the model")
        state.update(shadow)
    return state


def load_run_model(run_dir: str | Path, checkpoint: str = "best", use_ema: bool = True) -> torch.nn.Module:
    """Rebuild the model of ``run_dir`` with the weights of ``checkpoint`` (eval mode, stored dtype)."""
    from training.run import build_model

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise ExportError(f"{run_dir} has no config.yaml; is it a spktrain run directory?")
    cfg = OmegaConf.load(cfg_path)
    model = build_model(cfg)
    state = model_state_from_checkpoint(load_checkpoint(_checkpoint_path(run_dir, checkpoint)), use_ema)
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    model = model.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"checkpoint weights do not fit the configured model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.eval()
    return model


def _versions() -> dict[str, str]:
    import training

    out = {"training": training.__version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import pytorch_lightning

        out["pytorch_lightning"] = pytorch_lightning.__version__
    except ImportError:
        pass
    try:
        import spkserve

        out["spkserve"] = spkserve.__version__
    except (ImportError, AttributeError):
        pass
    return out


def bundle_metadata(run_dir: Path, model: torch.nn.Module, checkpoint: str) -> dict[str, Any]:
    """Metadata of the bundle of ``run_dir`` (see module docstring)."""
    info_path = run_dir / DATA_INFO
    if not info_path.exists():
        raise ExportError(f"{run_dir} has no {DATA_INFO} (written when training starts); cannot state species and units")
    info = json.loads(info_path.read_text())
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    length = info["distance_unit"]
    prop_units: dict[str, str] = info["property_units"]
    energy_key = cfg.get("globals", {}).get("energy_key", keys.energy)
    energy_unit = prop_units.get(energy_key) or prop_units.get(keys.energy)
    if energy_unit is None:
        raise ExportError(f"the training data has no energy unit (units known: {prop_units})")
    outputs: dict[str, dict[str, str]] = {keys.energy: {"unit": energy_unit, "per": "system"}}
    has_energy = keys.energy in getattr(model, "extra_outputs", ()) or any(
        getattr(h, "output_key", None) == keys.energy for h in getattr(model, "output_heads", [])
    )
    if has_energy:
        outputs[keys.forces] = {"unit": f"{energy_unit}/{length}", "per": "atom"}
        if info.get("periodic"):
            outputs[keys.stress] = {"unit": f"{energy_unit}/{length}^3", "per": "system"}
    for out in cfg["task"]["outputs"]:
        name = out["name"]
        if name in outputs or name == energy_key:
            continue
        unit = prop_units.get(out.get("target_name") or name)
        if unit is None and cfg["task"].get("only_present_outputs"):
            continue  # not in the data, so not trained (see training.run.build_outputs)
        if unit is None:
            raise ExportError(f"no unit known for output {name!r} (data units: {prop_units})")
        outputs[name] = {"unit": unit, "per": "atom" if name in keys.PER_ATOM_OUTPUTS else "system"}
    return {
        "species": sorted(int(z) for z in info["species"]),
        "cutoff": float(model.cutoff),
        "units": {"length": length, "energy": energy_unit},
        "outputs": outputs,
        "provenance": {
            "config": cfg,
            "data_fingerprint": info.get("fingerprint"),
            "data_path": info.get("datapath"),
            "split": info.get("split_file"),
            "checkpoint": checkpoint,
            "test_metrics": metrics.get("test_metrics", {}),
            "test_metrics_checkpoint": "best",
            "epochs": metrics.get("epochs"),
            "ema_decay": cfg.get("task", {}).get("ema_decay"),
            "versions": _versions(),
        },
    }


def export_run(run_dir: str | Path, output: str | Path, checkpoint: str = "best", dtype: str = "float32") -> Path:
    """Write the bundle of ``run_dir`` to ``output``; returns its path."""
    from spkserve.bundle import write_bundle

    run_dir = Path(run_dir)
    if dtype not in ("float32", "float64"):
        raise ExportError(f"dtype must be float32 or float64, got {dtype!r}")
    model = load_run_model(run_dir, checkpoint)
    model = model.to(getattr(torch, dtype))
    meta = bundle_metadata(run_dir, model, checkpoint)
    return write_bundle(output, model, meta)
