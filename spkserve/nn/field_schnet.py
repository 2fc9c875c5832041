"""FieldSchNet: SchNet coupled to an external electric field through dipole features.

Each interaction block also builds vector (dipole) features
mu_i = sum_j (x_j W^d) * w_ij (x) r_ij / |r_ij|   [N, 3, F]
and adds (mu_i . E) W^E to the scalar features, where E is the field of the
atom's system (``electric_field`` [S, 3], zero if absent). Response properties
are derivatives of the energy with respect to the field (computed by
:class:`FieldResponsePotential`):

* dipole moment   mu = -dE/dE_field          [S, 3]
* polarizability  alpha = -d^2E/dE_field^2   [S, 3, 3]

Field in energy unit per (charge x length unit), e.g. eV/(e Å) = V/Å.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn import functional as F

from spkserve import keys
from spkserve.model import cell_volume
from spkserve.nn.geometry import PAIR_DISTANCES, PAIR_I, PAIR_J, PAIR_VECTORS, SCALAR, VECTOR
from spkserve.nn.potential import NeuralNetworkPotential
from spkserve.nn.schnet import SchNet, _xavier_stack


class FieldSchNet(SchNet):
    """SchNet with electric-field coupling (same parameters as :class:`SchNet`)."""

    #: batch keys this representation reads besides the geometry
    field_keys = (keys.electric_field,)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        n_int, F_, nf = self.n_interactions, self.n_atom_basis, self.n_filters
        self.dipole_in_w = _xavier_stack(n_int, F_, nf)
        self.field_w = _xavier_stack(n_int, nf, F_)

    def forward(self, inputs: dict[str, torch.Tensor], geometry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        Z = inputs[keys.Z]
        idx_i, idx_j = geometry[PAIR_I], geometry[PAIR_J]
        d_ij = geometry[PAIR_DISTANCES]
        unit = (geometry[PAIR_VECTORS] / d_ij[:, None]).unsqueeze(-1)  # [P, 3, 1]
        filters = self.filters(d_ij).unbind(0)
        x = self.embedding(Z)
        n_atoms = x.shape[0]
        field = inputs.get(keys.electric_field)
        if field is None:
            field = torch.zeros(inputs[keys.n_atoms].shape[0], 3, dtype=x.dtype, device=x.device)
        field_atom = field.to(x.dtype)[inputs[keys.idx_m]].unsqueeze(-1)  # [N, 3, 1]
        mu = torch.zeros(n_atoms, 3, self.n_filters, dtype=x.dtype, device=x.device)
        out2_b = self.out2_b - 0.6931471805599453 * self.out2_w.sum(1) if self._ssp else self.out2_b
        for k in range(self.n_interactions):
            w = filters[0 if self.shared_filters else k]
            m = torch.mm(x, self.in2f_w[k]).index_select(0, idx_j) * w
            y = torch.zeros(n_atoms, self.n_filters, dtype=x.dtype, device=x.device).index_add_(0, idx_i, m)
            md = torch.mm(x, self.dipole_in_w[k]).index_select(0, idx_j) * w  # [P, nf]
            mu = mu.index_add(0, idx_i, md.unsqueeze(1) * unit)  # [N, 3, nf]
            y = torch.addmm(self.out1_b[k], y, self.out1_w[k])
            y = F.softplus(y) if self._ssp else self.act(y)
            dq_field = torch.mm((mu * field_atom).sum(1), self.field_w[k])  # [N, F]
            x = torch.addmm(out2_b[k], y, self.out2_w[k]) + x + dq_field
        return {SCALAR: x, VECTOR: mu}


class FieldResponsePotential(NeuralNetworkPotential):
    """NeuralNetworkPotential whose dipole moment and polarizability are field derivatives."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not hasattr(self.representation, "field_keys"):
            raise ValueError("FieldResponsePotential needs a field-aware representation such as field_schnet")
        self.extra_outputs = tuple(dict.fromkeys(self.extra_outputs + (keys.dipole_moment, keys.polarizability)))

    def forward(
        self,
        inputs: dict[str, torch.Tensor],
        properties: Sequence[str] = (keys.energy, keys.forces),
        create_graph: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Energy, forces, stress, dipole (-dE/dF) and polarizability (-d2E/dF2)."""
        want_forces = keys.forces in properties
        want_stress = keys.stress in properties
        want_dipole = keys.dipole_moment in properties
        want_pol = keys.polarizability in properties
        inputs = dict(inputs)
        R, cell = inputs[keys.R], inputs[keys.cell]
        n_sys = cell.shape[0]
        field = inputs.get(keys.electric_field)
        if field is None:
            field = torch.zeros(n_sys, 3, dtype=R.dtype, device=R.device)
        field = field.detach().to(R.dtype).requires_grad_(want_dipole or want_pol)
        inputs[keys.electric_field] = field
        wrt: list[torch.Tensor] = []
        if want_forces:
            R = R.detach().requires_grad_(True)
            wrt.append(R)
        strain = None
        if want_stress:
            strain = torch.zeros(n_sys, 3, 3, dtype=R.dtype, device=R.device, requires_grad=True)
            deform = torch.eye(3, dtype=R.dtype, device=R.device) + 0.5 * (strain + strain.transpose(1, 2))
            R = torch.einsum("ni,nij->nj", R, deform[inputs[keys.idx_m]])
            cell = torch.bmm(cell, deform)
            wrt.append(strain)
        if want_dipole or want_pol:
            wrt.append(field)
        inputs[keys.R], inputs[keys.cell] = R, cell
        results = self.compute(inputs)
        energy = results[keys.energy]
        if wrt:
            graph = create_graph or self.training
            grads = torch.autograd.grad(
                energy.sum(), wrt, create_graph=graph or want_pol, retain_graph=graph or want_pol, allow_unused=True
            )
            grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]
            k = 0
            if want_forces:
                results[keys.forces] = -grads[k]
                k += 1
            if want_stress:
                results[keys.stress] = grads[k] / cell_volume(inputs[keys.cell].detach())[:, None, None]
                k += 1
            if want_dipole or want_pol:
                dipole = -grads[k]
                if want_pol:
                    rows = []
                    for a in range(3):
                        (g,) = torch.autograd.grad(
                            dipole[:, a].sum(), field, create_graph=graph, retain_graph=True, allow_unused=True
                        )
                        rows.append(torch.zeros_like(field) if g is None else g)
                    results[keys.polarizability] = torch.stack(rows, dim=1)  # [S, 3, 3]
                results[keys.dipole_moment] = dipole if graph else dipole.detach()
        results = {k: v for k, v in results.items() if k == keys.energy or k in properties}
        if self.cast_float64:
            results = {k: v.double() for k, v in results.items()}
        return results
