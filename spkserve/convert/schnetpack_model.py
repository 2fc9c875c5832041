"""Convert a trained SchNetPack 2.x model file into a bundle, without SchNetPack.

SchNetPack saves a trained model (``best_model``, ``best_inference_model``) with
``torch.save(model)``: a pickle of the whole ``NeuralNetworkPotential``. This
module reads it with the restricted unpickler of
:mod:`spkserve.convert.torch_pickle` (no code from the file runs, ``schnetpack``
need not be installed), maps every supported SchNetPack module to this
project's architecture of the same mathematics, copies the weights (transposed
where the layouts differ), and writes a bundle.

Supported: representations SchNet and PaiNN (Gaussian, centred Gaussian or
Bessel radial basis; cosine or mollifier cutoff; shared or separate
interactions and filters), the ``Atomwise`` energy head with ``Forces`` (forces,
stress), ``DipoleMoment`` heads, input modules ``PairwiseDistances`` and
``Strain``, and the post-processors ``CastTo64``, ``AddOffsets`` (mean per atom
and atom references of the energy) and ``ScaleProperty`` (when energy and forces
are scaled alike). Anything else is refused with a message naming the module.

The file does not record units: positions are Å (SchNetPack's default) and the
energy unit is the one of the training data, read from the run's
``config.yaml`` / ``.hydra/config.yaml`` beside the model file when present,
otherwise it must be given (``energy_unit``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from spkserve import keys, units
from spkserve.convert.torch_pickle import DisallowedGlobalError, FunctionRef, ModelFileError, Record, load_records

_SPK = "schnetpack"
_NNP = f"{_SPK}.model.base.NeuralNetworkPotential"
_SCHNET = f"{_SPK}.representation.schnet.SchNet"
_PAINN = f"{_SPK}.representation.painn.PaiNN"
_ATOMWISE = f"{_SPK}.atomistic.atomwise.Atomwise"
_DIPOLE = f"{_SPK}.atomistic.atomwise.DipoleMoment"
_POLAR = f"{_SPK}.atomistic.atomwise.Polarizability"
_FORCES = f"{_SPK}.atomistic.response.Forces"
_DENSE = f"{_SPK}.nn.base.Dense"
_IDENTITY = "torch.nn.modules.linear.Identity"

#: classes admitted by the unpickler (as inert records)
CLASSES = frozenset({
    _NNP, _SCHNET, _PAINN, _ATOMWISE, _DIPOLE, _POLAR, _FORCES, _DENSE, _IDENTITY,
    f"{_SPK}.representation.schnet.SchNetInteraction",
    f"{_SPK}.representation.painn.PaiNNInteraction",
    f"{_SPK}.representation.painn.PaiNNMixing",
    f"{_SPK}.representation.so3net.SO3net",
    f"{_SPK}.nn.so3.RealSphericalHarmonics",
    f"{_SPK}.nn.so3.SO3TensorProduct",
    f"{_SPK}.nn.so3.SO3Convolution",
    f"{_SPK}.nn.so3.SO3ParametricGatedNonlinearity",
    "torch.nn.modules.linear.Linear",
    f"{_SPK}.atomistic.distances.PairwiseDistances",
    f"{_SPK}.atomistic.response.Strain",
    f"{_SPK}.nn.radial.GaussianRBF",
    f"{_SPK}.nn.radial.GaussianRBFCentered",
    f"{_SPK}.nn.radial.BesselRBF",
    f"{_SPK}.nn.cutoff.CosineCutoff",
    f"{_SPK}.nn.cutoff.MollifierCutoff",
    f"{_SPK}.nn.activations.ShiftedSoftplus",
    f"{_SPK}.nn.equivariant.GatedEquivariantBlock",
    f"{_SPK}.transform.casting.CastTo64",
    f"{_SPK}.transform.casting.CastTo32",
    f"{_SPK}.transform.atomistic.AddOffsets",
    f"{_SPK}.transform.atomistic.ScaleProperty",
    "torch.nn.modules.container.ModuleList",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.sparse.Embedding",
    "torch.nn.modules.activation.SiLU",
    "torch.nn.modules.activation.Tanh",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.activation.Softplus",
    "torch.nn.modules.activation.GELU",
})

#: functions that appear as attribute values (activations) -> our activation names
_ACTIVATION_FUNCTIONS = {
    f"{_SPK}.nn.activations.shifted_softplus": "shifted_softplus",
    "torch.nn.functional.silu": "silu",
    "torch.nn.functional.softplus": "softplus",
    "torch.nn.functional.relu": "relu",
    "torch.relu": "relu",
    "torch.nn.functional.tanh": "tanh",
    "torch.tanh": "tanh",
    "torch.nn.functional.gelu": "gelu",
}
_ACTIVATION_MODULES = {
    "torch.nn.modules.activation.SiLU": "silu",
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.GELU": "gelu",
}
#: weight initialisers stored on every Dense layer (never called)
_INITIALISERS = {
    f"torch.nn.init.{n}" for n in (
        "xavier_uniform_", "xavier_normal_", "zeros_", "ones_", "normal_", "uniform_",
        "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "constant_",
    )
}
FUNCTIONS = frozenset(_ACTIVATION_FUNCTIONS) | frozenset(_INITIALISERS)

SUPPORTED = (
    "representations SchNet, PaiNN, SO3net; heads Atomwise (energy), Forces, DipoleMoment, Polarizability; input modules "
    "PairwiseDistances, Strain; post-processors CastTo64, AddOffsets, ScaleProperty"
)


class ConversionError(ModelFileError):
    """The model file holds something the converter cannot map; the message names it."""


# ---- small readers ------------------------------------------------------------------
def _is(rec: Any, cls: str) -> bool:
    return isinstance(rec, Record) and rec.class_name == cls


def _short(rec: Any) -> str:
    return rec.class_name if isinstance(rec, Record) else type(rec).__name__


def _expect(rec: Any, cls: str, what: str) -> Record:
    if not _is(rec, cls):
        raise ConversionError(f"{what} is {_short(rec)}, expected {cls}")
    return rec


def _activation(value: Any, what: str) -> str | None:
    """Our activation name for a pickled activation (function, module, or identity)."""
    if value is None or _is(value, _IDENTITY):
        return None
    if isinstance(value, FunctionRef):
        if value.name in _ACTIVATION_FUNCTIONS:
            return _ACTIVATION_FUNCTIONS[value.name]
        raise ConversionError(f"{what}: activation {value.name} is not supported")
    if isinstance(value, Record):
        if value.class_name in _ACTIVATION_MODULES:
            return _ACTIVATION_MODULES[value.class_name]
        if value.class_name == "torch.nn.modules.activation.Softplus":
            if float(value.get("beta", 1.0)) != 1.0 or float(value.get("threshold", 20.0)) != 20.0:
                raise ConversionError(f"{what}: Softplus with beta != 1 or threshold != 20 is not supported")
            return "softplus"
        if value.class_name == f"{_SPK}.nn.activations.ShiftedSoftplus":
            a, b = value.tensor("alpha"), value.tensor("beta")
            if a.numel() == 1 and b.numel() == 1 and float(a) == 1.0 and float(b) == 1.0:
                return "shifted_softplus"
            raise ConversionError(f"{what}: ShiftedSoftplus with alpha/beta other than 1 is not supported")
    raise ConversionError(f"{what}: activation {_short(value)} is not supported")


def _dense(rec: Any, what: str) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
    """(weight [out, in], bias [out] or None, activation name) of a Dense/Linear layer."""
    if not (_is(rec, _DENSE) or _is(rec, "torch.nn.modules.linear.Linear")):
        raise ConversionError(f"{what} is {_short(rec)}, expected a schnetpack Dense layer")
    act = _activation(rec.get("activation"), what) if _is(rec, _DENSE) else None
    return rec.tensor("weight"), rec.param("bias"), act


def _mlp(rec: Any, what: str) -> tuple[list[int], str | None, dict[str, torch.Tensor]]:
    """Widths [n_in, h..., n_out], hidden activation and our ``net.k.*`` tensors of a Dense stack."""
    layers = rec.children() if _is(rec, "torch.nn.modules.container.Sequential") else None
    if not layers:
        raise ConversionError(f"{what} is {_short(rec)}, expected a Sequential of Dense layers")
    widths, acts, tensors = [], [], {}
    for k, layer in enumerate(layers):
        w, b, act = _dense(layer, f"{what} layer {k}")
        if b is None:
            raise ConversionError(f"{what} layer {k} has no bias (not supported)")
        if widths and widths[-1] != w.shape[1]:
            raise ConversionError(f"{what}: layer {k} takes {w.shape[1]} inputs, the previous gives {widths[-1]}")
        if not widths:
            widths.append(int(w.shape[1]))
        widths.append(int(w.shape[0]))
        acts.append(act)
        tensors[f"net.{k}.weight"], tensors[f"net.{k}.bias"] = w, b
    if acts[-1] is not None:
        raise ConversionError(f"{what}: the last layer has an activation ({acts[-1]}), which is not supported")
    hidden = set(acts[:-1])
    if len(hidden) > 1:
        raise ConversionError(f"{what}: hidden layers use different activations {sorted(map(str, hidden))}")
    return widths, (acts[0] if len(acts) > 1 else "silu"), tensors


def _scalar(t: torch.Tensor, what: str) -> float:
    if t.numel() != 1:
        raise ConversionError(f"{what} must be a single value, got shape {tuple(t.shape)}")
    return float(t.reshape(()))


# ---- representation -----------------------------------------------------------------
@dataclass
class _Rep:
    spec: dict
    tensors: dict[str, torch.Tensor]
    n_atom_basis: int
    cutoff: float
    max_z: int


def _radial(rep: Record, what: str) -> tuple[str, int, dict[str, torch.Tensor]]:
    rbf = rep.child("radial_basis")
    names = {
        f"{_SPK}.nn.radial.GaussianRBF": ("gaussian", ("offsets", "widths")),
        f"{_SPK}.nn.radial.GaussianRBFCentered": ("gaussian_centered", ("offsets", "widths")),
        f"{_SPK}.nn.radial.BesselRBF": ("bessel", ("freqs",)),
    }
    if not isinstance(rbf, Record) or rbf.class_name not in names:
        raise ConversionError(f"{what}: radial basis {_short(rbf)} is not supported (Gaussian, GaussianRBFCentered, Bessel)")
    name, tensor_names = names[rbf.class_name]
    tensors = {f"radial_basis.{n}": rbf.tensor(n) for n in tensor_names}
    n_rbf = int(next(iter(tensors.values())).numel())
    return name, n_rbf, tensors


def _cutoff(rep: Record, what: str) -> tuple[str, float]:
    fn = rep.child("cutoff_fn")
    if _is(fn, f"{_SPK}.nn.cutoff.CosineCutoff"):
        return "cosine", _scalar(fn.tensor("cutoff"), f"{what} cutoff")
    if _is(fn, f"{_SPK}.nn.cutoff.MollifierCutoff"):
        eps = _scalar(fn.tensor("eps"), f"{what} mollifier eps")
        if abs(eps - 1.0e-7) > 1e-12:
            raise ConversionError(f"{what}: mollifier cutoff with eps={eps} is not supported (only 1e-7)")
        return "mollifier", _scalar(fn.tensor("cutoff"), f"{what} cutoff")
    raise ConversionError(f"{what}: cutoff function {_short(fn)} is not supported (CosineCutoff, MollifierCutoff)")


def _embedding(rep: Record, what: str) -> tuple[torch.Tensor, int]:
    emb = rep.child("embedding")
    if not _is(emb, "torch.nn.modules.sparse.Embedding"):
        raise ConversionError(f"{what}: nuclear embedding {_short(emb)} is not supported (only nn.Embedding)")
    elec = rep._section("_modules").get("electronic_embeddings")
    if elec is not None and elec.children():
        raise ConversionError(f"{what}: electronic (charge/spin) embeddings are not supported")
    w = emb.tensor("weight")
    return w, int(w.shape[0]) - 1


def _blocks(rep: Record, name: str, what: str) -> tuple[list[Record], bool]:
    """The blocks of a ModuleList and whether they are one shared module."""
    blocks = rep.child(name).children()
    if not blocks:
        raise ConversionError(f"{what} has no {name}")
    shared = len(blocks) > 1 and all(b is blocks[0] for b in blocks)
    return blocks, shared


def _schnet(rep: Record) -> _Rep:
    what = "SchNet"
    emb, max_z = _embedding(rep, what)
    rbf_name, n_rbf, rbf_t = _radial(rep, what)
    cut_name, cutoff = _cutoff(rep, what)
    blocks, _ = _blocks(rep, "interactions", what)
    F, nf = int(emb.shape[1]), int(rep.get("n_filters", emb.shape[1]))
    stacks: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "filter_w1", "filter_b1", "filter_w2", "filter_b2", "in2f_w", "out1_w", "out1_b", "out2_w", "out2_b")}
    act = None
    for k, blk in enumerate(blocks):
        where = f"{what} interaction {k}"
        _expect(blk, f"{_SPK}.representation.schnet.SchNetInteraction", where)
        w_in, b_in, a_in = _dense(blk.child("in2f"), f"{where} in2f")
        if b_in is not None or a_in is not None:
            raise ConversionError(f"{where}: in2f with bias or activation is not supported")
        f1, f2 = blk.child("filter_network").children(), blk.child("f2out").children()
        if len(f1) != 2 or len(f2) != 2:
            raise ConversionError(f"{where}: filter network and f2out must have two Dense layers each")
        (w1, b1, a1), (w2, b2, a2) = _dense(f1[0], f"{where} filter 0"), _dense(f1[1], f"{where} filter 1")
        (w3, b3, a3), (w4, b4, a4) = _dense(f2[0], f"{where} f2out 0"), _dense(f2[1], f"{where} f2out 1")
        if a2 is not None or a4 is not None or a1 != a3 or a1 is None:
            raise ConversionError(f"{where}: unsupported activations ({a1}, {a2}, {a3}, {a4})")
        if act is not None and a1 != act:
            raise ConversionError(f"{what}: interactions use different activations ({act}, {a1})")
        act = a1
        for b in (b1, b2, b3, b4):
            if b is None:
                raise ConversionError(f"{where}: a Dense layer without bias is not supported")
        stacks["filter_w1"].append(w1.t())
        stacks["filter_b1"].append(b1[None, :])
        stacks["filter_w2"].append(w2.t())
        stacks["filter_b2"].append(b2[None, :])
        stacks["in2f_w"].append(w_in.t())
        stacks["out1_w"].append(w3.t())
        stacks["out1_b"].append(b3)
        stacks["out2_w"].append(w4.t())
        stacks["out2_b"].append(b4)
    tensors = {k: torch.stack(v) for k, v in stacks.items()}
    tensors["embedding.weight"] = emb
    tensors.update(rbf_t)
    params = dict(
        n_atom_basis=F, n_interactions=len(blocks), n_rbf=n_rbf, cutoff_angstrom=cutoff, n_filters=nf,
        radial_basis=rbf_name, cutoff_fn=cut_name, shared_filters=False, activation_name=act, max_z=max_z,
    )
    return _Rep({"name": "schnet", "params": params}, tensors, F, cutoff, max_z)


def _painn(rep: Record) -> _Rep:
    what = "PaiNN"
    emb, max_z = _embedding(rep, what)
    rbf_name, n_rbf, rbf_t = _radial(rep, what)
    cut_name, cutoff = _cutoff(rep, what)
    inter, shared_i = _blocks(rep, "interactions", what)
    mixing, shared_m = _blocks(rep, "mixing", what)
    if len(inter) != len(mixing) or shared_i != shared_m:
        raise ConversionError(f"{what}: interaction and mixing blocks do not pair up")
    F = int(emb.shape[1])
    n_int = len(inter)
    shared_filters = bool(rep.get("share_filters", False))
    wf, bf, af = _dense(rep.child("filter_net"), f"{what} filter_net")
    if af is not None or bf is None:
        raise ConversionError(f"{what}: filter_net must be a linear Dense layer with bias")
    tensors = {"embedding.weight": emb, "filter_net.weight": wf, "filter_net.bias": bf, **rbf_t}
    act, eps = None, None
    n_blocks = 1 if shared_i else n_int
    for k in range(n_blocks):
        where = f"{what} block {k}"
        blk = _expect(inter[k], f"{_SPK}.representation.painn.PaiNNInteraction", where)
        mix = _expect(mixing[k], f"{_SPK}.representation.painn.PaiNNMixing", where)
        for src, dst, r in (("interatomic_context_net", "interactions", blk), ("intraatomic_context_net", "mixing", mix)):
            layers = r.child(src).children()
            if len(layers) != 2:
                raise ConversionError(f"{where}: {src} must have two Dense layers")
            (w1, b1, a1), (w2, b2, a2) = _dense(layers[0], f"{where} {src} 0"), _dense(layers[1], f"{where} {src} 1")
            if a2 is not None or a1 is None or (act is not None and a1 != act) or b1 is None or b2 is None:
                raise ConversionError(f"{where}: unsupported {src} (activations {a1}, {a2})")
            act = a1
            tensors[f"{dst}.{k}.context.0.weight"], tensors[f"{dst}.{k}.context.0.bias"] = w1, b1
            tensors[f"{dst}.{k}.context.1.weight"], tensors[f"{dst}.{k}.context.1.bias"] = w2, b2
        wm, bm, am = _dense(mix.child("mu_channel_mix"), f"{where} mu_channel_mix")
        if bm is not None or am is not None:
            raise ConversionError(f"{where}: mu_channel_mix with bias or activation is not supported")
        tensors[f"mixing.{k}.mu_mix.weight"] = wm
        e = float(mix.get("epsilon", 1e-8))
        if eps is not None and e != eps:
            raise ConversionError(f"{what}: mixing blocks use different epsilon values")
        eps = e
    expected = (1 if shared_filters else n_int) * 3 * F
    if wf.shape[0] != expected:
        raise ConversionError(f"{what}: filter_net gives {wf.shape[0]} filters, expected {expected}")
    params = dict(
        n_atom_basis=F, n_interactions=n_int, n_rbf=n_rbf, cutoff_angstrom=cutoff, radial_basis=rbf_name,
        cutoff_fn=cut_name, activation_name=act, shared_interactions=shared_i, shared_filters=shared_filters,
        epsilon=eps, max_z=max_z,
    )
    return _Rep({"name": "painn", "params": params}, tensors, F, cutoff, max_z)


def _linear(rec: Any, what: str, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not _is(rec, "torch.nn.modules.linear.Linear"):
        raise ConversionError(f"{what} is {_short(rec)}, expected torch.nn.Linear")
    b = rec.param("bias")
    if (b is not None) != bias:
        raise ConversionError(f"{what}: expected a Linear layer {'with' if bias else 'without'} bias")
    return rec.tensor("weight"), b


def _so3net(rep: Record) -> _Rep:
    what = "SO3net"
    emb, max_z = _embedding(rep, what)
    rbf_name, n_rbf, rbf_t = _radial(rep, what)
    cut_name, cutoff = _cutoff(rep, what)
    lmax = int(rep.get("lmax", -1))
    if lmax not in (1, 2):
        raise ConversionError(f"{what}: lmax={lmax} is not supported (1 or 2)")
    convs, shared = _blocks(rep, "so3convs", what)
    groups = {n: _blocks(rep, n, what) for n in ("mixings1", "mixings2", "mixings3", "gatings")}
    if any(len(b) != len(convs) or sh != shared for b, sh in groups.values()):
        raise ConversionError(f"{what}: convolution, mixing and gating blocks do not pair up")
    F, n_int = int(emb.shape[1]), len(convs)
    tensors = {"embedding.weight": emb, **rbf_t}
    filt_w, filt_b = [], []
    for k in range(n_int):
        where = f"{what} block {k}"
        conv = _expect(convs[k], f"{_SPK}.nn.so3.SO3Convolution", f"{where} convolution")
        w, b, a = _dense(conv.child("filternet"), f"{where} filternet")
        if a is not None or b is None or w.shape != (F * (lmax + 1), n_rbf):
            raise ConversionError(f"{where}: unexpected filter network {tuple(w.shape)}")
        filt_w.append(w)
        filt_b.append(b)
        if shared and k > 0:
            continue
        for n, dst in (("mixings1", "mix1"), ("mixings2", "mix2"), ("mixings3", "mix3")):
            tensors[f"blocks.{k}.{dst}.weight"], _ = _linear(groups[n][0][k], f"{where} {n}", bias=False)
        gate = _expect(groups["gatings"][0][k], f"{_SPK}.nn.so3.SO3ParametricGatedNonlinearity", f"{where} gating")
        tensors[f"blocks.{k}.gate.weight"], tensors[f"blocks.{k}.gate.bias"] = _linear(
            gate.child("scaling"), f"{where} gating", bias=True)
    tensors["filter_net.weight"] = torch.cat(filt_w, 0)
    tensors["filter_net.bias"] = torch.cat(filt_b, 0)
    params = dict(
        n_atom_basis=F, n_interactions=n_int, lmax=lmax, n_rbf=n_rbf, cutoff_angstrom=cutoff,
        radial_basis=rbf_name, cutoff_fn=cut_name, shared_interactions=shared, parity_invariant=True,
        max_z=max_z, convention="schnetpack",
    )
    return _Rep({"name": "so3net", "params": params}, tensors, F, cutoff, max_z)


_REPRESENTATIONS = {_SCHNET: _schnet, _PAINN: _painn, f"{_SPK}.representation.so3net.SO3net": _so3net}


# ---- heads ----------------------------------------------------------------------------
def _atomwise(head: Record, k: int, output_key: str) -> tuple[dict, dict[str, torch.Tensor]]:
    what = f"output module {k} (Atomwise {head.get('output_key')!r})"
    widths, act, tensors = _mlp(head.child("outnet"), what)
    mode = head.get("aggregation_mode", "sum")
    agg = {"sum": "sum", "avg": "mean"}.get(mode)
    if agg is None:
        raise ConversionError(f"{what}: aggregation_mode {mode!r} is not supported (sum, avg)")
    params = dict(n_in=widths[0], n_out=widths[-1], n_hidden=widths[1:-1], n_layers=len(widths) - 1,
                  activation_name=act, aggregation=agg, output_key=output_key)
    return {"name": "atomwise", "params": params}, {f"output_heads.{k}.{n}": t for n, t in tensors.items()}


def _gated_mlp(rec: Any, what: str) -> tuple[list[int], list[int], str, dict[str, torch.Tensor]]:
    """Widths, gating widths, activation and our ``net.k.*`` tensors of a gated equivariant stack."""
    blocks = rec.children() if _is(rec, "torch.nn.modules.container.Sequential") else None
    if not blocks:
        raise ConversionError(f"{what} is {_short(rec)}, expected a Sequential of GatedEquivariantBlocks")
    widths, gating, tensors, act = [], [], {}, None
    for k, blk in enumerate(blocks):
        where = f"{what} block {k}"
        _expect(blk, f"{_SPK}.nn.equivariant.GatedEquivariantBlock", where)
        n_sin, n_vin, n_sout, n_vout = (int(blk.get(n, -1)) for n in ("n_sin", "n_vin", "n_sout", "n_vout"))
        if n_sin != n_vin or n_sout != n_vout or (widths and widths[-1] != n_sin):
            raise ConversionError(f"{where}: scalar and vector widths differ ({n_sin}, {n_vin} -> {n_sout}, {n_vout})")
        wv, bv, av = _dense(blk.child("mix_vectors"), f"{where} mix_vectors")
        layers = blk.child("scalar_net").children()
        if bv is not None or av is not None or len(layers) != 2:
            raise ConversionError(f"{where}: unsupported layout of mix_vectors / scalar_net")
        (w1, b1, a1), (w2, b2, a2) = _dense(layers[0], f"{where} scalar_net 0"), _dense(layers[1], f"{where} scalar_net 1")
        if a1 is None or a2 is not None or (act is not None and a1 != act) or b1 is None or b2 is None:
            raise ConversionError(f"{where}: unsupported activations in scalar_net ({a1}, {a2})")
        act = a1
        last = k == len(blocks) - 1
        sact = _activation(blk.get("sactivation"), f"{where} sactivation")
        if (last and sact is not None) or (not last and sact != act):
            raise ConversionError(f"{where}: scalar output activation {sact} is not supported here")
        if not widths:
            widths.append(n_sin)
        widths.append(n_sout)
        gating.append(int(w1.shape[0]))
        tensors[f"net.{k}.mix_vectors.weight"] = wv
        tensors[f"net.{k}.scalar_net.0.weight"], tensors[f"net.{k}.scalar_net.0.bias"] = w1, b1
        tensors[f"net.{k}.scalar_net.1.weight"], tensors[f"net.{k}.scalar_net.1.bias"] = w2, b2
    return widths, gating, act, tensors


def _dipole(head: Record, k: int) -> tuple[dict, dict[str, torch.Tensor]]:
    what = f"output module {k} (DipoleMoment)"
    if not head.get("correct_charges", True):
        raise ConversionError(
            f"{what}: correct_charges=False is not supported (SchNetPack's dipole then depends on the origin)"
        )
    vector = bool(head.get("use_vector_representation", False))
    params: dict[str, Any]
    if vector:
        widths, gating, act, tensors = _gated_mlp(head.child("outnet"), what)
        params = dict(n_gating_hidden=gating, epsilon=0.0)
    else:
        widths, act, tensors = _mlp(head.child("outnet"), what)
        params = {}
    params.update(n_in=widths[0], n_hidden=widths[1:-1], n_layers=len(widths) - 1, activation_name=act,
                  use_vector_representation=vector, predict_magnitude=bool(head.get("predict_magnitude", False)),
                  dipole_key=keys.dipole_moment, charges_key=keys.partial_charges)
    return {"name": "dipole_moment", "params": params}, {f"output_heads.{k}.{n}": t for n, t in tensors.items()}


def _polarizability(head: Record, k: int) -> tuple[dict, dict[str, torch.Tensor]]:
    what = f"output module {k} (Polarizability)"
    widths, gating, act, tensors = _gated_mlp(head.child("outnet"), what)
    params = dict(n_in=widths[0], n_hidden=widths[1:-1], n_layers=len(widths) - 1, activation_name=act,
                  n_gating_hidden=gating, epsilon=0.0, centre_positions=False,
                  polarizability_key=keys.polarizability)
    return {"name": "polarizability", "params": params}, {f"output_heads.{k}.{n}": t for n, t in tensors.items()}


# ---- the whole model -----------------------------------------------------------------
@dataclass
class ConvertedModel:
    """The bundle contents made from a SchNetPack model file."""

    architecture: dict
    tensors: dict[str, torch.Tensor]
    cutoff: float
    max_z: int
    outputs: list[str]
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)
    spk_version: str | None = None
    #: our output name -> SchNetPack's output key (to look up units in the run config)
    spk_keys: dict[str, str] = field(default_factory=dict)


def _offsets(post: Sequence[Any], energy_key: str, forces_key: str | None, stress_key: str | None, n_z: int) -> tuple[float, torch.Tensor, float, bool, list[str]]:
    """Fold the post-processors into E = scale * E_net + sum_i (atomref[Z_i] + mean)."""
    scale, mean = 1.0, 0.0
    atomref = torch.zeros(n_z, dtype=torch.float64)
    cast64, notes = False, []
    scaled: dict[str, float] = {}
    for k, pp in enumerate(post):
        what = f"post-processor {k} ({_short(pp)})"
        if _is(pp, f"{_SPK}.transform.casting.CastTo64"):
            cast64 = True
        elif _is(pp, f"{_SPK}.transform.casting.CastTo32"):
            raise ConversionError(f"{what}: CastTo32 as a post-processor is not supported; remove it or convert with --dtype float32")
        elif _is(pp, f"{_SPK}.transform.atomistic.AddOffsets"):
            prop = pp.get("_property")
            if prop != energy_key:
                raise ConversionError(f"{what}: offsets of {prop!r} are not supported (only of the energy {energy_key!r})")
            if not pp.get("is_extensive", True):
                raise ConversionError(f"{what}: offsets of a non-extensive energy are not supported")
            if pp.get("add_mean", False):
                mean += _scalar(pp.tensor("mean").double(), f"{what} mean")
                notes.append(f"energy mean per atom {mean:.10g} added")
            if pp.get("add_atomrefs", False):
                ref = pp.tensor("atomref").double().reshape(-1)
                if ref.numel() > n_z:
                    if bool((ref[n_z:] != 0).any()):
                        raise ConversionError(f"{what}: atom references for Z >= {n_z} but the embedding covers Z < {n_z}")
                    ref = ref[:n_z]
                atomref[: ref.numel()] += ref
                notes.append(f"atom references of Z={[int(z) for z in ref.nonzero().flatten()]} added")
        elif _is(pp, f"{_SPK}.transform.atomistic.ScaleProperty"):
            src, dst = pp.get("input_key"), pp.get("output_key")
            s = _scalar(pp.tensor("scale").double(), f"{what} scale")
            if src != dst or src not in (energy_key, forces_key, stress_key):
                raise ConversionError(
                    f"{what}: scaling {src!r} into {dst!r} is not supported (only energy, forces and stress in place)"
                )
            if src in scaled:
                raise ConversionError(f"{what}: {src!r} is scaled twice")
            scaled[src] = s
            if src == energy_key:  # offsets added before the scaling are scaled too
                mean, atomref = mean * s, atomref * s
        else:
            raise ConversionError(f"{what} is not supported ({SUPPORTED})")
    if scaled:
        se = scaled.get(energy_key)
        sf = scaled.get(forces_key) if forces_key is not None else se  # no Forces module: nothing to scale
        if se is None or sf is None or abs(se - sf) > 1e-12 * abs(se):
            raise ConversionError(
                f"ScaleProperty scales energy by {se} and forces by {sf}: forces are then not -dE/dR and "
                "this project's models cannot reproduce that; scale both alike"
            )
        ss = scaled.get(stress_key)
        if ss is not None and abs(ss - se) > 1e-12 * abs(se):
            raise ConversionError(f"ScaleProperty scales energy by {se} but stress by {ss}; scale both alike")
        if ss is None and stress_key is not None:
            notes.append(
                f"energy and forces scaled by {se:.10g}; SchNetPack leaves the stress unscaled in this model, "
                "the bundle's stress is the strain derivative of the scaled energy"
            )
        scale = se
    return scale, atomref, mean, cast64, notes


def convert_records(root: Any, energy_key: str | None = None) -> ConvertedModel:
    """Map an unpickled SchNetPack model (its :class:`Record` tree) to our architecture and weights."""
    nnp = _expect(root, _NNP, "the model file's object")
    rep_rec = nnp.child("representation")
    builder = _REPRESENTATIONS.get(getattr(rep_rec, "class_name", ""))
    if builder is None:
        raise ConversionError(f"representation {_short(rep_rec)} is not supported ({SUPPORTED})")
    rep = builder(rep_rec)
    allowed_inputs = {f"{_SPK}.atomistic.distances.PairwiseDistances", f"{_SPK}.atomistic.response.Strain"}
    for k, m in enumerate(nnp.child("input_modules").children()):
        if getattr(m, "class_name", None) not in allowed_inputs:
            raise ConversionError(f"input module {k} {_short(m)} is not supported ({SUPPORTED})")
    heads = nnp.child("output_modules").children()
    forces = [h for h in heads if _is(h, _FORCES)]
    if energy_key is None:
        atomwise = [h.get("output_key") for h in heads if _is(h, _ATOMWISE)]
        if forces:
            energy_key = forces[0].get("energy_key", "energy")
        elif len(atomwise) == 1:  # an energy model without forces (e.g. qm9_atomwise's energy_U0)
            energy_key = atomwise[0]
        else:
            energy_key = "energy"
    if not any(_is(h, _ATOMWISE) for h in heads):
        raise ConversionError(
            "the model has no Atomwise energy head: a bundle always predicts an energy, so models of other "
            f"properties alone (e.g. qm9_dipole) cannot be converted (heads: {[_short(h) for h in heads]})"
        )
    forces_key = forces[0].get("force_key", "forces") if forces else None
    stress_key = forces[0].get("stress_key", "stress") if forces else None
    head_specs, tensors, outputs = [], {}, []
    spk_keys = {keys.energy: energy_key, keys.forces: forces_key or "forces"}
    for k, h in enumerate(heads):
        if _is(h, _FORCES):
            if h.get("energy_key") != energy_key:
                raise ConversionError(f"output module {k} (Forces) differentiates {h.get('energy_key')!r}, not {energy_key!r}")
            continue
        idx = len(head_specs)
        if _is(h, _ATOMWISE):
            if h.get("output_key") != energy_key:
                raise ConversionError(
                    f"output module {k} (Atomwise {h.get('output_key')!r}) is not the energy {energy_key!r}; "
                    "only energy Atomwise heads are supported (choose another with --energy-key)"
                )
            if h.get("per_atom_output_key"):
                raise ConversionError(f"output module {k}: per_atom_output_key is not supported")
            spec, t = _atomwise(h, idx, keys.energy)
            if spec["params"]["n_out"] != 1 or spec["params"]["aggregation"] != "sum":
                raise ConversionError(f"output module {k}: an energy head must be a sum of one value per atom")
        elif _is(h, _DIPOLE):
            if keys.dipole_moment in outputs:
                raise ConversionError(f"output module {k}: a second DipoleMoment head is not supported")
            spec, t = _dipole(h, idx)
            outputs.append(keys.dipole_moment)
            spk_keys[keys.dipole_moment] = h.get("dipole_key", "dipole_moment")
        elif _is(h, _POLAR):
            if keys.polarizability in outputs:
                raise ConversionError(f"output module {k}: a second Polarizability head is not supported")
            spec, t = _polarizability(h, idx)
            outputs.append(keys.polarizability)
            spk_keys[keys.polarizability] = h.get("polarizability_key", "polarizability")
        else:
            raise ConversionError(f"output module {k} {_short(h)} is not supported ({SUPPORTED})")
        head_specs.append(spec)
        tensors.update(t)
    if not any(s["name"] == "atomwise" for s in head_specs):
        raise ConversionError(f"the model has no Atomwise head for the energy {energy_key!r}")
    outputs = [keys.energy, keys.forces, keys.stress] + outputs
    n_z = rep.max_z + 1
    if nnp.get("do_postprocessing", True):
        scale, atomref, mean, cast64, notes = _offsets(
            nnp.child("postprocessors").children(), energy_key, forces_key, stress_key, n_z)
    else:
        scale, atomref, mean, cast64, notes = 1.0, torch.zeros(n_z, dtype=torch.float64), 0.0, False, [
            "do_postprocessing=False in the file: offsets and scaling are not applied (as in SchNetPack)"]
    for name, t in rep.tensors.items():
        tensors[f"representation.{name}"] = t
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    dtype = torch.float64 if torch.float64 in float_dtypes else torch.float32
    tensors = {n: (t.to(dtype) if t.is_floating_point() else t) for n, t in tensors.items()}
    tensors["atomref"] = atomref.to(dtype)
    tensors["mean_per_atom"] = torch.tensor(mean, dtype=dtype)
    tensors["scale"] = torch.tensor(scale, dtype=dtype)
    tensors["shift_per_atom"] = torch.zeros((), dtype=dtype)
    arch = {"name": "neural_network_potential", "params": {
        "representation": rep.spec,
        "outputs": head_specs,
        "input_modules": [],
        "postprocessors": {"postprocess": bool(nnp.get("do_postprocessing", True)), "cast_float64": cast64},
    }}
    return ConvertedModel(arch, tensors, rep.cutoff, rep.max_z, outputs, dtype, notes, nnp.get("spk_version"), spk_keys)


def read_schnetpack_model(path: str | Path, energy_key: str | None = None) -> ConvertedModel:
    """Read a SchNetPack model file safely and map it (see :func:`convert_records`)."""
    try:
        root = load_records(path, CLASSES, FUNCTIONS)
    except DisallowedGlobalError as err:
        if err.name.startswith(_SPK + "."):
            raise ConversionError(
                f"{path}: the model uses the SchNetPack class {err.name!r}, which the converter does not support "
                f"({SUPPORTED}); the file was not executed"
            ) from err
        raise
    return convert_records(root, energy_key)


def _units_from_run_config(model_path: Path) -> tuple[str | None, dict[str, str], Path | None]:
    """(distance unit, property units by SchNetPack key, config path) from the SchNetPack run's
    ``config.yaml`` (saved unresolved in the run directory) or ``.hydra/config.yaml`` beside the
    model file, if present. Interpolations are resolved where possible; unresolvable ones are skipped."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for cand in (model_path.parent / "config.yaml", model_path.parent / ".hydra" / "config.yaml"):
        if not cand.is_file():
            continue
        try:
            cfg = OmegaConf.load(cand)
        except (OmegaConfBaseException, ValueError, OSError):
            continue

        def get(key: str):
            try:
                value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=True)
            except OmegaConfBaseException:
                return None
            return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

        node = OmegaConf.select(cfg, "data.property_units", default=None, throw_on_resolution_failure=False)
        props = {}
        for k in (node.keys() if OmegaConf.is_dict(node) else ()):
            v = get(f"data.property_units.{k}")
            if v is not None:
                props[str(k)] = str(v)
        length = get("data.distance_unit")
        return (str(length) if length is not None else None), props, cand
    return None, {}, None


