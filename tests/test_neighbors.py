"""Neighbor lists: every backend against ase.neighborlist.neighbor_list, batching, skin list, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list as ase_neighbor_list
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spkserve import keys
from spkserve.batch import Structure, collate
from spkserve.neighbors import (
    BACKENDS,
    NeighborListError,
    SkinNeighborList,
    add_neighbor_pairs,
    neighbor_list,
    torch_neighbor_list,
)

pytestmark = pytest.mark.timeout(120)

HYPOTHESIS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


# --- helpers --------------------------------------------------------------------


def reference(pos: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> dict:
    """ASE's pair set {(i, j, S): distance}."""
    atoms = Atoms(positions=pos, cell=cell, pbc=pbc)
    i, j, S, d = ase_neighbor_list("ijSd", atoms, cutoff)
    return {(a, b, tuple(s)): x for a, b, s, x in zip(i.tolist(), j.tolist(), S.tolist(), d.tolist())}


def ours(pos, cells, pbcs, counts, cutoff, backend, dtype=torch.float64) -> dict:
    """Our pair set {(i, j, S): distance}, checking output types and no duplicates."""
    P = torch.tensor(np.asarray(pos), dtype=dtype)
    C = torch.tensor(np.asarray(cells), dtype=dtype)
    i, j, S = neighbor_list(P, C, torch.tensor(np.asarray(pbcs)), torch.tensor(counts), cutoff, backend)
    assert i.dtype == torch.int64 and j.dtype == torch.int64 and S.dtype == dtype
    assert S.shape == (i.shape[0], 3)
    assert torch.equal(S, torch.round(S)), "shifts must be integer valued"
    sys_of = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    assert torch.equal(sys_of[i], sys_of[j]), "pairs must not cross systems"
    vec = P[j] - P[i] + torch.einsum("pk,pkd->pd", S, C[sys_of[i]])
    d = torch.linalg.vector_norm(vec, dim=1)
    out = {(a, b, tuple(int(x) for x in s)): x for a, b, s, x in zip(i.tolist(), j.tolist(), S.tolist(), d.tolist())}
    assert len(out) == i.shape[0], "duplicate pairs"
    return out


def assert_same_pairs(got: dict, want: dict) -> None:
    missing = set(want) - set(got)
    extra = set(got) - set(want)
    assert not missing and not extra, f"missing {sorted(missing)[:5]} extra {sorted(extra)[:5]}"
    keys_ = sorted(want)
    np.testing.assert_allclose([got[k] for k in keys_], [want[k] for k in keys_], rtol=1e-10, atol=1e-10)


@st.composite
def systems(draw, max_atoms: int = 10):
    """A random system: reasonably conditioned triclinic cell, random pbc, some zero non-periodic rows."""
    n = draw(st.integers(1, max_atoms))
    lengths = draw(st.lists(st.floats(2.0, 7.0), min_size=3, max_size=3))
    tilt = draw(st.lists(st.floats(-0.35, 0.35), min_size=6, max_size=6))
    cell = np.diag(lengths)
    for (r, c), t in zip([(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)], tilt):
        cell[r, c] = t * lengths[r]
    pbc = np.array(draw(st.lists(st.booleans(), min_size=3, max_size=3)))
    zero_rows = np.array(draw(st.lists(st.booleans(), min_size=3, max_size=3))) & ~pbc
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    frac = rng.uniform(-0.3, 1.3, size=(n, 3))  # atoms also outside the cell
    pos = frac @ cell
    cell[zero_rows] = 0.0
    return pos, cell, pbc


def cutoffs():
    """Cutoffs from 0.3 Å to 6 Å: cells are 2-7 Å wide, so often more than half a cell (several images)."""
    return st.floats(0.3, 6.0)


# --- against ASE ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@settings(HYPOTHESIS, max_examples=25)
@given(data=st.data())
def test_single_system_matches_ase(backend: str, data) -> None:
    pos, cell, pbc = data.draw(systems())
    cutoff = data.draw(cutoffs())
    assert_same_pairs(ours(pos, cell[None], pbc[None], [len(pos)], cutoff, backend), reference(pos, cell, pbc, cutoff))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(HYPOTHESIS, max_examples=8)
