"""The evaluation contract shared by every architecture a bundle can hold.

An :class:`AtomisticModel` takes a batch (see :mod:`spkserve.keys`) and returns
a dict of named tensors. Subclasses implement :meth:`AtomisticModel.compute`,
which returns the per-system ``energy`` (and any other outputs) as a
differentiable function of ``positions`` and ``cell``; forces and stress are
then obtained by autograd here, never by hand:

* forces  = -dE/dR                         [N, 3]
* stress  = (1/V) dE/d(strain)             [S, 3, 3]  (symmetric strain applied
  to positions and cell, ASE's sign convention)

Models must tolerate neighbor pairs beyond their cutoff (skin lists) and must
not write into the input dict.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from spkserve import keys


def pair_vectors(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Return r_ij = R[j] - R[i] + shift @ cell for every pair.  [P, 3]"""
    R = inputs[keys.R]
    idx_i = inputs[keys.idx_i]
    idx_j = inputs[keys.idx_j]
    cell_of_pair = inputs[keys.cell][inputs[keys.idx_m][idx_i]]  # [P, 3, 3]
    offsets = torch.einsum("pk,pkl->pl", inputs[keys.shifts].to(R.dtype), cell_of_pair)
    return R[idx_j] - R[idx_i] + offsets


def scatter_sum(src: torch.Tensor, index: torch.Tensor, dim_size: int) -> torch.Tensor:
    """Sum rows of ``src`` [M, ...] into ``dim_size`` bins given by ``index`` [M].

    Uses ``scatter_add`` rather than ``index_add``: torch 2.13's inductor fails to
    compile ``index_add`` into a single-row output (one system per batch).
    """
    out = torch.zeros((dim_size,) + tuple(src.shape[1:]), dtype=src.dtype, device=src.device)
    idx = index.view((-1,) + (1,) * (src.dim() - 1)).expand_as(src)
    return out.scatter_add(0, idx, src)


def strained(
    R: torch.Tensor, cell: torch.Tensor, system_index: torch.Tensor, strain: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions [N, 3] and cells [S, 3, 3] deformed by 1 + sym(strain) [S, 3, 3] (stress = dE/dstrain / V)."""
    sym = 0.5 * (strain + strain.transpose(1, 2))
    deform = torch.eye(3, dtype=R.dtype, device=R.device) + sym
    return torch.einsum("ni,nij->nj", R, deform[system_index]), torch.bmm(cell, deform)


def cell_volume(cell: torch.Tensor) -> torch.Tensor:
    """|det(cell)| per system.  [S]"""
    return torch.abs(torch.linalg.det(cell))


class AtomisticModel(nn.Module):
    """Base class: energy and other outputs from :meth:`compute`, derivatives by autograd.

    Attributes set by subclasses:
        ``outputs``: names of the outputs :meth:`compute` returns besides energy.
    """

    #: outputs that compute() returns in addition to "energy"
    extra_outputs: tuple[str, ...] = ()

    def compute(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return at least ``{"energy": [S]}`` from a batch whose positions and
        cell are already strained (if stress is wanted)."""
        raise NotImplementedError

    def forward(
        self,
        inputs: dict[str, torch.Tensor],
        properties: Sequence[str] = (keys.energy, keys.forces),
        create_graph: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Evaluate ``properties`` for a batch.

        Args:
            inputs: batch dict (positions, cell, pairs, ...); not modified.
            properties: names of wanted outputs (``energy`` is always returned).
            create_graph: keep the graph of the derivatives (training on forces).
        """
        want_forces = keys.forces in properties
        want_stress = keys.stress in properties
        inputs = dict(inputs)  # never mutate the caller's dict
        R = inputs[keys.R]
        cell = inputs[keys.cell]
        grad_wrt: list[torch.Tensor] = []
        if want_forces:
            R = R.detach().requires_grad_(True)
            grad_wrt.append(R)
        strain = None
        if want_stress:
            n_sys = cell.shape[0]
            strain = torch.zeros(n_sys, 3, 3, dtype=R.dtype, device=R.device, requires_grad=True)
            R, cell = strained(R, cell, inputs[keys.idx_m], strain)
            grad_wrt.append(strain)
        inputs[keys.R] = R
        inputs[keys.cell] = cell
        results = self.compute(inputs)
        energy = results[keys.energy]
        if grad_wrt:
            grads = torch.autograd.grad(
                energy.sum(),
                grad_wrt,
                create_graph=create_graph or self.training,
                allow_unused=True,
            )
            k = 0
            if want_forces:
                g = grads[k]
                results[keys.forces] = -g if g is not None else torch.zeros_like(R)
                k += 1
            if want_stress:
                g = grads[k]
                if g is None:
                    g = torch.zeros_like(strain)
                volume = cell_volume(inputs[keys.cell].detach())
                results[keys.stress] = g / volume[:, None, None]
        return {k: v for k, v in results.items() if k == keys.energy or k in properties}

    def forward_functional(
        self, inputs: dict[str, torch.Tensor], properties: Sequence[str] = (keys.energy, keys.forces)
    ) -> dict[str, torch.Tensor]:
        """Same results as :meth:`forward` (inference only), with the derivatives taken by
        ``torch.func.grad`` instead of ``torch.autograd.grad``.

        Meant for ``torch.compile``: the energy, its gradient and the outputs then form
        one graph without breaks, so the compiled call has no autograd bookkeeping
        (about 2x faster than compiling :meth:`forward` for a small molecule).
        """
        want_forces = keys.forces in properties
        want_stress = keys.stress in properties
        R = inputs[keys.R]
        if not (want_forces or want_stress):
            results = self.compute(dict(inputs))
        else:
            strain = torch.zeros(inputs[keys.cell].shape[0], 3, 3, dtype=R.dtype, device=R.device)

            def energy(R: torch.Tensor, strain: torch.Tensor):
                batch = dict(inputs)
                if want_stress:
                    R, batch[keys.cell] = strained(R, inputs[keys.cell], inputs[keys.idx_m], strain)
                batch[keys.R] = R
                out = self.compute(batch)
                return out[keys.energy].sum(), out

            argnums = (0, 1) if want_stress else (0,)
            grads, results = torch.func.grad(energy, argnums=argnums, has_aux=True)(R, strain)
            results = dict(results)
            if want_forces:
                results[keys.forces] = -grads[0]
            if want_stress:
                volume = cell_volume(inputs[keys.cell])
                results[keys.stress] = grads[-1] / volume[:, None, None]
        return {k: v for k, v in results.items() if k == keys.energy or k in properties}
