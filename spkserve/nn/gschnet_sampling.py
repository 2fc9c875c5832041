"""Partial-molecule batches and autoregressive sampling for cG-SchNet (no Lightning, no MD engine).

:func:`partial_molecule_batch` turns a list of generation *steps* (placed atoms, focus,
origin, conditions) into the model's batch; training (:mod:`training.gschnet`) and
sampling use the same function, so the model sees identical inputs in both.

:func:`generate` builds molecules atom by atom: pick a random unfinished focus (the origin
token at the first step), sample the next type from the model (stop marks the focus
finished), then sample the position on a grid of points within the placement cutoff of
the focus from the product of the predicted distance distributions, sharpened by a
temperature. A molecule is complete when every atom is finished, and unfinished if it
reaches ``max_n_atoms`` first.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from spkserve import keys
from spkserve.nn.gschnet import (
    COMPOSITION,
    FOCUS_TYPE,
    N_ATOMS_TARGET,
    NEXT_Z,
    ORIGIN_TYPE,
    PRED_IDX_J,
    PRED_IDX_M,
    STOP_TYPE,
    ConditionalGenerativeSchNet,
)


class GenerationError(ValueError):
    """Generation cannot start (bad conditions or arguments); the message names the problem."""


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def intra_step_pairs(n_nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ordered pairs (i != j) of nodes inside each step (global indices).  [P], [P]"""
    counts = n_nodes * n_nodes
    total = int(counts.sum())
    step = torch.repeat_interleave(torch.arange(n_nodes.shape[0]), counts)
    local = torch.arange(total) - torch.repeat_interleave(_exclusive_cumsum(counts), counts)
    n = n_nodes[step]
    li, lj = local // n, local % n
    base = _exclusive_cumsum(n_nodes)[step]
    keep = li != lj
    return (base + li)[keep], (base + lj)[keep]


