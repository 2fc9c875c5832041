"""Registered built-in architectures and convenience constructors.

Importing this module registers every built-in neural-network architecture with
:mod:`spkserve.registry`. All builders take plain JSON params. The composite
spec of a full model is::

    {"name": "neural_network_potential",
     "params": {
        "representation": {"name": "painn", "params": {"n_atom_basis": 128, "n_interactions": 3,
                                                      "n_rbf": 20, "cutoff_angstrom": 5.0}},
        "outputs": [{"name": "atomwise", "params": {"output_key": "energy"}},
                    {"name": "dipole_moment", "params": {"use_vector_representation": true}}],
        "input_modules": [],
        "postprocessors": {"postprocess": true, "cast_float64": false}}}

Heads get ``n_in`` from the representation's ``n_atom_basis`` unless given.
A field-aware representation (``field_schnet``) gives a
:class:`spkserve.nn.field_schnet.FieldResponsePotential`, whose ``dipole_moment``
and ``polarizability`` are -dE/dF and -d2E/dF2 (request them in ``properties``).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from spkserve import keys
from spkserve.registry import build, register
from spkserve.nn.electrostatics import ElectrostaticEnergy
from spkserve.nn.field_schnet import FieldResponsePotential, FieldSchNet
from spkserve.nn.outputs import Atomwise, DipoleMoment, EnergySum, Polarizability, ZBLRepulsion
from spkserve.nn.painn import PaiNN
from spkserve.nn.potential import NeuralNetworkPotential
from spkserve.nn.schnet import SchNet
from spkserve.nn.so3net import SO3net

_HEADS_WITH_N_IN = ("atomwise", "dipole_moment", "polarizability")


@register("schnet")
def build_schnet(**params: Any) -> nn.Module:
    """SchNet representation (see :class:`spkserve.nn.schnet.SchNet`)."""
    return SchNet(**params)


@register("painn")
def build_painn(**params: Any) -> nn.Module:
    """PaiNN representation (see :class:`spkserve.nn.painn.PaiNN`)."""
    return PaiNN(**params)


@register("so3net")
def build_so3net(**params: Any) -> nn.Module:
    """SO3net representation (see :class:`spkserve.nn.so3net.SO3net`)."""
    return SO3net(**params)


@register("field_schnet")
def build_field_schnet(**params: Any) -> nn.Module:
    """FieldSchNet representation (see :class:`spkserve.nn.field_schnet.FieldSchNet`)."""
    return FieldSchNet(**params)


@register("atomwise")
def build_atomwise(**params: Any) -> nn.Module:
    """Atomwise head (see :class:`spkserve.nn.outputs.Atomwise`)."""
    return Atomwise(**params)


@register("dipole_moment")
def build_dipole_moment(**params: Any) -> nn.Module:
    """Dipole head (see :class:`spkserve.nn.outputs.DipoleMoment`)."""
    return DipoleMoment(**params)


@register("polarizability")
def build_polarizability(**params: Any) -> nn.Module:
    """Polarizability head (see :class:`spkserve.nn.outputs.Polarizability`)."""
    return Polarizability(**params)


@register("zbl")
def build_zbl(**params: Any) -> nn.Module:
    """ZBL repulsion head (see :class:`spkserve.nn.outputs.ZBLRepulsion`)."""
    return ZBLRepulsion(**params)


@register("electrostatics")
def build_electrostatics(**params: Any) -> nn.Module:
    """Damped Coulomb / Ewald energy of latent charges (see :class:`spkserve.nn.electrostatics.ElectrostaticEnergy`)."""
    return ElectrostaticEnergy(**params)


@register("energy_sum")
def build_energy_sum(**params: Any) -> nn.Module:
    """Sum of energy terms (see :class:`spkserve.nn.outputs.EnergySum`)."""
    return EnergySum(**params)


def _check_spec(spec: Any, what: str) -> dict:
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"{what} must be a spec {{'name': ..., 'params': {{...}}}}, got {spec!r}")
    return spec


@register("neural_network_potential")
def build_neural_network_potential(
    representation: dict,
    outputs: list[dict],
    input_modules: list[dict] | None = None,
    postprocessors: dict | None = None,
) -> nn.Module:
    """Composite model from nested specs (see the module docstring)."""
    rep = build(_check_spec(representation, "representation"))
    n_in = getattr(rep, "n_atom_basis", None)
    if not isinstance(outputs, list) or not outputs:
        raise ValueError(f"outputs must be a non-empty list of head specs, got {outputs!r}")
    heads = []
    for spec in outputs:
        spec = copy.deepcopy(_check_spec(spec, "each output"))
        params = spec.setdefault("params", {}) or {}
        spec["params"] = params
        if spec["name"] in _HEADS_WITH_N_IN and "n_in" not in params:
            if n_in is None:
                raise ValueError(f"head {spec['name']!r} needs 'n_in' (the representation has no n_atom_basis)")
            params["n_in"] = n_in
        heads.append(build(spec))
    inputs = [build(_check_spec(s, "each input module")) for s in (input_modules or [])]
    post = dict(postprocessors or {})
    unknown = set(post) - {"postprocess", "cast_float64"}
    if unknown:
        raise ValueError(f"unknown postprocessors options {sorted(unknown)}; known: postprocess, cast_float64")
    kwargs = dict(
        representation=rep,
        outputs=heads,
        input_modules=inputs,
        postprocess=bool(post.get("postprocess", True)),
        cast_float64=bool(post.get("cast_float64", False)),
        max_z=int(getattr(rep, "max_z", 100)),
    )
    if hasattr(rep, "field_keys"):  # field-aware representation: responses are field derivatives
        return FieldResponsePotential(**kwargs)
    return NeuralNetworkPotential(**kwargs)


def _energy_spec(representation: dict, extra_outputs: list[dict] | None = None, **post: Any) -> dict:
    return {
        "name": "neural_network_potential",
        "params": {
            "representation": representation,
            "outputs": [{"name": "atomwise", "params": {"output_key": keys.energy}}] + list(extra_outputs or []),
            "postprocessors": {"postprocess": True, "cast_float64": False, **post},
        },
    }


def painn_energy_model(
    cutoff: float = 5.0,
    n_atom_basis: int = 128,
    n_interactions: int = 3,
    n_rbf: int = 20,
    radial_basis: str = "gaussian",
    cutoff_fn: str = "cosine",
    activation_name: str = "silu",
    max_z: int = 100,
) -> NeuralNetworkPotential:
    """PaiNN energy model built from a registered spec (``model.architecture_spec``)."""
    rep = {
        "name": "painn",
        "params": dict(
            n_atom_basis=n_atom_basis, n_interactions=n_interactions, n_rbf=n_rbf, cutoff_angstrom=cutoff,
            radial_basis=radial_basis, cutoff_fn=cutoff_fn, activation_name=activation_name, max_z=max_z,
        ),
    }
    return build(_energy_spec(rep))


def schnet_energy_model(
    cutoff: float = 5.0,
    n_atom_basis: int = 128,
    n_interactions: int = 6,
    n_rbf: int = 20,
    n_filters: int | None = None,
    radial_basis: str = "gaussian",
    cutoff_fn: str = "cosine",
    activation_name: str = "shifted_softplus",
    max_z: int = 100,
) -> NeuralNetworkPotential:
    """SchNet energy model built from a registered spec (``model.architecture_spec``)."""
    rep = {
        "name": "schnet",
        "params": dict(
            n_atom_basis=n_atom_basis, n_interactions=n_interactions, n_rbf=n_rbf, cutoff_angstrom=cutoff,
            n_filters=n_filters, radial_basis=radial_basis, cutoff_fn=cutoff_fn,
            activation_name=activation_name, max_z=max_z,
        ),
    }
    return build(_energy_spec(rep))
