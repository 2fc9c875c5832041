"""Physics checks of the neural-network architectures (spkserve.nn)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from spkserve import keys, registry
from spkserve.batch import Structure, collate
from spkserve.neighbors import add_neighbor_pairs
from spkserve.nn import models  # noqa: F401  (registers the architectures)
from spkserve.nn.outputs import ZBLRepulsion

pytestmark = pytest.mark.timeout(120)

CUTOFF = 3.5
SMALL = dict(n_atom_basis=8, n_interactions=2, n_rbf=6, cutoff_angstrom=CUTOFF)
REPRESENTATIONS = {
    "schnet": {"name": "schnet", "params": dict(SMALL)},
    "painn": {"name": "painn", "params": dict(SMALL)},
    "so3net_l1": {"name": "so3net", "params": dict(SMALL, lmax=1)},
    "so3net_l2": {"name": "so3net", "params": dict(SMALL, lmax=2)},
    "field_schnet": {"name": "field_schnet", "params": dict(SMALL)},
}


def energy_model(rep: str, extra_outputs=(), seed: int = 0):
    torch.manual_seed(seed)
    spec = {
        "name": "neural_network_potential",
        "params": {
            "representation": REPRESENTATIONS[rep],
            "outputs": [{"name": "atomwise", "params": {}}] + list(extra_outputs),
        },
    }
    return registry.build(spec).double().eval()


def make_batch(structures, cutoff=CUTOFF, dtype=torch.float64):
    structures = [s if isinstance(s, Structure) else Structure.from_atoms(s) for s in structures]
    return add_neighbor_pairs(collate(structures, dtype=dtype), cutoff)


def random_rotation(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def ethanol(offset=(0.0, 0.0, 0.0)) -> Atoms:
    at = molecule("CH3CH2OH")
    at.positions += np.asarray(offset)
    return at


def periodic_crystal() -> Atoms:
    """Small triclinic cell (periodic images within the cutoff matter)."""
    rng = np.random.default_rng(3)
    cell = np.array([[3.1, 0.0, 0.0], [0.7, 2.9, 0.0], [-0.4, 0.5, 3.3]])
    frac = rng.uniform(size=(4, 3))
    return Atoms("CHON", scaled_positions=frac, cell=cell, pbc=True)


def rotate(batch, Q):
    out = dict(batch)
    out[keys.R] = batch[keys.R] @ Q.T
    out[keys.cell] = batch[keys.cell] @ Q.T
    return out


# ---------------------------------------------------------------- invariances
@pytest.mark.parametrize("rep", list(REPRESENTATIONS))
def test_rotation_translation_permutation(rep):
    model = energy_model(rep)
    b = make_batch([ethanol()])
    ref = model(b)
    assert ref[keys.forces].abs().max() > 1e-4  # the test can fail: forces are not trivially zero
    Q = random_rotation(1)
    rot = model(rotate(b, Q))
    torch.testing.assert_close(rot[keys.energy], ref[keys.energy], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rot[keys.forces], ref[keys.forces] @ Q.T, rtol=1e-9, atol=1e-10)
    shifted = model(make_batch([ethanol(offset=(1.3, -2.0, 0.7))]))
    torch.testing.assert_close(shifted[keys.energy], ref[keys.energy], rtol=1e-10, atol=1e-10)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(5))
    at = ethanol()
    permuted = model(make_batch([at[perm.numpy()]]))
    torch.testing.assert_close(permuted[keys.energy], ref[keys.energy], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(permuted[keys.forces], ref[keys.forces][perm], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("rep", ["schnet", "painn", "so3net_l2"])
def test_skin_pairs_and_batching_change_nothing(rep):
    model = energy_model(rep)
    systems = [ethanol(), periodic_crystal(), molecule("H2O")]
    exact = make_batch(systems)
    skin = make_batch(systems, cutoff=CUTOFF + 1.5)
    assert skin[keys.idx_i].numel() > exact[keys.idx_i].numel()
    props = (keys.energy, keys.forces, keys.stress)
    a, b = model(exact, props), model(skin, props)
    periodic = exact[keys.pbc].any(1)  # stress is defined for periodic systems only
    for k in (keys.energy, keys.forces):
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a[keys.stress][periodic], b[keys.stress][periodic], rtol=1e-10, atol=1e-12)
    start = 0
    for s, at in enumerate(systems):
        single = model(make_batch([at]), props)
        n = len(at)
        torch.testing.assert_close(single[keys.energy][0], a[keys.energy][s], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(single[keys.forces], a[keys.forces][start : start + n], rtol=1e-9, atol=1e-10)
        if at.pbc.any():  # stress is defined for periodic systems only
            torch.testing.assert_close(single[keys.stress][0], a[keys.stress][s], rtol=1e-9, atol=1e-10)
        start += n


def test_skin_pairs_change_nothing_inside_compiled_shapes():
    """With compaction off (as under torch.compile) the cutoff masks skin pairs."""
    from spkserve.nn.geometry import pair_geometry

    model = energy_model("painn")
    b = make_batch([periodic_crystal()], cutoff=CUTOFF + 1.5)
    g_masked = pair_geometry(b, CUTOFF, compact=False)
    g_compact = pair_geometry(b, CUTOFF, compact=True)
    assert g_masked["pair_i"].numel() > g_compact["pair_i"].numel()
    f1 = model.representation(b, g_masked)
    f2 = model.representation(b, g_compact)
    for k in f1:
        torch.testing.assert_close(f1[k], f2[k], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- derivatives
def _energy_at(model, batch, R=None, cell=None):
    b = dict(batch)
    if R is not None:
        b[keys.R] = R
    if cell is not None:
        b[keys.cell] = cell
    return model(b, (keys.energy,))[keys.energy].sum().item()


@pytest.mark.parametrize("rep", ["schnet", "painn", "so3net_l2", "field_schnet"])
def test_forces_and_stress_match_finite_differences(rep):
    model = energy_model(rep)
    b = make_batch([periodic_crystal()])
    out = model(b, (keys.energy, keys.forces, keys.stress))
    R, cell = b[keys.R], b[keys.cell]
    h = 1e-5
    fd_forces = out[keys.forces].detach().clone()
    for i in (0, 2):  # two atoms suffice (the others are checked by invariance tests)
        for a in range(3):
            dR = torch.zeros_like(R)
            dR[i, a] = h
            fd_forces[i, a] = -(_energy_at(model, b, R + dR) - _energy_at(model, b, R - dR)) / (2 * h)
    torch.testing.assert_close(out[keys.forces], fd_forces, rtol=1e-6, atol=1e-8)
    volume = abs(torch.det(cell[0])).item()
    fd_stress = torch.zeros(3, 3, dtype=R.dtype)
    for a in range(3):
        for c in range(a, 3):
            eps = torch.zeros(3, 3, dtype=R.dtype)
            eps[a, c] = eps[c, a] = h / 2 if a != c else h
            energies = []
            for sign in (1, -1):
                deform = torch.eye(3, dtype=R.dtype) + sign * eps
                energies.append(_energy_at(model, b, R @ deform, cell @ deform))
            fd_stress[a, c] = fd_stress[c, a] = (energies[0] - energies[1]) / (2 * h) / volume
    assert out[keys.stress][0].abs().max() > 1e-5
    torch.testing.assert_close(out[keys.stress][0], fd_stress, rtol=1e-6, atol=1e-8)


def test_training_mode_keeps_graph_for_force_training():
    model = energy_model("painn").train()
    b = make_batch([ethanol()])
    out = model(b, (keys.energy, keys.forces))
    assert out[keys.forces].requires_grad
    loss = out[keys.forces].pow(2).sum()
    loss.backward()
    g = model.representation.filter_net.weight.grad
    assert g is not None and g.abs().max() > 0


# ---------------------------------------------------------------- output heads
def test_dipole_and_polarizability_heads_are_equivariant():
    heads = [
        {"name": "dipole_moment", "params": {"use_vector_representation": True}},
        {"name": "polarizability", "params": {}},
    ]
    model = energy_model("painn", heads)
    b = make_batch([ethanol(), molecule("H2O")])
    b[keys.total_charge] = torch.tensor([1.0, 0.0], dtype=torch.float64)
    props = (keys.energy, keys.dipole_moment, keys.polarizability, keys.partial_charges)
    ref = model(b, props)
    q = ref[keys.partial_charges]
    torch.testing.assert_close(q[:9].sum(), torch.tensor(1.0, dtype=q.dtype))
    torch.testing.assert_close(q[9:].sum(), torch.tensor(0.0, dtype=q.dtype), atol=1e-12, rtol=0)
    Q = random_rotation(2)
    rot = model(rotate(b, Q), props)
    mu, alpha = ref[keys.dipole_moment], ref[keys.polarizability]
    assert mu.abs().max() > 1e-4 and alpha.abs().max() > 1e-4
    torch.testing.assert_close(rot[keys.dipole_moment], mu @ Q.T, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(rot[keys.polarizability], Q @ alpha @ Q.T, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(alpha, alpha.transpose(1, 2))
    moved = dict(b)
    moved[keys.R] = b[keys.R] + torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(model(moved, props)[keys.polarizability], alpha, rtol=1e-9, atol=1e-10)


def test_so3net_vector_features_are_equivariant():
    model = energy_model("so3net_l2", [{"name": "dipole_moment", "params": {"use_vector_representation": True}}])
    b = make_batch([ethanol()])
    Q = random_rotation(4)
    mu = model(b, (keys.dipole_moment,))[keys.dipole_moment]
    mu_rot = model(rotate(b, Q), (keys.dipole_moment,))[keys.dipole_moment]
    torch.testing.assert_close(mu_rot, mu @ Q.T, rtol=1e-9, atol=1e-10)


def test_field_schnet_responses_are_field_derivatives():
    model = energy_model("field_schnet")
    b = make_batch([ethanol(), molecule("H2O")])
    field = torch.tensor([[0.02, -0.01, 0.03], [0.0, 0.05, -0.02]], dtype=torch.float64)
    b[keys.electric_field] = field
    props = (keys.energy, keys.forces, keys.dipole_moment, keys.polarizability)
    out = model(b, props)
    mu, alpha = out[keys.dipole_moment], out[keys.polarizability]
    assert mu.abs().max() > 1e-5 and alpha.abs().max() > 1e-7
    h = 1e-4
    for a in range(3):
        dF = torch.zeros_like(field)
        dF[:, a] = h
        plus, minus = dict(b), dict(b)
        plus[keys.electric_field], minus[keys.electric_field] = field + dF, field - dF
        ep = model(plus, (keys.energy, keys.dipole_moment))
        em = model(minus, (keys.energy, keys.dipole_moment))
        fd_mu = -(ep[keys.energy] - em[keys.energy]) / (2 * h)
        torch.testing.assert_close(mu[:, a], fd_mu, rtol=1e-6, atol=1e-9)
        fd_alpha = (ep[keys.dipole_moment] - em[keys.dipole_moment]) / (2 * h)  # d mu / dF_a
        torch.testing.assert_close(alpha[:, :, a], fd_alpha, rtol=1e-5, atol=1e-8)
    # rotating the molecule and the field rotates the dipole
    Q = random_rotation(3)
    rb = rotate(b, Q)
    rb[keys.electric_field] = field @ Q.T
    rot = model(rb, props)
    torch.testing.assert_close(rot[keys.energy], out[keys.energy], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rot[keys.dipole_moment], mu @ Q.T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(rot[keys.polarizability], Q @ alpha @ Q.T, rtol=1e-7, atol=1e-10)


def test_zbl_is_screened_coulomb_and_sums_into_energy():
    zbl = ZBLRepulsion(cutoff_angstrom=2.0).double()
    ke = 14.399645  # eV Å (e^2 / 4 pi eps0), independent check of the unit conversion
    for r in (1e-4, 0.3, 1.9, 2.5):
        b = make_batch([Atoms("CO", positions=[[0, 0, 0], [r, 0, 0]])], cutoff=3.0)
        from spkserve.nn.geometry import pair_geometry

        e = zbl(b, pair_geometry(b, 3.0), {})["zbl_energy"].item()
        if r < 1e-3:
            assert e * r / (ke * 6 * 8) == pytest.approx(1.0, rel=1e-2)  # phi(0) = 1: bare Coulomb
        elif r >= 2.0:
            assert e == 0.0
        else:
            assert 0 < e < ke * 48 / r
    model = energy_model(
        "schnet",
        [
            {"name": "zbl", "params": {"cutoff_angstrom": 1.5}},
            {"name": "energy_sum", "params": {"input_keys": ["atomwise_energy", "zbl_energy"]}},
        ],
    )
    # atomwise writes "energy" by default; rebuild with a distinct key for the sum
    spec = json.loads(json.dumps(model.architecture_spec))
    spec["params"]["outputs"][0]["params"]["output_key"] = "atomwise_energy"
    model = registry.build(spec).double().eval()
    b = make_batch([Atoms("H2", positions=[[0, 0, 0], [0.5, 0, 0]])])
    out = model(b, (keys.energy, "atomwise_energy", "zbl_energy"))
    torch.testing.assert_close(out[keys.energy], out["atomwise_energy"] + out["zbl_energy"])
    assert out["zbl_energy"].item() > 0


def test_offsets_and_scaling_apply_only_at_prediction_time():
    model = energy_model("schnet")
    b = make_batch([ethanol(), molecule("H2O")])
    model.train()
    raw = model(b, (keys.energy, keys.forces))
    atomref = torch.zeros(101, dtype=torch.float64)
    atomref[1], atomref[6], atomref[8] = -13.6, -1029.0, -2041.0
    model.set_offsets(atomref, mean_per_atom=0.25)
    model.set_scale_shift(2.0, shift_per_atom=0.1)
    model.eval()
    out = model(b, (keys.energy, keys.forces))
    Z = b[keys.Z]
    offsets = torch.stack([atomref[Z[:9]].sum() + 9 * 0.35, atomref[Z[9:]].sum() + 3 * 0.35]).double()
    torch.testing.assert_close(out[keys.energy], 2.0 * raw[keys.energy].detach() + offsets)
    torch.testing.assert_close(out[keys.forces], 2.0 * raw[keys.forces].detach())
    torch.testing.assert_close(model.normalize_energy(out[keys.energy].detach(), b), raw[keys.energy].detach())
    with pytest.raises(ValueError, match="scale must be positive"):
        model.set_scale_shift(0.0)


# ---------------------------------------------------------------- specs and compile
@pytest.mark.parametrize("rep", list(REPRESENTATIONS))
def test_spec_round_trip_rebuilds_the_same_model(rep):
    model = energy_model(rep, [{"name": "dipole_moment", "params": {}}])
    spec = json.loads(json.dumps(model.architecture_spec))  # plain JSON
    clone = registry.build(spec).double().eval()
    clone.load_state_dict(model.state_dict(), strict=True)
    b = make_batch([ethanol()])
    props = (keys.energy, keys.forces, keys.dipole_moment)
    a, c = model(b, props), clone(b, props)
    for k in props:
        torch.testing.assert_close(a[k], c[k])


def test_convenience_constructors_and_bad_specs():
    m = models.painn_energy_model(cutoff=4.0, n_atom_basis=16, n_interactions=1)
    assert m.cutoff == 4.0 and m.architecture_spec["params"]["representation"]["name"] == "painn"
    s = models.schnet_energy_model(n_atom_basis=16, n_interactions=2)
    assert registry.build(json.loads(json.dumps(s.architecture_spec))).representation.n_interactions == 2
    with pytest.raises(ValueError, match="unknown activation"):
        registry.build({"name": "painn", "params": {"activation_name": "sigmoidal"}})
    with pytest.raises(ValueError, match="outputs must be a non-empty list"):
        registry.build({"name": "neural_network_potential", "params": {"representation": REPRESENTATIONS["schnet"], "outputs": []}})
    with pytest.raises(ValueError, match="unknown postprocessors options"):
        registry.build({"name": "neural_network_potential", "params": {
            "representation": REPRESENTATIONS["schnet"], "outputs": [{"name": "atomwise"}],
            "postprocessors": {"scale_energies": True}}})


@pytest.mark.timeout(300)
@pytest.mark.parametrize("rep", ["schnet", "painn"])
def test_torch_compile_matches_eager(rep):
    """Dynamo + AOTAutograd trace of the model (the "aot_eager" backend: the same graph
    capture and decomposition as inductor, without its minutes of C++ code generation,
    which benchmarks/models.py exercises)."""
    torch.manual_seed(0)
    spec = {"name": rep, "params": dict(SMALL, n_interactions=1)}
    model = registry.build({"name": "neural_network_potential",
                            "params": {"representation": spec, "outputs": [{"name": "atomwise"}]}}).eval()
    b = make_batch([ethanol(), periodic_crystal()], dtype=torch.float32)
    ref = model(b, (keys.energy, keys.forces))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    out = compiled(b, (keys.energy, keys.forces))
    torch.testing.assert_close(out[keys.energy], ref[keys.energy], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[keys.forces], ref[keys.forces], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- fused inference path
def test_fused_functions_pass_gradcheck():
    from spkserve.nn.fused import PaiNNMessage, SchNetFilterConv

    g = torch.Generator().manual_seed(0)
    n, p, f, r = 4, 9, 3, 5
    idx_i = torch.randint(0, n, (p,), generator=g)
    idx_j = torch.randint(0, n, (p,), generator=g)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    args = (rnd(n, f), rnd(p, r), rnd(p), rnd(r, f), rnd(f), rnd(f, f), rnd(f), idx_i, idx_j)
    assert torch.autograd.gradcheck(SchNetFilterConv.apply, args)
    args = (rnd(n, 3 * f), rnd(n, 3, f), rnd(p, 3 * f), rnd(p), rnd(p, 3), idx_i, idx_j)
    assert torch.autograd.gradcheck(PaiNNMessage.apply, args)


@pytest.mark.parametrize("rep", ["schnet", "painn"])
def test_fused_inference_path_equals_plain_autograd(rep):
    model = energy_model(rep)
    model.representation.fused_min_elements = 0  # force the fused path on this small system
    if rep == "schnet":
        model.representation.filter_table_points = 0  # exact filter networks (tables: next test)
    b = make_batch([periodic_crystal(), ethanol()])
    props = (keys.energy, keys.forces, keys.stress)
    fused = model(b, props)  # eval, no graph: fused backward
    plain = model(b, props, create_graph=True)  # graph kept: plain autograd
    for k in props:
        torch.testing.assert_close(fused[k][:1] if k == keys.stress else fused[k],
                                   (plain[k][:1] if k == keys.stress else plain[k]).detach(),
                                   rtol=1e-12, atol=1e-12)


def test_tabulated_schnet_filters_match_network_and_are_conservative():
    from spkserve.nn.fused import TabulatedFilterConv, hermite_coefficients

    model = energy_model("schnet")
    rep = model.representation
    b = make_batch([periodic_crystal(), ethanol()])
    props = (keys.energy, keys.forces, keys.stress)
    exact = model(b, props, create_graph=True)
    rep.fused_min_elements = 0  # use the tabulated inference path on this small system
    tab = model(b, props)
    assert rep._table is not None
    for k in props:
        ref = exact[k][:1] if k == keys.stress else exact[k]
        got = tab[k][:1] if k == keys.stress else tab[k]
        torch.testing.assert_close(got, ref.detach(), rtol=1e-6, atol=1e-7)
    # forces are the exact derivative of the interpolated energy (finite differences, tight)
    R = b[keys.R]
    h = 1e-6
    for i, a in ((0, 0), (5, 2)):
        dR = torch.zeros_like(R)
        dR[i, a] = h
        fd = -(_energy_at(model, b, R + dR) - _energy_at(model, b, R - dR)) / (2 * h)
        assert tab[keys.forces][i, a].item() == pytest.approx(fd, rel=1e-6, abs=1e-8)
    # the table follows weight updates
    with torch.no_grad():
        rep.filter_w2.mul_(1.5)
    assert not torch.allclose(model(b, props)[keys.energy], tab[keys.energy])
    # the interpolation itself: gradcheck and exactness on a cubic
    knots = torch.linspace(0, 2, 9, dtype=torch.float64)
    f = lambda x: (x**3 - x)[:, None] * torch.tensor([1.0, -2.0], dtype=torch.float64)  # noqa: E731
    coeffs = hermite_coefficients(f(knots), (3 * knots**2 - 1)[:, None] * torch.tensor([1.0, -2.0]).double(), 0.25)
    coeffs = coeffs.transpose(0, 1).contiguous()  # coefficient-major [4, G, F]
    d = torch.tensor([0.1, 0.77, 1.5, 1.99], dtype=torch.float64, requires_grad=True)
    y = torch.ones(3, 2, dtype=torch.float64, requires_grad=True)
    idx_i, idx_j = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 2])
    out = TabulatedFilterConv.apply(y, d, coeffs, 4.0, idx_i, idx_j)
    expected = torch.zeros(3, 2, dtype=torch.float64).index_add_(0, idx_i, f(d.detach()))
    torch.testing.assert_close(out, expected)  # cubic Hermite is exact for cubics
    assert torch.autograd.gradcheck(lambda y_, d_: TabulatedFilterConv.apply(y_, d_, coeffs, 4.0, idx_i, idx_j), (y, d))
