"""The model bundle: one self-describing file, safe to load.

Format v1
---------
A bundle is a valid *safetensors* file. The tensors are the model's
``state_dict`` (weights and buffers). The safetensors header's
``__metadata__`` holds two strings:

``spkserve.bundle``
    JSON: ``{"format_version": 1, "metadata": {...}, "architecture": {"name": ..., "params": {...}}}``
``spkserve.sha256``
    integrity hash: sha256 over the canonical JSON above, then every tensor
    in name order (name, dtype, shape, raw bytes).

``metadata`` holds ``species`` (atomic numbers the model may see),
``cutoff`` (in the bundle's length unit), ``units`` (``length``, ``energy``),
``outputs`` (name -> ``{"unit": str, "per": "system"|"atom"}``), ``dtype`` of
the weights, ``neighbor_list`` (``{"cutoff": float, "full": true}``) and
``provenance`` (config, data fingerprint, metrics, versions, creation time).

Loading reads the file as bytes, checks header, version and hash, rebuilds
the model from the registered architecture (:mod:`spkserve.registry`) and
loads the tensors; nothing is ever unpickled.

Older versions
--------------
Format 0 (pre-release layout) kept everything under ``__metadata__["spk_bundle"]``
as ``{"version": 0, "meta": {...}, "spec": {...}}`` with units in
``meta["distance_unit"]``/``meta["energy_unit"]`` and no hash.
:func:`migrate` turns it into v1 on load (:data:`MIGRATIONS`); ``spkserve
verify --upgrade FILE`` rewrites the file in the current format.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
import platform
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from spkserve import __version__, keys, registry, units

FORMAT_VERSION = 1
_BUNDLE_KEY = "spkserve.bundle"
_HASH_KEY = "spkserve.sha256"
_LEGACY_KEY = "spk_bundle"

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_REQUIRED = ("species", "cutoff", "units", "outputs")


class BundleError(ValueError):
    """A bundle cannot be written, read or served; the message names the problem."""


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _hash(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(_canonical(header))
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' or 'float64' for a torch dtype (error otherwise)."""
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise BundleError(f"unsupported dtype {dtype}: bundles hold float32 or float64 models")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Accept 'float32'/'float64'/'32'/'64'/torch dtypes; None passes through."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None:
            dtype_name(dtype)
        return dtype
    name = str(dtype).replace("torch.", "")
    name = {"32": "float32", "64": "float64", "single": "float32", "double": "float64"}.get(name, name)
    if name not in _DTYPES:
        raise BundleError(f"unsupported dtype {dtype!r}: use float32 or float64")
    return _DTYPES[name]


def validate_metadata(metadata: dict[str, Any]) -> None:
    """Raise :class:`BundleError` unless ``metadata`` holds what every bundle must state."""
    missing = [k for k in _REQUIRED if k not in metadata]
    if missing:
        raise BundleError(f"bundle metadata lacks {missing} (required: {list(_REQUIRED)})")
    species = metadata["species"]
    if not species or not all(isinstance(z, int) and 1 <= z <= 118 for z in species):
        raise BundleError(f"bundle species must be a non-empty list of atomic numbers 1..118, got {species!r}")
    cutoff = metadata["cutoff"]
    if not isinstance(cutoff, (int, float)) or cutoff < 0 or cutoff != cutoff:
        raise BundleError(f"bundle cutoff must be a non-negative number, got {cutoff!r}")
    u = metadata["units"]
    if not isinstance(u, dict) or "length" not in u or "energy" not in u:
        raise BundleError(f"bundle units must state 'length' and 'energy', got {u!r}")
    try:
        units.check_dimension(u["length"], "Angstrom")
        units.check_dimension(u["energy"], "eV")
    except units.UnitError as err:
        raise BundleError(f"bundle units are invalid: {err}") from err
    outputs = metadata["outputs"]
    generative = metadata.get("model_kind") == "generative"  # cG-SchNet: distributions, no energy
    if not isinstance(outputs, dict) or (keys.energy not in outputs and not generative):
        raise BundleError(f"bundle outputs must be a dict including 'energy', got {outputs!r}")
    for name, spec in outputs.items():
        if not isinstance(spec, dict) or spec.get("per") not in ("system", "atom") or "unit" not in spec:
            raise BundleError(f"bundle output {name!r} must state 'unit' and 'per' ('system' or 'atom'), got {spec!r}")
        try:
            units.parse(spec["unit"])
        except units.UnitError as err:
            raise BundleError(f"bundle output {name!r} has an invalid unit: {err}") from err


