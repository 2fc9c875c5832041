"""SO3net: equivariant message passing with real spherical harmonics up to lmax = 2.

Atom features x [N, (lmax+1)^2, F] (see :mod:`spkserve.nn.so3` for the index
layout). Each block: SO(3) convolution (Clebsch–Gordan product of neighbor
features with radially weighted harmonics of r_ij), feature mixing, a
Clebsch–Gordan self-product, gated nonlinearity by scalars, residual update.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from spkserve import keys
from spkserve.nn.cutoff import build_cutoff
from spkserve.nn.geometry import PAIR_DISTANCES, PAIR_I, PAIR_J, PAIR_VECTORS, SCALAR, VECTOR
from spkserve.nn.layers import Dense
from spkserve.nn.radial import build_rbf
from spkserve.nn.so3 import LMAX_SUPPORTED, coupling_paths, degree_of_index, real_spherical_harmonics, sparse_coupling


#: SchNetPack's real Clebsch–Gordan coefficients are ours times sign * sqrt(2 l3 + 1) on each
#: (l1, l2, l3) path (standard normalisation; the signs of its real-harmonic convention),
#: checked against SchNetPack 2.2 models in tests/test_convert_schnetpack.py
_SCHNETPACK_SIGNS = {(1, 1, 0): -1.0, (1, 1, 2): -1.0, (1, 2, 1): -1.0, (2, 1, 1): -1.0}
CONVENTIONS = ("spkserve", "schnetpack")


def _check_convention(convention: str, parity_invariant: bool) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown SO3 convention {convention!r}; choose one of {list(CONVENTIONS)}")
    if convention == "schnetpack" and not parity_invariant:
        raise ValueError("the schnetpack convention has parity-invariant couplings only (parity_invariant=True)")


class SO3Coupling(nn.Module):
    """Clebsch–Gordan product of two feature tensors ``[B, L, F] x [B, L, F] -> [B, L, F]``.

    ``convention="schnetpack"`` uses SchNetPack's normalisation and signs of the coefficients
    (for models converted from SchNetPack; see :data:`_SCHNETPACK_SIGNS`).
    """

    def __init__(self, lmax: int, parity_invariant: bool = True, convention: str = "spkserve"):
        super().__init__()
        _check_convention(convention, parity_invariant)
        i1, i2, io, cf, path = sparse_coupling(lmax, parity_invariant)
        if convention == "schnetpack":
            paths = coupling_paths(lmax, parity_invariant)
            factor = torch.tensor(
                [_SCHNETPACK_SIGNS.get(p, 1.0) * math.sqrt(2 * p[2] + 1) for p in paths], dtype=cf.dtype
            )
            cf = cf * factor[path]
        self.n_lm = (lmax + 1) ** 2
        self.register_buffer("idx_1", i1, persistent=False)
        self.register_buffer("idx_2", i2, persistent=False)
        self.register_buffer("idx_out", io, persistent=False)
        self.register_buffer("coeff", cf.to(torch.get_default_dtype()), persistent=False)

    def terms(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Products of coupled components.  [B, K, F]"""
        return a.index_select(1, self.idx_1) * b.index_select(1, self.idx_2) * self.coeff.to(a.dtype)[:, None]

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        t = self.terms(a, b)
        out = torch.zeros(a.shape[0], self.n_lm, a.shape[2], dtype=a.dtype, device=a.device)
        return out.index_add_(1, self.idx_out, t)


class SO3netBlock(nn.Module):
    """One interaction block of SO3net."""

    def __init__(self, n_atom_basis: int, lmax: int, coupling: SO3Coupling):
        super().__init__()
        self.lmax = lmax
        self.coupling = coupling
        self.mix1 = nn.Linear(n_atom_basis, n_atom_basis, bias=False)
        self.mix2 = nn.Linear(n_atom_basis, n_atom_basis, bias=False)
        self.mix3 = nn.Linear(n_atom_basis, n_atom_basis, bias=False)
        self.gate = Dense(n_atom_basis, n_atom_basis * (lmax + 1))
        self.register_buffer("degree", degree_of_index(lmax), persistent=False)

    def forward(
        self,
        x: torch.Tensor,  # [N, L, F]
        yw: torch.Tensor,  # [P, L, F] radially weighted harmonics
        idx_i: torch.Tensor,
        idx_j: torch.Tensor,
    ) -> torch.Tensor:
        n, L, F_ = x.shape
        c = self.coupling
        t = c.terms(x.index_select(0, idx_j), yw)  # [P, K, F]
        flat_index = (idx_i[:, None] * L + c.idx_out[None, :]).reshape(-1)
        dx = torch.zeros(n * L, F_, dtype=x.dtype, device=x.device).index_add_(0, flat_index, t.reshape(-1, F_))
        dx = dx.view(n, L, F_)
        dx = dx + c(dx, self.mix1(dx))
        dx = self.mix2(dx)
        gate = torch.sigmoid(self.gate(dx[:, 0])).view(n, self.lmax + 1, F_).index_select(1, self.degree)
        dx = self.mix3(dx * gate)
        return x + dx


