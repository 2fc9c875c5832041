"""SchNet: continuous-filter convolutions (Schütt et al., J. Chem. Phys. 148, 241722 (2018)).

The filter networks of all interaction blocks depend only on distances, so they
are evaluated together as one batched matrix product per layer
([n_blocks, P, F] in two ``baddbmm`` calls) instead of one small network per block.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from spkserve import keys
from spkserve.nn.cutoff import build_cutoff
from spkserve.nn.fused import SchNetFilterConv, TabulatedFilterConv, hermite_coefficients
from spkserve.nn.geometry import PAIR_DISTANCES, PAIR_I, PAIR_J, SCALAR, _is_compiling
from spkserve.nn.layers import LOG2, activation
from spkserve.nn.radial import build_rbf


def _xavier_stack(n: int, fan_in: int, fan_out: int) -> nn.Parameter:
    w = torch.empty(n, fan_in, fan_out)
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(w, -bound, bound)
    return nn.Parameter(w)


class SchNet(nn.Module):
    """SchNet representation: per-atom scalar features ``[N, n_atom_basis]``.

    Args:
        n_atom_basis: feature width F.
        n_interactions: number of interaction blocks.
        n_rbf: number of radial basis functions.
        cutoff_angstrom: cutoff radius (model length unit, Å by convention).
        n_filters: filter width (default F).
        radial_basis: ``gaussian`` | ``gaussian_centered`` | ``bessel``.
        cutoff_fn: ``cosine`` | ``mollifier``.
        shared_filters: one filter network for all blocks.
        activation_name: activation of filter and output networks (default shifted softplus).
        max_z: largest atomic number supported.
        filter_table_points: for inference on large systems, read the filters (a smooth
            function of distance only) from a cubic Hermite table with this many intervals
            on [0, cutoff] instead of evaluating the filter networks per pair; 0 disables.
            The table is rebuilt when the weights change; its interpolation error is of
            order (cutoff / points)^4 relative (about 1e-9 at 1024 points and 5 Å).
    """

    def __init__(
        self,
        n_atom_basis: int = 128,
        n_interactions: int = 6,
        n_rbf: int = 20,
        cutoff_angstrom: float = 5.0,
        n_filters: int | None = None,
        radial_basis: str = "gaussian",
        cutoff_fn: str = "cosine",
        shared_filters: bool = False,
        activation_name: str = "shifted_softplus",
        max_z: int = 100,
        filter_table_points: int = 1024,
    ):
        super().__init__()
        if n_interactions < 1:
            raise ValueError(f"n_interactions must be at least 1, got {n_interactions}")
        if filter_table_points < 0 or filter_table_points == 1:
            raise ValueError(f"filter_table_points must be 0 (off) or at least 2, got {filter_table_points}")
        self.filter_table_points = int(filter_table_points)
        self._table_key: tuple | None = None
        self._table: torch.Tensor | None = None
        nf = n_filters or n_atom_basis
        self.n_atom_basis = n_atom_basis
        self.n_interactions = n_interactions
        self.n_filters = nf
        self.cutoff = float(cutoff_angstrom)
        self.max_z = max_z
        self.shared_filters = shared_filters
        self.activation_name = activation_name
        self.embedding = nn.Embedding(max_z + 1, n_atom_basis, padding_idx=0)
        self.radial_basis = build_rbf(radial_basis, n_rbf, self.cutoff)
        self.cutoff_fn = build_cutoff(cutoff_fn, self.cutoff)
        n_sets = 1 if shared_filters else n_interactions
        # filter networks of all blocks, stacked: rbf -> nf (act) -> nf
        self.filter_w1 = _xavier_stack(n_sets, n_rbf, nf)
        self.filter_b1 = nn.Parameter(torch.zeros(n_sets, 1, nf))
        self.filter_w2 = _xavier_stack(n_sets, nf, nf)
        self.filter_b2 = nn.Parameter(torch.zeros(n_sets, 1, nf))
        # atom-wise layers of all blocks: in2f (no bias), f2out (act), dense
        self.in2f_w = _xavier_stack(n_interactions, n_atom_basis, nf)
        self.out1_w = _xavier_stack(n_interactions, nf, n_atom_basis)
        self.out1_b = nn.Parameter(torch.zeros(n_interactions, n_atom_basis))
        self.out2_w = _xavier_stack(n_interactions, n_atom_basis, n_atom_basis)
        self.out2_b = nn.Parameter(torch.zeros(n_interactions, n_atom_basis))
        self._ssp = activation_name in ("shifted_softplus", "ssp")
        self.act = activation(activation_name)
        #: set by NeuralNetworkPotential per call: use the memory-lean inference path
        self.use_fused = False
        #: the fused path pays off once pair tensors are large (fewer ops win below)
        self.fused_min_elements = 1 << 18

    def filters(self, d_ij: torch.Tensor) -> torch.Tensor:
        """Cutoff-weighted filters of all blocks.  [n_sets, P, nf]"""
        rbf = self.radial_basis(d_ij)  # [P, n_rbf]
        fcut = self.cutoff_fn(d_ij)  # [P]
        n_sets = self.filter_w1.shape[0]
        rbf = rbf.unsqueeze(0).expand(n_sets, -1, -1)
        h = torch.baddbmm(self.filter_b1, rbf, self.filter_w1)
        if self._ssp:
            # ssp(h) @ W2 + b2 == softplus(h) @ W2 + (b2 - log2 * sum_k W2[k])
            b2 = self.filter_b2 - LOG2 * self.filter_w2.sum(1, keepdim=True)
            h = F.softplus(h)
        else:
            b2 = self.filter_b2
            h = self.act(h)
        w = torch.baddbmm(b2, h, self.filter_w2)
        return w * fcut[None, :, None]

    def forward(self, inputs: dict[str, torch.Tensor], geometry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scalar features ``{SCALAR: [N, F]}``."""
        Z = inputs[keys.Z]
        idx_i, idx_j = geometry[PAIR_I], geometry[PAIR_J]
        if (
            self.use_fused
            and self._ssp
            and idx_i.shape[0] * self.n_filters >= self.fused_min_elements
            and not _is_compiling()
        ):
            if self.filter_table_points:
                return {SCALAR: self._forward_tabulated(Z, geometry[PAIR_DISTANCES], idx_i, idx_j)}
            return {SCALAR: self._forward_fused(Z, geometry[PAIR_DISTANCES], idx_i, idx_j)}
        if self.filter_table_points and not self.training and self._table is not None and _is_compiling():
            # compiled inference (see prepare_for_compile): filters from the table, in plain ops
            filters = self.tabulated_filters(geometry[PAIR_DISTANCES]).unbind(0)
        else:
            filters = self.filters(geometry[PAIR_DISTANCES]).unbind(0)
        x = self.embedding(Z)
        n_atoms = x.shape[0]
        if self._ssp:  # fold the -log2 of the shifted softplus into the next bias
            out2_b = self.out2_b - LOG2 * self.out2_w.sum(1)
        else:
            out2_b = self.out2_b
        in2f, out1_w, out1_b = self.in2f_w.unbind(0), self.out1_w.unbind(0), self.out1_b.unbind(0)
        out2_w, out2_b = self.out2_w.unbind(0), out2_b.unbind(0)
        for k in range(self.n_interactions):
            w = filters[0 if self.shared_filters else k]
            m = torch.mm(x, in2f[k]).index_select(0, idx_j) * w  # [P, nf]
            y = torch.zeros(n_atoms, self.n_filters, dtype=x.dtype, device=x.device).index_add_(0, idx_i, m)
            y = torch.addmm(out1_b[k], y, out1_w[k])
            y = F.softplus(y) if self._ssp else self.act(y)
            x = torch.addmm(out2_b[k], y, out2_w[k]).add_(x)
        return {SCALAR: x}

    def _forward_fused(
        self, Z: torch.Tensor, d_ij: torch.Tensor, idx_i: torch.Tensor, idx_j: torch.Tensor
    ) -> torch.Tensor:
        """Same result as the plain path; one fused filter+convolution per block (inference only)."""
        rbf = self.radial_basis(d_ij)
        fcut = self.cutoff_fn(d_ij)
        x = self.embedding(Z)
        b2 = (self.filter_b2 - LOG2 * self.filter_w2.sum(1, keepdim=True)).squeeze(1)
        out2_b = self.out2_b - LOG2 * self.out2_w.sum(1)
        for k in range(self.n_interactions):
            f = 0 if self.shared_filters else k
            y = torch.mm(x, self.in2f_w[k])
            y = SchNetFilterConv.apply(
                y, rbf, fcut, self.filter_w1[f], self.filter_b1[f, 0], self.filter_w2[f], b2[f], idx_i, idx_j
            )
            y = F.softplus(torch.addmm(self.out1_b[k], y, self.out1_w[k]))
            x = torch.addmm(out2_b[k], y, self.out2_w[k]).add_(x)
        return x

    def filter_table(self) -> torch.Tensor:
        """Hermite coefficients of the cutoff-weighted filters of all blocks.  [n_sets, 4, G, nf]

        Built in float64 (values and exact distance derivatives by forward-mode AD) and
        cached until a filter weight, the radial basis or the dtype/device changes.
        """
        tensors = [self.filter_w1, self.filter_b1, self.filter_w2, self.filter_b2]
        tensors += list(self.radial_basis.parameters()) + list(self.radial_basis.buffers())
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        if self._table is not None and self._table_key == key:
            return self._table
        import torch.autograd.forward_ad as fwAD

        G = self.filter_table_points
        spacing = self.cutoff / G
        dev = self.filter_w1.device
        knots = torch.arange(G + 1, dtype=torch.float64, device=dev) * spacing
        with torch.no_grad(), fwAD.dual_level():
            d = fwAD.make_dual(knots, torch.ones_like(knots))
            rbf = self.radial_basis(d).to(torch.float64)
            fcut = self.cutoff_fn(d)
            w1, b1 = self.filter_w1.double(), self.filter_b1.double()
            w2, b2 = self.filter_w2.double(), self.filter_b2.double()
            b2 = b2 - LOG2 * w2.sum(1, keepdim=True)
            h = F.softplus(torch.baddbmm(b1, rbf.unsqueeze(0).expand(w1.shape[0], -1, -1), w1))
            w = torch.baddbmm(b2, h, w2) * fcut[None, :, None]  # [n_sets, G+1, nf]
            values, slopes = fwAD.unpack_dual(w)
        coeffs = torch.stack(
            [hermite_coefficients(values[k], slopes[k], spacing).transpose(0, 1) for k in range(values.shape[0])]
        ).to(self.filter_w1.dtype).contiguous()  # [n_sets, 4, G, nf]
        self._table, self._table_key = coeffs, key
        return coeffs

    def prepare_for_compile(self) -> None:
        """Build the filter table now, so that a compiled inference graph reads filters from
        it (:meth:`tabulated_filters`) instead of evaluating the filter networks per pair."""
        if self.filter_table_points and not self.training:
            self.filter_table()

    def tabulated_filters(self, d_ij: torch.Tensor) -> torch.Tensor:
        """Cutoff-weighted filters of all blocks read from the Hermite table with plain
        differentiable operations (the derivative is the interpolant's).  [n_sets, P, nf]"""
        table = self._table  # [n_sets, 4, G, nf]
        t = d_ij * (self.filter_table_points / self.cutoff)
        k = t.detach().long().clamp(0, table.shape[2] - 1)
        s = (t - k.to(t.dtype)).view(1, -1, 1)
        c = table.index_select(2, k)  # [n_sets, 4, P, nf]
        w = ((c[:, 3] * s + c[:, 2]) * s + c[:, 1]) * s + c[:, 0]
        # skin pairs (d >= cutoff) would extrapolate the last interval: their filter is 0
        return w * (d_ij < self.cutoff).to(w.dtype).view(1, -1, 1)

    def _forward_tabulated(
        self, Z: torch.Tensor, d_ij: torch.Tensor, idx_i: torch.Tensor, idx_j: torch.Tensor
    ) -> torch.Tensor:
        """Inference path with tabulated filters (no per-pair filter networks)."""
        table = self.filter_table()
        inv_spacing = self.filter_table_points / self.cutoff
        x = self.embedding(Z)
        out2_b = self.out2_b - LOG2 * self.out2_w.sum(1)
        for k in range(self.n_interactions):
            f = 0 if self.shared_filters else k
            y = torch.mm(x, self.in2f_w[k])
            y = TabulatedFilterConv.apply(y, d_ij, table[f], inv_spacing, idx_i, idx_j)
            y = F.softplus(torch.addmm(self.out1_b[k], y, self.out1_w[k]))
            x = torch.addmm(out2_b[k], y, self.out2_w[k]).add_(x)
        return x