def default_outputs(energy_unit: str, length_unit: str, stress: bool = True) -> dict[str, dict[str, str]]:
    """The energy/forces(/stress) output block for a potential in the given units."""
    out = {
        keys.energy: {"unit": energy_unit, "per": "system"},
        keys.forces: {"unit": f"{energy_unit}/{length_unit}", "per": "atom"},
    }
    if stress:
        out[keys.stress] = {"unit": f"{energy_unit}/{length_unit}^3", "per": "system"}
    return out


def write_bundle(
    path: str | os.PathLike,
    model: nn.Module,
    metadata: dict[str, Any],
    architecture: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` and ``metadata`` as a v1 bundle; returns the path.

    Args:
        path: output file (written atomically: temp file + rename).
        model: a module built by :func:`spkserve.registry.build` (its
            ``architecture_spec`` is stored), or any module if ``architecture`` is given.
        metadata: see the module docstring; ``dtype``, ``neighbor_list``,
            ``created`` and versions are filled in when absent.
        architecture: the spec to store instead of ``model.architecture_spec``.
    """
    from safetensors.torch import save

    spec = architecture if architecture is not None else getattr(model, "architecture_spec", None)
    if spec is None:
        raise BundleError(
            "the model has no architecture spec: build it with spkserve.registry.build(spec) or pass architecture="
        )
    meta = copy.deepcopy(metadata)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    float_dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(float_dtypes) > 1:
        raise BundleError(f"model mixes floating dtypes {sorted(map(str, float_dtypes))}; cast it to one dtype first")
    meta.setdefault("dtype", dtype_name(float_dtypes.pop()) if float_dtypes else "float64")
    meta.setdefault("neighbor_list", {"cutoff": float(meta.get("cutoff", 0.0)), "full": True})
    prov = meta.setdefault("provenance", {})
    prov.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    prov.setdefault(
        "versions", {"spkserve": __version__, "torch": torch.__version__, "python": platform.python_version()}
    )
    validate_metadata(meta)
    # the spec must rebuild the same architecture
    try:
        registry.get_builder(spec["name"])
    except registry.UnknownArchitectureError as err:
        raise BundleError(str(err)) from err
    header = {"format_version": FORMAT_VERSION, "metadata": meta, "architecture": spec}
    try:
        header_json = json.dumps(header, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise BundleError(f"bundle metadata must be plain JSON (no NaN, no objects): {err}") from err
    digest = _hash(header, state)
    blob = save(state, metadata={_BUNDLE_KEY: header_json, _HASH_KEY: digest})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# --- reading -------------------------------------------------------------------------


def _read_safetensors_header(blob: bytes, path: Path) -> dict[str, Any]:
    if len(blob) < 8:
        raise BundleError(f"{path}: not a bundle (file is {len(blob)} bytes; truncated or empty)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n <= 0 or 8 + n > len(blob):
        raise BundleError(f"{path}: corrupt or truncated bundle (header of {n} bytes in a {len(blob)}-byte file)")
    try:
        header = json.loads(blob[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: corrupt bundle header ({err})") from err
    if not isinstance(header, dict):
        raise BundleError(f"{path}: corrupt bundle header")
    return header


def _migrate_v0(doc: dict[str, Any]) -> dict[str, Any]:
    meta = dict(doc["meta"])
    u = {"length": meta.pop("distance_unit", "Angstrom"), "energy": meta.pop("energy_unit", "eV")}
    meta["units"] = u
    return {"format_version": 1, "metadata": meta, "architecture": doc["spec"]}


#: from-version -> function(document) returning the next version's document
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _migrate_v0}


def migrate(doc: dict[str, Any]) -> dict[str, Any]:
    """Bring a header document of an older format to :data:`FORMAT_VERSION`."""
    version = doc.get("format_version", doc.get("version"))
    while version < FORMAT_VERSION:
        if version not in MIGRATIONS:
            raise BundleError(f"bundle format version {version} cannot be migrated (no migration step)")
        doc = MIGRATIONS[version](doc)
        version = doc["format_version"]
    return doc


@dataclass
class BundleContents:
    """What a bundle file holds, checked but not yet turned into a model."""

    path: Path
    format_version: int  # version found in the file (before migration)
    metadata: dict[str, Any]
    architecture: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    sha256: str | None


def read_bundle(path: str | os.PathLike, verify: bool = True) -> BundleContents:
    """Read and check a bundle file without building the model."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise BundleError(f"bundle file {path} does not exist")
    blob = path.read_bytes()
    st_header = _read_safetensors_header(blob, path)
    extra = st_header.get("__metadata__") or {}
    if _BUNDLE_KEY in extra:
        try:
            doc = json.loads(extra[_BUNDLE_KEY])
        except json.JSONDecodeError as err:
            raise BundleError(f"{path}: corrupt bundle metadata ({err})") from err
        found = doc.get("format_version")
    elif _LEGACY_KEY in extra:
        doc = json.loads(extra[_LEGACY_KEY])
        found = doc.get("version")
    else:
        raise BundleError(f"{path}: a safetensors file but not a spkserve bundle (no '{_BUNDLE_KEY}' metadata)")
    if not isinstance(found, int):
        raise BundleError(f"{path}: bundle has no integer format version (found {found!r})")
    if found > FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {found} is newer than this spkserve supports "
            f"({FORMAT_VERSION}); upgrade spkserve to load it"
        )
    try:
        tensors = load(blob)
    except (SafetensorError, Exception) as err:  # safetensors raises its own error types
        raise BundleError(f"{path}: corrupt or truncated bundle weights ({err})") from err
    digest = extra.get(_HASH_KEY)
    if found == FORMAT_VERSION:
        if verify:
            if digest is None:
                raise BundleError(f"{path}: bundle has no integrity hash")
            actual = _hash(doc, tensors)
            if actual != digest:
                raise BundleError(
                    f"{path}: integrity hash mismatch (stored {digest[:12]}…, computed {actual[:12]}…): "
                    "the file was modified or corrupted"
                )
    else:
        doc = migrate(doc)
    validate_metadata(doc["metadata"])
    return BundleContents(path, found, doc["metadata"], doc["architecture"], tensors, digest)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Metadata of a bundle (checked and migrated)."""
    return read_bundle(path).metadata


@dataclass
class LoadedBundle:
    """A model rebuilt from a bundle, ready to evaluate."""

    model: nn.Module
    metadata: dict[str, Any]
    architecture: dict[str, Any]
    path: Path | None = None

    @property
    def cutoff(self) -> float:
        """Model cutoff in the bundle's length unit."""
        return float(self.metadata["cutoff"])

    @property
    def species(self) -> list[int]:
        return list(self.metadata["species"])

    @property
    def length_unit(self) -> str:
        return self.metadata["units"]["length"]

    @property
    def energy_unit(self) -> str:
        return self.metadata["units"]["energy"]

    @property
    def outputs(self) -> dict[str, dict[str, str]]:
        return self.metadata["outputs"]

    @property
    def dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.model.state_dict().values() if p.is_floating_point()), torch.float64)

    def check_species(self, numbers) -> None:
        """Raise :class:`BundleError` if any atomic number is outside the bundle's species."""
        present = set(int(z) for z in torch.as_tensor(numbers).unique().tolist())
        unknown = sorted(present - set(self.metadata["species"]))
        if unknown:
            from ase.data import chemical_symbols

            names = ", ".join(f"{z} ({chemical_symbols[z] if 0 < z < len(chemical_symbols) else '?'})" for z in unknown)
            raise BundleError(
                f"atomic number(s) {names} not among the bundle's species {sorted(self.metadata['species'])}"
            )


def _check_device(device: torch.device | str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BundleError(f"cannot serve on device {device!r}: CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise BundleError(f"cannot serve on device {device!r}: MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise BundleError(f"cannot serve on device {device!r}: use cpu, cuda or mps")
    return dev


def load_bundle(
    path: str | os.PathLike, dtype: str | torch.dtype | None = None, device: torch.device | str = "cpu"
) -> LoadedBundle:
    """Rebuild the model of a bundle in eval mode.

    Args:
        path: bundle file.
        dtype: evaluate in this float dtype (float32/float64); default: as stored.
        device: torch device to place the model on.
    """
    contents = read_bundle(path)
    dev = _check_device(device)
    want = parse_dtype(dtype)
    try:
        model = registry.build(contents.architecture)
    except registry.UnknownArchitectureError as err:
        raise BundleError(f"{path}: {err}") from err
    except ValueError as err:
        raise BundleError(f"{path}: {err}") from err
    stored = _DTYPES.get(contents.metadata.get("dtype", "float64"), torch.float64)
    model = model.to(stored)
    missing, unexpected = model.load_state_dict(contents.tensors, strict=False)
    if missing or unexpected:
        raise BundleError(
            f"{path}: weights do not fit the architecture {contents.architecture['name']!r} "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    model = model.to(device=dev, dtype=want or stored)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedBundle(model, contents.metadata, contents.architecture, Path(path))


def describe(path: str | os.PathLike) -> str:
    """A human-readable description of a bundle (what ``spkserve info`` prints)."""
    c = read_bundle(path)
    m = c.metadata
    from ase.data import chemical_symbols

    n_params = sum(t.numel() for t in c.tensors.values())
    size = Path(path).stat().st_size
    lines = [
        f"bundle      {c.path}",
        f"format      v{FORMAT_VERSION}" + (f" (migrated from v{c.format_version})" if c.format_version != FORMAT_VERSION else ""),
        f"integrity   sha256 {c.sha256}" if c.sha256 else "integrity   (no hash in this older format)",
        f"model       {c.architecture['name']}  ({n_params:,} values, {m.get('dtype')}, {size / 1024:.1f} KiB)",
    ]
    species = m["species"]
    if len(species) > 20:
        sp = f"{len(species)} elements ({chemical_symbols[species[0]]}…{chemical_symbols[species[-1]]})"
    else:
        sp = " ".join(f"{chemical_symbols[z]}({z})" for z in species)
    lines += [
        f"species     {sp}",
        f"cutoff      {m['cutoff']:g} {m['units']['length']}",
        f"units       length {m['units']['length']}, energy {m['units']['energy']}",
        "outputs",
    ]
    for name, spec in m["outputs"].items():
        lines.append(f"  {name:<22} [{spec['unit']}] per {spec['per']}")
    params = c.architecture.get("params", {})
    flat = json.dumps(params, sort_keys=True)
    lines.append("architecture")
    lines.append("  " + (flat if len(flat) < 400 else flat[:400] + " …"))
    prov = m.get("provenance", {})
    if prov:
        lines.append("provenance")
        for k in sorted(prov):
            v = prov[k]
            text = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
            if len(text) > 200:
                text = text[:200] + " …"
            lines.append(f"  {k:<12} {text}")
    return "\n".join(lines)
