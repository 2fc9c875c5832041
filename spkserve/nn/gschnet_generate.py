"""``gschnet_generate``: sample molecules from a cG-SchNet bundle, write an ASE db and a summary.

    gschnet_generate modeldir=runs/gschnet_qm9_gap_relenergy_... n_molecules=1000 batch_size=500 \\
        max_n_atoms=35 ++conditions.gap=4.0 ++conditions.relative_atomic_energy=-0.2
    gschnet_generate modeldir=shipped n_molecules=100 ++conditions.gap=6.0 ++conditions.relative_atomic_energy=0.0
    gschnet_generate modeldir=my.bundle ++conditions.composition=C7H10O2 ...

``modeldir`` is a run directory (its ``best_model.bundle``), a bundle file, or ``shipped`` (the
small QM9 gap/relative-energy model installed with the package). Arguments are
``key=value`` (a leading ``+``/``++`` is accepted, as with Hydra). Nothing here imports
Lightning or the MD engine.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from spkserve.allocator import tuned_entry

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "gschnet_qm9_gap_relenergy.bundle"
DEFAULTS: dict[str, Any] = {
    "modeldir": None,
    "n_molecules": 100,
    "batch_size": 100,
    "max_n_atoms": 35,
    "grid_spacing": 0.1,
    "temperature": 0.1,
    "seed": 0,
    "outputfile": None,
    "training_data": None,
    "conditions": {},
}


def resolve_bundle(modeldir: str | Path) -> Path:
    """The bundle file behind ``modeldir`` (run directory, bundle file or ``shipped``)."""
    if str(modeldir) == "shipped":
        return SHIPPED
    p = Path(str(modeldir)).expanduser()
    if p.is_dir():
        b = p / "best_model.bundle"
        if not b.exists():
            raise FileNotFoundError(f"{p} has no best_model.bundle; is it a gschnet_train run directory?")
        return b
    if not p.exists():
        raise FileNotFoundError(f"modeldir {p} does not exist (a run directory, a bundle file or 'shipped')")
    return p


def training_identities(metadata: dict[str, Any], training_data: str | None, use_rdkit: bool | None) -> set[str] | None:
    """Identities of the training molecules (for novelty), from ``training_data`` or the bundle's provenance."""
    from ase.io import read

    from spkserve.nn.gschnet_analysis import identify

    path = training_data or (metadata.get("provenance", {}).get("config", {}).get("data", {}) or {}).get("datapath")
    if not path or not Path(str(path)).exists():
        return None
    frames = read(str(path), index=":")
    return {i for a in frames if (i := identify(a.numbers, a.positions, use_rdkit)) is not None}


