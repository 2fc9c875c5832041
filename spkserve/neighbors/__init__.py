"""Neighbor lists for batches of systems (full lists with integer cell shifts).

Public API (stable; backends and the skin list live in submodules):

``neighbor_list(positions, cell, pbc, n_atoms, cutoff, backend="vesin")``
    -> ``(pair_i, pair_j, shifts)`` with global atom indices [P] (int64) and
    integer cell shifts [P, 3] (same dtype as ``positions``) such that
    r_ij = R[j] - R[i] + shifts @ cell[system of i]. Full list: both (i, j)
    and (j, i); an atom pairs with its own periodic images but never with
    itself at zero shift.

``add_neighbor_pairs(batch, cutoff, backend)`` fills ``pair_i``/``pair_j``/
``pair_shifts`` of a batch dict (see :mod:`spkserve.keys`).
"""

from __future__ import annotations

import numpy as np
import torch

from spkserve import keys


def _vesin_single(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float):
    from vesin import NeighborList

    box = cell if pbc.any() else np.zeros((3, 3))
    nl = NeighborList(cutoff=cutoff, full_list=True)
    i, j, S = nl.compute(points=positions, box=box, periodic=pbc.tolist() if pbc.any() else False, quantities="ijS")
    return i.astype(np.int64), j.astype(np.int64), S.astype(np.int64)


def neighbor_list(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    n_atoms: torch.Tensor,
    cutoff: float,
    backend: str = "vesin",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full neighbor list of a batch of systems (see module docstring)."""
    if backend != "vesin":
        raise ValueError(f"unknown neighbor-list backend {backend!r}")
    R = positions.detach().cpu().double().numpy()
    C = cell.detach().cpu().double().numpy()
    P = pbc.detach().cpu().numpy().astype(bool)
    counts = n_atoms.detach().cpu().numpy()
    start = 0
    ii, jj, ss = [], [], []
    for s, n in enumerate(counts):
        i, j, S = _vesin_single(R[start : start + n], C[s], P[s], cutoff)
        ii.append(i + start)
        jj.append(j + start)
        ss.append(S)
        start += n
    dev = positions.device
    return (
        torch.from_numpy(np.concatenate(ii)).to(dev),
        torch.from_numpy(np.concatenate(jj)).to(dev),
        torch.from_numpy(np.concatenate(ss)).to(device=dev, dtype=positions.dtype),
    )


def add_neighbor_pairs(batch: dict[str, torch.Tensor], cutoff: float, backend: str = "vesin") -> dict[str, torch.Tensor]:
    """Return a copy of ``batch`` with neighbor pairs within ``cutoff`` (batch length unit)."""
    i, j, S = neighbor_list(batch[keys.R], batch[keys.cell], batch[keys.pbc], batch[keys.n_atoms], cutoff, backend)
    out = dict(batch)
    out[keys.idx_i], out[keys.idx_j], out[keys.shifts] = i, j, S
    return out
