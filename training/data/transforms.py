"""Per-sample transforms: callables ``sample -> sample`` that never modify their input.

They act on the dicts produced by :class:`~training.data.ASEAtomsData`; the
offset transforms (:class:`RemoveOffsets`, :class:`AddOffsets`) and the casts
also work on collated batches (they use ``system_index`` when present).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from spkserve import keys
from spkserve.neighbors import neighbor_list

from .atoms_db import IDX, AtomsDataError

Sample = dict[str, torch.Tensor]

__all__ = [
    "Transform",
    "NeighborList",
    "RemoveOffsets",
    "AddOffsets",
    "CastTo32",
    "CastTo64",
    "SubtractCenterOfMass",
    "WrapPositions",
    "ScaleProperty",
]


class Transform:
    """Base class (optional): a callable ``sample -> new sample``.

    ``deterministic = True`` declares the output a pure function of the input
    sample (no randomness, no state that changes it); only then may a data
    module cache transformed samples between epochs. Random augmentations
    must leave it False (the default).
    """

    deterministic: bool = False

    def __call__(self, sample: Sample) -> Sample:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


# --- neighbor lists --------------------------------------------------------------------
#: periodic images per direction above which a cutoff is refused
MAX_IMAGES_PER_DIRECTION = 50


def _content_hash(sample: Sample) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k in (keys.Z, keys.R, keys.cell, keys.pbc):
        t = sample[k].detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def periodic_heights(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """Distance between opposite faces of the cell along each periodic direction (nan if not periodic).

    For fewer than three periodic directions the height of a lattice vector is
    measured from the span of the other periodic vectors. 0 means degenerate.
    """
    periodic = np.flatnonzero(pbc)
    out = np.full(3, np.nan)
    if len(periodic) == 0:
        return out
    vecs = cell[periodic]  # [k, 3]
    gram_all = np.linalg.det(vecs @ vecs.T)
    for a, d in enumerate(periodic):
        others = np.delete(vecs, a, axis=0)
        gram_other = np.linalg.det(others @ others.T) if len(others) else 1.0
        out[d] = math.sqrt(max(gram_all, 0.0) / gram_other) if gram_other > 0 else 0.0
    return out


def check_cutoff(cell: np.ndarray, pbc: np.ndarray, cutoff: float, where: str) -> None:
    """Refuse degenerate periodic cells and cutoffs needing more than
    :data:`MAX_IMAGES_PER_DIRECTION` images along a direction."""
    heights = periodic_heights(cell, pbc)
    for d in np.flatnonzero(pbc):
        h = heights[d]
        if not h > 1e-8:
            raise AtomsDataError(
                f"{where}: the cell is periodic along lattice vector {d} but degenerate there "
                f"(cell {cell.tolist()}); a neighbor list with cutoff {cutoff} cannot be built. "
                "Fix the cell or set pbc=False along that direction."
            )
        if cutoff / h > MAX_IMAGES_PER_DIRECTION:
            raise AtomsDataError(
                f"{where}: cutoff {cutoff} is larger than allowed for this cell: the height along lattice "
                f"vector {d} is only {h:.3g}, which would need {math.ceil(cutoff / h)} periodic images "
                f"(limit {MAX_IMAGES_PER_DIRECTION}); the cell is almost degenerate"
            )


def _vesin_molecule(positions: torch.Tensor, cutoff: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full list of one non-periodic system straight from vesin (no cell handling needed).

    The batched :func:`spkserve.neighbors.neighbor_list` costs milliseconds per
    call in fixed overhead, which would dominate per-sample use for molecules.
    """
    from vesin import NeighborList as VesinNL

    R = positions.detach().cpu().double().numpy()
    i, j = VesinNL(cutoff=cutoff, full_list=True).compute(points=R, box=np.zeros((3, 3)), periodic=False,
                                                           quantities="ij")
    i = torch.from_numpy(np.ascontiguousarray(i, dtype=np.int64))
    j = torch.from_numpy(np.ascontiguousarray(j, dtype=np.int64))
    return i, j, zero_shifts(i.shape[0], positions.dtype)