def _polarizability_unit(unit: str) -> str:
    """A polarizability unit as charge^2 length^2 / energy: a volume (Gaussian convention,
    e.g. ``Bohr^3``) is 4 pi eps0 times that volume, which is ``e^2*Bohr^2/Hartree`` per Bohr^3."""
    try:
        if units.dimension(unit) == units.dimension("Bohr^3"):
            return f"{units.factor(unit, 'Bohr^3')!r}*e^2*Bohr^2/Hartree"
        units.check_dimension(unit, "e^2*Bohr^2/Hartree")
    except units.UnitError as err:
        raise ConversionError(f"polarizability unit {unit!r}: {err}") from err
    return unit


def convert_schnetpack(
    model_file: str | Path,
    output: str | Path,
    energy_unit: str | None = None,
    length_unit: str | None = None,
    species: Sequence[int] | None = None,
    dtype: str | torch.dtype | None = None,
    energy_key: str | None = None,
) -> Path:
    """Convert a SchNetPack model file into a bundle at ``output``; returns the path.

    Args:
        model_file: ``best_model`` / ``best_inference_model`` written by SchNetPack 2.x.
        output: bundle path to write.
        energy_unit: unit of the model's energies (default: from the run's config.yaml
            beside the file; required otherwise).
        length_unit: unit of positions (default: the run config's ``distance_unit``, else Å).
        species: atomic numbers the bundle admits (default: every Z the embedding covers).
        dtype: store weights as float32/float64 (default: as in the file).
        energy_key: the SchNetPack output key of the energy (default: the one ``Forces`` differentiates).
    """
    from spkserve import __version__
    from spkserve.bundle import BundleError, default_outputs, parse_dtype, write_bundle
    from spkserve.registry import build

    model_file = Path(model_file)
    conv = read_schnetpack_model(model_file, energy_key)
    cfg_len, cfg_units, cfg_path = _units_from_run_config(model_file)
    energy_unit = energy_unit or cfg_units.get(conv.spk_keys[keys.energy])
    dipole_unit = cfg_units.get(conv.spk_keys.get(keys.dipole_moment, ""))
    polarizability_unit = cfg_units.get(conv.spk_keys.get(keys.polarizability, ""))
    if energy_unit is None:
        where = (f"the run config {cfg_path} gives no unit for {conv.spk_keys[keys.energy]!r}" if cfg_path
                 else "no run config.yaml was found beside it")
        raise ConversionError(
            f"{model_file}: a SchNetPack model file does not record its energy unit and {where}; "
            "give the unit of the training energies, e.g. --energy-unit kcal/mol"
        )
    length_unit = length_unit or cfg_len or "Ang"
    try:
        units.check_dimension(energy_unit, "eV")
        units.check_dimension(length_unit, "Angstrom")
    except units.UnitError as err:
        raise ConversionError(str(err)) from err
    if species is None:
        species = list(range(1, conv.max_z + 1))
    species = sorted({int(z) for z in species})
    bad = [z for z in species if not 1 <= z <= conv.max_z]
    if bad:
        raise ConversionError(f"species {bad} are outside the model's embedding (Z = 1..{conv.max_z})")
    model = build(conv.architecture)
    want = parse_dtype(dtype) or conv.dtype
    model = model.to(conv.dtype)
    try:
        model.load_state_dict(conv.tensors, strict=True)
    except RuntimeError as err:
        raise ConversionError(f"{model_file}: the converted weights do not fit {conv.architecture['params']['representation']['name']}: {err}") from err
    model = model.to(want)
    outputs = default_outputs(energy_unit, length_unit, stress=True)
    if keys.dipole_moment in conv.outputs:
        outputs[keys.dipole_moment] = {"unit": dipole_unit or f"e*{length_unit}", "per": "system"}
        outputs[keys.partial_charges] = {"unit": "e", "per": "atom"}
    if keys.polarizability in conv.outputs:
        outputs[keys.polarizability] = {"unit": _polarizability_unit(polarizability_unit or f"{length_unit}^3"),
                                        "per": "system"}
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    metadata = {
        "species": species,
        "cutoff": conv.cutoff,
        "units": {"length": length_unit, "energy": energy_unit},
        "outputs": outputs,
        "provenance": {
            "converted_from": {
                "format": "schnetpack",
                "file": model_file.name,
                "sha256": digest,
                "schnetpack_version": conv.spk_version,
                "run_config": str(cfg_path) if cfg_path else None,
                "notes": conv.notes,
                "converter": f"spkserve {__version__}",
            }
        },
    }
    try:
        return write_bundle(output, model, metadata)
    except BundleError as err:
        raise ConversionError(str(err)) from err
