"""Verlet (skin) neighbor list: build for cutoff + skin, reuse while atoms move little.

A list built for ``cutoff + skin`` contains every pair within ``cutoff`` as
long as no atom has moved more than ``skin / 2`` since the build (each of the
two atoms of a pair moves at most skin/2, so the pair distance changes by at
most skin). Displacements are plain differences of the positions passed in:
MD engines do not wrap positions between builds, and if a caller does wrap an
atom, its jump is a whole cell vector, larger than skin/2, so the list is
rebuilt and the shifts stay right.

When the cell changes (NPT), displacements are measured against the affinely
deformed reference: with F = h₀⁻¹h (lattice vectors as rows, r = s·h) and the
non-affine displacement u = r − r₀·F, a pair vector is d = d₀·F + (u_j − u_i), so
|d| ≥ σ_min(F)|d₀| − 2 max|u|. Every pair now inside ``cutoff`` was inside
``cutoff + skin`` at the build as long as, per system,
2 max|u| ≤ (cutoff + skin) σ_min(F) − cutoff (for F = 1 this is max|u| ≤ skin/2).
This holds for every periodic image, so a deforming cell rebuilds only when the strain
and the displacements together use up the skin. Systems that are not periodic in all
three directions rebuild whenever their cell changes.

The list returns pairs up to ``cutoff + skin``; models mask pairs beyond their
cutoff (contract in :mod:`spkserve.keys`), so nothing is filtered here.
"""

from __future__ import annotations

import math
import time

import torch

from spkserve.neighbors._cells import NeighborListError


class SkinNeighborList:
    """Callable ``(positions, cell, pbc, n_atoms) -> (pair_i, pair_j, shifts)``.

    ``cutoff`` and ``skin`` are in the length unit of the positions passed in
    (Å for providers). ``backend`` is any of
    :data:`spkserve.neighbors.BACKENDS`.
    """

    def __init__(self, cutoff: float, skin: float, backend: str = "vesin") -> None:
        from spkserve.neighbors import _check_backend

        if not (isinstance(cutoff, (int, float)) and math.isfinite(cutoff) and cutoff > 0):
            raise NeighborListError(f"cutoff must be a positive finite number, got {cutoff!r}")
        if not (isinstance(skin, (int, float)) and math.isfinite(skin) and skin >= 0):
            raise NeighborListError(f"skin must be a non-negative finite number, got {skin!r}")
        _check_backend(backend)
        self.cutoff = float(cutoff)
        self.skin = float(skin)
        self.backend = backend
        self.n_builds = 0
        self.n_calls = 0
        self.build_time_s = 0.0
        self.last_reason = ""
        self._reasons: dict[str, int] = {}
        self._ref_positions: torch.Tensor | None = None
        self._ref_cell: torch.Tensor | None = None
        self._ref_pbc: torch.Tensor | None = None
        self._ref_n_atoms: torch.Tensor | None = None
        self._pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def reset(self) -> None:
        """Forget the stored list; the next call rebuilds."""
        self._pairs = None
        self._ref_positions = None

    def _rebuild_reason(self, positions, cell, pbc, n_atoms) -> str | None:
        ref = self._ref_positions
        if self._pairs is None or ref is None:
            return "first call"
        if positions.dtype != ref.dtype or positions.device != ref.device:
            return "dtype or device changed"
        if positions.shape != ref.shape or not torch.equal(n_atoms, self._ref_n_atoms):
            return "atoms per system changed"
        if not torch.equal(pbc, self._ref_pbc):
            return "pbc changed"
        if positions.shape[0] == 0:
            return None
        if torch.equal(cell, self._ref_cell):
            disp2 = ((positions - ref) ** 2).sum(dim=1).max()
            if float(disp2) > (0.5 * self.skin) ** 2:
                return "atom moved more than skin/2"
            return None
        return self._strained_reason(positions, cell, pbc, n_atoms)

    def _strained_reason(self, positions, cell, pbc, n_atoms) -> str | None:
        """Rebuild test for a changed cell (see the module docstring)."""
        changed = (cell != self._ref_cell).flatten(1).any(1)  # [S]
        if bool((changed & ~pbc.all(1)).any()):
            return "cell changed (system not fully periodic)"
        h0, h = self._ref_cell.double(), cell.double()
        F = torch.linalg.solve(h0[changed], h[changed])  # h0 F = h  [C, 3, 3]
        strain = torch.eye(3, dtype=torch.float64, device=F.device).expand(len(n_atoms), 3, 3).clone()
        strain[changed] = F
        margin = torch.full((len(n_atoms),), self.skin, dtype=torch.float64, device=F.device)
        margin[changed] = (self.cutoff + self.skin) * torch.linalg.svdvals(F)[:, -1] - self.cutoff
        if bool((margin <= 0).any()):
            return "cell strain larger than the skin allows"
        system = torch.repeat_interleave(torch.arange(len(n_atoms), device=n_atoms.device), n_atoms)
        r0 = self._ref_positions.double()
        u = positions.double() - torch.einsum("nk,nkl->nl", r0, strain[system])  # non-affine displacement
        u_max = torch.zeros_like(margin).scatter_reduce(0, system, u.norm(dim=1), "amax")
        if bool((2.0 * u_max > margin).any()):
            return "strain and displacements used up the skin"
        return None

    def __call__(
        self,
        positions: torch.Tensor,
        cell: torch.Tensor,
        pbc: torch.Tensor,
        n_atoms: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from spkserve.neighbors import neighbor_list
        from spkserve.neighbors._cells import check_inputs

        self.n_calls += 1
        positions = positions.detach()
        cell, pbc, n_atoms = check_inputs(positions, cell, pbc, n_atoms, self.cutoff)
        cell = cell.detach()
        reason = self._rebuild_reason(positions, cell, pbc, n_atoms)
        if reason is None:
            return self._pairs
        t0 = time.perf_counter()
        self._pairs = neighbor_list(positions, cell, pbc, n_atoms, self.cutoff + self.skin, self.backend)
        self.build_time_s += time.perf_counter() - t0
        self._ref_positions = positions.clone()
        self._ref_cell = cell.clone()
        self._ref_pbc = pbc.clone()
        self._ref_n_atoms = n_atoms.clone()
        self.n_builds += 1
        self.last_reason = reason
        self._reasons[reason] = self._reasons.get(reason, 0) + 1
        return self._pairs

    def stats(self) -> dict:
        """Counters: calls, builds, reuse fraction, build time, rebuild reasons, pairs in the list."""
        return {
            "cutoff": self.cutoff,
            "skin": self.skin,
            "backend": self.backend,
            "n_calls": self.n_calls,
            "n_builds": self.n_builds,
            "reuse_fraction": 1.0 - self.n_builds / self.n_calls if self.n_calls else 0.0,
            "build_time_s": self.build_time_s,
            "n_pairs": int(self._pairs[0].shape[0]) if self._pairs is not None else 0,
            "last_rebuild_reason": self.last_reason,
            "rebuild_reasons": dict(self._reasons),
        }

    def __repr__(self) -> str:
        return f"SkinNeighborList(cutoff={self.cutoff}, skin={self.skin}, backend={self.backend!r})"
