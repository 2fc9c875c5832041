"""Skin (Verlet) neighbor list under a deforming cell (NPT).

* Pair sets inside the cutoff equal a fresh list's after isotropic, shear and large
  compressive strains with small displacements; small strains must NOT rebuild (the
  buffer is used), a strain beyond the skin must (a list that ignores the strain misses pairs).
* A deforming-cell MD run (anisotropic MTK started 10 % too dense, so the cell moves every
  step): forces from the skin list equal forces from a fresh full list at every step, and the
  list is rebuilt on fewer than a third of the steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spkserve import units
from spkserve.neighbors import SkinNeighborList, neighbor_list
from spkserve.potentials import reference_bundle
from spkmd.barostats import MTKAnisotropic
from spkmd.calculators import BundleCalculator
from spkmd.initializers import MaxwellBoltzmann
from spkmd.npt import NPTVelocityVerlet
from spkmd.simulator import Simulator
from spkmd.system import System
from spkmd.thermostats import Langevin

pytestmark = pytest.mark.timeout(120)

CUTOFF, SKIN = 5.0, 1.0


def _pairs_within(i, j, s, pos, cell, cutoff):
    d = (pos[j] - pos[i] + s.to(pos.dtype) @ cell).norm(dim=1)
    keep = d < cutoff
    return {(a, b, tuple(x)) for a, b, x in zip(i[keep].tolist(), j[keep].tolist(), s[keep].tolist())}


def _random_box(seed=0, n=60):
    g = torch.Generator().manual_seed(seed)
    cell = torch.tensor([[11.0, 0.0, 0.0], [1.5, 10.5, 0.0], [-1.0, 0.8, 12.0]], dtype=torch.float64)
    frac = torch.rand(n, 3, generator=g, dtype=torch.float64)
    return frac @ cell, cell, g


def _call(nl, pos, cell):
    pbc = torch.ones(1, 3, dtype=torch.bool)
    n = torch.tensor([len(pos)])
    return nl(pos, cell.unsqueeze(0), pbc, n)


@pytest.mark.parametrize(
    "strain,rebuild",
    [
        (np.diag([-0.03, -0.03, -0.03]), False),  # 3 % isotropic compression: buffer holds
        (np.array([[0.0, 0.04, 0.0], [0.04, 0.0, 0.0], [0.0, 0.0, 0.0]]), False),  # 4 % shear
        (np.diag([0.05, -0.04, 0.02]), False),
        (np.diag([-0.20, -0.20, -0.20]), True),  # 20 % compression: pairs at cutoff+skin come inside
    ],
)
def test_skin_list_under_strain_matches_fresh_list(strain, rebuild):
    pos0, cell0, g = _random_box()
    nl = SkinNeighborList(CUTOFF, SKIN)
    _call(nl, pos0, cell0)
    F = torch.eye(3, dtype=torch.float64) + torch.as_tensor(strain)
    # ramp the strain in 4 steps with small non-affine displacements (0.05 Å)
    for k in range(1, 5):
        Fk = torch.eye(3, dtype=torch.float64) + k / 4 * (F - torch.eye(3, dtype=torch.float64))
        cell = cell0 @ Fk
        pos = pos0 @ Fk + 0.05 * torch.randn(pos0.shape, generator=g, dtype=torch.float64) / np.sqrt(3)
        i, j, s = _call(nl, pos, cell)
        fi, fj, fs = neighbor_list(pos, cell.unsqueeze(0), torch.ones(1, 3, dtype=torch.bool), torch.tensor([len(pos)]), CUTOFF)
        got = _pairs_within(i, j, s, pos, cell, CUTOFF)
        want = _pairs_within(fi, fj, fs, pos, cell, CUTOFF)
        assert len(want) > 500
        assert got == want, f"step {k}: {len(want - got)} pairs missing, {len(got - want)} extra"
    if rebuild:
        assert nl.n_builds > 1, nl.stats()
    else:
        assert nl.n_builds == 1, f"the strain fits in the skin but the list was rebuilt: {nl.stats()}"


def test_strain_rebuild_bound_is_tight():
    """Right at the bound (no displacement): (cutoff+skin)·s = cutoff keeps the list, a hair below rebuilds."""
    pos0, cell0, _ = _random_box(seed=1)
    s_edge = CUTOFF / (CUTOFF + SKIN)
    for s, builds in [(s_edge * (1 + 1e-6), 1), (s_edge * (1 - 1e-6), 2)]:
        nl = SkinNeighborList(CUTOFF, SKIN)
        _call(nl, pos0, cell0)
        _call(nl, pos0 * s, cell0 * s)
        assert nl.n_builds == builds, (s, nl.stats())


def test_non_periodic_system_with_changed_cell_rebuilds():
    pos0, cell0, _ = _random_box(seed=2, n=20)
    nl = SkinNeighborList(CUTOFF, SKIN)
    pbc = torch.tensor([[True, True, False]])
    n = torch.tensor([20])
    nl(pos0, cell0.unsqueeze(0), pbc, n)
    nl(pos0, (cell0 * 1.001).unsqueeze(0), pbc, n)
    assert nl.n_builds == 2 and "not fully periodic" in nl.last_reason


@pytest.fixture(scope="module")
def lj_bundle(tmp_path_factory):
    eps = 119.8 * units.KB_EV_PER_K
    return reference_bundle("lj", tmp_path_factory.mktemp("lj") / "lj.bundle", sigma=3.405, epsilon=eps, cutoff=2.5 * 3.405)


def test_deforming_cell_md_forces_equal_fresh_list(lj_bundle):
    from test_npt_lj import _boxes

    T = 240.0
    system = System.from_atoms(_boxes(0.8 * 1.1, 1, size=2, seed=7, jitter=0.1))
    MaxwellBoltzmann(T, remove_translation=False)(system, torch.Generator().manual_seed(1))
    baro = MTKAnisotropic(500.0, T, time_constant_fs=150.0)
    skin_calc = BundleCalculator(lj_bundle, stress=True, skin_angstrom=1.0)
    fresh = BundleCalculator(lj_bundle, stress=True, skin_angstrom=0.0)
    sim = Simulator(system, NPTVelocityVerlet(5.0, baro), skin_calc, hooks=[Langevin(T, 100.0), baro], seed=3)
    cell_start = system.cells[0, 0].clone()
    n_steps = 60
    for _ in range(n_steps):
        sim.simulate(1)
        ref = System.from_state_dict(system.state_dict())
        fresh.calculate(ref)
        assert torch.allclose(system.forces, ref.forces, rtol=0, atol=1e-12)
        assert torch.allclose(system.stress, ref.stress, rtol=0, atol=1e-14)
    strain = torch.linalg.solve(cell_start, system.cells[0, 0]) - torch.eye(3, dtype=system.dtype)
    assert float(strain.abs().max()) > 0.01, "the cell hardly moved; the test would not exercise the strain"
    stats = skin_calc.provider.neighbors.stats()
    assert stats["n_builds"] < n_steps / 3, stats
