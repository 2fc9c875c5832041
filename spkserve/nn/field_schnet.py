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

With ``magnetic=True`` the features also couple to a uniform magnetic field B
(``magnetic_field`` [S, 3]) and to the nuclear magnetic moments I
(``nuclear_magnetic_moments`` [N, 3]), both zero if absent, through three
rotation-invariant terms per interaction: (mu_i . B) W^B, (mu_i . I_i) W^I and
(B . I_i) w^BI (the isotropic part) plus ((B x I_i) . mu_i) W^X (the antisymmetric
part). The nuclear magnetic shielding tensor of atom n is

* sigma_n[a, b] = d^2E / (dB_a dI_{n,b})     [N, 3, 3]

B and I are reduced (dimensionless) inputs whose product carries the energy unit
per ppm, so that sigma comes out in ppm (the unit of the training data).
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

    def __init__(self, *args, magnetic: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        n_int, F_, nf = self.n_interactions, self.n_atom_basis, self.n_filters
        self.dipole_in_w = _xavier_stack(n_int, F_, nf)
        self.field_w = _xavier_stack(n_int, nf, F_)
        #: couples to a magnetic field and nuclear magnetic moments (shielding)
        self.magnetic = bool(magnetic)
        #: batch keys this representation reads besides the geometry
        self.field_keys = (keys.electric_field,) + (
            (keys.magnetic_field, keys.nuclear_magnetic_moments) if self.magnetic else ()
        )
        if self.magnetic:
            self.bfield_w = _xavier_stack(n_int, nf, F_)
            self.moment_w = _xavier_stack(n_int, nf, F_)
            self.cross_w = _xavier_stack(n_int, nf, F_)
            self.b_dot_i_w = torch.nn.Parameter(torch.randn(n_int, F_) / F_**0.5)

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
        if self.magnetic:
            b_sys = inputs.get(keys.magnetic_field)
            if b_sys is None:
                b_sys = torch.zeros_like(field)
            b_atom = b_sys.to(x.dtype)[inputs[keys.idx_m]]  # [N, 3]
            moments = inputs.get(keys.nuclear_magnetic_moments)
            if moments is None:
                moments = torch.zeros(n_atoms, 3, dtype=x.dtype, device=x.device)
            moments = moments.to(x.dtype)
            if moments.shape != (n_atoms, 3):
                raise ValueError(f"nuclear_magnetic_moments must have shape [{n_atoms}, 3], got {list(moments.shape)}")
            b_dot_i = (b_atom * moments).sum(-1, keepdim=True)  # [N, 1]
            b_cross_i = torch.linalg.cross(b_atom, moments).unsqueeze(-1)  # [N, 3, 1]
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
            if self.magnetic:
                dq_field = (
                    dq_field
                    + torch.mm((mu * b_atom.unsqueeze(-1)).sum(1), self.bfield_w[k])
                    + torch.mm((mu * moments.unsqueeze(-1)).sum(1), self.moment_w[k])
                    + torch.mm((mu * b_cross_i).sum(1), self.cross_w[k])
                    + b_dot_i * self.b_dot_i_w[k]
                )
            x = torch.addmm(out2_b[k], y, self.out2_w[k]) + x + dq_field
        return {SCALAR: x, VECTOR: mu}


class FieldResponsePotential(NeuralNetworkPotential):
    """NeuralNetworkPotential whose dipole moment, polarizability and (with a magnetic
    representation) nuclear magnetic shielding are field derivatives of the energy."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not hasattr(self.representation, "field_keys"):
            raise ValueError("FieldResponsePotential needs a field-aware representation such as field_schnet")
        responses = (keys.dipole_moment, keys.polarizability)
        if getattr(self.representation, "magnetic", False):
            responses += (keys.nuclear_magnetic_shielding,)
        self.extra_outputs = tuple(dict.fromkeys(self.extra_outputs + responses))

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
        want_shield = keys.nuclear_magnetic_shielding in properties
        if want_shield and not getattr(self.representation, "magnetic", False):
            raise ValueError(
                "nuclear_magnetic_shielding needs a magnetic field_schnet (representation param magnetic: true)"
            )
        inputs = dict(inputs)
        R, cell = inputs[keys.R], inputs[keys.cell]
        n_sys = cell.shape[0]
        field = inputs.get(keys.electric_field)
        if field is None:
            field = torch.zeros(n_sys, 3, dtype=R.dtype, device=R.device)
        field = field.detach().to(R.dtype).requires_grad_(want_dipole or want_pol)
        inputs[keys.electric_field] = field
        if want_shield:
            bfield = inputs.get(keys.magnetic_field)
            bfield = torch.zeros(n_sys, 3, dtype=R.dtype, device=R.device) if bfield is None else bfield
            moments = inputs.get(keys.nuclear_magnetic_moments)
            moments = torch.zeros(R.shape[0], 3, dtype=R.dtype, device=R.device) if moments is None else moments
            inputs[keys.magnetic_field] = bfield = bfield.detach().to(R.dtype).requires_grad_(True)
            inputs[keys.nuclear_magnetic_moments] = moments = moments.detach().to(R.dtype).requires_grad_(True)
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
        if want_shield:
            wrt.append(bfield)
        inputs[keys.R], inputs[keys.cell] = R, cell
        results = self.compute(inputs)
        energy = results[keys.energy]
        if wrt:
            graph = create_graph or self.training
            second = want_pol or want_shield
            grads = torch.autograd.grad(
                energy.sum(), wrt, create_graph=graph or second, retain_graph=graph or second, allow_unused=True
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
                k += 1
            if want_shield:
                de_db = grads[k]  # [S, 3]
                cols = []
                for a in range(3):
                    if de_db.requires_grad:
                        (g,) = torch.autograd.grad(
                            de_db[:, a].sum(), moments, create_graph=graph, retain_graph=True, allow_unused=True
                        )
                    else:
                        g = None
                    cols.append(torch.zeros_like(moments) if g is None else g)  # [N, 3]: d2E/dB_a dI_{n,b}
                results[keys.nuclear_magnetic_shielding] = torch.stack(cols, dim=1)  # [N, 3(B), 3(I)]
        results = {k: v for k, v in results.items() if k == keys.energy or k in properties}
        if self.cast_float64:
            results = {k: v.double() for k, v in results.items()}
        return results
