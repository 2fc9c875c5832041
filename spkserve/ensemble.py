"""Committees (ensembles) of bundles, served as one model.

An ensemble is a small JSON manifest next to its member bundles::

    {"format": "spkserve-ensemble", "version": 1,
     "members": ["member_0.bundle", "member_1.bundle", ...]}   # paths relative to the manifest

written by ``spktrain ensemble`` (:func:`write_manifest`). :func:`open_runner` turns a
bundle *or* a manifest into a force provider, so every consumer that loads a model
(the ASE ``BundleCalculator``, the msgpack server, ``spkserve ipi``, ``spkmd
calculator=ensemble``) takes an ensemble as one model.

:class:`EnsembleRunner` returns the committee mean of every common output plus

* ``energy_uncertainty`` [S] (eV): standard deviation of the member energies,
* ``forces_uncertainty`` [S] (eV/Å): largest per-atom norm of the force standard deviation,
* ``committee_energy`` [S, K] (eV) and ``committee_forces`` [N, K, 3] (eV/Å): every member's values
  (``spkserve ipi`` sends them to i-PI as ``committee_pot`` / ``committee_force`` in the extras string).

Members must agree on species, length unit and the units of their common outputs;
otherwise :class:`EnsembleError` names the member and the mismatch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from spkserve import keys
from spkserve.batch import Structure, collate
from spkserve.provider import ProviderError

MANIFEST_FORMAT = "spkserve-ensemble"
MANIFEST_VERSION = 1
#: provider units of the ensemble's own outputs
ENSEMBLE_UNITS = {
    keys.energy_uncertainty: "eV",
    keys.forces_uncertainty: "eV/Angstrom",
    keys.committee_energy: "eV",
    keys.committee_forces: "eV/Angstrom",
}
ENSEMBLE_OUTPUTS = tuple(ENSEMBLE_UNITS)


class EnsembleError(ValueError):
    """An ensemble manifest or its members cannot be used together (message names why)."""


def is_manifest(path: str | os.PathLike) -> bool:
    """True if ``path`` is an ensemble manifest (a JSON file with the manifest format tag)."""
    p = Path(path)
    if not p.is_file() or p.suffix != ".json":
        return False
    try:
        return json.loads(p.read_text()).get("format") == MANIFEST_FORMAT
    except (ValueError, OSError, AttributeError):
        return False


def write_manifest(path: str | os.PathLike, members: Sequence[str | os.PathLike], info: dict | None = None) -> Path:
    """Write a manifest listing ``members`` (stored relative to the manifest when possible)."""
    path = Path(path)
    if len(members) < 2:
        raise EnsembleError(f"an ensemble needs at least 2 members, got {len(members)}")
    check_compatible([_metadata_of(m) for m in members], [str(m) for m in members])
    rel = []
    for m in members:
        m = Path(m).resolve()
        try:
            rel.append(str(m.relative_to(path.parent.resolve())))
        except ValueError:
            rel.append(str(m))
    doc = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "members": rel, "info": info or {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
    return path


def read_manifest(path: str | os.PathLike) -> list[Path]:
    """Member bundle paths of a manifest (absolute); errors name the problem."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise EnsembleError(f"cannot read ensemble manifest {str(path)!r}: {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise EnsembleError(f"{str(path)!r} is not an ensemble manifest (no \"format\": \"{MANIFEST_FORMAT}\")")
    if doc.get("version") != MANIFEST_VERSION:
        raise EnsembleError(f"ensemble manifest {str(path)!r} has version {doc.get('version')!r}; this code reads {MANIFEST_VERSION}")
    members = doc.get("members")
    if not isinstance(members, list) or len(members) < 2:
        raise EnsembleError(f"ensemble manifest {str(path)!r} must list at least 2 member bundles")
    out = []
    for m in members:
        p = Path(m)
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            raise EnsembleError(f"member bundle {str(p)!r} of ensemble {str(path)!r} does not exist")
        out.append(p)
    return out


def member_paths(path_or_paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expand a manifest (or a list of bundles and manifests) into member bundle paths."""
    items = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    out: list[Path] = []
    for it in items:
        out.extend(read_manifest(it) if is_manifest(it) else [Path(it)])
    return out


def _metadata_of(member: Any) -> dict:
    if isinstance(member, (str, os.PathLike)):
        from spkserve.bundle import read_metadata

        return read_metadata(member)
    meta = getattr(member, "metadata", None)
    if meta is None:
        bundle = getattr(member, "bundle", None)
        meta = getattr(bundle, "metadata", None)
    if meta is None:
        raise EnsembleError(f"cannot read the metadata of ensemble member {member!r}")
    return meta


def check_compatible(metadatas: Sequence[dict], names: Sequence[str] | None = None) -> None:
    """Raise :class:`EnsembleError` unless all members share species, units and output units."""
    names = list(names) if names is not None else [f"member {i}" for i in range(len(metadatas))]
    first = metadatas[0]
    for name, meta in zip(names[1:], metadatas[1:]):
        if sorted(meta["species"]) != sorted(first["species"]):
            raise EnsembleError(
                f"ensemble members differ in species: {names[0]} has {sorted(first['species'])}, "
                f"{name} has {sorted(meta['species'])}; train all members on the same elements"
            )
        for u in ("length", "energy"):
            a, b = first["units"].get(u), meta["units"].get(u)
            if a != b:
                raise EnsembleError(f"ensemble members differ in {u} unit: {names[0]} uses {a!r}, {name} uses {b!r}")
        for out in set(first["outputs"]) & set(meta["outputs"]):
            a, b = first["outputs"][out].get("unit"), meta["outputs"][out].get("unit")
            if a != b:
                raise EnsembleError(f"ensemble members differ in the unit of {out!r}: {names[0]} {a!r}, {name} {b!r}")
        for out in (keys.energy, keys.forces):
            if (out in first["outputs"]) != (out in meta["outputs"]):
                raise EnsembleError(f"ensemble members differ in whether they predict {out!r} ({names[0]} vs {name})")


class EnsembleRunner:
    """A :class:`~spkserve.provider.ForceProvider` over several bundles (committee mean + spread).

    Args:
        members: bundle paths, ensemble manifests, or ModelRunners (at least 2 in total).
        dtype, device, skin_angstrom, neighbor_backend: as for :class:`~spkserve.runtime.ModelRunner`.
    """

    def __init__(
        self,
        members: Sequence[Any] | str | os.PathLike,
        dtype: str | torch.dtype | None = None,
        device: torch.device | str = "cpu",
        skin_angstrom: float = 1.0,
        neighbor_backend: str = "vesin",
    ) -> None:
        from spkserve.runtime import ModelRunner

        if isinstance(members, (str, os.PathLike)):
            members = [members]
        runners: list[ModelRunner] = []
        names: list[str] = []
        for m in members:
            if isinstance(m, (str, os.PathLike)):
                for p in member_paths(m):
                    runners.append(ModelRunner(p, dtype=dtype, device=device, skin_angstrom=skin_angstrom,
                                               neighbor_backend=neighbor_backend))
                    names.append(str(p))
            else:
                runners.append(m)
                names.append(repr(m))
        if len(runners) < 2:
            raise EnsembleError(f"an ensemble needs at least 2 members, got {len(runners)}")
        check_compatible([r.metadata for r in runners], names)
        self.members = runners
        self.names = names
        #: the first member's bundle (species, units and metadata are shared by all)
        self.bundle = runners[0].bundle
        self.device = runners[0].device
        self.dtype = runners[0].dtype
        self.cutoff_angstrom = max(r.cutoff_angstrom for r in runners)
        common = [p for p in runners[0].available_properties if all(p in r.available_properties for r in runners)]
        self._model_properties = tuple(common)
        self.available_properties = tuple(common) + ENSEMBLE_OUTPUTS

    @property
    def metadata(self) -> dict:
        return self.bundle.metadata

    @property
    def n_members(self) -> int:
        return len(self.members)

    def compute_tensors(
        self,
        numbers: torch.Tensor,
        positions_angstrom: torch.Tensor,
        cells_angstrom: torch.Tensor,
        pbc: torch.Tensor,
        n_atoms: torch.Tensor,
        properties: Sequence[str] = (keys.energy, keys.forces),
    ) -> dict[str, torch.Tensor]:
        """As :meth:`ModelRunner.compute_tensors`; ensemble outputs on request (see module docstring)."""
        unknown = [p for p in properties if p not in self.available_properties]
        if unknown:
            raise ProviderError(f"the ensemble cannot compute {unknown}; it provides {sorted(self.available_properties)}")
        want = [p for p in properties if p in self._model_properties]
        need_forces = any(p in properties for p in ("forces_uncertainty", "committee_forces"))
        model_props = tuple(dict.fromkeys([keys.energy, *want, *([keys.forces] if need_forces else [])]))
        results = [r.compute_tensors(numbers, positions_angstrom, cells_angstrom, pbc, n_atoms, model_props)
                   for r in self.members]
        dev, dt = results[0][keys.energy].device, results[0][keys.energy].dtype
        stacked = {k: torch.stack([res[k].to(device=dev, dtype=dt) for res in results]) for k in model_props}
        out = {k: v.mean(0) for k, v in stacked.items() if k in (keys.energy, *want)}
        e = stacked[keys.energy]  # [K, S]
        if "energy_uncertainty" in properties:
            out["energy_uncertainty"] = e.std(0, unbiased=False)
        if "committee_energy" in properties:
            out["committee_energy"] = e.transpose(0, 1).contiguous()  # [S, K]
        if need_forces:
            f = stacked[keys.forces]  # [K, N, 3]
            if "committee_forces" in properties:
                out["committee_forces"] = f.transpose(0, 1).contiguous()  # [N, K, 3]
            if "forces_uncertainty" in properties:
                per_atom = f.std(0, unbiased=False).norm(dim=-1)  # [N]
                idx = torch.repeat_interleave(torch.arange(len(n_atoms), device=per_atom.device), n_atoms.to(per_atom.device))
                spread = per_atom.new_zeros(len(n_atoms)).scatter_reduce(0, idx, per_atom, "amax", include_self=False)
                out["forces_uncertainty"] = spread
        return out

    def compute(
        self, structures: Sequence[Structure], properties: Sequence[str] = (keys.energy, keys.forces)
    ) -> dict[str, torch.Tensor]:
        """Evaluate structures (Å) together; float64 CPU tensors in provider units."""
        if len(structures) == 0:
            raise ProviderError("no structures to compute")
        b = collate(structures, dtype=torch.float64)
        out = self.compute_tensors(b[keys.Z], b[keys.R], b[keys.cell], b[keys.pbc], b[keys.n_atoms], properties)
        return {k: v.to(device="cpu", dtype=torch.float64) for k, v in out.items()}

    def close(self) -> None:
        for r in self.members:
            r.close()


def open_runner(path: str | os.PathLike, **kwargs: Any):
    """A :class:`~spkserve.runtime.ModelRunner` for a bundle, an :class:`EnsembleRunner` for a manifest."""
    if is_manifest(path):
        return EnsembleRunner(path, **kwargs)
    from spkserve.runtime import ModelRunner

    return ModelRunner(path, **kwargs)
