"""Output heads: per-atom networks on representation features, aggregated per system.

Every head is called as ``head(inputs, features, results) -> dict`` where
``features`` holds the representation output and the pair geometry (see
:mod:`spkserve.nn.geometry`) and ``results`` the outputs of earlier heads.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from spkserve import keys, units
from spkserve.nn.cutoff import build_cutoff
from spkserve.nn.geometry import PAIR_DISTANCES, PAIR_I, PAIR_J, SCALAR, VECTOR, scatter_sum
from spkserve.nn.layers import Dense, activation, build_mlp


def _n_systems(inputs: dict[str, torch.Tensor]) -> int:
    return inputs[keys.n_atoms].shape[0]


class Atomwise(nn.Module):
    """MLP on scalar features, summed or averaged per system.

    Args:
        n_in: feature width of the representation.
        n_out: outputs per atom (1 gives shape [S], otherwise [S, n_out]).
        n_hidden, n_layers, activation_name: MLP shape (see :func:`build_mlp`).
        aggregation: ``sum`` | ``mean`` | ``none`` (per-atom output [N]).
        output_key: name of the output (default ``energy``).
        per_atom_key: also return the per-atom contributions under this name.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int = 1,
        n_hidden: int | Sequence[int] | None = None,
        n_layers: int = 2,
        activation_name: str = "silu",
        aggregation: str = "sum",
        output_key: str = keys.energy,
        per_atom_key: str | None = None,
    ):
        super().__init__()
        if aggregation not in ("sum", "mean", "none"):
            raise ValueError(f"aggregation must be 'sum', 'mean' or 'none', got {aggregation!r}")
        self.net = build_mlp(n_in, n_out, n_hidden, n_layers, activation_name)
        self.n_out = n_out
        self.aggregation = aggregation
        self.output_key = output_key
        self.per_atom_key = per_atom_key

    def forward(
        self, inputs: dict[str, torch.Tensor], features: dict[str, torch.Tensor], results: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        y = self.net(features[SCALAR])  # [N, n_out]
        if self.n_out == 1:
            y = y.squeeze(-1)
        out: dict[str, torch.Tensor] = {}
        if self.per_atom_key is not None:
            out[self.per_atom_key] = y
        if self.aggregation == "none":
            out[self.output_key] = y
            return out
        agg = scatter_sum(y, inputs[keys.idx_m], _n_systems(inputs))
        if self.aggregation == "mean":
            n = inputs[keys.n_atoms].to(agg.dtype)
            agg = agg / (n if agg.dim() == 1 else n[:, None])
        out[self.output_key] = agg
        return out


class GatedEquivariantBlock(nn.Module):
    """Gated equivariant block (PaiNN paper, Fig. 3): scalars and vectors in and out."""

    def __init__(
        self,
        n_sin: int,
        n_vin: int,
        n_sout: int,
        n_vout: int,
        n_hidden: int,
        activation_name: str = "silu",
        scalar_activation: str | None = None,
        epsilon: float = 1e-8,
    ):
        super().__init__()
        self.n_sout, self.n_vout = n_sout, n_vout
        self.mix_vectors = Dense(n_vin, 2 * n_vout, None, bias=False)
        self.scalar_net = nn.Sequential(
            Dense(n_sin + n_vout, n_hidden, activation_name), Dense(n_hidden, n_sout + n_vout)
        )
        self.scalar_activation = activation(scalar_activation)
        self.epsilon = epsilon

    def forward(self, s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v_v, v_w = self.mix_vectors(v).split(self.n_vout, dim=-1)  # [N, 3, n_vout]
        v_norm = torch.sqrt((v_v * v_v).sum(1) + self.epsilon)
        x = self.scalar_net(torch.cat([s, v_norm], dim=-1))
        s_out, gate = x.split([self.n_sout, self.n_vout], dim=-1)
        return self.scalar_activation(s_out), gate.unsqueeze(1) * v_w


def build_gated_equivariant_mlp(
    n_in: int,
    n_out: int,
    n_hidden: int | Sequence[int] | None = None,
    n_layers: int = 2,
    activation_name: str = "silu",
    n_gating_hidden: Sequence[int] | None = None,
    epsilon: float = 1e-8,
) -> nn.ModuleList:
    """Stack of gated equivariant blocks with widths halving from ``n_in`` to ``n_out``
    (or the hidden widths ``n_hidden``: one for all, or a list of ``n_layers - 1``).

    ``n_gating_hidden`` gives the hidden width of each block's gating network
    (default: the larger of its input and output width); ``epsilon`` regularises
    the vector norms (0 gives the plain norm, as SchNetPack's block).
    """
    widths = [n_in]
    if n_hidden is not None and not isinstance(n_hidden, int):
        hidden = [int(w) for w in n_hidden]
        if len(hidden) != n_layers - 1:
            raise ValueError(f"n_hidden lists {len(hidden)} widths but n_layers={n_layers} needs {n_layers - 1}")
        widths += hidden
    else:
        for _ in range(n_layers - 1):
            widths.append(n_hidden if n_hidden is not None else max(n_out, widths[-1] // 2))
    widths.append(n_out)
    if n_gating_hidden is None:
        gating = [max(widths[k], widths[k + 1]) for k in range(n_layers)]
    else:
        gating = [int(w) for w in n_gating_hidden]
        if len(gating) != n_layers:
            raise ValueError(f"n_gating_hidden lists {len(gating)} widths but there are {n_layers} blocks")
    blocks = []
    for k in range(n_layers):
        last = k == n_layers - 1
        blocks.append(
            GatedEquivariantBlock(
                widths[k], widths[k], widths[k + 1], widths[k + 1], gating[k],
                activation_name, None if last else activation_name, epsilon,
            )
        )
    return nn.ModuleList(blocks)


def _run_gated(blocks: nn.ModuleList, s: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for block in blocks:
        s, v = block(s, v)
    return s, v


def _centred_positions(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Positions relative to the geometric centre of their system.  [N, 3]"""
    R = inputs[keys.R]
    idx_m = inputs[keys.idx_m]
    centre = scatter_sum(R, idx_m, _n_systems(inputs)) / inputs[keys.n_atoms].to(R.dtype)[:, None]
    return R - centre[idx_m]


class DipoleMoment(nn.Module):
    """Dipole moment from latent partial charges (and optional atomic dipoles).

    mu = sum_i q_i (R_i - centre) [+ sum_i mu_i], with charges corrected so that
    they sum to ``total_charge`` of the batch (0 if absent). Units: elementary
    charge times the model length unit.
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int | Sequence[int] | None = None,
        n_layers: int = 2,
        activation_name: str = "silu",
        use_vector_representation: bool = False,
        correct_charges: bool = True,
        predict_magnitude: bool = False,
        dipole_key: str = keys.dipole_moment,
        charges_key: str = keys.partial_charges,
        n_gating_hidden: Sequence[int] | None = None,
        epsilon: float = 1e-8,
    ):
        super().__init__()
        self.use_vector_representation = use_vector_representation
        if use_vector_representation:
            self.net = build_gated_equivariant_mlp(
                n_in, 1, n_hidden, n_layers, activation_name, n_gating_hidden, epsilon
            )
        else:
            self.net = build_mlp(n_in, 1, n_hidden, n_layers, activation_name)
        self.correct_charges = correct_charges
        self.predict_magnitude = predict_magnitude
        self.dipole_key = dipole_key
        self.charges_key = charges_key

    def forward(
        self, inputs: dict[str, torch.Tensor], features: dict[str, torch.Tensor], results: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        idx_m = inputs[keys.idx_m]
        n_sys = _n_systems(inputs)
        atomic_dipoles = None
        if self.use_vector_representation:
            s, v = _run_gated(self.net, features[SCALAR], features[VECTOR])
            charges = s.squeeze(-1)
            atomic_dipoles = v.squeeze(-1)  # [N, 3]
        else:
            charges = self.net(features[SCALAR]).squeeze(-1)  # [N]
        if self.correct_charges:
            total = scatter_sum(charges, idx_m, n_sys)
            target = inputs.get(keys.total_charge)
            excess = total if target is None else total - target.to(total.dtype).reshape(-1)
            charges = charges - (excess / inputs[keys.n_atoms].to(charges.dtype))[idx_m]
        y = charges[:, None] * _centred_positions(inputs)
        if atomic_dipoles is not None:
            y = y + atomic_dipoles
        dipole = scatter_sum(y, idx_m, n_sys)  # [S, 3]
        if self.predict_magnitude:
            dipole = torch.linalg.vector_norm(dipole, dim=-1)
        return {self.dipole_key: dipole, self.charges_key: charges}


class Polarizability(nn.Module):
    """Polarizability tensor from scalar and vector features (PaiNN paper, eq. 14).

    alpha = sum_i a_i I + nu_i (x) r_i + r_i (x) nu_i, with r_i relative to the
    system's geometric centre (so the result is translation invariant), or with
    ``centre_positions=False`` the positions as given (SchNetPack's head, which
    therefore depends on the origin). ``n_gating_hidden`` and ``epsilon``: see
    :func:`build_gated_equivariant_mlp`.
    """

    def __init__(
        self,
        n_in: int,
        n_hidden: int | Sequence[int] | None = None,
        n_layers: int = 2,
        activation_name: str = "silu",
        polarizability_key: str = keys.polarizability,
        n_gating_hidden: Sequence[int] | None = None,
        epsilon: float = 1e-8,
        centre_positions: bool = True,
    ):
        super().__init__()
        self.net = build_gated_equivariant_mlp(n_in, 1, n_hidden, n_layers, activation_name, n_gating_hidden, epsilon)
        self.polarizability_key = polarizability_key
        self.centre_positions = centre_positions

    def forward(
        self, inputs: dict[str, torch.Tensor], features: dict[str, torch.Tensor], results: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        if VECTOR not in features:
            raise ValueError("the polarizability head needs vector features (use PaiNN or SO3net)")
        s, v = _run_gated(self.net, features[SCALAR], features[VECTOR])
        a = s.squeeze(-1)  # [N]
        nu = v.squeeze(-1)  # [N, 3]
        r = _centred_positions(inputs) if self.centre_positions else inputs[keys.R]
        outer = nu[:, :, None] * r[:, None, :]
        eye = torch.eye(3, dtype=a.dtype, device=a.device)
        alpha = a[:, None, None] * eye + outer + outer.transpose(1, 2)  # [N, 3, 3]
        return {self.polarizability_key: scatter_sum(alpha, inputs[keys.idx_m], _n_systems(inputs))}


class ZBLRepulsion(nn.Module):
    """Ziegler–Biersack–Littmark screened nuclear repulsion, a pair energy with its own cutoff.

    E = 1/2 sum_{i != j} k_e Z_i Z_j / r_ij phi(r_ij / a_ij) f_cut(r_ij),
    a_ij = 0.8854 a_0 / (Z_i^0.23 + Z_j^0.23). Units of the model are given by
    ``length_unit`` and ``energy_unit``; constants come from :mod:`spkserve.units`.
    """

    COEFFS = (0.18175, 0.50986, 0.28022, 0.02817)
    EXPONENTS = (3.19980, 0.94229, 0.40290, 0.20162)

    def __init__(
        self,
        cutoff_angstrom: float = 2.0,
        length_unit: str = "Ang",
        energy_unit: str = "eV",
        cutoff_fn: str = "cosine",
        trainable: bool = False,
        output_key: str = "zbl_energy",
    ):
        super().__init__()
        self.cutoff = float(cutoff_angstrom)
        self.cutoff_fn = build_cutoff(cutoff_fn, self.cutoff)
        # k_e = 1 Hartree Bohr / e^2 in atomic units
        self.ke = units.factor("Hartree", energy_unit) * units.factor("Bohr", length_unit)
        self.a0 = 0.8854 * units.factor("Bohr", length_unit)
        coeffs = torch.tensor(self.COEFFS)
        exps = torch.tensor(self.EXPONENTS)
        if trainable:
            self.coeffs = nn.Parameter(coeffs)
            self.exponents = nn.Parameter(exps)
        else:
            self.register_buffer("coeffs", coeffs)
            self.register_buffer("exponents", exps)
        self.output_key = output_key

    def forward(
        self, inputs: dict[str, torch.Tensor], features: dict[str, torch.Tensor], results: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        idx_i, idx_j = features[PAIR_I], features[PAIR_J]
        d = features[PAIR_DISTANCES]
        z = inputs[keys.Z].to(d.dtype)
        zi, zj = z[idx_i], z[idx_j]
        a = self.a0 / (zi**0.23 + zj**0.23)
        x = (d / a)[:, None]
        phi = (self.coeffs * torch.exp(-self.exponents * x)).sum(-1)
        e_pair = 0.5 * self.ke * zi * zj / d * phi * self.cutoff_fn(d)
        e_atom = scatter_sum(e_pair, idx_i, z.shape[0])
        return {self.output_key: scatter_sum(e_atom, inputs[keys.idx_m], _n_systems(inputs))}


class EnergySum(nn.Module):
    """Sum of several energy terms (outputs of earlier heads) into one output."""

    def __init__(self, input_keys: Sequence[str], output_key: str = keys.energy):
        super().__init__()
        if len(input_keys) == 0:
            raise ValueError("EnergySum needs at least one input key")
        self.input_keys = list(input_keys)
        self.output_key = output_key

    def forward(
        self, inputs: dict[str, torch.Tensor], features: dict[str, torch.Tensor], results: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        missing = [k for k in self.input_keys if k not in results]
        if missing:
            raise ValueError(f"EnergySum needs outputs {missing} from earlier heads; have {sorted(results)}")
        total = results[self.input_keys[0]]
        for k in self.input_keys[1:]:
            total = total + results[k]
        return {self.output_key: total}
