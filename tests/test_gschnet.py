"""cG-SchNet: model invariances, normalisation, conditioning, training, sampling, entry points, bad input."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from spkserve.nn.gschnet import (
    COMPOSITION,
    LOG_P_DISTANCE,
    LOG_P_TYPE,
    N_ATOMS_TARGET,
    STOP_TYPE,
    CompositionEmbedding,
    ConditionRangeWarning,
    ScalarConditionEmbedding,
)
from spkserve.nn.gschnet_analysis import identify, valence_check
from spkserve.nn.gschnet_sampling import (
    GenerationError,
    condition_tensors,
    generate,
    log_density_on_points,
    partial_molecule_batch,
    placement_grid,
)
from spkserve.registry import build

pytest.importorskip("pytorch_lightning")

from training.gschnet.data import GSchNetDataError, Molecule, load_molecules, neighbor_cache  # noqa: E402
from training.gschnet.sequences import StepCollate, StepDataset, sample_trajectory  # noqa: E402
from training.gschnet.task import gschnet_loss  # noqa: E402

TYPES = [1, 6, 7, 8]


def tiny_spec(conditions=None, types=TYPES, cutoff=4.0):
    return {"name": "cgschnet", "params": {
        "representation": {"name": "schnet", "params": {"n_atom_basis": 32, "n_interactions": 2, "n_rbf": 16,
                                                        "cutoff_angstrom": cutoff, "max_z": 125,
                                                        "filter_table_points": 0}},
        "atom_types": types, "model_cutoff_angstrom": cutoff, "prediction_cutoff_angstrom": cutoff,
        "placement_cutoff_angstrom": 1.7, "conditions": conditions or [], "n_conditional_features": 16,
        "distance_max_angstrom": 4.0, "n_distance_bins": 61}}


def as_molecule(name: str, **props) -> Molecule:
    a = molecule(name)
    return Molecule(a.numbers.astype(np.int64), a.positions - a.get_center_of_mass(), dict(props))


def random_rotation(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (q * torch.sign(torch.linalg.det(q))).float()


def overfit(model, mols, keys_, steps=300, lr=3e-3):
    torch.manual_seed(0)
    ds = StepDataset(mols, model.placement_cutoff, 0, "random")
    col = StepCollate(model.model_cutoff, model.prediction_cutoff, model.atom_types, keys_)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = gschnet_loss(model, col([ds[i % len(mols)] for i in range(2 * len(mols))]))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


# ------------------------------------------------------------------ model properties
def _ethanol_step(perm=None, rot=None):
    a = molecule("CH3CH2OH")
    r = torch.tensor(a.positions - a.get_center_of_mass(), dtype=torch.float32)
    z = torch.tensor(a.numbers)
    placed = torch.arange(6)  # a partial molecule: 6 of 9 atoms
    focus = 2
    if perm is not None:
        placed = placed[perm]
        focus = int((perm == 2).nonzero())
    rr = r[placed] @ rot.T if rot is not None else r[placed]
    return z[placed], rr, focus


def test_outputs_invariant_to_rotation_and_permutation_and_distributions_normalised():
    torch.manual_seed(1)
    model = build(tiny_spec()).eval()
    rot = random_rotation(3)
    perm = torch.tensor([3, 0, 5, 2, 1, 4])
    grid = placement_grid(model.placement_cutoff, 0.2).float()
    results = []
    for p, R in ((None, None), (perm, None), (None, rot), (perm, rot)):
        z, r, f = _ethanol_step(p, R)
        b = partial_molecule_batch([z], [r], [f], model.model_cutoff, model.prediction_cutoff,
                                   next_numbers=torch.tensor([6]))
        with torch.no_grad():
            out = model(b)
            # log-density of the next atom on grid points that rotate with the molecule
            pts = r[f] + (grid @ R.T if R is not None else grid)
            node_pos = b["positions"][b["pred_idx_j"]]
            dens = log_density_on_points(model, out[LOG_P_DISTANCE], node_pos, pts)
        results.append((out[LOG_P_TYPE], dens))
        # every predicted distribution is normalised
        assert torch.allclose(out[LOG_P_TYPE].exp().sum(-1), torch.ones(1), atol=1e-5)
        assert torch.allclose(out[LOG_P_DISTANCE].exp().sum(-1), torch.ones(out[LOG_P_DISTANCE].shape[0]), atol=1e-5)
    ref_t, ref_d = results[0]
    assert ref_d.std() > 1e-3  # the density is not flat, so the comparison means something
    for t, d in results[1:]:
        assert torch.allclose(t, ref_t, atol=1e-5)
        # bins are rounded, so a point exactly on a bin edge may move one bin: compare robustly
        assert (d - ref_d).abs().median() < 1e-4
        assert np.corrcoef(d.numpy(), ref_d.numpy())[0, 1] > 0.999


def test_condition_embeddings_shapes_and_ranges():
    emb = ScalarConditionEmbedding("gap", 2.0, 10.0, 0.5, n_features=8)
    assert emb.expansion.n_features == 17  # centres 2.0, 2.5, ..., 10.0
    x = emb.expansion(torch.tensor([2.0, 6.25, 10.0]))
    assert x.shape == (3, 17)
    assert int(x[0].argmax()) == 0 and int(x[2].argmax()) == 16 and int(x[1].argmax()) in (8, 9)
    assert torch.allclose(x.max(-1).values[[0, 2]], torch.ones(2))
    assert emb({"gap": torch.tensor([3.0, 4.0])}).shape == (2, 8)
    with pytest.warns(ConditionRangeWarning, match="gap=12.0"):
        emb.check_range(12.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emb.check_range(5.0)
    comp = CompositionEmbedding(TYPES, max_n_atoms=20, n_features=8)
    out = comp({COMPOSITION: torch.tensor([[6.0, 2, 0, 1], [4, 1, 0, 0]]), N_ATOMS_TARGET: torch.tensor([9.0, 5])})
    assert out.shape == (2, 8)
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match="maximum"):
        ScalarConditionEmbedding("x", 1.0, 1.0, 0.1)


def test_conditions_checked_against_model():
    model = build(tiny_spec([{"type": "scalar", "name": "gap", "min": 0.0, "max": 1.0, "grid_spacing": 0.25,
                              "n_features": 8}]))
    with pytest.raises(GenerationError, match="trained on.*gap"):
        condition_tensors(model, {"gap": 0.5, "polarizability": 3.0}, 2)
    with pytest.raises(GenerationError, match="give a target for.*gap"):
        condition_tensors(model, {}, 2)
    with pytest.warns(ConditionRangeWarning):
        condition_tensors(model, {"gap": 5.0}, 2)
    assert condition_tensors(model, {"gap": 0.5}, 3)["gap"].tolist() == [0.5] * 3
    model2 = build(tiny_spec([{"type": "composition", "max_n_atoms": 10, "n_features": 8}]))
    c = condition_tensors(model2, {"composition": "CH4O"}, 2)
    assert c[COMPOSITION].tolist() == [[4, 1, 0, 1]] * 2 and c[N_ATOMS_TARGET].tolist() == [6, 6]
    with pytest.raises(GenerationError, match="Cl"):
        condition_tensors(model2, {"composition": "CH3Cl"}, 1)


# ------------------------------------------------------------------ sequences and data
def test_trajectory_places_every_atom_once_within_placement_cutoff():
    mol = as_molecule("CH3CH2OH")
    rng = np.random.default_rng(0)
    for ordering in ("random", "canonical"):
        steps = sample_trajectory(mol, 1.7, rng, ordering)
        assert len(steps) == 2 * mol.n_atoms
        nexts = [s.next_atom for s in steps if s.next_atom >= 0]
        assert sorted(nexts) == list(range(mol.n_atoms))
        stops = [s.focus for s in steps if s.next_atom < 0]
        assert sorted(stops) == list(range(mol.n_atoms))  # every atom is finished exactly once
        for s in steps[1:]:
            assert s.focus in s.placed and s.next_atom not in s.placed
            if s.next_atom >= 0:
                assert np.linalg.norm(mol.positions[s.focus] - mol.positions[s.next_atom]) < 1.7
            else:  # stop only when no unplaced neighbour is left
                d = np.linalg.norm(mol.positions - mol.positions[s.focus], axis=1)
                left = set(np.nonzero(d < 1.7)[0]) - set(s.placed) - {s.focus}
                assert not left
    ds = StepDataset([mol], 1.7, draw_random_samples=3)
    assert len(ds[0][1]) == 3
    assert len(StepDataset([mol], 1.7, 0)[0][1]) == 18


def test_training_step_reduces_loss_on_fixed_batch():
    torch.manual_seed(0)
    model = build(tiny_spec())
    mols = [as_molecule("CH3CH2OH"), as_molecule("CH3CN")]
    ds = StepDataset(mols, 1.7, 0, fixed_seed=1)
    batch = StepCollate(4.0, 4.0, TYPES)([ds[0], ds[1]])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = float(gschnet_loss(model, batch)["loss"].detach())
    for _ in range(30):
        loss = gschnet_loss(model, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = float(gschnet_loss(model, batch)["loss"].detach())
    assert last < 0.6 * first, (first, last)


def test_overfit_single_molecule_regenerates_it():
    model = overfit(build(tiny_spec(types=[1, 6, 8])), [as_molecule("CH3OH")], [])
    target = identify(*(lambda m: (m.numbers, m.positions))(as_molecule("CH3OH")), use_rdkit=False)
    res = generate(model, 20, batch_size=20, max_n_atoms=10, seed=0)
    ids = [identify(z, r, use_rdkit=False) if f else None for z, r, f in zip(res.numbers, res.positions, res.finished)]
    assert sum(i == target for i in ids) >= 14, ids
    # the regenerated geometry has methanol's bond lengths (C-O ~1.42 A)
    k = ids.index(target)
    z, r = res.numbers[k], res.positions[k]
    c, o = r[z == 6][0], r[z == 8][0]
    assert 1.3 < np.linalg.norm(c - o) < 1.55


def test_conditioning_changes_the_generated_distribution():
    cond = [{"type": "scalar", "name": "gap", "min": 0.0, "max": 1.0, "grid_spacing": 0.25, "n_features": 16}]
    mols = [as_molecule("NH3", gap=0.0), as_molecule("H2O", gap=1.0)]
    model = overfit(build(tiny_spec(cond, types=[1, 7, 8])), mols, ["gap"])
    names = {identify(m.numbers, m.positions, use_rdkit=False): n for m, n in zip(mols, ["NH3", "H2O"])}
    frac = {}
    for gap, name in ((0.0, "NH3"), (1.0, "H2O")):
        res = generate(model, 20, batch_size=20, max_n_atoms=8, conditions={"gap": gap}, seed=2)
        got = [names.get(identify(z, r, use_rdkit=False)) if f else None
               for z, r, f in zip(res.numbers, res.positions, res.finished)]
        frac[name] = got.count(name) / len(got)
        other = "H2O" if name == "NH3" else "NH3"
        assert got.count(other) <= 2, (gap, got)  # the other molecule's condition is (almost) never obeyed
    assert min(frac.values()) >= 0.5, frac


def test_generation_stops_at_max_atoms_and_is_deterministic():
    torch.manual_seed(4)
    model = build(tiny_spec())
    a = generate(model, 12, batch_size=5, max_n_atoms=4, seed=7)
    assert all(len(z) <= 4 for z in a.numbers)
    assert all(f or len(z) == 4 for z, f in zip(a.numbers, a.finished))  # unfinished only at the cap
    assert not a.finished.all()  # an untrained model rarely stops in time
    b = generate(model, 12, batch_size=5, max_n_atoms=4, seed=7)
    c = generate(model, 12, batch_size=5, max_n_atoms=4, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a.positions, b.positions))
    assert not all(x.shape == y.shape and np.allclose(x, y) for x, y in zip(a.positions, c.positions))


# ------------------------------------------------------------------ validity
def test_valence_check_accepts_molecules_and_rejects_broken_ones():
    for name in ("CH3CH2OH", "C6H6", "HCN", "CH3COOH"):
        a = molecule(name)
        assert valence_check(a.numbers, a.positions)[0], name
    a = molecule("CH3CH2OH")
    r = a.positions.copy()
    r[a.numbers == 8] += 1.5  # pull the OH group off: two fragments / wrong valences
    assert not valence_check(a.numbers, r)[0]
    assert not valence_check(a.numbers[:-1], a.positions[:-1])[0]  # a missing H leaves a radical


# ------------------------------------------------------------------ bad input
def _write(tmp_path, frames, name="d.extxyz"):
    from ase.io import write

    p = tmp_path / name
    write(p, frames)
    return p


def test_bad_data_is_refused_with_a_clear_message(tmp_path):
    water = molecule("H2O")
    periodic = water.copy()
    periodic.cell = [5, 5, 5]
    periodic.pbc = True
    with pytest.raises(GSchNetDataError, match="periodic"):
        load_molecules(_write(tmp_path, [water, periodic]), [1, 8], 1.7)
    with pytest.raises(GSchNetDataError, match=r"\[7\].*atom_types"):
        load_molecules(_write(tmp_path, [water, molecule("NH3")]), [1, 8], 1.7)
    with pytest.raises(GSchNetDataError, match="no atoms"):
        load_molecules(_write(tmp_path, [water, Atoms()], "e.xyz"), [1, 8], 1.7)
    with pytest.warns(UserWarning, match="single-atom"):
        mols = load_molecules(_write(tmp_path, [water, Atoms("O")]), [1, 8], 1.7)
    assert len(mols) == 1
    far = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [5.0, 0, 0]])
    with pytest.raises(GSchNetDataError, match="not connected"):
        load_molecules(_write(tmp_path, [far]), [1, 8], 1.7)


def test_neighbor_cache_round_trip(tmp_path):
    mols = [as_molecule("CH3CH2OH"), as_molecule("H2O")]
    for m in mols:
        m.distances = np.linalg.norm(m.positions[:, None] - m.positions[None], axis=-1).astype(np.float32)
    neighbor_cache(mols, tmp_path / "nbr.npz")
    fresh = [as_molecule("CH3CH2OH"), as_molecule("H2O")]
    neighbor_cache(fresh, tmp_path / "nbr.npz")
    for a, b in zip(mols, fresh):
        np.testing.assert_array_equal(a.distances, b.distances)


# ------------------------------------------------------------------ entry points
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from ase.io import write

    p = tmp_path_factory.mktemp("gsdata") / "tiny.extxyz"
    frames = []
    for k, name in enumerate(["CH4", "NH3", "H2O", "CH3OH", "CH3CN", "HCN", "H2CO", "C2H6", "CH3CHO", "C2H2"]):
        a = molecule(name)
        a.info["gap_test"] = 1.0 + k
        frames.append(a)
    write(p, frames)
    return p


def test_entry_points_train_resume_generate(tmp_path, tiny_data):
    from click.testing import CliRunner

    from spkserve.nn.gschnet_generate import main as gen_main
    from training.gschnet.cli import main as train_main

    run = tmp_path / "run"
    cfgdir = tmp_path / "cfg" / "model" / "conditioning"
    cfgdir.mkdir(parents=True)
    (cfgdir / "mygap.yaml").write_text(
        "n_features: 16\nconditions:\n  - {type: scalar, name: gap, min: 0.0, max: 12.0, grid_spacing: 1.0, "
        "n_features: 8}\n")
    args = ["--config-dir", str(tmp_path / "cfg"), "experiment=gschnet_template", f"data.datapath={tiny_data}",
            "globals.atom_types=[1, 6, 7, 8]", "globals.model_cutoff=4.0", "globals.prediction_cutoff=4.0",
            "globals.placement_cutoff=1.7", "model/conditioning=mygap", "+data.properties.gap=gap_test",
            "data.num_train=8", "data.num_val=2", "data.batch_size=4", f"run.dir={run}", "trainer.max_epochs=1",
            "trainer.enable_progress_bar=false", "model.representation.params.n_atom_basis=16",
            "model.representation.params.n_interactions=1"]
    r = CliRunner().invoke(train_main, args)
    assert r.exit_code == 0, r.output
    assert (run / "best_model.bundle").exists() and (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "data" / "neighbors.npz").exists()
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1
    r = CliRunner().invoke(train_main, ["resume", str(run), "trainer.max_epochs=2"])
    assert r.exit_code == 0, r.output
    m = json.loads((run / "metrics.json").read_text())
    assert m["resumed"] and m["epochs"] == 2
    out = tmp_path / "gen.db"
    r = CliRunner().invoke(gen_main, [f"modeldir={run}", "n_molecules=6", "batch_size=3", "max_n_atoms=6",
                                      "++conditions.gap=4.0", f"outputfile={out}"])
    assert r.exit_code == 0, r.output
    assert "valid_fraction_of_finished" in r.output
    from ase.db import connect

    with connect(str(out)) as db:
        rows = list(db.select())
        assert len(rows) == 6 and all(row.cond_gap == 4.0 for row in rows)
    s = json.loads((tmp_path / "gen.db.summary.json").read_text())
    assert s["n_molecules"] == 6 and s["novelty_reference"] == "training data"
    # a condition the model was not trained on, and a missing one
    r = CliRunner().invoke(gen_main, [f"modeldir={run}", "++conditions.gap=4.0", "++conditions.polarizability=1.0"])
    assert r.exit_code != 0 and "polarizability" in r.output
    r = CliRunner().invoke(gen_main, [f"modeldir={run}"])
    assert r.exit_code != 0 and "gap" in r.output
    # atom types in the data missing from globals.atom_types
    bad = [a if not a.startswith("globals.atom_types") else "globals.atom_types=[1, 6, 8]" for a in args]
    r = CliRunner().invoke(train_main, [a if not a.startswith("run.dir") else f"run.dir={tmp_path}/r2" for a in bad])
    assert r.exit_code != 0 and "atom_types" in r.output


def test_experiment_configs_compose():
    from training.gschnet.config import compose_gschnet_config
    from training.gschnet.run import model_spec

    for exp, names in (("gschnet_qm9", []), ("gschnet_qm9_gap_relenergy", ["gap", "relative_atomic_energy"]),
                       ("gschnet_qm9_comp_relenergy", [None, "relative_atomic_energy"])):
        cfg = compose_gschnet_config([f"experiment={exp}", "data.datapath=x.db"])
        spec = model_spec(cfg)
        assert [c.get("name") for c in spec["params"]["conditions"]] == names
        assert spec["params"]["placement_cutoff_angstrom"] == 1.7
    cfg = compose_gschnet_config(["experiment=gschnet_qm9", "data.datapath=x", "model/representation=painn"])
    assert model_spec(cfg)["params"]["representation"]["name"] == "painn"
    model = build(model_spec(cfg))  # PaiNN builds as the representation too
    assert model.representation.max_z >= STOP_TYPE


def test_console_scripts_installed():
    import shutil
    import subprocess

    for name in ("gschnet_train", "gschnet_generate"):
        exe = shutil.which(name) or str(__import__("pathlib").Path(__import__("sys").executable).parent / name)
        r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "Usage" in r.stdout, r.stderr


def test_shipped_generator_runs():
    from spkserve.nn.gschnet_generate import SHIPPED
    from spkserve.nn.gschnet_sampling import load_generator

    if not SHIPPED.exists():
        pytest.fail(f"the shipped generator {SHIPPED} is missing")
    loaded = load_generator(str(SHIPPED))
    assert set(loaded.model.condition_names) == {"gap", "relative_atomic_energy"}
    res = generate(loaded.model, 8, batch_size=8, max_n_atoms=25, conditions={"gap": 6.0,
                                                                              "relative_atomic_energy": 0.0}, seed=0)
    assert res.finished.mean() > 0.5
    assert SHIPPED.stat().st_size < 3 * 2**20
    assert math.isfinite(res.seconds)
