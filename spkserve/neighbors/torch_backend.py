"""Pure-torch cell-list neighbor list, batched over systems, on any device.

Algorithm (all systems at once, no Python loop over systems):

1. complete the cell (non-periodic rows -> unit normals), fractional
   coordinates, wrap periodic coordinates into [0, 1) remembering the integer
   offsets ``wrap``;
2. bin atoms on a per-system grid whose bins are at least the cutoff wide
   (measured perpendicular to the lattice planes); a cell thinner than the
   cutoff gets one bin and several periodic images;
3. for each atom and each neighbouring bin offset (with its periodic image),
   gather the atoms of that bin, compute r_ij = R[j] - R[i] + S @ cell with
   S = image + wrap[i] - wrap[j], and keep |r_ij| < cutoff. Only half of the
   bin offsets are searched; their pairs are mirrored as (j, i, -S).

Step 3 runs in chunks so that memory stays bounded for large systems.

Under ``torch.compile`` the function runs eagerly (``torch.compiler.disable``):
every size in it depends on the data (pair counts change at each rebuild), so
tracing it would only add graph breaks and recompilations (tens of seconds)
for no speed-up; the model around it is still compiled. Being plain torch, it
runs on the device of the inputs (CPU, CUDA, ...).
"""

from __future__ import annotations

import torch

from spkserve.neighbors._cells import complete_cell, raise_if_singular