def partial_molecule_batch(
    numbers: Sequence[torch.Tensor],
    positions: Sequence[torch.Tensor],
    focus: Sequence[int],
    model_cutoff: float,
    prediction_cutoff: float,
    conditions: dict[str, torch.Tensor] | None = None,
    next_numbers: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Model batch of S steps.

    Args:
        numbers: per step the atomic numbers of the placed atoms [n_s] (may be empty).
        positions: per step their positions in Å [n_s, 3], with the origin token at (0, 0, 0).
        focus: per step the index of the focus atom among the placed atoms, -1 for the origin token.
        model_cutoff: message-passing cutoff (Å): pairs of nodes closer than this.
        prediction_cutoff: nodes closer than this to the focus (Å) are prediction neighbours.
        conditions: condition tensors with S rows (names as the model's conditions).
        next_numbers: the type of the next atom per step (training; ``STOP_TYPE`` for stop).
    """
    S = len(numbers)
    Z_parts, R_parts = [], []
    n_nodes = torch.empty(S, dtype=torch.long)
    focus_pos = torch.zeros(S, 3, dtype=dtype)
    for s in range(S):
        z = numbers[s].to(torch.long)
        r = positions[s].to(dtype)
        f = int(focus[s])
        if f >= z.shape[0] or f < -1:
            raise IndexError(f"step {s}: focus {f} outside the {z.shape[0]} placed atoms")
        fpos = r[f] if f >= 0 else torch.zeros(3, dtype=dtype)
        focus_pos[s] = fpos
        Z_parts += [z, torch.tensor([ORIGIN_TYPE, FOCUS_TYPE])]
        R_parts += [r, torch.zeros(1, 3, dtype=dtype), fpos[None]]
        n_nodes[s] = z.shape[0] + 2
    Z = torch.cat(Z_parts)
    R = torch.cat(R_parts)
    idx_m = torch.repeat_interleave(torch.arange(S), n_nodes)
    i, j = intra_step_pairs(n_nodes)
    d = torch.linalg.vector_norm(R[j] - R[i], dim=-1)
    inside = d < model_cutoff
    i, j = i[inside], j[inside]
    d_focus = torch.linalg.vector_norm(R - focus_pos[idx_m], dim=-1)
    pred_j = (d_focus < prediction_cutoff).nonzero().squeeze(1)
    batch = {
        keys.Z: Z,
        keys.R: R,
        keys.idx_m: idx_m,
        keys.n_atoms: n_nodes,
        keys.cell: torch.zeros(S, 3, 3, dtype=dtype),
        keys.pbc: torch.zeros(S, 3, dtype=torch.bool),
        keys.idx_i: i,
        keys.idx_j: j,
        keys.shifts: torch.zeros(i.shape[0], 3, dtype=dtype),
        PRED_IDX_J: pred_j,
        PRED_IDX_M: idx_m[pred_j],
    }
    if next_numbers is not None:
        batch[NEXT_Z] = next_numbers.to(torch.long)
    for name, value in (conditions or {}).items():
        batch[name] = value
    return batch


def log_density_on_points(model: ConditionalGenerativeSchNet, log_p_distance: torch.Tensor,
                          node_positions: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Unnormalised log-density of the next atom at ``points`` [G, 3]: the sum over prediction
    neighbours (positions [q, 3], distance log-distributions [q, bins]) of the log-probability
    of the bin each point's distance falls in.  [G]"""
    d = torch.cdist(node_positions, points)  # [q, G]
    b = torch.clamp(torch.round(d / model.bin_width).long(), max=model.n_bins - 1)
    return torch.gather(log_p_distance, 1, b).sum(0)


def placement_grid(placement_cutoff: float, grid_spacing: float, min_distance: float = 0.7) -> torch.Tensor:
    """Cubic grid points with min_distance <= |p| <= placement_cutoff (Å).  [G, 3]"""
    if not grid_spacing > 0:
        raise GenerationError(f"grid_spacing must be > 0 Å, got {grid_spacing}")
    n = int(math.ceil(placement_cutoff / grid_spacing))
    ax = torch.arange(-n, n + 1, dtype=torch.float64) * grid_spacing
    g = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    r = torch.linalg.vector_norm(g, dim=-1)
    return g[(r <= placement_cutoff) & (r >= min_distance)]


def condition_tensors(model: ConditionalGenerativeSchNet, conditions: dict[str, Any] | None, n: int) -> dict[str, torch.Tensor]:
    """Check requested conditions against the model's and expand them to ``n`` rows.

    ``conditions``: scalar name -> value; ``composition`` as ``{"C": 7, "O": 2, "H": 10}``,
    ``{6: 7, ...}`` or a formula string ``"C7H10O2"``.
    """
    conditions = dict(conditions or {})
    wanted = set(model.condition_names)
    unknown = sorted(set(conditions) - wanted)
    if unknown:
        raise GenerationError(
            f"condition(s) {unknown} requested but the model was trained on {sorted(wanted) or 'no conditions'}"
        )
    missing = sorted(wanted - set(conditions))
    if missing:
        raise GenerationError(f"the model is conditioned on {sorted(wanted)}; give a target for {missing} "
                              f"(e.g. ++conditions.{missing[0]}=...)")
    out: dict[str, torch.Tensor] = {}
    embs = {e.name: e for e in model.conditioning.embeddings} if model.conditioning is not None else {}
    for name, value in conditions.items():
        emb = embs[name]
        if name == COMPOSITION:
            counts = composition_counts(value, model.atom_types)
            emb.check_range(float(sum(counts)))
            out[COMPOSITION] = torch.tensor(counts, dtype=torch.float32)[None].repeat(n, 1)
            out[N_ATOMS_TARGET] = torch.full((n,), float(sum(counts)))
        else:
            try:
                v = float(value)
            except (TypeError, ValueError) as err:
                raise GenerationError(f"condition {name} must be a number, got {value!r}") from err
            emb.check_range(v)
            out[name] = torch.full((n,), v)
    return out


def composition_counts(value: Any, atom_types: Sequence[int]) -> list[int]:
    """Counts per atom type (order of ``atom_types``) from a dict or formula string."""
    from ase.data import atomic_numbers
    from ase.formula import Formula

    if isinstance(value, str):
        try:
            value = Formula(value).count()
        except ValueError as err:
            raise GenerationError(f"cannot read composition {value!r}: {err}") from err
    if not isinstance(value, dict):
        try:
            value = dict(value)
        except (TypeError, ValueError) as err:
            raise GenerationError(f"composition must be a formula or a mapping element -> count, got {value!r}") from err
    counts = {z: 0 for z in atom_types}
    for k, c in value.items():
        z = int(k) if str(k).isdigit() else atomic_numbers.get(str(k))
        if z not in counts:
            raise GenerationError(f"composition names {k!r}, which is not among the model's atom types {list(atom_types)}")
        counts[z] = int(c)
    if sum(counts.values()) < 1:
        raise GenerationError("composition has no atoms")
    return [counts[z] for z in atom_types]


@dataclass
class GeneratedMolecules:
    """Result of :func:`generate`: per molecule numbers [n] and positions [n, 3] (Å)."""

    numbers: list[np.ndarray]
    positions: list[np.ndarray]
    finished: np.ndarray  # [M] bool: every atom stopped before max_n_atoms
    conditions: dict[str, Any]
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)

    def to_atoms(self) -> list:
        """The molecules as ASE Atoms (``info['finished']``)."""
        from ase import Atoms

        out = []
        for z, r, f in zip(self.numbers, self.positions, self.finished):
            a = Atoms(numbers=z, positions=r)
            a.info["finished"] = bool(f)
            out.append(a)
        return out


@torch.no_grad()
def _generate_batch(model, n, max_n_atoms, cond, grid, h, temperature, gen, chunk):
    dtype = next(model.parameters()).dtype
    Zs = [torch.zeros(0, dtype=torch.long) for _ in range(n)]
    Rs = [torch.zeros(0, 3, dtype=dtype) for _ in range(n)]
    unfinished = [torch.zeros(0, dtype=torch.bool) for _ in range(n)]
    done = np.zeros(n, dtype=bool)
    ok = np.zeros(n, dtype=bool)
    grid = grid.to(dtype)
    stop_class = len(model.atom_types)
    for _ in range(2 * max_n_atoms + 2):
        active = [m for m in range(n) if not done[m]]
        if not active:
            break
        foci = []
        for m in active:
            if Zs[m].shape[0] == 0:
                foci.append(-1)
                continue
            cand = unfinished[m].nonzero().squeeze(1)
            foci.append(int(cand[torch.randint(cand.shape[0], (1,), generator=gen)]))
        act = torch.tensor(active)
        c = {k: v[act] for k, v in cond.items()}
        batch = partial_molecule_batch([Zs[m] for m in active], [Rs[m] for m in active], foci, model.model_cutoff,
                                       model.prediction_cutoff, c, dtype=dtype)
        feats = model.node_features(batch)
        logp = model.type_log_probs(feats, batch[PRED_IDX_M], len(active))
        first = torch.tensor([f == -1 for f in foci])
        logp[first, stop_class] = -math.inf  # the first atom is never "stop"
        cls = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)
        place = []
        for k, m in enumerate(active):
            if int(cls[k]) == stop_class:
                unfinished[m][foci[k]] = False
                if not bool(unfinished[m].any()):
                    done[m], ok[m] = True, True
            elif Zs[m].shape[0] >= max_n_atoms:
                done[m] = True  # would exceed max_n_atoms: unfinished
            else:
                place.append(k)
        if not place:
            continue
        pred_m = batch[PRED_IDX_M]
        next_z = model.all_types[cls]  # [A]
        for start in range(0, len(place), chunk):
            ks = torch.tensor(place[start : start + chunk])
            sel_mask = torch.isin(pred_m, ks)
            sel = sel_mask.nonzero().squeeze(1)
            q_step = pred_m[sel]
            logd = model.distance_log_probs(feats[sel], next_z[q_step])  # [Q, bins]
            node_pos = batch[keys.R][batch[PRED_IDX_J][sel]]  # [Q, 3]
            # focus position of each chosen step
            for k in ks.tolist():
                m = active[k]
                fpos = Rs[m][foci[k]] if foci[k] >= 0 else torch.zeros(3, dtype=dtype)
                rows = (q_step == k).nonzero().squeeze(1)
                pts = fpos[None] + grid  # [G, 3]
                score = log_density_on_points(model, logd[rows], node_pos[rows], pts) / temperature  # [G]
                g = int(torch.multinomial(torch.softmax(score, 0), 1, generator=gen))
                jitter = (torch.rand(3, generator=gen, dtype=dtype) - 0.5) * h
                Zs[m] = torch.cat([Zs[m], next_z[k : k + 1]])
                Rs[m] = torch.cat([Rs[m], (pts[g] + jitter)[None]])
                unfinished[m] = torch.cat([unfinished[m], torch.tensor([True])])
    return Zs, Rs, ok


