"""NeuralNetworkPotential: representation + output heads + prediction-time post-processing.

Energies: in training mode (``model.train()``) the ``energy`` output is the raw
network energy E_net. In evaluation mode it is

    E = scale * E_net + sum_i (atomref[Z_i] + mean_per_atom + shift_per_atom)

so forces and stress (autograd in :class:`spkserve.model.AtomisticModel`) are
scaled consistently. Training sets ``atomref``/``mean_per_atom`` with
:meth:`NeuralNetworkPotential.set_offsets` and ``scale``/``shift_per_atom`` with
:meth:`NeuralNetworkPotential.set_scale_shift`, and turns reference energies
into training targets with :meth:`NeuralNetworkPotential.normalize_energy`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from spkserve import keys
from spkserve.model import AtomisticModel
from spkserve.nn.geometry import _is_compiling, pair_geometry, scatter_sum


class NeuralNetworkPotential(AtomisticModel):
    """Input modules -> representation -> output heads -> post-processing.

    Args:
        representation: module ``(inputs, geometry) -> features`` with a ``cutoff`` attribute.
        outputs: heads ``(inputs, features, results) -> dict``, evaluated in order.
        input_modules: optional modules ``inputs -> inputs`` applied first (on a copy).
        postprocess: apply offsets/scaling in evaluation mode.
        cast_float64: return every output as float64.
        max_z: largest atomic number the ``atomref`` table covers.
    """

    def __init__(
        self,
        representation: nn.Module,
        outputs: Sequence[nn.Module],
        input_modules: Sequence[nn.Module] = (),
        postprocess: bool = True,
        cast_float64: bool = False,
        max_z: int = 100,
    ):
        super().__init__()
        if len(outputs) == 0:
            raise ValueError("a NeuralNetworkPotential needs at least one output head")
        self.representation = representation
        self.output_heads = nn.ModuleList(outputs)
        self.input_modules = nn.ModuleList(input_modules)
        self.postprocess = postprocess
        self.cast_float64 = cast_float64
        cutoffs = [float(representation.cutoff)] + [float(h.cutoff) for h in outputs if hasattr(h, "cutoff")]
        #: the neighbor-list cutoff the model needs (model length unit)
        self.cutoff = max(cutoffs)
        self.max_z = max_z
        self.register_buffer("atomref", torch.zeros(max_z + 1))
        self.register_buffer("mean_per_atom", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("shift_per_atom", torch.zeros(()))
        names: list[str] = []
        for h in outputs:
            for attr in ("output_key", "dipole_key", "charges_key", "polarizability_key", "per_atom_key"):
                v = getattr(h, attr, None)
                if isinstance(v, str):
                    names.append(v)
        self.extra_outputs = tuple(n for n in dict.fromkeys(names) if n != keys.energy)

    # ---- offsets and scaling (set by training) ---------------------------------
    def set_offsets(self, atomref: torch.Tensor | None, mean_per_atom: float = 0.0) -> None:
        """Set per-element reference energies ``atomref`` [max_z+1] (energy unit, indexed
        by Z) and a mean energy per atom, both added in evaluation mode."""
        if atomref is not None:
            atomref = torch.as_tensor(atomref, dtype=self.atomref.dtype).reshape(-1)
            if atomref.numel() > self.atomref.numel():
                if bool((atomref[self.atomref.numel():] != 0).any()):
                    raise ValueError(
                        f"atomref has {atomref.numel()} entries but the model supports Z <= {self.max_z}"
                    )
                atomref = atomref[: self.atomref.numel()]
            self.atomref.zero_()
            self.atomref[: atomref.numel()] = atomref.to(self.atomref.device)
        self.mean_per_atom.fill_(float(mean_per_atom))

    def set_scale_shift(self, scale: float = 1.0, shift_per_atom: float = 0.0) -> None:
        """Set the energy scale (multiplies the network energy) and a shift per atom."""
        if not scale > 0:
            raise ValueError(f"energy scale must be positive, got {scale}")
        self.scale.fill_(float(scale))
        self.shift_per_atom.fill_(float(shift_per_atom))

    def energy_offsets(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum_i (atomref[Z_i] + mean_per_atom + shift_per_atom) per system.  [S]"""
        Z = inputs[keys.Z]
        per_atom = self.atomref[Z] + (self.mean_per_atom + self.shift_per_atom)
        return scatter_sum(per_atom, inputs[keys.idx_m], inputs[keys.n_atoms].shape[0])

    def normalize_energy(self, energy: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Reference energies [S] -> targets for the training-mode output E_net
        (forces and stress are divided by ``scale``)."""
        return (energy - self.energy_offsets(inputs).to(energy.dtype)) / self.scale.to(energy.dtype)

    # ---- evaluation -------------------------------------------------------------
    def compute(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for m in self.input_modules:
            inputs = m(dict(inputs))
        geometry = pair_geometry(inputs, self.cutoff)
        features = dict(geometry)
        features.update(self.representation(inputs, geometry))
        results: dict[str, torch.Tensor] = {}
        for head in self.output_heads:
            results.update(head(inputs, features, results))
        if self.postprocess and not self.training and keys.energy in results:
            e = results[keys.energy]
            results[keys.energy] = e * self.scale.to(e.dtype) + self.energy_offsets(inputs).to(e.dtype)
        return results

    def forward(
        self,
        inputs: dict[str, torch.Tensor],
        properties: Sequence[str] = (keys.energy, keys.forces),
        create_graph: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Evaluate ``properties`` (see :meth:`AtomisticModel.forward`)."""
        wants_derivatives = keys.forces in properties or keys.stress in properties
        if not self._has_energy():
            if wants_derivatives:
                raise ValueError(
                    f"forces/stress need an energy output; this model predicts {list(self.extra_outputs)}"
                )
            results = self.compute(dict(inputs))
            results = {k: v for k, v in results.items() if k in properties}
        else:
            # memory-lean fused backward only when no graph of the derivatives is kept
            # (never inside torch.compile, which fuses by itself)
            toggle = hasattr(self.representation, "use_fused") and not _is_compiling()
            if toggle:
                self.representation.use_fused = not (create_graph or self.training)
            try:
                results = super().forward(inputs, properties, create_graph)
            finally:
                if toggle:
                    self.representation.use_fused = False
        if self.cast_float64:
            results = {k: v.double() for k, v in results.items()}
        return results

    def forward_functional(
        self, inputs: dict[str, torch.Tensor], properties: Sequence[str] = (keys.energy, keys.forces)
    ) -> dict[str, torch.Tensor]:
        """:meth:`AtomisticModel.forward_functional` with this model's float64 cast."""
        results = super().forward_functional(inputs, properties)
        if self.cast_float64:
            results = {k: v.double() for k, v in results.items()}
        return results

    def _has_energy(self) -> bool:
        return keys.energy in self.extra_outputs or any(
            getattr(h, "output_key", None) == keys.energy for h in self.output_heads
        )
