"""The compiled inference path: AtomisticModel.forward_functional and ModelRunner(compile=True)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ase import Atoms

from spkserve import keys
from spkserve.bundle import default_outputs, write_bundle
from spkserve.potentials import reference_bundle
from spkserve.runtime import ModelRunner

from test_nn_models import REPRESENTATIONS, energy_model, ethanol, make_batch, periodic_crystal

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("rep", list(REPRESENTATIONS))
def test_functional_derivatives_equal_autograd_ones(rep):
    """torch.func.grad (the compiled path) and torch.autograd.grad give the same forces and stress."""
    model = energy_model(rep)
    b = make_batch([ethanol(), periodic_crystal()])
    props = (keys.energy, keys.forces)
    ref, got = model(b, props), model.forward_functional(b, props)
    for k in props:
        torch.testing.assert_close(got[k], ref[k].detach(), rtol=1e-10, atol=1e-12)
    b = make_batch([periodic_crystal()])
    props = (keys.energy, keys.forces, keys.stress)
    ref, got = model(b, props), model.forward_functional(b, props)
    for k in props:
        torch.testing.assert_close(got[k], ref[k].detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,params", [
    ("lj", dict(sigma=3.4, epsilon=0.0104, cutoff=8.5)),
    ("morse", dict(depth=0.3, alpha=1.5, r0=2.8, cutoff=7.0)),
])
def test_functional_path_of_reference_potentials(tmp_path, name, params):
    runner = ModelRunner(reference_bundle(name, tmp_path / f"{name}.bundle", **params), dtype="float64")
    rng = np.random.default_rng(0)
    atoms = Atoms("Ar8", positions=rng.uniform(0, 7.0, (8, 3)), cell=[7.5, 7.5, 7.5], pbc=True)
    from spkserve.batch import Structure, collate
    from spkserve.neighbors import add_neighbor_pairs

    b = add_neighbor_pairs(collate([Structure.from_atoms(atoms)], dtype=torch.float64), runner.bundle.cutoff)
    props = (keys.energy, keys.forces, keys.stress)
    ref, got = runner.model(b, props), runner.model.forward_functional(b, props)
    for k in props:
        torch.testing.assert_close(got[k], ref[k].detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("small", [True, False], ids=["small-batch-compiled", "large-batch-eager"])
def test_compiled_runner_matches_eager_across_neighbor_list_rebuilds(tmp_path, monkeypatch, small):
    """A real inductor compilation (dynamic pair counts): the same numbers as eager while
    atoms move, the skin list rebuilds and the pair count changes (skin pairs masked by
    the cutoff function inside the graph); no recompilation. Batches above SMALL_PAIRS
    never compile."""
    import spkserve.runtime

    monkeypatch.setattr(spkserve.runtime, "SMALL_PAIRS", 10**9 if small else 0)
    torch.manual_seed(0)
    model = energy_model("schnet").float()
    meta = {"species": [1, 6, 7, 8], "cutoff": 3.5, "units": {"length": "Angstrom", "energy": "eV"},
            "outputs": default_outputs("eV", "Angstrom", stress=False)}
    path = write_bundle(tmp_path / "m.bundle", model, meta)
    eager = ModelRunner(path, dtype="float32", skin_angstrom=0.5)
    compiled = ModelRunner(path, dtype="float32", skin_angstrom=0.5, compile=True)
    at = ethanol()
    Z = torch.as_tensor(at.numbers)
    cells, pbc, n = torch.zeros(1, 3, 3), torch.zeros(1, 3, dtype=torch.bool), torch.tensor([len(at)])
    g = torch.Generator().manual_seed(1)
    R = torch.as_tensor(at.positions, dtype=torch.float32)
    pairs = set()
    torch._dynamo.utils.counters.clear()
    for step in range(12):
        R = R + 0.12 * torch.randn(R.shape, generator=g)  # large moves: rebuilds, pair count changes
        a = eager.compute_tensors(Z, R, cells, pbc, n)
        c = compiled.compute_tensors(Z, R, cells, pbc, n)
        torch.testing.assert_close(c[keys.energy], a[keys.energy], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c[keys.forces], a[keys.forces], rtol=1e-4, atol=1e-4)
        pairs.add(int((torch.cdist(R, R) < 3.5).sum()) - len(at))
    assert compiled.compile, "the compiled path fell back to eager"
    assert (compiled._compiled is not None) == small
    assert len(pairs) > 2, "the test should change the number of pairs inside the cutoff"
    assert compiled.neighbors.n_builds > 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2, "recompiled for new pair counts"


def test_compile_failure_falls_back_to_eager_with_a_warning(lj_bundle):
    runner = ModelRunner(lj_bundle, dtype="float64", compile=True)

    class BackendCompilerFailed(RuntimeError):
        pass

    BackendCompilerFailed.__module__ = "torch._dynamo.exc"

    def broken(*args, **kwargs):
        raise BackendCompilerFailed("no C++ compiler")

    runner.compiled_model = lambda: broken
    at = Atoms("Ar2", positions=[[0, 0, 0], [3.8, 0, 0]])
    from spkserve.batch import Structure

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = runner.compute([Structure.from_atoms(at)])
    assert not runner.compile
    assert any("running the model eagerly" in str(w.message) for w in caught)
    assert out[keys.forces].shape == (2, 3)


def test_species_check_is_redone_for_new_or_modified_tensors(tmp_path):
    """The per-call species check is cached only for the very same, unmodified tensor."""
    from spkserve.provider import ProviderError

    torch.manual_seed(0)
    meta = {"species": [1, 6, 7, 8], "cutoff": 3.5, "units": {"length": "Angstrom", "energy": "eV"},
            "outputs": default_outputs("eV", "Angstrom", stress=False)}
    runner = ModelRunner(write_bundle(tmp_path / "m.bundle", energy_model("schnet"), meta))
    R = torch.tensor([[0.0, 0, 0], [1.1, 0, 0]], dtype=torch.float64)
    cells, pbc, n = torch.zeros(1, 3, 3), torch.zeros(1, 3, dtype=torch.bool), torch.tensor([2])
    Z = torch.tensor([6, 8])
    runner.compute_tensors(Z, R, cells, pbc, n)
    runner.compute_tensors(Z, R, cells, pbc, n)
    Z[1] = 18  # modified in place: checked again
    with pytest.raises(ProviderError, match="18"):
        runner.compute_tensors(Z, R, cells, pbc, n)
    with pytest.raises(ProviderError, match="18"):
        runner.compute_tensors(torch.tensor([6, 18]), R, cells, pbc, n)


def test_schnet_tabulated_filters_match_the_networks_and_vanish_beyond_the_cutoff():
    """The compiled SchNet reads its filters from the Hermite table: equal to the filter
    networks inside the cutoff, exactly zero for skin pairs beyond it, and the distance
    derivative is the interpolant's (close to the network's)."""
    model = energy_model("schnet").float()
    rep = model.representation
    rep.prepare_for_compile()
    d = torch.cat([torch.linspace(0.05, 3.499, 500), torch.tensor([3.5, 3.7, 4.4])]).requires_grad_(True)
    a, b = rep.filters(d), rep.tabulated_filters(d)
    inside = d < 3.5
    torch.testing.assert_close(b[:, inside], a[:, inside], rtol=0, atol=2e-6)
    assert torch.all(b[:, ~inside] == 0)
    ga = torch.autograd.grad(a.sum(), d)[0]
    gb = torch.autograd.grad(b.sum(), d)[0]
    torch.testing.assert_close(gb[inside], ga[inside], rtol=1e-3, atol=1e-3)
