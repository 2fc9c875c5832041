"""Per-system neighbor lists from compiled libraries (vesin, matscipy) and ASE.

Each function takes one system in float64 numpy: ``positions`` [n, 3],
``cell`` [3, 3] already *completed* (invertible, see :mod:`._cells`), ``pbc``
[3] bool, and returns ``(i [P] int64, j [P] int64, shifts [P, 3] integer)``,
a full list with r_ij = R[j] - R[i] + shifts @ cell (shifts may be any
integer dtype; the caller converts them once to the positions dtype).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Single = Callable[[np.ndarray, np.ndarray, np.ndarray, float], tuple[np.ndarray, np.ndarray, np.ndarray]]


def vesin_single(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float):
    from vesin import NeighborList

    nl = NeighborList(cutoff=cutoff, full_list=True)
    if pbc.any():
        positions, cell = _box_for_non_periodic(positions, cell, pbc, cutoff)
        i, j, S = nl.compute(points=positions, box=cell, periodic=pbc, quantities="ijS", copy=False)
    else:
        i, j = nl.compute(points=positions, box=np.zeros((3, 3)), periodic=False, quantities="ij", copy=False)
        S = np.zeros((len(i), 3), dtype=np.int32)
    # one copy out of vesin's buffers (size_t -> int64; int32 shifts are converted later)
    return i.astype(np.int64), j.astype(np.int64), S.copy()


def _box_for_non_periodic(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float):
    """Stretch non-periodic rows (unit vectors after completion) to span all atoms plus the cutoff.

    matscipy and ASE bin atoms with the cell; a cell that encloses the atoms in
    non-periodic directions keeps their bin grids small. The pair set does not
    depend on these rows (their shifts are zero).
    """
    if pbc.all():
        return positions, cell
    cell = cell.copy()
    for k in np.flatnonzero(~pbc):
        u = cell[k]  # unit vector orthogonal to the periodic rows
        proj = positions @ u if len(positions) else np.zeros(1)
        cell[k] = u * (float(proj.max() - proj.min()) + 2.0 * cutoff + 1.0)
    return positions, cell


def matscipy_single(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float):
    from matscipy.neighbours import neighbour_list

    positions, cell = _box_for_non_periodic(positions, cell, pbc, cutoff)
    i, j, S = neighbour_list("ijS", positions=positions, cell=cell, pbc=pbc, cutoff=float(cutoff))
    return i.astype(np.int64), j.astype(np.int64), S


def ase_single(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float):
    from ase.neighborlist import primitive_neighbor_list

    positions, cell = _box_for_non_periodic(positions, cell, pbc, cutoff)
    i, j, S = primitive_neighbor_list(
        "ijS", pbc, cell, positions, float(cutoff), self_interaction=False, use_scaled_positions=False
    )
    return i.astype(np.int64), j.astype(np.int64), S


SINGLE_BACKENDS: dict[str, Single] = {
    "vesin": vesin_single,
    "matscipy": matscipy_single,
    "ase": ase_single,
}

#: fully non-periodic systems up to this size are merged into one library call
MERGE_MAX_ATOMS = 1024


def merged_non_periodic(
    positions: np.ndarray, starts: np.ndarray, counts: np.ndarray, cutoff: float, single: Single
) -> tuple[np.ndarray, np.ndarray]:
    """One library call for many small non-periodic systems.

    The systems are translated onto a grid with gaps larger than the cutoff,
    so every pair found lies inside one system. ``positions`` is the whole
    batch [N, 3]; ``starts``/``counts`` select the systems. Returns global
    ``(i, j)``; shifts are zero.
    """
    index = np.concatenate([np.arange(s, s + c) for s, c in zip(starts, counts)])
    pos = positions[index]
    local_starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    nonempty = counts > 0
    lo = np.zeros((len(counts), 3))
    hi = np.zeros((len(counts), 3))
    lo[nonempty] = np.minimum.reduceat(pos, local_starts[nonempty], axis=0)
    hi[nonempty] = np.maximum.reduceat(pos, local_starts[nonempty], axis=0)
    spacing = float((hi - lo).max()) + 2.0 * cutoff + 1.0
    side = int(np.ceil(len(counts) ** (1.0 / 3.0) - 1e-9))
    g = np.arange(len(counts))
    grid = np.stack([g % side, (g // side) % side, g // (side * side)], axis=1) * spacing
    offset = grid - lo  # [G, 3]
    pos = pos + np.repeat(offset, counts, axis=0)
    i, j, _ = single(pos, np.eye(3), np.zeros(3, dtype=bool), cutoff)
    return index[i], index[j]