#: candidate pairs processed per chunk in step 3
CHUNK_PAIRS = 1 << 21
#: bins are made this much wider than the cutoff so that rounding never loses a pair
_BIN_MARGIN = 1e-5
#: non-periodic batches whose largest system has at most this many atoms use all pairs
BRUTE_FORCE_MAX_ATOMS = 64
#: bins per cutoff length: 2 halves the candidate pairs of 1 (27 -> 15.6 cutoff^3 searched)
BINS_PER_CUTOFF = 2


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def _segment_arange(counts: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For counts [K]: (owner [total], rank within owner [total])."""
    owner = torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts, output_size=total)
    rank = torch.arange(total, device=counts.device) - _exclusive_cumsum(counts)[owner]
    return owner, rank


def _all_pairs_molecules(
    positions: torch.Tensor, n_atoms: torch.Tensor, cutoff: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Non-periodic batch of small systems: test every pair inside each system (few ops, no bins)."""
    sq = n_atoms * n_atoms
    total = int(sq.sum())
    owner, rank = _segment_arange(sq, total)
    n = n_atoms.index_select(0, owner)
    a = torch.div(rank, n, rounding_mode="floor")
    start = _exclusive_cumsum(n_atoms).index_select(0, owner)
    i = start + a
    j = start + rank - a * n
    vec = positions.index_select(0, j) - positions.index_select(0, i)
    keep = torch.nonzero(((vec * vec).sum(dim=1) < cutoff * cutoff) & (i != j)).squeeze(1)
    i, j = i.index_select(0, keep), j.index_select(0, keep)
    return i, j, torch.zeros(i.shape[0], 3, dtype=positions.dtype, device=positions.device)


@torch.compiler.disable
def torch_neighbor_list(
    positions: torch.Tensor,
    cell: torch.Tensor,
    pbc: torch.Tensor,
    n_atoms: torch.Tensor,
    cutoff: float,
    chunk_pairs: int = CHUNK_PAIRS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full neighbor list; inputs as in :func:`spkserve.neighbors.neighbor_list` (already checked).

    ``positions`` [N, 3], ``cell`` [S, 3, 3] (same dtype), ``pbc`` [S, 3] bool,
    ``n_atoms`` [S] int64, ``cutoff`` in the length unit of ``positions``.
    Returns ``pair_i`` [P], ``pair_j`` [P] (int64) and ``shifts`` [P, 3]
    (integer values, dtype of ``positions``).
    """
    device, dtype = positions.device, positions.dtype
    positions = positions.detach()
    cell = cell.detach()
    n_sys = n_atoms.shape[0]
    n_tot = positions.shape[0]
    if n_tot > 0 and not bool(pbc.any()) and int(n_atoms.max()) <= BRUTE_FORCE_MAX_ATOMS:
        return _all_pairs_molecules(positions, n_atoms, cutoff)
    completed, singular = complete_cell(cell, pbc)
    raise_if_singular(singular, cell)

    sys_idx = torch.repeat_interleave(torch.arange(n_sys, device=device), n_atoms, output_size=n_tot)  # [N]
    inv = torch.linalg.inv(completed)  # [S, 3, 3]; frac = R @ inv; columns are reciprocal vectors
    spacing = 1.0 / torch.linalg.vector_norm(inv, dim=1)  # [S, 3] distance between lattice planes
    frac = torch.einsum("nd,ndk->nk", positions, inv[sys_idx])  # [N, 3]
    pbc_a = pbc[sys_idx]  # [N, 3]

    # wrap periodic coordinates into [0, 1)
    wrap = torch.where(pbc_a, torch.floor(frac), torch.zeros_like(frac))
    fw = frac - wrap
    up = pbc_a & (fw >= 1.0)
    wrap = wrap + up.to(dtype)
    fw = torch.where(up, fw - 1.0, fw)

    # non-periodic directions: length coordinate relative to the system minimum
    big = torch.finfo(dtype).max
    idx3 = sys_idx.unsqueeze(1).expand(n_tot, 3)
    lo = torch.full((n_sys, 3), big, dtype=dtype, device=device).scatter_reduce(0, idx3, frac, "amin")
    hi = torch.full((n_sys, 3), -big, dtype=dtype, device=device).scatter_reduce(0, idx3, frac, "amax")
    extent = (hi - lo).clamp(min=0.0)  # [S, 3]

    # bin grid per system and direction
    rc_bin = cutoff * (1.0 + _BIN_MARGIN)
    w_min = rc_bin / BINS_PER_CUTOFF  # smallest bin width
    length = torch.where(pbc, spacing, extent)
    nb = torch.where(pbc, torch.floor(length / w_min).clamp(min=1.0), torch.floor(length / w_min) + 1.0)
    cap = 2.0 * n_atoms.to(dtype) + 8.0  # at most about two bins per atom
    alpha = (nb.prod(dim=1) / cap).clamp(min=1.0) ** (1.0 / 3.0)
    nb = torch.floor(nb / alpha.unsqueeze(1)).clamp(min=1.0)
    width = torch.where(pbc, spacing / nb, torch.maximum(torch.full_like(extent, w_min), extent / nb * (1.0 + 1e-6)))
    reach = torch.ceil(rc_bin / width)  # bins to look at on each side
    reach = torch.where(pbc, reach, torch.minimum(reach, nb - 1.0))  # no images beyond a non-periodic box
    nb_i = nb.to(torch.int64)
    reach_i = reach.to(torch.int64)

    coord = torch.where(pbc_a, fw * nb[sys_idx], (frac - lo[sys_idx]) / width[sys_idx])
    nb_a = nb_i[sys_idx]
    b = torch.minimum(torch.floor(coord).to(torch.int64).clamp(min=0), nb_a - 1)  # [N, 3]

    bins_per_sys = nb_i.prod(dim=1)  # [S]
    bin_offset = _exclusive_cumsum(bins_per_sys)
    n_bins = int(bins_per_sys.sum())
    gid = bin_offset[sys_idx] + (b[:, 0] * nb_a[:, 1] + b[:, 1]) * nb_a[:, 2] + b[:, 2]
    order = torch.argsort(gid, stable=True)
    bin_count = torch.bincount(gid, minlength=n_bins)
    bin_start = _exclusive_cumsum(bin_count)

    # stage 1: (non-empty source bin, bin offset) -> target bin and periodic image
    bin_sys = torch.repeat_interleave(torch.arange(n_sys, device=device), bins_per_sys, output_size=n_bins)
    src = torch.nonzero(bin_count > 0).squeeze(1)  # [B]
    s_src = bin_sys.index_select(0, src)
    nbs = nb_i.index_select(0, s_src)
    local = src - bin_offset.index_select(0, s_src)
    bsrc = torch.stack([local // (nbs[:, 1] * nbs[:, 2]), (local // nbs[:, 2]) % nbs[:, 1], local % nbs[:, 2]], dim=1)
    # per-system table of bin offsets; half of them suffice: pairs found at offset
    # o > 0 (lexicographic) are mirrored as (j, i, -S) below, offset 0 (same bin,
    # no image) is searched fully
    span = 2 * reach_i + 1  # [S, 3]
    n_full = span.prod(dim=1)
    t_sys, q = _segment_arange(n_full, int(n_full.sum()))
    sp = span.index_select(0, t_sys)
    table = torch.stack([q // (sp[:, 1] * sp[:, 2]), (q // sp[:, 2]) % sp[:, 1], q % sp[:, 2]], dim=1)
    table = table - reach_i.index_select(0, t_sys)
    forward = (table[:, 0] > 0) | ((table[:, 0] == 0) & ((table[:, 1] > 0) | ((table[:, 1] == 0) & (table[:, 2] >= 0))))
    fwd = torch.nonzero(forward).squeeze(1)
    table, t_sys = table.index_select(0, fwd), t_sys.index_select(0, fwd)
    n_fwd = torch.bincount(t_sys, minlength=n_sys)
    table_start = _exclusive_cumsum(n_fwd)

    n_off = n_fwd.index_select(0, s_src)  # [B]
    n_stage1 = int(n_off.sum())
    ent, q = _segment_arange(n_off, n_stage1)
    s_of = s_src.index_select(0, ent)
    off = table.index_select(0, table_start.index_select(0, s_of) + q)
    target = bsrc.index_select(0, ent) + off
    nbt = nb_i.index_select(0, s_of)
    per = pbc.index_select(0, s_of)
    image = torch.where(per, torch.div(target, nbt, rounding_mode="floor"), torch.zeros_like(target))
    target = target - image * nbt
    valid = (per | ((target >= 0) & (target < nbt))).all(dim=1)
    tgid = bin_offset.index_select(0, s_of) + (target[:, 0] * nbt[:, 1] + target[:, 1]) * nbt[:, 2] + target[:, 2]
    tgid = torch.where(valid, tgid, torch.zeros_like(tgid))
    count_b = torch.where(valid, bin_count.index_select(0, tgid), torch.zeros_like(tgid))
    sgid = src.index_select(0, ent)
    count_a = bin_count.index_select(0, sgid)
    mirror = (off != 0).any(dim=1)
    # keep (source bin, target bin) entries that hold atoms
    live = torch.nonzero(count_b > 0).squeeze(1)
    mirror = mirror.index_select(0, live)
    count_a, count_b = count_a.index_select(0, live), count_b.index_select(0, live)
    start_a = bin_start.index_select(0, sgid.index_select(0, live))
    start_b = bin_start.index_select(0, tgid.index_select(0, live))
    image = image.index_select(0, live)
    image_cart = torch.einsum("ck,ckd->cd", image.to(dtype), completed.index_select(0, s_of.index_select(0, live)))
    self_image = (image == 0).all(dim=1)  # the unshifted copy of the source bin itself
    cnt = count_a * count_b
    del ent, q, s_of, off, target, nbt, per, valid, tgid, sgid, live  # free stage-1 memory before stage 2

    # stage 2: expand to atom pairs in chunks of about ``chunk_pairs``, with wrapped
    # positions Rw = R - wrap @ cell: r_ij = Rw[j] + image @ cell - Rw[i]
    wrap_i64 = wrap.to(torch.int64)
    wrapped = positions - torch.einsum("nk,nkd->nd", wrap, completed.index_select(0, sys_idx))
    cut2 = cutoff * cutoff
    out_i, out_j, out_s = [], [], []
    csum = torch.cumsum(cnt, 0)
    total = int(csum[-1]) if cnt.shape[0] > 0 else 0
    lo_idx = 0
    done = 0
    while done < total:
        hi_idx = int(torch.searchsorted(csum, done + chunk_pairs, right=True))
        hi_idx = max(hi_idx, lo_idx + 1)
        c = cnt[lo_idx:hi_idx]
        n_pairs = int(c.sum())
        owner, rank = _segment_arange(c, n_pairs)
        owner = owner + lo_idx
        cb = count_b.index_select(0, owner)
        ra = torch.div(rank, cb, rounding_mode="floor")
        pi = order.index_select(0, start_a.index_select(0, owner) + ra)
        pj = order.index_select(0, start_b.index_select(0, owner) + rank - ra * cb)
        vec = wrapped.index_select(0, pj) - wrapped.index_select(0, pi) + image_cart.index_select(0, owner)
        keep = ((vec * vec).sum(dim=1) < cut2) & ((pi != pj) | ~self_image.index_select(0, owner))
        idx = torch.nonzero(keep).squeeze(1)
        ki, kj = pi.index_select(0, idx), pj.index_select(0, idx)
        shift = image.index_select(0, owner.index_select(0, idx)) + wrap_i64.index_select(0, ki) - wrap_i64.index_select(0, kj)
        shift_f = shift.to(dtype)
        m = torch.nonzero(mirror.index_select(0, owner.index_select(0, idx))).squeeze(1)
        out_i += [ki, kj.index_select(0, m)]
        out_j += [kj, ki.index_select(0, m)]
        out_s += [shift_f, -shift_f.index_select(0, m)]
        done += n_pairs
        lo_idx = hi_idx
    if not out_i:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty.clone(), torch.zeros(0, 3, dtype=dtype, device=device)
    return torch.cat(out_i), torch.cat(out_j), torch.cat(out_s)