def _to_dtype(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``v.to(dtype)``, keeping broadcast views (zero shifts) views."""
    if v.dtype != dtype and v.dim() >= 1 and v.shape[0] > 1 and v.stride(0) == 0:
        return v[:1].to(dtype).expand(v.shape)
    return v.to(dtype)


def zero_shifts(n_pairs: int, dtype: torch.dtype) -> torch.Tensor:
    """[n_pairs, 3] zeros as a stride-0 view (no memory per pair; read-only like every cached tensor)."""
    return torch.zeros(1, 3, dtype=dtype).expand(n_pairs, 3)


class NeighborList(Transform):
    """Add a full neighbor list (``pair_i``, ``pair_j``, ``pair_shifts``) within ``cutoff``.

    Lists are cached in memory per row index and checked against a hash of
    numbers, positions, cell and pbc, so a cached list is only reused for the
    identical structure (static datasets: computed once, then free; randomly
    augmented samples: recomputed). With ``cache_dir`` the lists are also
    stored on disk under ``cache_dir/nbl_<backend>_<cutoff>_<fingerprint>/``
    (``fingerprint`` identifies the dataset, set by the data module) and reused
    across runs and worker processes.

    Args:
        cutoff: in the dataset's distance unit.
        backend: a backend of :func:`spkserve.neighbors.neighbor_list`.
        cache_dir: optional directory for the on-disk cache.
        cache_in_memory: keep lists in memory (default True).
        fingerprint: dataset identifier for the on-disk cache key.
    """

    deterministic = True

    def __init__(
        self,
        cutoff: float,
        backend: str = "vesin",
        cache_dir: str | os.PathLike | None = None,
        cache_in_memory: bool = True,
        fingerprint: str | None = None,
    ) -> None:
        cutoff = float(cutoff)
        if not cutoff > 0 or not math.isfinite(cutoff):
            raise ValueError(f"the neighbor-list cutoff must be a positive number, got {cutoff}")
        self.cutoff = cutoff
        self.backend = backend
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.cache_in_memory = cache_in_memory
        self.fingerprint = fingerprint
        self._memory: dict[int, tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def with_fingerprint(self, fingerprint: str) -> "NeighborList":
        """A copy (empty caches) whose on-disk cache is keyed by ``fingerprint``."""
        return NeighborList(self.cutoff, self.backend, self.cache_dir, self.cache_in_memory, fingerprint)

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    @property
    def cache_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        fp = (self.fingerprint or "nofingerprint")[:16]
        return self.cache_dir / f"nbl_{self.backend}_{self.cutoff:.6g}_{fp}"

    def compute(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pair_i [P], pair_j [P], pair_shifts [P, 3]) of one sample, no caching."""
        cell = sample[keys.cell].reshape(1, 3, 3)
        pbc = sample[keys.pbc].reshape(1, 3)
        if self.backend == "vesin" and not bool(pbc.any()):
            return _vesin_molecule(sample[keys.R], self.cutoff)
        if bool(pbc.any()):
            where = f"dataset row {int(sample[IDX][0])}" if IDX in sample else "sample"
            check_cutoff(cell[0].detach().cpu().double().numpy(), pbc[0].cpu().numpy(), self.cutoff, where)
        n = sample[keys.n_atoms].reshape(1)
        return neighbor_list(sample[keys.R], cell, pbc, n, self.cutoff, self.backend)

    def precompute(self, samples: Iterable[Sample], chunk_size: int = 512) -> int:
        """Fill the in-memory cache for many samples with few batched neighbor-list calls.

        ``samples`` must be the samples as this transform will see them (the
        transforms before it already applied) and carry ``_idx``. Returns the
        number of lists computed. A batched call merges molecules, which makes
        it far cheaper than one call per sample.
        """
        if not self.cache_in_memory:
            raise RuntimeError("precompute() fills the in-memory cache; it is off (cache_in_memory=False)")
        done = 0
        chunk: list[Sample] = []
        for s in samples:
            if IDX not in s:
                raise KeyError("precompute() needs samples with '_idx' (as ASEAtomsData returns them)")
            if self.cache_dir is not None:  # lists stored by an earlier run
                h = _content_hash(s)
                hit = self._load(int(s[IDX][0]), h)
                if hit is not None:
                    self._memory[int(s[IDX][0])] = (h, *hit)
                    continue
            chunk.append(s)
            if len(chunk) == chunk_size:
                done += self._precompute_chunk(chunk)
                chunk = []
        if chunk:
            done += self._precompute_chunk(chunk)
        return done

    def _precompute_chunk(self, chunk: list[Sample]) -> int:
        for s in chunk:
            if bool(s[keys.pbc].any()):
                check_cutoff(s[keys.cell].reshape(3, 3).double().numpy(), s[keys.pbc].reshape(3).numpy(),
                              self.cutoff, f"dataset row {int(s[IDX][0])}")
        n = torch.cat([s[keys.n_atoms] for s in chunk])  # [S]
        R = torch.cat([s[keys.R] for s in chunk]).double()
        cell = torch.cat([s[keys.cell].reshape(1, 3, 3) for s in chunk]).double()
        pbc = torch.cat([s[keys.pbc].reshape(1, 3) for s in chunk])
        i, j, S = neighbor_list(R, cell, pbc, n, self.cutoff, self.backend)
        counts = n.numpy()
        starts = np.cumsum(counts) - counts
        system = np.repeat(np.arange(len(chunk)), counts)[i.numpy()]  # system of each pair
        order = np.argsort(system, kind="stable")
        per_system = np.bincount(system, minlength=len(chunk))
        bounds = np.concatenate([[0], np.cumsum(per_system)])
        i, j, S = i[order], j[order], S[order]
        for k, s in enumerate(chunk):
            a, b = bounds[k], bounds[k + 1]
            off = int(starts[k])
            shifts = S[a:b].clone() if bool(s[keys.pbc].any()) else zero_shifts(int(b - a), S.dtype)
            entry = (_content_hash(s), i[a:b] - off, j[a:b] - off, shifts)
            self._memory[int(s[IDX][0])] = entry
            if self.cache_dir is not None:
                self._store(int(s[IDX][0]), entry[0], entry[1:])
        return len(chunk)

    def __call__(self, sample: Sample) -> Sample:
        idx = int(sample[IDX][0]) if IDX in sample else None
        pairs = None
        h = None
        if idx is not None and (self.cache_in_memory or self.cache_dir is not None):
            h = _content_hash(sample)
            hit = self._memory.get(idx)
            if hit is not None and hit[0] == h:
                pairs = hit[1:]
            elif self.cache_dir is not None:
                pairs = self._load(idx, h)
                if pairs is not None and self.cache_in_memory:
                    self._memory[idx] = (h, *pairs)
        if pairs is None:
            pairs = self.compute(sample)
            if h is not None:
                if self.cache_in_memory:
                    self._memory[idx] = (h, *pairs)
                if self.cache_dir is not None:
                    self._store(idx, h, pairs)
        out = dict(sample)
        out[keys.idx_i], out[keys.idx_j] = pairs[0], pairs[1]
        out[keys.shifts] = _to_dtype(pairs[2], sample[keys.R].dtype)
        return out

    def _file(self, idx: int) -> Path:
        return self.cache_path / f"{idx}.npz"

    def _load(self, idx: int, h: str):
        f = self._file(idx)
        if not f.exists():
            return None
        with np.load(f, allow_pickle=False) as z:
            if str(z["hash"]) != h:
                return None
            return torch.from_numpy(z["i"]), torch.from_numpy(z["j"]), torch.from_numpy(z["S"])

    def _store(self, idx: int, h: str, pairs) -> None:
        d = self.cache_path
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{idx}.{os.getpid()}.tmp.npz"
        np.savez(tmp, i=pairs[0].numpy(), j=pairs[1].numpy(), S=pairs[2].numpy(), hash=np.array(h))
        os.replace(tmp, self._file(idx))


# --- offsets ---------------------------------------------------------------------------
class _Offsets(Transform):
    deterministic = True
    def __init__(
        self,
        property: str = keys.energy,
        remove_mean: bool = True,
        remove_atomrefs: bool = True,
        is_extensive: bool = True,
        atomref: torch.Tensor | Sequence[float] | None = None,
        mean_per_atom: float | None = None,
    ) -> None:
        self.property = property
        self.remove_mean = remove_mean
        self.remove_atomrefs = remove_atomrefs
        self.is_extensive = is_extensive
        self.atomref = None if atomref is None else torch.as_tensor(atomref, dtype=torch.float64).reshape(-1)
        self.mean_per_atom = None if mean_per_atom is None else float(mean_per_atom)
        self._ref_np: np.ndarray | None = None
        self._ref_src: torch.Tensor | None = None

    @property
    def is_fitted(self) -> bool:
        return (not self.remove_atomrefs or self.atomref is not None) and (
            not self.remove_mean or self.mean_per_atom is not None
        )

    def fitted(self, atomref: torch.Tensor | None, mean_per_atom: float | None) -> "_Offsets":
        """A copy with the given statistics."""
        return type(self)(
            self.property, self.remove_mean, self.remove_atomrefs, self.is_extensive, atomref, mean_per_atom
        )

    def _single_offset(self, Z: torch.Tensor, n: int) -> float:
        """Offset of one system (numpy: far cheaper than torch for a few atoms)."""
        off = 0.0
        if self.remove_atomrefs:
            if self._ref_np is None or self._ref_src is not self.atomref:
                self._ref_np, self._ref_src = self.atomref.numpy(), self.atomref
            z = Z.numpy()
            if z.max() >= self._ref_np.shape[0]:
                raise AtomsDataError(
                    f"atomic number {int(z.max())} has no atomref for {self.property!r} "
                    f"(atomrefs cover Z < {self._ref_np.shape[0]})"
                )
            off += float(self._ref_np[z].sum())
        if self.remove_mean:
            off += self.mean_per_atom * n if self.is_extensive else self.mean_per_atom
        return off

    def offset(self, inputs: Sample) -> torch.Tensor:
        """Offset per system [S] (float64) = sum of atomrefs + mean (per atom if extensive)."""
        if not self.is_fitted:
            raise RuntimeError(
                f"{type(self).__name__} for {self.property!r} has no statistics: pass atomref/mean_per_atom, "
                "or let AtomsDataModule.setup() fit them on the training split"
            )
        Z = inputs[keys.Z]
        n = inputs[keys.n_atoms].reshape(-1)
        off = torch.zeros(n.shape[0], dtype=torch.float64, device=Z.device)
        if self.remove_atomrefs:
            ref = self.atomref.to(Z.device)
            if int(Z.max()) >= ref.shape[0]:
                raise AtomsDataError(
                    f"atomic number {int(Z.max())} has no atomref for {self.property!r} "
                    f"(atomrefs cover Z < {ref.shape[0]})"
                )
            idx_m = inputs.get(keys.idx_m)
            if idx_m is None:
                if n.shape[0] != 1:
                    raise ValueError("a batch of several systems needs 'system_index'")
                idx_m = torch.zeros_like(Z)
            off.index_add_(0, idx_m, ref[Z])
        if self.remove_mean:
            off = off + (self.mean_per_atom * n.double() if self.is_extensive else self.mean_per_atom)
        return off

    def _apply(self, sample: Sample, sign: float) -> Sample:
        v = sample[self.property]
        out = dict(sample)
        n = sample[keys.n_atoms]
        if n.shape[0] == 1 and self.is_fitted and sample[keys.Z].device.type == "cpu":  # one system
            out[self.property] = v + sign * self._single_offset(sample[keys.Z], int(n[0]))
            return out
        off = self.offset(sample).to(v.dtype)
        out[self.property] = v + sign * off.reshape((-1,) + (1,) * (v.dim() - 1))
        return out


class RemoveOffsets(_Offsets):
    """Subtract single-atom references (``atomref`` [max_z+1]) and a mean from a property.

    ``E' = E - sum_i atomref[Z_i] - n_atoms * mean_per_atom`` (``mean_per_atom``
    counted once per system if not ``is_extensive``). The statistics are fitted
    on the training split by :class:`~training.data.AtomsDataModule`
    (:func:`training.data.stats.fit_offsets`) or given explicitly.
    """

    def __call__(self, sample: Sample) -> Sample:
        return self._apply(sample, -1.0)


class AddOffsets(_Offsets):
    """Inverse of :class:`RemoveOffsets` (same arguments); works on samples and batches."""

    def __call__(self, sample: Sample) -> Sample:
        return self._apply(sample, +1.0)

    @classmethod
    def from_remove(cls, remove: RemoveOffsets) -> "AddOffsets":
        """The inverse of a fitted :class:`RemoveOffsets`."""
        return cls(
            remove.property, remove.remove_mean, remove.remove_atomrefs, remove.is_extensive,
            remove.atomref, remove.mean_per_atom,
        )


# --- casts and geometry ----------------------------------------------------------------
class _Cast(Transform):
    deterministic = True
    src: torch.dtype
    dst: torch.dtype

    def __call__(self, sample: Sample) -> Sample:
        return {k: (self._cast(v) if v.dtype == self.src else v) for k, v in sample.items()}

    def _cast(self, v: torch.Tensor) -> torch.Tensor:
        return _to_dtype(v, self.dst)


class CastTo32(_Cast):
    """float64 tensors -> float32 (integer and bool tensors unchanged)."""

    src, dst = torch.float64, torch.float32


class CastTo64(_Cast):
    """float32 tensors -> float64."""

    src, dst = torch.float32, torch.float64


class SubtractCenterOfMass(Transform):
    """Shift positions so that the centre of mass (ASE atomic masses) is at the origin."""

    deterministic = True

    def __init__(self) -> None:
        from ase.data import atomic_masses

        self._masses = torch.as_tensor(atomic_masses, dtype=torch.float64)

    def __call__(self, sample: Sample) -> Sample:
        R = sample[keys.R]
        m = self._masses[sample[keys.Z]].to(R.dtype)  # [n]
        com = (m[:, None] * R).sum(0) / m.sum()  # [3]
        out = dict(sample)
        out[keys.R] = R - com
        return out


class WrapPositions(Transform):
    """Wrap atoms into the cell along periodic directions.

    If the sample already has neighbor pairs, their cell shifts are corrected
    so that every pair vector stays the same.
    """

    deterministic = True

    def __call__(self, sample: Sample) -> Sample:
        pbc = sample[keys.pbc].reshape(3)
        if not bool(pbc.any()):
            return sample
        R = sample[keys.R]
        cell = sample[keys.cell].reshape(3, 3).to(torch.float64)
        periodic = torch.nonzero(pbc).reshape(-1)
        vecs = cell[periodic]  # [k, 3]
        frac = R.to(torch.float64) @ torch.linalg.pinv(vecs)  # [n, k]
        n_img = torch.floor(frac + 1e-12)  # [n, k]
        full = torch.zeros(R.shape[0], 3, dtype=torch.float64)
        full[:, periodic] = n_img
        out = dict(sample)
        out[keys.R] = (R.to(torch.float64) - full @ cell).to(R.dtype)
        if keys.idx_i in sample:
            i, j = sample[keys.idx_i], sample[keys.idx_j]
            S = sample[keys.shifts]
            out[keys.shifts] = S + (full[j] - full[i]).to(S.dtype)
        return out


class ScaleProperty(Transform):
    """Multiply ``property`` by ``factor`` (a dimensionless scale; unit changes belong to the dataset)."""

    deterministic = True

    def __init__(self, property: str, factor: float) -> None:
        self.property = property
        self.factor = float(factor)

    def __call__(self, sample: Sample) -> Sample:
        if self.property not in sample:
            raise KeyError(f"ScaleProperty: the sample has no property {self.property!r} (keys: {sorted(sample)})")
        out = dict(sample)
        out[self.property] = sample[self.property] * self.factor
        return out
