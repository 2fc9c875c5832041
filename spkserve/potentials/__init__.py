"""Reference potentials as registered architectures, and their bundles.

They let the engine and the servers be tested before any training exists:
``lennard_jones``, ``morse``, ``harmonic_bonds`` and ``harmonic_trap``
(parameters in Å and eV for the reference bundles).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from spkserve import registry
from spkserve.bundle import default_outputs, write_bundle
from spkserve.potentials.harmonic import HarmonicBonds, HarmonicTrap  # noqa: F401  (registers)
from spkserve.potentials.pair import LennardJones, Morse  # noqa: F401  (registers)

ALL_ELEMENTS = list(range(1, 119))


def reference_spec(kind: str, **params: Any) -> tuple[dict[str, Any], float, bool]:
    """(architecture spec, cutoff in Å, has stress) for a reference potential kind."""
    if kind in ("lj", "lennard_jones"):
        p = {"sigma": params.get("sigma", 3.4), "epsilon": params.get("epsilon", 0.0104)}
        p["cutoff"] = params.get("cutoff") or 3.0 * p["sigma"]
        return {"name": "lennard_jones", "params": p}, p["cutoff"], True
    if kind == "morse":
        p = {k: params[k] for k in ("depth", "alpha", "r0", "cutoff")}
        return {"name": "morse", "params": p}, p["cutoff"], True
    if kind in ("harmonic_trap", "trap"):
        p = {"k": params["k"], "centre": list(params.get("centre", (0.0, 0.0, 0.0)))}
        return {"name": "harmonic_trap", "params": p}, 0.0, False
    if kind in ("harmonic_bonds", "bonds"):
        p = {k: params[k] for k in ("bonds", "k", "r0", "n_atoms")}
        return {"name": "harmonic_bonds", "params": p}, 0.0, False
    raise ValueError(f"unknown reference potential {kind!r}: use lj, morse, harmonic_trap or harmonic_bonds")


def reference_bundle(
    kind: str,
    path: str | os.PathLike,
    species: Sequence[int] | None = None,
    dtype: str = "float64",
    **params: Any,
) -> Path:
    """Write a reference-potential bundle in Å and eV.

    Args:
        kind: ``lj``, ``morse``, ``harmonic_trap`` or ``harmonic_bonds``.
        path: output file.
        species: atomic numbers allowed (default: every element).
        dtype: weights/buffer dtype.
        **params: the potential's parameters (Å, eV, eV/Å²).
    """
    import torch

    spec, cutoff, stress = reference_spec(kind, **params)
    model = registry.build(spec).to(getattr(torch, dtype))
    meta = {
        "species": sorted(int(z) for z in (species or ALL_ELEMENTS)),
        "cutoff": float(cutoff),
        "units": {"length": "Angstrom", "energy": "eV"},
        "outputs": default_outputs("eV", "Angstrom", stress=stress),
        "provenance": {"description": f"reference potential {spec['name']}", "parameters": spec["params"]},
    }
    return write_bundle(path, model, meta)
