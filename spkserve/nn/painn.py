"""PaiNN: polarizable atom interaction neural network (Schütt et al., ICML 2021).

Scalar features q [N, F] and vector features mu [N, 3, F]. The filter network of
all interaction blocks is one dense layer evaluated once.
"""

from __future__ import annotations

import torch
from torch import nn

from spkserve import keys
from spkserve.nn.cutoff import build_cutoff
from spkserve.nn.fused import PaiNNMessage
from spkserve.nn.geometry import PAIR_DISTANCES, PAIR_I, PAIR_J, PAIR_VECTORS, SCALAR, VECTOR, _is_compiling
from spkserve.nn.layers import Dense
from spkserve.nn.radial import build_rbf


class PaiNNInteraction(nn.Module):
    """Message block: equivariant messages from neighbors."""

    def __init__(self, n_atom_basis: int, activation_name: str):
        super().__init__()
        self.n_atom_basis = n_atom_basis
        self.context = nn.Sequential(
            Dense(n_atom_basis, n_atom_basis, activation_name), Dense(n_atom_basis, 3 * n_atom_basis)
        )

    def forward(
        self,
        q: torch.Tensor,  # [N, F]
        mu: torch.Tensor,  # [N, 3, F]
        w_ij: torch.Tensor,  # [P, 3F]
        dir_ij: torch.Tensor,  # [P, 3, 1]
        idx_i: torch.Tensor,
        idx_j: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        F_ = self.n_atom_basis
        x = self.context(q).index_select(0, idx_j) * w_ij  # [P, 3F]
        dq, dmu_r, dmu_mu = x.split(F_, dim=-1)
        dmu = torch.addcmul(dmu_r.unsqueeze(1) * dir_ij, dmu_mu.unsqueeze(1), mu.index_select(0, idx_j))  # [P, 3, F]
        q = q.index_add(0, idx_i, dq)
        mu = mu.index_add(0, idx_i, dmu)
        return q, mu


class PaiNNMixing(nn.Module):
    """Update block: mixes scalar and vector channels within each atom."""

    def __init__(self, n_atom_basis: int, activation_name: str, epsilon: float = 1e-8):
        super().__init__()
        self.n_atom_basis = n_atom_basis
        self.context = nn.Sequential(
            Dense(2 * n_atom_basis, n_atom_basis, activation_name), Dense(n_atom_basis, 3 * n_atom_basis)
        )
        self.mu_mix = Dense(n_atom_basis, 2 * n_atom_basis, None, bias=False)
        self.epsilon = epsilon

    def forward(self, q: torch.Tensor, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        F_ = self.n_atom_basis
        mu_v, mu_w = self.mu_mix(mu).split(F_, dim=-1)  # [N, 3, F] each
        mu_vn = torch.sqrt((mu_v * mu_v).sum(1) + self.epsilon)  # [N, F]
        x = self.context(torch.cat([q, mu_vn], dim=-1))
        dq, dmu, dqmu = x.split(F_, dim=-1)
        q = q + dq + dqmu * (mu_v * mu_w).sum(1)
        mu = torch.addcmul(mu, dmu.unsqueeze(1), mu_w)
        return q, mu


class PaiNN(nn.Module):
    """PaiNN representation: ``{SCALAR: [N, F], VECTOR: [N, 3, F]}``.

    Args:
        n_atom_basis: feature width F.
        n_interactions: number of message + update blocks.
        n_rbf: number of radial basis functions.
        cutoff_angstrom: cutoff radius (model length unit).
        radial_basis: ``gaussian`` | ``gaussian_centered`` | ``bessel``.
        cutoff_fn: ``cosine`` | ``mollifier``.
        activation_name: activation (default ``silu``).
        shared_interactions: reuse one message and update block.
        shared_filters: one filter set for all blocks.
        max_z: largest atomic number supported.
    """

    def __init__(
        self,
        n_atom_basis: int = 128,
        n_interactions: int = 3,
        n_rbf: int = 20,
        cutoff_angstrom: float = 5.0,
        radial_basis: str = "gaussian",
        cutoff_fn: str = "cosine",
        activation_name: str = "silu",
        shared_interactions: bool = False,
        shared_filters: bool = False,
        epsilon: float = 1e-8,
        max_z: int = 100,
    ):
        super().__init__()
        if n_interactions < 1:
            raise ValueError(f"n_interactions must be at least 1, got {n_interactions}")
        self.n_atom_basis = n_atom_basis
        self.n_interactions = n_interactions
        self.cutoff = float(cutoff_angstrom)
        self.max_z = max_z
        self.shared_filters = shared_filters
        self.shared_interactions = shared_interactions
        self.embedding = nn.Embedding(max_z + 1, n_atom_basis, padding_idx=0)
        self.radial_basis = build_rbf(radial_basis, n_rbf, self.cutoff)
        self.cutoff_fn = build_cutoff(cutoff_fn, self.cutoff)
        n_filter_sets = 1 if shared_filters else n_interactions
        self.filter_net = Dense(n_rbf, n_filter_sets * 3 * n_atom_basis)
        n_blocks = 1 if shared_interactions else n_interactions
        self.interactions = nn.ModuleList(PaiNNInteraction(n_atom_basis, activation_name) for _ in range(n_blocks))
        self.mixing = nn.ModuleList(PaiNNMixing(n_atom_basis, activation_name, epsilon) for _ in range(n_blocks))
        #: set by NeuralNetworkPotential per call: use the memory-lean inference path
        self.use_fused = False
        #: the fused path pays off once pair tensors are large (fewer ops win below)
        self.fused_min_elements = 1 << 18

    def forward(self, inputs: dict[str, torch.Tensor], geometry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        Z = inputs[keys.Z]
        idx_i, idx_j = geometry[PAIR_I], geometry[PAIR_J]
        d_ij = geometry[PAIR_DISTANCES]
        dir_ij = (geometry[PAIR_VECTORS] / d_ij[:, None]).unsqueeze(-1)  # [P, 3, 1]
        fcut = self.cutoff_fn(d_ij)
        q = self.embedding(Z)  # [N, F]
        mu = torch.zeros(q.shape[0], 3, q.shape[1], dtype=q.dtype, device=q.device)
        if self.use_fused and idx_i.shape[0] * self.n_atom_basis >= self.fused_min_elements and not _is_compiling():
            w_raw = self.filter_net(self.radial_basis(d_ij)).split(3 * self.n_atom_basis, dim=-1)
            unit = dir_ij.squeeze(-1)
            for k in range(self.n_interactions):
                b = 0 if self.shared_interactions else k
                x = self.interactions[b].context(q)
                dq, dmu = PaiNNMessage.apply(x, mu, w_raw[0 if self.shared_filters else k], fcut, unit, idx_i, idx_j)
                q, mu = self.mixing[b](q + dq, mu + dmu)
            return {SCALAR: q, VECTOR: mu}
        filters = self.filter_net(self.radial_basis(d_ij)) * fcut[:, None]  # [P, sets*3F]
        w = filters.split(3 * self.n_atom_basis, dim=-1)
        for k in range(self.n_interactions):
            b = 0 if self.shared_interactions else k
            q, mu = self.interactions[b](q, mu, w[0 if self.shared_filters else k], dir_ij, idx_i, idx_j)
            q, mu = self.mixing[b](q, mu)
        return {SCALAR: q, VECTOR: mu}