def generate(
    model: ConditionalGenerativeSchNet,
    n_molecules: int,
    batch_size: int = 100,
    max_n_atoms: int = 35,
    conditions: dict[str, Any] | None = None,
    grid_spacing_angstrom: float = 0.1,
    temperature: float = 0.1,
    seed: int | None = 0,
    chunk_size: int = 64,
    progress: Any = None,
) -> GeneratedMolecules:
    """Sample ``n_molecules`` molecules from ``model`` (see module docstring).

    Args:
        conditions: targets for every condition the model was trained on (a target outside
            the trained range warns, an unknown or missing condition raises).
        grid_spacing_angstrom: spacing of the placement grid (positions get a uniform
            jitter within one grid cell, so they are continuous).
        temperature: sharpens (<1) or flattens (>1) the position distribution.
        seed: torch generator seed (same seed, same molecules); None = random.
        progress: optional callable(done, total).
    """
    if n_molecules < 1 or batch_size < 1 or max_n_atoms < 1:
        raise GenerationError(f"n_molecules, batch_size, max_n_atoms must be >= 1, got "
                              f"{n_molecules}, {batch_size}, {max_n_atoms}")
    if not temperature > 0:
        raise GenerationError(f"temperature must be > 0, got {temperature}")
    model.eval()
    gen = torch.Generator()
    gen.manual_seed(int(seed) if seed is not None else int(torch.seed()))
    grid = placement_grid(model.placement_cutoff, grid_spacing_angstrom)
    cond_all = condition_tensors(model, conditions, n_molecules)
    numbers, positions, finished = [], [], []
    t0 = time.perf_counter()
    for start in range(0, n_molecules, batch_size):
        n = min(batch_size, n_molecules - start)
        cond = {k: v[start : start + n] for k, v in cond_all.items()}
        Zs, Rs, ok = _generate_batch(model, n, max_n_atoms, cond, grid, grid_spacing_angstrom, temperature, gen, chunk_size)
        numbers += [z.numpy().copy() for z in Zs]
        positions += [r.double().numpy().copy() for r in Rs]
        finished.append(ok)
        if progress is not None:
            progress(start + n, n_molecules)
    seconds = time.perf_counter() - t0
    return GeneratedMolecules(numbers, positions, np.concatenate(finished), dict(conditions or {}), seconds)


def load_generator(path: str, dtype: str | None = None):
    """Load a cG-SchNet bundle; returns :class:`spkserve.bundle.LoadedBundle` (model in eval mode)."""
    from spkserve.bundle import BundleError, load_bundle

    loaded = load_bundle(path, dtype=dtype)
    if not isinstance(loaded.model, ConditionalGenerativeSchNet):
        raise BundleError(f"{path} holds a {type(loaded.model).__name__}, not a cG-SchNet generator")
    return loaded
