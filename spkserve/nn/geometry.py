"""Pair geometry shared by representations and heads.

:func:`pair_geometry` computes r_ij and |r_ij| once per model call and, outside
``torch.compile``, drops pairs beyond the cutoff (skin neighbor lists) so that
later layers do no work for them. Inside a compiled graph (static shapes) the
pairs are kept and every consumer masks them through its cutoff function.
"""

from __future__ import annotations

import torch

from spkserve import keys

#: keys of the geometry/feature dict passed from representation to heads
PAIR_I = "pair_i"
PAIR_J = "pair_j"
PAIR_VECTORS = "pair_vectors"  # [P, 3]
PAIR_DISTANCES = "pair_distances"  # [P]
SCALAR = "scalar_representation"  # [N, F]
VECTOR = "vector_representation"  # [N, 3, F]


def _is_compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # pragma: no cover - older torch
        return False


def pair_vectors(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """r_ij = R[j] - R[i] + shift @ cell (same as :func:`spkserve.model.pair_vectors`,
    with fewer operations for a single system).  [P, 3]"""
    R = inputs[keys.R]
    idx_i, idx_j = inputs[keys.idx_i], inputs[keys.idx_j]
    cell = inputs[keys.cell]
    shifts = inputs[keys.shifts].to(R.dtype)
    if cell.shape[0] == 1:
        offsets = shifts @ cell[0]
    else:
        offsets = torch.bmm(shifts.unsqueeze(1), cell.index_select(0, inputs[keys.idx_m].index_select(0, idx_i))).squeeze(1)
    return R.index_select(0, idx_j) - R.index_select(0, idx_i) + offsets


def pair_geometry(inputs: dict[str, torch.Tensor], cutoff: float, compact: bool = True) -> dict[str, torch.Tensor]:
    """Return ``{pair_i, pair_j, pair_vectors [P,3], pair_distances [P]}``.

    With ``compact`` (and when not compiling) pairs with d >= cutoff are removed.
    """
    r_ij = pair_vectors(inputs)
    d_ij = torch.linalg.vector_norm(r_ij, dim=-1)
    idx_i = inputs[keys.idx_i]
    idx_j = inputs[keys.idx_j]
    if compact and not _is_compiling() and d_ij.numel() > 0:
        inside = d_ij < cutoff
        if not bool(inside.all()):
            keep = inside.nonzero().squeeze(1)
            idx_i, idx_j = idx_i[keep], idx_j[keep]
            r_ij, d_ij = r_ij[keep], d_ij[keep]
    return {PAIR_I: idx_i, PAIR_J: idx_j, PAIR_VECTORS: r_ij, PAIR_DISTANCES: d_ij}


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Sum rows of ``src`` into ``dim_size`` bins given by ``index`` (dim 0)."""
    if dim_size == 1:  # one system: a plain sum (fewer ops; avoids an inductor scatter bug on size-1 outputs)
        return src.sum(0, keepdim=True)
    out = torch.zeros((dim_size,) + tuple(src.shape[1:]), dtype=src.dtype, device=src.device)
    return out.index_add_(0, index, src)
