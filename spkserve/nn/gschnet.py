"""Conditional G-SchNet (cG-SchNet): an autoregressive generator of 3D molecules.

Gebauer, Gastegger, Hessmann, Müller, Schütt, Nat. Commun. 13, 973 (2022).

A molecule is built atom by atom. At every step the model sees a *partial molecule*
(the atoms placed so far) plus two tokens: the **origin token** at the centre of mass
of the final molecule (the coordinate origin, 0, during generation) and the **focus
token** on the current focus atom. From the features of all nodes within the
*prediction cutoff* of the focus it predicts

* the type of the next atom, or the **stop type** ("nothing more to place next to this
  focus"): every such node gives a log-distribution over ``atom_types + [stop]``; they
  are summed (a product of distributions) and renormalised;
* the distance of the next atom to each of those nodes: a distribution over
  ``n_distance_bins`` bins on ``[0, distance_max]`` Å, from the node's features times an
  embedding of the chosen next type.

The next position is then sampled on a grid around the focus (within the
*placement cutoff*) from the product of the distance distributions
(:mod:`spkserve.nn.gschnet_sampling`). Conditions (composition, scalar targets) enter
as a feature vector concatenated to every node's features
(:class:`ConditioningModule`).

Token atom types are :data:`ORIGIN_TYPE`, :data:`FOCUS_TYPE`, :data:`STOP_TYPE`
(above every element, so the representation needs ``max_z >= STOP_TYPE``).

Batch keys (besides :mod:`spkserve.keys` inputs with the tokens as extra nodes):
``pred_idx_j`` [Q] global node indices of the prediction neighbours of each step,
``pred_idx_m`` [Q] the step each belongs to, ``next_atomic_numbers`` [S], and the
conditions: ``composition`` [S, T] (atom counts per type, order of ``atom_types``),
``n_atoms_target`` [S], and one [S] tensor per scalar condition name.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from spkserve import keys
from spkserve.nn.geometry import SCALAR, pair_geometry
from spkserve.nn.layers import build_mlp
from spkserve.registry import build, register

ORIGIN_TYPE = 121
FOCUS_TYPE = 122
STOP_TYPE = 123

# batch keys of the generative model (one home)
PRED_IDX_J = "pred_idx_j"
PRED_IDX_M = "pred_idx_m"
NEXT_Z = "next_atomic_numbers"
COMPOSITION = "composition"
N_ATOMS_TARGET = "n_atoms_target"
LOG_P_TYPE = "log_p_type"  # [S, T+1]
LOG_P_DISTANCE = "log_p_distance"  # [Q', n_bins]


class ConditionRangeWarning(UserWarning):
    """A requested condition lies outside the range its embedding was built for."""


class GaussianExpansion(nn.Module):
    """Gaussians with centres every ``grid_spacing`` on [minimum, maximum], width = spacing.  x [S] -> [S, K]"""

    def __init__(self, minimum: float, maximum: float, grid_spacing: float):
        super().__init__()
        if not maximum > minimum:
            raise ValueError(f"condition maximum ({maximum}) must exceed its minimum ({minimum})")
        if not grid_spacing > 0:
            raise ValueError(f"grid_spacing must be > 0, got {grid_spacing}")
        n = int(math.ceil((maximum - minimum) / grid_spacing - 1e-9)) + 1
        self.register_buffer("centers", minimum + grid_spacing * torch.arange(n, dtype=torch.float32))
        self.width = float(grid_spacing)
        self.minimum, self.maximum = float(minimum), float(maximum)

    @property
    def n_features(self) -> int:
        return int(self.centers.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        diff = x.to(self.centers.dtype)[:, None] - self.centers[None, :]
        return torch.exp(-0.5 * (diff / self.width) ** 2)


class ScalarConditionEmbedding(nn.Module):
    """One scalar condition (e.g. HOMO-LUMO gap in eV): Gaussian expansion, then an MLP.  [S] -> [S, n_features]"""

    def __init__(
        self, name: str, minimum: float, maximum: float, grid_spacing: float, n_features: int = 64, n_layers: int = 3
    ):
        super().__init__()
        self.name = name
        self.required_keys = (name,)
        self.expansion = GaussianExpansion(minimum, maximum, grid_spacing)
        self.net = build_mlp(self.expansion.n_features, n_features, n_hidden=n_features, n_layers=n_layers,
                             activation_name="shifted_softplus")
        self.n_features = n_features

    def check_range(self, value: float) -> None:
        """Warn if ``value`` lies outside [minimum, maximum]."""
        if not self.expansion.minimum <= value <= self.expansion.maximum:
            warnings.warn(
                f"condition {self.name}={value} lies outside the range the model was trained for "
                f"[{self.expansion.minimum}, {self.expansion.maximum}]; its embedding is close to zero there",
                ConditionRangeWarning, stacklevel=3,
            )

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(self.expansion(inputs[self.name]))


class CompositionEmbedding(nn.Module):
    """Atomic composition: the type fractions weight learned type embeddings, the atom count is
    Gaussian-expanded; an MLP combines both.  ``composition`` [S, T], ``n_atoms_target`` [S] -> [S, n_features]"""

    name = COMPOSITION

    def __init__(self, atom_types: Sequence[int], max_n_atoms: int = 35, n_features: int = 64, n_layers: int = 3,
                 n_atoms_spacing: float = 1.0):
        super().__init__()
        self.atom_types = [int(z) for z in atom_types]
        self.required_keys = (COMPOSITION, N_ATOMS_TARGET)
        self.type_embedding = nn.Linear(len(self.atom_types), n_features, bias=False)
        self.n_atoms_expansion = GaussianExpansion(1.0, float(max_n_atoms), n_atoms_spacing)
        self.net = build_mlp(n_features + self.n_atoms_expansion.n_features, n_features, n_hidden=n_features,
                             n_layers=n_layers, activation_name="shifted_softplus")
        self.n_features = n_features

    def check_range(self, n_atoms: float) -> None:
        if not 1 <= n_atoms <= self.n_atoms_expansion.maximum:
            warnings.warn(f"composition with {n_atoms} atoms lies outside the trained range "
                          f"[1, {self.n_atoms_expansion.maximum:g}]", ConditionRangeWarning, stacklevel=3)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        counts = inputs[COMPOSITION].to(self.type_embedding.weight.dtype)  # [S, T]
        n = counts.sum(-1).clamp(min=1.0)
        fractions = counts / n[:, None]
        x = torch.cat([self.type_embedding(fractions), self.n_atoms_expansion(n)], dim=-1)
        return self.net(x)


class ConditioningModule(nn.Module):
    """Embeds every condition, concatenates and mixes them with a small MLP.  -> [S, n_features]"""

    def __init__(self, embeddings: Sequence[nn.Module], n_features: int = 128, n_layers: int = 2):
        super().__init__()
        if not embeddings:
            raise ValueError("a ConditioningModule needs at least one condition embedding")
        self.embeddings = nn.ModuleList(embeddings)
        n_in = sum(e.n_features for e in embeddings)
        self.net = build_mlp(n_in, n_features, n_hidden=n_features, n_layers=n_layers, activation_name="shifted_softplus")
        self.n_features = n_features

    @property
    def condition_names(self) -> list[str]:
        return [e.name for e in self.embeddings]

    @property
    def required_keys(self) -> list[str]:
        return [k for e in self.embeddings for k in e.required_keys]

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(torch.cat([e(inputs) for e in self.embeddings], dim=-1))


def build_conditioning(specs: Sequence[dict[str, Any]] | None, atom_types: Sequence[int],
                       n_features: int = 128, n_layers: int = 2) -> ConditioningModule | None:
    """A :class:`ConditioningModule` from plain specs, or None for an unconditioned model.

    Specs: ``{"type": "scalar", "name": "gap", "min": 0.0, "max": 10.0, "grid_spacing": 0.2,
    "n_features": 64}`` or ``{"type": "composition", "max_n_atoms": 35, "n_features": 64}``.
    """
    if not specs:
        return None
    embs: list[nn.Module] = []
    for spec in specs:
        spec = dict(spec)
        kind = spec.pop("type", None)
        if kind == "scalar":
            embs.append(ScalarConditionEmbedding(spec.pop("name"), spec.pop("min"), spec.pop("max"),
                                                 spec.pop("grid_spacing"), **spec))
        elif kind == "composition":
            embs.append(CompositionEmbedding(atom_types, **spec))
        else:
            raise ValueError(f"unknown condition type {kind!r}: use 'scalar' or 'composition'")
    names = [e.name for e in embs]
    if len(set(names)) != len(names):
        raise ValueError(f"condition names must be unique, got {names}")
    return ConditioningModule(embs, n_features=n_features, n_layers=n_layers)


class ConditionalGenerativeSchNet(nn.Module):
    """The cG-SchNet network (see module docstring).

    Args:
        representation: architecture spec of the runtime representation (``schnet`` or
            ``painn``), built with :func:`spkserve.registry.build`; its ``max_z`` must cover
            :data:`STOP_TYPE` and its cutoff is the model cutoff.
        atom_types: the elements the model can place (atomic numbers).
        model_cutoff_angstrom: message-passing cutoff.
        prediction_cutoff_angstrom: nodes this close to the focus predict type and distances.
        placement_cutoff_angstrom: the next atom is placed this close to the focus.
        conditions: condition specs (:func:`build_conditioning`), empty = unconditioned.
        n_conditional_features: width of the conditioning vector.
        type_prediction_n_layers / distance_prediction_n_layers: depths of the two heads.
        distance_max_angstrom: upper end of the distance bins (default prediction + placement cutoff).
        n_distance_bins: number of bins (default one per 1/30 Å).
    """

    def __init__(
        self,
        representation: dict[str, Any],
        atom_types: Sequence[int],
        model_cutoff_angstrom: float = 5.0,
        prediction_cutoff_angstrom: float = 5.0,
        placement_cutoff_angstrom: float = 1.7,
        conditions: Sequence[dict[str, Any]] | None = None,
        n_conditional_features: int = 128,
        type_prediction_n_layers: int = 3,
        distance_prediction_n_layers: int = 3,
        distance_max_angstrom: float | None = None,
        n_distance_bins: int | None = None,
    ):
        super().__init__()
        atom_types = sorted(int(z) for z in atom_types)
        if not atom_types or any(not 1 <= z < ORIGIN_TYPE for z in atom_types):
            raise ValueError(f"atom_types must be atomic numbers 1..{ORIGIN_TYPE - 1}, got {atom_types}")
        if not 0 < placement_cutoff_angstrom <= prediction_cutoff_angstrom:
            raise ValueError(f"need 0 < placement cutoff ({placement_cutoff_angstrom}) <= prediction cutoff "
                             f"({prediction_cutoff_angstrom})")
        self.representation = build(representation)
        max_z = getattr(self.representation, "max_z", None)
        if max_z is None or max_z < STOP_TYPE:
            raise ValueError(f"the representation needs max_z >= {STOP_TYPE} (the token types), got {max_z}")
        self.atom_types = atom_types
        self.model_cutoff = float(model_cutoff_angstrom)
        self.prediction_cutoff = float(prediction_cutoff_angstrom)
        self.placement_cutoff = float(placement_cutoff_angstrom)
        rep_cut = float(getattr(self.representation, "cutoff", self.model_cutoff))
        if abs(rep_cut - self.model_cutoff) > 1e-6:
            raise ValueError(f"representation cutoff {rep_cut} differs from model_cutoff {self.model_cutoff}")
        all_types = atom_types + [STOP_TYPE]
        class_map = torch.full((STOP_TYPE + 1,), -1, dtype=torch.long)
        class_map[torch.tensor(all_types)] = torch.arange(len(all_types))
        self.register_buffer("all_types", torch.tensor(all_types), persistent=False)
        self.register_buffer("type_to_class", class_map, persistent=False)
        self.conditioning = build_conditioning(conditions, atom_types, n_conditional_features)
        n_rep = int(self.representation.n_atom_basis)
        self.n_cond = self.conditioning.n_features if self.conditioning is not None else 0
        n_feat = n_rep + self.n_cond
        self.distance_max = float(distance_max_angstrom or (self.prediction_cutoff + self.placement_cutoff))
        self.n_bins = int(n_distance_bins or math.ceil(self.distance_max * 30) + 1)
        self.bin_width = self.distance_max / (self.n_bins - 1)
        self.register_buffer("bin_centers", torch.linspace(0.0, self.distance_max, self.n_bins), persistent=False)
        self.type_net = build_mlp(n_feat, len(all_types), n_hidden=n_feat, n_layers=type_prediction_n_layers,
                                  activation_name="shifted_softplus")
        self.next_type_embedding = nn.Embedding(STOP_TYPE + 1, n_rep, padding_idx=0)
        self.distance_net = build_mlp(n_feat, self.n_bins, n_hidden=n_feat, n_layers=distance_prediction_n_layers,
                                      activation_name="shifted_softplus")

    # ------------------------------------------------------------------ parts
    @property
    def condition_names(self) -> list[str]:
        """Names of the conditions the model was trained on (``composition`` for the composition)."""
        return self.conditioning.condition_names if self.conditioning is not None else []

    def required_condition_keys(self) -> list[str]:
        return self.conditioning.required_keys if self.conditioning is not None else []

    def node_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Features of the prediction neighbours (representation ++ conditions).  [Q, F + C]"""
        geometry = pair_geometry(inputs, self.model_cutoff)
        x = self.representation(inputs, geometry)[SCALAR]  # [N, F]
        pred_j, pred_m = inputs[PRED_IDX_J], inputs[PRED_IDX_M]
        x = x.index_select(0, pred_j)
        if self.conditioning is not None:
            missing = [k for k in self.required_condition_keys() if k not in inputs]
            if missing:
                raise KeyError(f"the model is conditioned on {self.condition_names}; the batch lacks {missing}")
            c = self.conditioning(inputs)  # [S, C]
            x = torch.cat([x, c.to(x.dtype).index_select(0, pred_m)], dim=-1)
        return x

    def type_log_probs(self, features: torch.Tensor, pred_idx_m: torch.Tensor, n_steps: int) -> torch.Tensor:
        """Log-distribution of the next type (classes: ``atom_types + [stop]``).  [S, T+1]"""
        logp = F.log_softmax(self.type_net(features), dim=-1)
        summed = torch.zeros(n_steps, logp.shape[1], dtype=logp.dtype, device=logp.device).index_add_(0, pred_idx_m, logp)
        return F.log_softmax(summed, dim=-1)

    def distance_log_probs(self, features: torch.Tensor, next_z: torch.Tensor) -> torch.Tensor:
        """Log-distributions of the distance of the next atom (type ``next_z`` [Q']) to each node.  [Q', n_bins]"""
        emb = self.next_type_embedding(next_z)
        if self.n_cond:
            emb = F.pad(emb, (0, self.n_cond), value=1.0)
        return F.log_softmax(self.distance_net(features * emb), dim=-1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{log_p_type [S, T+1], log_p_distance [Q', n_bins]}`` for the steps whose next type is not stop."""
        feats = self.node_features(inputs)
        n_steps = int(inputs[keys.n_atoms].shape[0])
        pred_m = inputs[PRED_IDX_M]
        out = {LOG_P_TYPE: self.type_log_probs(feats, pred_m, n_steps)}
        next_z = inputs.get(NEXT_Z)
        if next_z is not None:
            nz = next_z.index_select(0, pred_m)
            keep = (nz != STOP_TYPE).nonzero().squeeze(1)
            out[LOG_P_DISTANCE] = self.distance_log_probs(feats.index_select(0, keep), nz.index_select(0, keep))
        return out


@register("cgschnet")
def build_cgschnet(**params: Any) -> nn.Module:
    """cG-SchNet generator (see :class:`ConditionalGenerativeSchNet`)."""
    return ConditionalGenerativeSchNet(**params)
