"""Input checks and cell completion shared by every neighbor-list backend.

A periodic direction needs a proper cell vector; a non-periodic direction may
have any vector (often zero). Since shifts along non-periodic directions are
always zero, the pair set does not depend on those vectors, so every backend
works on a *completed* cell whose non-periodic rows are replaced by unit
vectors orthogonal to the periodic ones. This makes the cell invertible and
gives the smallest number of periodic images.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: a periodic cell vector whose component orthogonal to the other periodic
#: vectors is below this fraction of its length makes the cell singular
SINGULAR_TOLERANCE = 1e-6


class NeighborListError(ValueError):
    """Bad input for a neighbor list (shapes, degenerate periodic cell, cutoff)."""


def check_inputs(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    n_atoms: torch.Tensor,
    cutoff: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes and the cutoff; return ``cell`` [S,3,3], ``pbc`` [S,3] bool, ``n_atoms`` [S] int64."""
    if not isinstance(positions, torch.Tensor) or positions.ndim != 2 or positions.shape[1] != 3:
        raise NeighborListError(f"positions must be a tensor of shape [N, 3], got {getattr(positions, 'shape', positions)!r}")
    if not positions.is_floating_point():
        raise NeighborListError(f"positions must be floating point, got {positions.dtype}")
    if not isinstance(cutoff, (int, float)) or not math.isfinite(cutoff) or cutoff <= 0:
        raise NeighborListError(f"cutoff must be a positive finite number (Å or the batch length unit), got {cutoff!r}")
    if not isinstance(n_atoms, torch.Tensor):
        n_atoms = torch.as_tensor(n_atoms)
    n_atoms = n_atoms.reshape(-1).to(device=positions.device, dtype=torch.int64)
    n_sys = n_atoms.shape[0]
    if not isinstance(cell, torch.Tensor):
        cell = torch.as_tensor(cell)
    if cell.ndim == 2 and n_sys == 1:
        cell = cell.unsqueeze(0)
    if cell.shape != (n_sys, 3, 3):
        raise NeighborListError(f"cell must have shape [S, 3, 3] with S={n_sys} systems, got {tuple(cell.shape)}")
    if not isinstance(pbc, torch.Tensor):
        pbc = torch.as_tensor(pbc)
    if pbc.ndim == 1 and n_sys == 1:
        pbc = pbc.unsqueeze(0)
    if pbc.shape != (n_sys, 3):
        raise NeighborListError(f"pbc must have shape [S, 3] with S={n_sys} systems, got {tuple(pbc.shape)}")
    if n_sys == 0:
        raise NeighborListError("n_atoms is empty: a batch needs at least one system")
    counts = n_atoms.tolist()
    if min(counts) < 0:
        raise NeighborListError(f"n_atoms must be non-negative, got {counts}")
    if sum(counts) != positions.shape[0]:
        raise NeighborListError(f"n_atoms sums to {sum(counts)} but positions has {positions.shape[0]} rows")
    if cell.device != positions.device:
        cell = cell.to(positions.device)
    if pbc.device != positions.device:
        pbc = pbc.to(positions.device)
    return cell.to(positions.dtype), pbc.to(torch.bool), n_atoms