def run_generation(modeldir: str | Path, n_molecules: int = 100, batch_size: int = 100, max_n_atoms: int = 35,
                   conditions: dict[str, Any] | None = None, grid_spacing: float = 0.1, temperature: float = 0.1,
                   seed: int | None = 0, outputfile: str | Path | None = None, training_data: str | None = None,
                   progress: Any = None) -> dict[str, Any]:
    """Generate, write ``outputfile`` (ASE db; default ``<modeldir>/generated/generated_molecules.db``) and
    ``<outputfile>.summary.json``; returns the summary."""
    from ase.db import connect

    from spkserve.nn.gschnet_analysis import analyse, formula, have_rdkit
    from spkserve.nn.gschnet_sampling import generate, load_generator

    bundle = resolve_bundle(modeldir)
    loaded = load_generator(str(bundle))
    res = generate(loaded.model, n_molecules, batch_size=batch_size, max_n_atoms=max_n_atoms, conditions=conditions,
                   grid_spacing_angstrom=grid_spacing, temperature=temperature, seed=seed, progress=progress)
    use_rdkit = have_rdkit()
    train_ids = training_identities(loaded.metadata, training_data, use_rdkit)
    ana = analyse(res.numbers, res.positions, res.finished, train_ids, use_rdkit)
    summary = dict(ana["summary"])
    summary.update({"bundle": str(bundle), "conditions": dict(conditions or {}), "max_n_atoms": max_n_atoms,
                    "seconds": res.seconds, "seconds_per_molecule": res.seconds / n_molecules, "seed": seed,
                    "grid_spacing": grid_spacing, "temperature": temperature,
                    "novelty_reference": "training data" if train_ids is not None else None})
    comp = (conditions or {}).get("composition")
    if comp is not None:
        from spkserve.nn.gschnet_sampling import composition_counts

        target = composition_counts(comp, loaded.model.atom_types)
        hits = [
            bool(f) and [int(np.count_nonzero(z == t)) for t in loaded.model.atom_types] == target
            for z, f in zip(res.numbers, res.finished)
        ]
        summary["composition_match_fraction"] = float(np.mean(hits))
    if outputfile is None:
        base = Path(str(modeldir)) if Path(str(modeldir)).is_dir() else Path.cwd()
        outputfile = base / "generated" / "generated_molecules.db"
    outputfile = Path(outputfile)
    outputfile.parent.mkdir(parents=True, exist_ok=True)
    if outputfile.exists():
        outputfile.unlink()
    with connect(str(outputfile)) as db:
        for atoms, ident, valid in zip(res.to_atoms(), ana["ids"], ana["valid"]):
            kv = {"finished": bool(atoms.info["finished"]), "valid": bool(valid)}
            kv.update({f"cond_{k}": (v if isinstance(v, (int, float)) else str(v))
                       for k, v in (conditions or {}).items()})
            data = {"identity": ident or "", "formula": formula(atoms.numbers) if len(atoms) else ""}
            db.write(atoms, key_value_pairs=kv, data=data)
        db.metadata = {"summary": summary}
    summary["outputfile"] = str(outputfile)
    Path(str(outputfile) + ".summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def parse_overrides(args: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``key=value`` / ``++conditions.gap=4.0`` arguments into a settings dict (YAML-typed values)."""
    from omegaconf import OmegaConf

    dotlist = []
    for a in args:
        a = a.lstrip("+")
        if "=" not in a:
            raise click.UsageError(f"argument {a!r} is not key=value")
        dotlist.append(a)
    try:
        cfg = OmegaConf.from_dotlist(dotlist)
    except Exception as err:  # omegaconf raises several error types for bad syntax
        raise click.UsageError(f"cannot read arguments {dotlist}: {err}") from err
    settings = OmegaConf.to_container(cfg, resolve=True)
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise click.UsageError(f"unknown setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **settings}
    out["conditions"] = dict(out.get("conditions") or {})
    return out


@click.command(context_settings={"ignore_unknown_options": True, "help_option_names": ["-h", "--help"]})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def main(args: tuple[str, ...]) -> None:
    """Generate molecules: modeldir=... n_molecules=... batch_size=... max_n_atoms=... ++conditions.NAME=VALUE"""
    from spkserve.bundle import BundleError
    from spkserve.nn.gschnet_sampling import GenerationError

    s = parse_overrides(args)
    if not s["modeldir"]:
        raise click.UsageError("modeldir=... is required (a gschnet_train run directory, a bundle or 'shipped')")
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        click.echo(f"  generated {done}/{total} molecules ({time.perf_counter() - t0:.1f} s)", err=True)

    try:
        summary = run_generation(s["modeldir"], s["n_molecules"], s["batch_size"], s["max_n_atoms"], s["conditions"],
                                 s["grid_spacing"], s["temperature"], s["seed"], s["outputfile"], s["training_data"],
                                 progress)
    except (GenerationError, BundleError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from err
    for k in ("n_molecules", "finished_fraction", "valid_fraction_of_finished", "unique_fraction_of_valid",
              "novel_fraction_of_unique", "composition_match_fraction", "seconds_per_molecule"):
        if k in summary:
            v = summary[k]
            click.echo(f"{k:28s} {v:.4g}" if isinstance(v, float) else f"{k:28s} {v}")
    click.echo(f"{'validity_method':28s} {summary['validity_method']}")
    click.echo(f"wrote {summary['outputfile']} (+ .summary.json)")
    sys.stdout.flush()


entry = tuned_entry(main)

if __name__ == "__main__":
    entry()