class SO3net(nn.Module):
    """SO3net representation: ``{SCALAR: [N, F], VECTOR: [N, 3, F]}`` (vector in x, y, z order).

    Args:
        n_atom_basis: feature width F.
        n_interactions: number of blocks.
        lmax: largest degree (1 or 2).
        n_rbf, cutoff_angstrom, radial_basis, cutoff_fn: radial part.
        shared_interactions: reuse one block.
        parity_invariant: keep only couplings with even l1 + l2 + l3 (O(3) invariance).
        max_z: largest atomic number supported.
        convention: ``"spkserve"`` (harmonics with Y_00 = 1, unit-norm couplings) or
            ``"schnetpack"`` (orthonormal harmonics and standard Clebsch–Gordan
            normalisation, as SchNetPack's SO3net; for converted models).
    """

    def __init__(
        self,
        n_atom_basis: int = 64,
        n_interactions: int = 3,
        lmax: int = 2,
        n_rbf: int = 20,
        cutoff_angstrom: float = 5.0,
        radial_basis: str = "gaussian",
        cutoff_fn: str = "cosine",
        shared_interactions: bool = False,
        parity_invariant: bool = True,
        max_z: int = 100,
        convention: str = "spkserve",
    ):
        super().__init__()
        _check_convention(convention, parity_invariant)
        #: SchNetPack's harmonics are ours divided by sqrt(4 pi) (orthonormal on the sphere)
        self.harmonics_scale = 1.0 / math.sqrt(4.0 * math.pi) if convention == "schnetpack" else 1.0
        if not 1 <= lmax <= LMAX_SUPPORTED:
            raise ValueError(f"SO3net supports lmax 1..{LMAX_SUPPORTED}, got {lmax}")
        if n_interactions < 1:
            raise ValueError(f"n_interactions must be at least 1, got {n_interactions}")
        self.n_atom_basis = n_atom_basis
        self.n_interactions = n_interactions
        self.lmax = lmax
        self.cutoff = float(cutoff_angstrom)
        self.max_z = max_z
        self.shared_interactions = shared_interactions
        self.embedding = nn.Embedding(max_z + 1, n_atom_basis, padding_idx=0)
        self.radial_basis = build_rbf(radial_basis, n_rbf, self.cutoff)
        self.cutoff_fn = build_cutoff(cutoff_fn, self.cutoff)
        self.filter_net = Dense(n_rbf, n_interactions * (lmax + 1) * n_atom_basis)
        coupling = SO3Coupling(lmax, parity_invariant, convention)
        n_blocks = 1 if shared_interactions else n_interactions
        self.blocks = nn.ModuleList(SO3netBlock(n_atom_basis, lmax, coupling) for _ in range(n_blocks))
        self.register_buffer("degree", degree_of_index(lmax), persistent=False)

    def forward(self, inputs: dict[str, torch.Tensor], geometry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        Z = inputs[keys.Z]
        idx_i, idx_j = geometry[PAIR_I], geometry[PAIR_J]
        d_ij = geometry[PAIR_DISTANCES]
        Y = real_spherical_harmonics(geometry[PAIR_VECTORS] / d_ij[:, None], self.lmax)  # [P, L]
        if self.harmonics_scale != 1.0:
            Y = Y * self.harmonics_scale
        F_, L, nl = self.n_atom_basis, (self.lmax + 1) ** 2, self.lmax + 1
        W = self.filter_net(self.radial_basis(d_ij)) * self.cutoff_fn(d_ij)[:, None]
        W = W.view(-1, self.n_interactions, nl, F_)
        x0 = self.embedding(Z)
        x = torch.cat([x0.unsqueeze(1), x0.new_zeros(x0.shape[0], L - 1, F_)], dim=1)  # [N, L, F]
        for k in range(self.n_interactions):
            yw = Y.unsqueeze(-1) * W[:, k].index_select(1, self.degree)  # [P, L, F]
            x = self.blocks[0 if self.shared_interactions else k](x, yw, idx_i, idx_j)
        return {SCALAR: x[:, 0], VECTOR: x[:, [3, 1, 2]]}