def complete_cell(cell: torch.Tensor, pbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace non-periodic rows by orthonormal vectors perpendicular to the periodic ones.

    ``cell`` [S, 3, 3] (rows are lattice vectors), ``pbc`` [S, 3] bool.
    Returns ``(completed [S, 3, 3], singular [S, 3] bool)`` where ``singular``
    flags periodic rows that are zero or linearly dependent on the other
    periodic rows. Pure torch, fixed number of operations (compile friendly).
    """
    S = cell.shape[0]
    dtype, device = cell.dtype, cell.device
    eye = torch.eye(3, dtype=dtype, device=device)
    basis = torch.zeros(S, 3, 3, dtype=dtype, device=device)  # orthonormal rows, filled in order
    n_basis = torch.zeros(S, dtype=torch.int64, device=device)
    singular = torch.zeros(S, 3, dtype=torch.bool, device=device)
    candidates = [(cell[:, k], pbc[:, k]) for k in range(3)]
    candidates += [(eye[k].expand(S, 3), torch.ones(S, dtype=torch.bool, device=device)) for k in range(3)]
    for idx, (vec, active) in enumerate(candidates):
        v = vec - torch.einsum("sk,skd->sd", torch.einsum("skd,sd->sk", basis, vec), basis)
        norm_v = torch.linalg.vector_norm(v, dim=-1)
        norm_c = torch.linalg.vector_norm(vec, dim=-1)
        accept = active & (norm_v > SINGULAR_TOLERANCE * norm_c) & (n_basis < 3)
        if idx < 3:
            singular[:, idx] = active & ~accept
        q = v / torch.where(accept, norm_v, torch.ones_like(norm_v)).unsqueeze(-1)
        slot = torch.nn.functional.one_hot(n_basis.clamp(max=2), 3).to(dtype) * accept.to(dtype).unsqueeze(-1)
        basis = basis + slot.unsqueeze(-1) * q.unsqueeze(1)
        n_basis = n_basis + accept.to(torch.int64)
    # the m-th non-periodic row receives basis row (n_periodic + m)
    n_periodic = pbc.to(torch.int64).sum(dim=1, keepdim=True)  # [S, 1]
    nonper = (~pbc).to(torch.int64)
    before = torch.cumsum(nonper, dim=1) - nonper  # non-periodic rows before row k
    pick = (n_periodic + before).clamp(max=2)  # [S, 3]
    filler = torch.gather(basis, 1, pick.unsqueeze(-1).expand(S, 3, 3))
    completed = torch.where(pbc.unsqueeze(-1), cell, filler)
    return completed, singular


def raise_if_singular(singular: torch.Tensor, cell: torch.Tensor) -> None:
    """Raise :class:`NeighborListError` naming the first system with a degenerate periodic cell."""
    if bool(singular.any()):
        s, k = (int(x) for x in torch.nonzero(singular)[0])
        raise NeighborListError(
            f"system {s}: periodic direction {k} has a zero or linearly dependent cell vector "
            f"{cell[s, k].tolist()} (cell {cell[s].tolist()}); give a proper cell or set pbc[{k}] = False"
        )


def complete_cell_numpy(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """:func:`complete_cell` for float64 numpy cells [S, 3, 3], raising on singular periodic cells.

    Fast paths for fully periodic and fully non-periodic systems (the common
    cases) keep the per-call overhead of the compiled backends small; mixed or
    suspicious cells go through the torch routine.
    """
    if cell.shape[0] == 1:  # single system: plain-float checks, no array bookkeeping
        flags = pbc[0].tolist()
        if not any(flags):
            return np.eye(3)[None]
        if all(flags):
            (a0, a1, a2), (b0, b1, b2), (c0, c1, c2) = cell[0].tolist()
            det = a0 * (b1 * c2 - b2 * c1) - a1 * (b0 * c2 - b2 * c0) + a2 * (b0 * c1 - b1 * c0)
            norms = math.sqrt((a0 * a0 + a1 * a1 + a2 * a2) * (b0 * b0 + b1 * b1 + b2 * b2) * (c0 * c0 + c1 * c1 + c2 * c2))
            if abs(det) >= 1e-4 * norms and norms > 0:
                return cell
    completed = cell.copy()
    all_p = pbc.all(axis=1)
    no_p = ~pbc.any(axis=1)
    completed[no_p] = np.eye(3)
    slow = ~all_p & ~no_p
    if all_p.any():
        c = cell[all_p]
        ratio = np.abs(np.linalg.det(c)) / np.maximum(np.linalg.norm(c, axis=2).prod(axis=1), 1e-300)
        suspicious = np.zeros_like(all_p)
        suspicious[all_p] = ratio < 1e-4  # the exact test below flags only ratios < 1e-6
        slow |= suspicious
    if slow.any():
        sub = torch.from_numpy(cell[slow])
        done, singular = complete_cell(sub, torch.from_numpy(pbc[slow]))
        if bool(singular.any()):
            full = torch.zeros(cell.shape[0], 3, dtype=torch.bool)
            full[torch.from_numpy(slow)] = singular
            raise_if_singular(full, torch.from_numpy(cell))
        completed[slow] = done.numpy()
    return completed


#: a structure may span at most this many cutoffs in any direction (atoms of a
#: non-periodic direction, or a periodic cell vector). The compiled libraries
#: divide by zero (SIGFPE, killing the process) from about 1e5 cutoffs and slow
#: down sharply from about 1e4; 1000 keeps a wide margin (5000 Å at a 5 Å cutoff).
MAX_SPAN_CUTOFFS = 1000.0
#: no coordinate may exceed this magnitude (length unit of the positions)
MAX_COORDINATE = 1e6
#: product over periodic directions of (2 ceil(cutoff / height) + 1): the
#: periodic images searched. More means a cell far thinner than the cutoff.
MAX_PERIODIC_IMAGES = 1000


def check_geometry(positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, n_atoms: torch.Tensor, cutoff: float) -> None:
    """Refuse structures that native neighbor-list code cannot handle safely.

    Runs before any compiled library sees the input (after :func:`check_inputs`).
    Raises :class:`NeighborListError` naming the system and the limit for
    non-finite values, coordinates beyond :data:`MAX_COORDINATE`, extents or
    cell vectors longer than :data:`MAX_SPAN_CUTOFFS` cutoffs, and periodic
    cells so thin that more than :data:`MAX_PERIODIC_IMAGES` images would be searched.
    """
    R = positions.detach().cpu().double().numpy()
    C = cell.detach().cpu().double().numpy()
    Pb = pbc.cpu().numpy()
    if not np.isfinite(R).all():
        raise NeighborListError("positions contain NaN or infinite values")
    if not np.isfinite(C).all():
        raise NeighborListError("cell contains NaN or infinite values")
    if R.size and float(np.abs(R).max()) > MAX_COORDINATE:
        raise NeighborListError(
            f"a coordinate of magnitude {float(np.abs(R).max()):.3g} exceeds the limit of {MAX_COORDINATE:g} "
            "(length unit of the positions); center the structure or wrap it into its cell"
        )
    max_span = MAX_SPAN_CUTOFFS * cutoff
    counts = n_atoms.cpu().numpy()
    start = 0
    for s, n in enumerate(counts.tolist()):
        pos = R[start : start + n]
        start += n
        lengths = np.linalg.norm(C[s], axis=1)
        for k in range(3):
            if Pb[s, k] and lengths[k] > max_span:
                raise NeighborListError(
                    f"system {s}: periodic cell vector {k} is {lengths[k]:.3g} long, more than "
                    f"{MAX_SPAN_CUTOFFS:g} cutoffs ({max_span:.3g}); such a cell is not supported"
                )
        if n and not Pb[s].all():
            ext = pos.max(axis=0) - pos.min(axis=0)
            span = float(np.linalg.norm(ext))
            if span > max_span:
                raise NeighborListError(
                    f"system {s}: its atoms span {span:.3g}, more than {MAX_SPAN_CUTOFFS:g} cutoffs "
                    f"({max_span:.3g}); an atom has flown off or the structure is not one system"
                )
        if Pb[s].any():
            images = 1

            for k in np.flatnonzero(Pb[s]).tolist():
                others = [C[s, m] for m in np.flatnonzero(Pb[s]).tolist() if m != k]
                if len(others) == 2:
                    normal = np.cross(others[0], others[1])
                    height = abs(float(C[s, k] @ normal)) / max(float(np.linalg.norm(normal)), 1e-300)
                elif len(others) == 1:
                    o = others[0] / max(float(np.linalg.norm(others[0])), 1e-300)
                    height = float(np.linalg.norm(C[s, k] - (C[s, k] @ o) * o))
                else:
                    height = float(lengths[k])
                if not height > SINGULAR_TOLERANCE * float(lengths[k]):
                    continue  # degenerate: the cell completion raises the specific error
                images *= 2 * math.ceil(cutoff / height) + 1
                if images > MAX_PERIODIC_IMAGES:
                    raise NeighborListError(
                        f"system {s}: the periodic cell is too thin for cutoff {cutoff:g} (height {height:.3g} "
                        f"along direction {k}); more than {MAX_PERIODIC_IMAGES} periodic images would be searched"
                    )