@given(data=st.data())
def test_batch_matches_ase_with_offsets(backend: str, data) -> None:
    n_sys = data.draw(st.integers(2, 5))
    cutoff = data.draw(st.floats(0.5, 5.0))
    items = []
    for _ in range(n_sys):
        pos, cell, pbc = data.draw(systems(max_atoms=8))
        if data.draw(st.booleans()):  # molecules: no cell at all
            cell, pbc = np.zeros((3, 3)), np.zeros(3, dtype=bool)
        items.append((pos, cell, pbc))
    want, offset = {}, 0
    for pos, cell, pbc in items:
        for (a, b, s), d in reference(pos, cell, pbc, cutoff).items():
            want[(a + offset, b + offset, s)] = d
        offset += len(pos)
    got = ours(
        np.concatenate([p for p, _, _ in items]),
        np.stack([c for _, c, _ in items]),
        np.stack([b for _, _, b in items]),
        [len(p) for p, _, _ in items],
        cutoff,
        backend,
    )
    assert_same_pairs(got, want)


def _water16():
    """16 waters in a 7.82 Å periodic box: a 5 Å cutoff needs several images of some pairs."""
    rng = np.random.default_rng(7)
    L = 7.82
    o = rng.uniform(0, L, (16, 3))
    h = o[:, None, :] + rng.normal(size=(16, 2, 3)) * 0.55
    return np.concatenate([o, h.reshape(-1, 3)]), np.eye(3) * L, np.ones(3, dtype=bool)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_periodic_box_with_many_images(backend: str) -> None:
    pos, cell, pbc = _water16()
    cell = cell + np.array([[0, 0, 0], [2.0, 0, 0], [1.0, -1.5, 0]])  # triclinic
    for cutoff in (5.0, 8.0):
        want = reference(pos, cell, pbc, cutoff)
        per_pair = {}
        for a, b, _ in want:
            per_pair[(a, b)] = per_pair.get((a, b), 0) + 1
        assert max(per_pair.values()) >= 2  # the same pair through several images
        if cutoff > 7.82:
            assert any(a == b for a, b, _ in want)  # atoms see their own images
        assert_same_pairs(ours(pos, cell[None], pbc[None], [len(pos)], cutoff, backend), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "cell,pbc",
    [
        (np.zeros((3, 3)), [False, False, False]),
        (np.diag([6.0, 5.0, 0.0]), [True, True, False]),  # slab with zero out-of-plane vector
        (np.array([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), [True, False, False]),  # wire
        (np.array([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 3.5]]), [True, False, True]),
        (np.diag([5.0, 5.0, 5.0]), [False, False, False]),  # cell given but not periodic
    ],
)
def test_zero_and_mixed_cells(backend: str, cell, pbc) -> None:
    rng = np.random.default_rng(3)
    pos = rng.uniform(-2.0, 6.0, (12, 3))
    pbc = np.array(pbc)
    want = reference(pos, cell, pbc, 3.5)
    assert want
    assert_same_pairs(ours(pos, cell[None], pbc[None], [12], 3.5, backend), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_atoms_far_outside_the_cell_in_non_periodic_directions(backend: str) -> None:
    rng = np.random.default_rng(5)
    cases = [
        (np.diag([6.0, 5.0, 0.0]), [True, True, False], [0.0, 0.0, 300.0]),
        (np.array([[4.0, 0, 0], [0, 0, 0], [0, 0, 0]]), [True, False, False], [0.0, -500.0, 800.0]),
        (np.diag([6.0, 5.0, 4.0]), [True, False, True], [0.0, 1e4, 0.0]),
    ]
    for cell, pbc, offset in cases:
        pos = rng.uniform(0.0, 8.0, (30, 3)) + np.array(offset)
        pbc = np.array(pbc)
        assert_same_pairs(ours(pos, cell[None], pbc[None], [30], 3.5, backend), reference(pos, cell, pbc, 3.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_and_empty_systems(backend: str) -> None:
    pos, cell, pbc = _water16()
    counts = [0, len(pos), 0]
    cells = np.stack([np.zeros((3, 3)), cell, np.eye(3)])
    pbcs = np.stack([np.zeros(3, bool), pbc, np.ones(3, bool)])
    got = ours(pos, cells, pbcs, counts, 3.0, backend, dtype=torch.float32)
    want = reference(pos, cell, pbc, 3.0)
    assert set(got) == set(want)
    # one atom alone, no cell: no pairs
    i, j, S = neighbor_list(torch.zeros(1, 3), torch.zeros(1, 3, 3), torch.zeros(1, 3, dtype=torch.bool), torch.tensor([1]), 2.0, backend)
    assert i.numel() == 0 and S.shape == (0, 3) and S.dtype == torch.float32


def test_many_small_molecules_batched() -> None:
    """64 ethanol-like replicas: every backend gives the per-molecule reference pairs."""
    from ase.build import molecule

    base = molecule("CH3CH2OH").positions
    rng = np.random.default_rng(0)
    pos = np.concatenate([base + rng.normal(scale=0.1, size=base.shape) + rng.normal(size=3) for _ in range(64)])
    counts = [9] * 64
    want = {}
    for s in range(64):
        for (a, b, sh), d in reference(pos[9 * s : 9 * s + 9], np.zeros((3, 3)), np.zeros(3, bool), 2.5).items():
            want[(a + 9 * s, b + 9 * s, sh)] = d
    for backend in BACKENDS:
        got = ours(pos, np.zeros((64, 3, 3)), np.zeros((64, 3), bool), counts, 2.5, backend)
        assert_same_pairs(got, want)


@pytest.mark.parametrize("n_atoms", [30, 150])  # torch backend: all-pairs path / cell-list path
def test_non_periodic_clusters(n_atoms: int) -> None:
    rng = np.random.default_rng(n_atoms)
    pos = rng.uniform(-6.0, 6.0, (n_atoms, 3))
    want = reference(pos, np.zeros((3, 3)), np.zeros(3, bool), 3.0)
    for backend in BACKENDS:
        assert_same_pairs(ours(pos, np.zeros((1, 3, 3)), np.zeros((1, 3), bool), [n_atoms], 3.0, backend), want)


def test_add_neighbor_pairs_fills_batch() -> None:
    pos, cell, pbc = _water16()
    batch = collate([Structure(np.full(len(pos), 8), pos, cell, pbc), Structure([1, 1], [[0, 0, 0], [0, 0, 0.8]], np.zeros((3, 3)), [False] * 3)])
    out = add_neighbor_pairs(batch, 4.0)
    assert keys.idx_i not in batch  # input not mutated
    i, j, S = out[keys.idx_i], out[keys.idx_j], out[keys.shifts]
    assert ((i == 48) & (j == 49)).sum() == 1 and ((i == 49) & (j == 48)).sum() == 1
    assert len(i) == len(reference(pos, cell, pbc, 4.0)) + 2


# --- torch backend specifics ---------------------------------------------------------


def test_torch_backend_inside_compiled_function() -> None:
    """A compiled function (as a compiled model would) calling the torch backend gets the eager pairs."""
    torch._dynamo.reset()
    pos, cell, pbc = _water16()
    P = torch.tensor(pos)
    C = torch.tensor(cell)[None]
    B = torch.tensor(pbc)[None]
    N = torch.tensor([len(pos)])

    def pair_distances(p, c, b, n):
        i, j, S = torch_neighbor_list(p, c, b, n, 5.0)
        vec = p[j] - p[i] + S @ c[0]
        return i, j, S, torch.linalg.vector_norm(vec, dim=1)

    compiled = torch.compile(pair_distances, backend="aot_eager")
    for shift in (0.0, 0.3):  # second call: new positions, same graphs
        got = compiled(P + shift, C, B, N)
        want = pair_distances(P + shift, C, B, N)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert set(zip(got[0].tolist(), got[1].tolist(), map(tuple, got[2].long().tolist()))) == set(reference(pos + 0.3, cell, pbc, 5.0))


def test_torch_backend_chunking_gives_same_pairs() -> None:
    pos, cell, pbc = _water16()
    P, C, B, N = torch.tensor(pos), torch.tensor(cell)[None], torch.tensor(pbc)[None], torch.tensor([len(pos)])
    full = torch_neighbor_list(P, C, B, N, 6.0)
    chunked = torch_neighbor_list(P, C, B, N, 6.0, chunk_pairs=997)
    as_set = lambda r: set(zip(r[0].tolist(), r[1].tolist(), map(tuple, r[2].tolist())))  # noqa: E731
    assert as_set(full) == as_set(chunked) and len(full[0]) == len(chunked[0])


def test_positions_with_grad_are_accepted() -> None:
    pos, cell, pbc = _water16()
    P = torch.tensor(pos, requires_grad=True)
    for backend in BACKENDS:
        i, j, S = neighbor_list(P, torch.tensor(cell)[None], torch.tensor(pbc)[None], torch.tensor([len(pos)]), 3.0, backend)
        assert not S.requires_grad and len(i) > 0


# --- errors -------------------------------------------------------------------------------


def test_unknown_backend_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown neighbor-list backend 'cuda-magic'.*vesin.*matscipy.*ase.*torch"):
        neighbor_list(torch.zeros(2, 3), torch.zeros(1, 3, 3), torch.zeros(1, 3, dtype=torch.bool), torch.tensor([2]), 1.0, "cuda-magic")
    with pytest.raises(ValueError, match="known backends"):
        SkinNeighborList(2.0, 0.5, backend="nope")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "cell,pbc,direction",
    [
        (np.diag([5.0, 5.0, 0.0]), [True, True, True], "2"),  # periodic but zero vector
        (np.array([[4.0, 0, 0], [8.0, 0, 0], [0, 0, 4.0]]), [True, True, True], "1"),  # parallel vectors
        (np.array([[4.0, 0, 0], [0, 4.0, 0], [4.0, 4.0, 0]]), [True, True, True], "2"),  # coplanar
        (np.array([[4.0, 0, 0], [-4.0, 0, 0], [0, 0, 0]]), [True, True, False], "1"),
    ],
)
def test_degenerate_periodic_cell_is_a_clear_error(backend: str, cell, pbc, direction: str) -> None:
    pos = torch.rand(4, 3, dtype=torch.float64)
    with pytest.raises(NeighborListError, match=f"periodic direction {direction}.*zero or linearly dependent"):
        neighbor_list(pos, torch.tensor(cell)[None], torch.tensor(pbc)[None], torch.tensor([4]), 2.0, backend)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_atoms": torch.tensor([3])}, "n_atoms sums to 3 but positions has 4"),
        ({"cutoff": -1.0}, "cutoff must be a positive"),
        ({"cutoff": float("nan")}, "cutoff must be a positive"),
        ({"cell": torch.zeros(2, 3, 3, dtype=torch.float64)}, "cell must have shape"),
        ({"pbc": torch.zeros(1, 2, dtype=torch.bool)}, "pbc must have shape"),
        ({"positions": torch.zeros(4, 2, dtype=torch.float64)}, "positions must be a tensor of shape"),
        ({"positions": torch.zeros(4, 3, dtype=torch.int64)}, "floating point"),
    ],
)
def test_bad_input_is_named(kwargs: dict, match: str) -> None:
    args = {
        "positions": torch.rand(4, 3, dtype=torch.float64),
        "cell": torch.zeros(1, 3, 3, dtype=torch.float64),
        "pbc": torch.zeros(1, 3, dtype=torch.bool),
        "n_atoms": torch.tensor([4]),
        "cutoff": 2.0,
    }
    args.update(kwargs)
    with pytest.raises(NeighborListError, match=match):
        neighbor_list(**args)


