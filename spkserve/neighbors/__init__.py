"""Neighbor lists for batches of systems (full lists with integer cell shifts).

Public API:

``neighbor_list(positions, cell, pbc, n_atoms, cutoff, backend="vesin")``
    -> ``(pair_i, pair_j, shifts)`` with global atom indices [P] (int64) and
    integer cell shifts [P, 3] (same dtype as ``positions``) such that
    r_ij = R[j] - R[i] + shifts @ cell[system of i]. Full list: both (i, j)
    and (j, i); an atom pairs with its own periodic images but never with
    itself at zero shift. Cells thinner than twice the cutoff give several
    images of the same pair. A non-periodic direction may have a zero cell
    vector; a periodic direction with a zero or dependent cell vector raises
    :class:`NeighborListError`.

``add_neighbor_pairs(batch, cutoff, backend)`` fills ``pair_i``/``pair_j``/
``pair_shifts`` of a batch dict (see :mod:`spkserve.keys`).

``SkinNeighborList(cutoff, skin, backend)`` (:mod:`.skin`) rebuilds only when
atoms moved more than skin/2.

Backends (:data:`BACKENDS`): ``"vesin"`` (default, fastest on CPU),
``"matscipy"``, ``"ase"`` (reference), ``"torch"`` (pure torch, batched, any
device, works under ``torch.compile``).
"""

from __future__ import annotations

import numpy as np
import torch

from spkserve import keys
from spkserve.neighbors._cells import NeighborListError, check_geometry, check_inputs, complete_cell_numpy
from spkserve.neighbors._numpy_backends import MERGE_MAX_ATOMS, SINGLE_BACKENDS, merged_non_periodic
from spkserve.neighbors.torch_backend import torch_neighbor_list

#: names accepted by ``backend=``
BACKENDS = ("vesin", "matscipy", "ase", "torch")

__all__ = [
    "BACKENDS",
    "NeighborListError",
    "SkinNeighborList",
    "add_neighbor_pairs",
    "neighbor_list",
    "torch_neighbor_list",
]


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown neighbor-list backend {backend!r}; known backends: {', '.join(BACKENDS)}")


def _numpy_neighbor_list(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    n_atoms: torch.Tensor,
    cutoff: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    single = SINGLE_BACKENDS[backend]
    P = pbc.cpu().numpy()
    C = complete_cell_numpy(cell.detach().cpu().double().numpy(), P)
    R = positions.detach().cpu().double().numpy()
    dev, dtype = positions.device, positions.dtype
    if P.shape[0] == 1:  # common case: no concatenation or index offsets
        i, j, S = single(R, C[0], P[0], cutoff)
        return _to_torch(i, j, S, dev, dtype)

    counts = n_atoms.cpu().numpy()
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    periodic = P.any(axis=1)
    mergeable = ~periodic & (counts <= MERGE_MAX_ATOMS) & (counts > 0)
    ii, jj, ss = [], [], []
    if mergeable.sum() > 1:
        i, j = merged_non_periodic(R, starts[mergeable], counts[mergeable], cutoff, single)
        ii.append(i)
        jj.append(j)
        ss.append(np.zeros((len(i), 3), dtype=np.int32))
        mergeable_done = mergeable
    else:
        mergeable_done = np.zeros_like(mergeable)
    for s in np.flatnonzero(~mergeable_done & (counts > 0)):
        a, n = starts[s], counts[s]
        i, j, S = single(R[a : a + n], C[s], P[s], cutoff)
        ii.append(i + a)
        jj.append(j + a)
        ss.append(S)
    if not ii:
        return _to_torch(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.int32), dev, dtype)
    return _to_torch(np.concatenate(ii), np.concatenate(jj), np.concatenate(ss), dev, dtype)


_NUMPY_FLOAT = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


def _to_torch(i: np.ndarray, j: np.ndarray, S: np.ndarray, device: torch.device, dtype: torch.dtype):
    """int64 indices and float shifts as torch tensors, one conversion pass each."""
    np_dtype = _NUMPY_FLOAT.get(dtype, np.float64)
    return (
        torch.from_numpy(np.ascontiguousarray(i, dtype=np.int64)).to(device),
        torch.from_numpy(np.ascontiguousarray(j, dtype=np.int64)).to(device),
        torch.from_numpy(np.ascontiguousarray(S, dtype=np_dtype)).to(device=device, dtype=dtype),
    )


def neighbor_list(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    n_atoms: torch.Tensor,
    cutoff: float,
    backend: str = "vesin",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full neighbor list of a batch of systems (see module docstring).

    ``positions`` [N, 3], ``cell`` [S, 3, 3] (rows), ``pbc`` [S, 3] bool,
    ``n_atoms`` [S], ``cutoff`` in the length unit of ``positions`` (Å for
    providers). Returns ``pair_i`` [P], ``pair_j`` [P] (int64, global
    indices) and ``shifts`` [P, 3] (integer values in ``positions.dtype``),
    on the device of ``positions``.
    """
    _check_backend(backend)
    cell, pbc, n_atoms = check_inputs(positions, cell, pbc, n_atoms, cutoff)
    check_geometry(positions, cell, pbc, n_atoms, float(cutoff))  # before any native code
    if backend == "torch":
        return torch_neighbor_list(positions, cell, pbc, n_atoms, float(cutoff))
    return _numpy_neighbor_list(positions, cell, pbc, n_atoms, float(cutoff), backend)


def add_neighbor_pairs(batch: dict[str, torch.Tensor], cutoff: float, backend: str = "vesin") -> dict[str, torch.Tensor]:
    """Return a copy of ``batch`` with neighbor pairs within ``cutoff`` (batch length unit)."""
    i, j, S = neighbor_list(batch[keys.R], batch[keys.cell], batch[keys.pbc], batch[keys.n_atoms], cutoff, backend)
    out = dict(batch)
    out[keys.idx_i], out[keys.idx_j], out[keys.shifts] = i, j, S
    return out


from spkserve.neighbors.skin import SkinNeighborList  # noqa: E402  (needs neighbor_list above)