# --- skin list ------------------------------------------------------------------------


def _within(pairs, positions, cell, cutoff: float) -> set:
    i, j, S = pairs
    vec = positions[j] - positions[i] + S @ cell
    keep = torch.linalg.vector_norm(vec, dim=1) < cutoff
    return set(zip(i[keep].tolist(), j[keep].tolist(), map(tuple, S[keep].long().tolist())))


def _fresh(positions, cell, pbc, cutoff: float) -> set:
    i, j, S = neighbor_list(positions, cell[None], pbc[None], torch.tensor([len(positions)]), cutoff, "ase")
    return set(zip(i.tolist(), j.tolist(), map(tuple, S.long().tolist())))


@pytest.mark.parametrize("backend", ["vesin", "torch"])
def test_skin_list_reuses_and_stays_correct(backend: str) -> None:
    rng = np.random.default_rng(11)
    pos0, cell_np, pbc_np = _water16()
    pos = torch.tensor(pos0)
    cell, pbc = torch.tensor(cell_np), torch.tensor(pbc_np)
    cutoff, skin = 3.0, 1.0
    nl = SkinNeighborList(cutoff, skin, backend=backend)
    n = torch.tensor([len(pos)])
    nl(pos, cell[None], pbc[None], n)
    assert nl.n_builds == 1 and nl.n_calls == 1
    assert nl.stats()["last_rebuild_reason"] == "first call"
    start = pos.clone()
    # random walk: steps of 0.08 Å; the list must rebuild only after some atom moved > skin/2
    for step in range(25):
        pos = pos + torch.tensor(rng.normal(scale=0.08 / np.sqrt(3), size=pos.shape))
        builds_before = nl.n_builds
        pairs = nl(pos, cell[None], pbc[None], n)
        moved = torch.linalg.vector_norm(pos - start, dim=1).max().item()
        if nl.n_builds > builds_before:
            assert moved > skin / 2
            start = pos.clone()
        else:
            assert moved <= skin / 2
        assert _within(pairs, pos, cell, cutoff) == _fresh(pos, cell, pbc, cutoff)
    assert 1 < nl.n_builds < 26 and nl.n_calls == 26
    st_ = nl.stats()
    assert st_["n_calls"] == 26 and st_["n_builds"] == nl.n_builds and st_["rebuild_reasons"]["atom moved more than skin/2"] >= 1
    # right after a build the pairs reach cutoff + skin (models mask them)
    nl.reset()
    i, j, S = nl(pos, cell[None], pbc[None], n)
    d = torch.linalg.vector_norm(pos[j] - pos[i] + S @ cell, dim=1)
    assert d.max() < cutoff + skin and d.max() > cutoff


def test_skin_list_rebuild_triggers() -> None:
    pos_np, cell_np, pbc_np = _water16()
    pos, cell, pbc = torch.tensor(pos_np), torch.tensor(cell_np)[None], torch.tensor(pbc_np)[None]
    n = torch.tensor([len(pos)])
    nl = SkinNeighborList(3.0, 1.0)
    nl(pos, cell, pbc, n)
    # a small move of one atom: no rebuild
    moved = pos.clone()
    moved[0, 0] += 0.49
    nl(moved, cell, pbc, n)
    assert nl.n_builds == 1
    # just above skin/2: rebuild
    moved[0, 0] += 0.02
    nl(moved, cell, pbc, n)
    assert nl.n_builds == 2 and nl.last_reason == "atom moved more than skin/2"
    # small strain within the skin (positions scaled with the cell) -> no rebuild, pairs right
    strained = cell * 1.01
    pairs = nl(moved * 1.01, strained, pbc, n)
    assert nl.n_builds == 2
    assert _within(pairs, moved * 1.01, strained[0], 3.0) == _fresh(moved * 1.01, strained[0], pbc[0], 3.0)
    # compression beyond the skin ((3 + 1) * 0.74 < 3) -> rebuild, and pairs right for the new cell
    strained = cell * 0.74
    pairs = nl(moved * 0.74, strained, pbc, n)
    assert nl.n_builds == 3 and nl.last_reason == "cell strain larger than the skin allows"
    assert _within(pairs, moved * 0.74, strained[0], 3.0) == _fresh(moved * 0.74, strained[0], pbc[0], 3.0)
    moved = moved * 0.74
    # dtype change -> rebuild
    nl(moved.float(), strained.float(), pbc, n)
    assert nl.n_builds == 4 and nl.last_reason == "dtype or device changed"
    # atoms per system change with the same total -> rebuild
    moved, strained = moved.float(), strained.float()
    nl(moved, torch.cat([strained, strained]), torch.cat([pbc, pbc]), torch.tensor([20, 28]))
    assert nl.n_builds == 5 and nl.last_reason == "atoms per system changed"
    nl(moved, torch.cat([strained, strained]), torch.cat([pbc, ~pbc]), torch.tensor([20, 28]))
    assert nl.n_builds == 6 and nl.last_reason == "pbc changed"
    assert nl.stats()["n_calls"] == 8


def test_skin_list_rebuilds_after_wrapping() -> None:
    """A caller wraps atoms into the cell: the jump exceeds skin/2, so shifts are rebuilt."""
    pos_np, cell_np, pbc_np = _water16()
    cell = torch.tensor(cell_np)
    pbc = torch.tensor(pbc_np)
    pos = torch.tensor(pos_np) + torch.tensor([0.5, -0.2, 7.5])  # many atoms now outside the box
    n = torch.tensor([len(pos)])
    nl = SkinNeighborList(3.0, 1.0)
    nl(pos, cell[None], pbc[None], n)
    wrapped = pos - torch.floor(pos @ torch.linalg.inv(cell)) @ cell
    assert not torch.equal(wrapped, pos)
    pairs = nl(wrapped, cell[None], pbc[None], n)
    assert nl.n_builds == 2
    assert _within(pairs, wrapped, cell, 3.0) == _fresh(wrapped, cell, pbc, 3.0)


def test_skin_list_bad_arguments() -> None:
    with pytest.raises(NeighborListError, match="skin"):
        SkinNeighborList(3.0, -0.1)
    with pytest.raises(NeighborListError, match="cutoff"):
        SkinNeighborList(0.0, 1.0)
