"""Active learning: frame selection, resumable labelling with failing references, the file-based
reference calculator, ensembles as one model (spkserve, ASE, i-PI extras, spkmd, msgpack server)
and the loop's round/resume logic (with stand-ins for training and MD, which are tested elsewhere)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.calculator import CalculationFailed, Calculator, all_changes

from training.active_learning import label_frames, read_labels, select_frames, spearman


# ------------------------------------------------------------------------------ selection
def test_select_frames_threshold_topk_and_time_separation():
    time_fs = np.arange(10) * 5.0  # [T]
    spread = np.zeros((10, 2))
    spread[3, 0], spread[4, 0] = 1.0, 0.9  # adjacent frames of molecule 0 (5 fs apart)
    spread[4, 1] = 0.8  # same time, other molecule: allowed
    spread[9, 0] = 0.7  # molecule 0 again, 30 fs after the first pick
    spread[6, 1] = np.nan  # a blown-up frame is never picked
    spread[7, 1] = 0.05  # below the threshold
    picks = select_frames(spread, time_fs, threshold=0.1, top_k=None, min_separation_fs=20.0)
    assert picks == [(3, 0), (4, 1), (9, 0)]  # (4, 0) too close to (3, 0); ordered by spread
    assert select_frames(spread, time_fs, threshold=0.1, top_k=2, min_separation_fs=20.0) == [(3, 0), (4, 1)]
    # no separation: adjacent frames both taken
    assert (4, 0) in select_frames(spread, time_fs, threshold=0.1, top_k=None, min_separation_fs=0.0)
    # top-k without threshold takes the low-spread frames too, never NaN
    k = select_frames(spread, time_fs, threshold=None, top_k=20, min_separation_fs=0.0)
    assert len(k) == 19 and (6, 1) not in k
    # skip the first 20 fs
    assert (3, 0) not in select_frames(spread, time_fs, threshold=0.1, top_k=None, skip_fs=20.0)
    # a threshold above every spread selects nothing (not an error)
    assert select_frames(spread, time_fs, threshold=5.0, top_k=10) == []
    with pytest.raises(ValueError):
        select_frames(spread, time_fs)
    # max_spread: molecule 0 reaches 0.95 at t=3, so its later frames (t=4, t=9) are not used
    assert select_frames(spread, time_fs, threshold=0.1, top_k=None, max_spread=0.95) == [(4, 1)]
    from training.active_learning import random_frames, trusted_mask

    mask = trusted_mask(spread, 0.95)
    assert mask[:3, 0].all() and not mask[3:, 0].any() and mask[:6, 1].all() and not mask[6:, 1].any()  # NaN at t=6
    picks = random_frames(10, 2, 9, seed=3, allowed=mask)
    assert len(set(picks)) == 9 and all(mask[t, m] for t, m in picks)


def test_spearman():
    a = np.array([0.1, 0.5, 0.2, 0.9, 0.3])
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    x, y = np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])
    # ties get the average rank: ranks (0, 1.5, 1.5, 3) vs (0, 1, 2, 3)
    rx, ry = np.array([0, 1.5, 1.5, 3]) - 1.5, np.arange(4) - 1.5
    assert spearman(x, y) == pytest.approx((rx * ry).sum() / np.sqrt((rx ** 2).sum() * (ry ** 2).sum()))


# ------------------------------------------------------------------------------ labelling
class ToyReference(Calculator):
    """E = sum |r|^2, F = -2 r; frames with info['bad'] == 'raise' fail, == 'nan' give NaN."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, stop_after: int | None = None):
        super().__init__()
        self.calls = 0
        self.stop_after = stop_after

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt("interrupted mid-labelling")
        self.calls += 1
        bad = self.atoms.info.get("bad")
        if bad == "raise":
            raise RuntimeError("SCF did not converge")
        r = self.atoms.positions
        e = float((r ** 2).sum())
        self.results = {"energy": float("nan") if bad == "nan" else e, "forces": -2 * r}


def _frames(n, bad=None):
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        a = Atoms("OH2", positions=rng.normal(size=(3, 3)))
        if bad and i in bad:
            a.info["bad"] = bad[i]
        out.append(a)
    return out


def test_failing_and_nan_frames_are_skipped_and_logged(tmp_path):
    frames = _frames(5, bad={1: "raise", 3: "nan"})
    ids = [f"f{i}" for i in range(5)]
    res = label_frames(frames, ids, ToyReference(), tmp_path / "labels", tmp_path / "failed.json")
    assert res["labelled"] == ["f0", "f2", "f4"]
    failed = json.loads((tmp_path / "failed.json").read_text())
    assert set(failed) == {"f1", "f3"}
    assert "SCF did not converge" in failed["f1"] and "non-finite" in failed["f3"]
    got = read_labels(tmp_path / "labels", res["labelled"])
    for a, i in zip(got, (0, 2, 4)):
        np.testing.assert_allclose(a.get_positions(), frames[i].positions, atol=1e-8)
        assert a.get_potential_energy() == pytest.approx(float((frames[i].positions ** 2).sum()), rel=1e-8)
        np.testing.assert_allclose(a.get_forces(), -2 * frames[i].positions, atol=1e-8)


def test_resume_labels_only_what_is_missing(tmp_path):
    frames = _frames(6, bad={4: "raise"})
    ids = [f"f{i}" for i in range(6)]
    first = ToyReference(stop_after=3)
    with pytest.raises(KeyboardInterrupt):
        label_frames(frames, ids, first, tmp_path / "labels", tmp_path / "failed.json")
    assert sorted(p.name for p in (tmp_path / "labels").glob("*.extxyz")) == ["f0.extxyz", "f1.extxyz", "f2.extxyz"]
    second = ToyReference()
    res = label_frames(frames, ids, second, tmp_path / "labels", tmp_path / "failed.json")
    assert second.calls == 3  # f3, f4 (fails), f5: nothing labelled twice
    assert res["computed"] == 2 and res["labelled"] == ["f0", "f1", "f2", "f3", "f5"]
    third = ToyReference()
    res = label_frames(frames, ids, lambda: third, tmp_path / "labels", tmp_path / "failed.json")
    assert third.calls == 0 and res["computed"] == 0 and list(res["failed"]) == ["f4"]  # known failure not retried


# --------------------------------------------------------------------- file-based reference
FAKE_PROGRAM = textwrap.dedent('''
    # a stand-in quantum-chemistry program (plain Python, no imports beyond sys): reads the
    # extxyz ASE wrote, works in Bohr and Hartree, writes an extxyz with energy and forces
    import sys
    inp, out = sys.argv[1], sys.argv[2]
    lines = open(inp).read().splitlines()
    n = int(lines[0])
    if "crash" in lines[1]:
        sys.stderr.write("fatal: basis set not found\\n"); sys.exit(3)
    bohr = 0.52917721
    atoms = [(l.split()[0], [float(x) / bohr for x in l.split()[1:4]]) for l in lines[2:2 + n]]
    e = sum(0.5 * 0.1 * x * x for _, r in atoms for x in r)
    if "nan" in lines[1]:
        e = float("nan")
    with open(out, "w") as f:
        f.write(f"{n}\\nProperties=species:S:1:pos:R:3:forces:R:3 energy={e!r} pbc=\\"F F F\\"\\n")
        for s, r in atoms:
            f.write(s + " " + " ".join(repr(x * bohr) for x in r) + " " + " ".join(repr(-0.1 * x) for x in r) + "\\n")
''')



def test_file_calculator_runs_a_program_converts_units_and_reports_failures(tmp_path):
    from ase.units import Bohr, Hartree

    from training.file_calculator import FileCalculator

    prog = tmp_path / "fake_qc.py"
    prog.write_text(FAKE_PROGRAM)
    calc = FileCalculator([sys.executable, str(prog), "{input}", "{output}"], energy_unit="Hartree",
                          length_unit="Bohr", directory=str(tmp_path / "calc"), timeout_s=120)
    frames = _frames(4, bad={1: "crash", 2: "nan"})
    # in the loop's labelling: the crash and the NaN are skipped and logged, the rest labelled
    res = label_frames(frames, ["a", "b", "c", "d"], calc, tmp_path / "labels", tmp_path / "failed.json")
    assert res["labelled"] == ["a", "d"] and set(res["failed"]) == {"b", "c"}
    for a, i in zip(read_labels(tmp_path / "labels", ["a", "d"]), (0, 3)):
        r = frames[i].positions / Bohr
        assert a.get_potential_energy() == pytest.approx(0.5 * 0.1 * (r ** 2).sum() * Hartree, rel=1e-6)
        np.testing.assert_allclose(a.get_forces(), -0.1 * r * Hartree / Bohr, rtol=1e-6)
    assert "basis set not found" in res["failed"]["b"]
    assert "status 3" in res["failed"]["b"] and "non-finite" in res["failed"]["c"]


# ------------------------------------------------------------------------------ ensembles
@pytest.fixture(scope="module")
def committee(tmp_path_factory):
    from spkserve.ensemble import write_manifest
    from spkserve.potentials import reference_bundle

    d = tmp_path_factory.mktemp("committee")
    members = [reference_bundle("morse", d / f"m{k}.bundle", species=[1, 8], depth=0.3 + 0.05 * k, alpha=1.5,
                                r0=1.0 + 0.05 * k, cutoff=5.0) for k in range(3)]
    return write_manifest(d / "ensemble.json", members), members


def _water():
    return Atoms("OH2", positions=[[0, 0, 0], [0.95, 0.1, 0], [-0.3, 0.92, 0.05]])


def test_ensemble_runner_mean_spread_and_committee(committee):
    from spkserve import keys
    from spkserve.batch import Structure
    from spkserve.ensemble import EnsembleRunner
    from spkserve.runtime import ModelRunner

    manifest, members = committee
    structs = [Structure.from_atoms(_water()), Structure.from_atoms(_water().copy())]
    structs[1].positions[1, 0] += 0.2  # two different structures in one call
    singles = [ModelRunner(m, dtype="float64").compute(structs) for m in members]
    e = np.stack([s[keys.energy].numpy() for s in singles])  # [K, S]
    f = np.stack([s[keys.forces].numpy() for s in singles])  # [K, N, 3]
    assert np.ptp(e, axis=0).min() > 1e-3  # the members really differ
    ens = EnsembleRunner(manifest, dtype="float64")
    out = ens.compute(structs, [keys.energy, keys.forces, keys.energy_uncertainty, keys.forces_uncertainty,
                                keys.committee_energy, keys.committee_forces])
    np.testing.assert_allclose(out[keys.energy].numpy(), e.mean(0), rtol=1e-10)
    np.testing.assert_allclose(out[keys.forces].numpy(), f.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out[keys.energy_uncertainty].numpy(), e.std(0), rtol=1e-10)
    per_atom = np.linalg.norm(f.std(0), axis=-1)
    np.testing.assert_allclose(out[keys.forces_uncertainty].numpy(), [per_atom[:3].max(), per_atom[3:].max()], rtol=1e-10)
    np.testing.assert_allclose(out[keys.committee_energy].numpy(), e.T, rtol=1e-12)
    np.testing.assert_allclose(out[keys.committee_forces].numpy(), f.transpose(1, 0, 2), rtol=1e-12)


def test_ase_calculator_and_ipi_extras_take_the_ensemble(committee):
    from ase.units import Bohr, Hartree

    from spkserve.ase import BundleCalculator
    from spkserve.ensemble import EnsembleRunner
    from spkserve.ipi.evaluate import BundleEvaluator

    manifest, members = committee
    atoms = _water()
    singles = []
    for m in members:
        a = atoms.copy()
        a.calc = BundleCalculator(m, dtype="float64")
        singles.append((a.get_potential_energy(), a.get_forces()))
    atoms.calc = BundleCalculator(manifest, dtype="float64", extra_properties=["energy_uncertainty", "committee_energy"])
    assert atoms.get_potential_energy() == pytest.approx(np.mean([s[0] for s in singles]), rel=1e-10)
    np.testing.assert_allclose(atoms.calc.results["committee_energy"], [s[0] for s in singles], rtol=1e-10)
    ev = BundleEvaluator(EnsembleRunner(manifest, dtype="float64"), atoms.numbers)
    energies, forces, _, extras = ev(np.zeros((1, 3, 3)), atoms.positions[None] / Bohr)
    x = json.loads(extras[0])
    # rtol 1e-6: ASE's CODATA constants differ from spkserve.units' in the 8th digit
    np.testing.assert_allclose(x["committee_pot"], [s[0] / Hartree for s in singles], rtol=1e-6)
    assert np.shape(x["committee_force"]) == (3, 9)  # [K, 3N] as i-PI's ffcommittee reads it
    np.testing.assert_allclose(np.array(x["committee_force"]), [s[1].reshape(-1) / (Hartree / Bohr) for s in singles],
                               rtol=1e-6, atol=1e-9)
    assert energies[0] == pytest.approx(np.mean(x["committee_pot"]), rel=1e-10)


def test_msgpack_server_and_spkmd_take_the_ensemble(committee, tmp_path):
    import torch

    from server_support import running_server
    from spkmd.factory import build_calculator
    from spkmd.system import System
    from spkserve import keys, units
    from spkserve.batch import Structure
    from spkserve.ensemble import EnsembleRunner
    from spkserve.server.client import RemoteProvider

    manifest, _ = committee
    atoms = _water()
    want = EnsembleRunner(manifest, dtype="float64").compute([Structure.from_atoms(atoms)],
                                                              [keys.energy, keys.energy_uncertainty])
    with running_server(manifest, dtype="float64") as server, RemoteProvider(unix=server.address) as remote:
        got = remote.compute([Structure.from_atoms(atoms)], [keys.energy, keys.forces, keys.energy_uncertainty])
    assert float(got[keys.energy][0]) == pytest.approx(float(want[keys.energy][0]), rel=1e-10)
    assert float(got[keys.energy_uncertainty][0]) == pytest.approx(float(want[keys.energy_uncertainty][0]), rel=1e-10)
    system = System.from_atoms([atoms], 1, "Angstrom", torch.float64, "cpu")
    calc = build_calculator({"type": "ensemble", "model_files": str(manifest)}, system, torch.float64, "cpu", tmp_path)
    assert len(calc.members) == 3
    calc.calculate(system)
    assert float(system.energy[0, 0]) * units.factor("Hartree", "eV") == pytest.approx(float(want[keys.energy][0]), rel=1e-10)
    spread = float(system.properties["energy_uncertainty"][0, 0]) * units.factor("Hartree", "eV")
    assert spread == pytest.approx(float(want[keys.energy_uncertainty][0]), rel=1e-8)


def test_ensembles_of_different_species_or_units_are_refused(tmp_path):
    import torch

    from spkmd.calculators import EnsembleCalculator
    from spkserve import registry
    from spkserve.bundle import default_outputs, write_bundle
    from spkserve.ensemble import EnsembleError, EnsembleRunner, write_manifest
    from spkserve.potentials import reference_bundle, reference_spec

    a = reference_bundle("harmonic_trap", tmp_path / "a.bundle", species=[1, 8], k=1.0)
    b = reference_bundle("harmonic_trap", tmp_path / "b.bundle", species=[1, 6, 8], k=1.0)
    spec, cutoff, stress = reference_spec("harmonic_trap", k=1.0)
    c = write_bundle(tmp_path / "c.bundle", registry.build(spec).to(torch.float64), {
        "species": [1, 8], "cutoff": float(cutoff), "units": {"length": "Angstrom", "energy": "kcal/mol"},
        "outputs": default_outputs("kcal/mol", "Angstrom", stress=stress), "provenance": {}})
    with pytest.raises(EnsembleError, match="species"):
        EnsembleRunner([a, b])
    with pytest.raises(EnsembleError, match="energy unit"):
        EnsembleRunner([a, c])
    with pytest.raises(EnsembleError, match="species"):
        write_manifest(tmp_path / "e.json", [a, b])
    with pytest.raises(EnsembleError, match="energy unit"):
        EnsembleCalculator([a, c])
    m = write_manifest(tmp_path / "ok.json", [a, a])
    assert len(EnsembleRunner(m).members) == 2
    bad = json.loads(m.read_text())
    bad["members"] = ["a.bundle", "missing.bundle"]
    (tmp_path / "broken.json").write_text(json.dumps(bad))
    with pytest.raises(EnsembleError, match="missing.bundle"):
        EnsembleRunner(tmp_path / "broken.json")


# --------------------------------------------------------------------------- the loop
def _fake_md_log(path: Path, spread: np.ndarray, n_atoms: int = 3) -> None:
    """An HDF5 file in the spkmd logger layout (format 1): replica 0, M molecules of n_atoms."""
    import h5py

    T, M = spread.shape
    rng = np.random.default_rng(2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs.update(format=1, entries=T, n_replicas=1, n_molecules=M, n_atoms=[n_atoms] * M,
                       atomic_numbers=[8, 1, 1] * M)
        f["molecules/positions"] = rng.normal(size=(T, 1, M * n_atoms, 3)).astype(np.float32)
        f["properties/forces_uncertainty"] = spread[:, None].astype(np.float32)
        f["properties/time"] = np.arange(T) * 5.0


def test_loop_rounds_threshold_nothing_failures_and_resume(tmp_path, monkeypatch):
    """Round orchestration with stand-ins for training/MD: counts reference calls across an interruption."""
    import ase.io

    import training.active_learning as al

    data = tmp_path / "data.extxyz"
    frames = _frames(30)
    for a in frames:
        a.calc = None
    ase.io.write(str(data), frames)
    trained: list[int] = []

    def fake_train(cfg, pool_file, n_frames, out_dir, seed, progress):
        out_dir.mkdir(parents=True, exist_ok=True)
        assert len(ase.io.read(str(pool_file), ":")) == n_frames
        trained.append(n_frames)
        (out_dir / "ensemble.json").write_text("{}")
        return out_dir / "ensemble.json"

    def fake_eval(manifest, test, batch_size=50):
        return {"forces_mae": 1.0, "forces_rmse": 1.0, "spread_error_spearman": 0.5, "n_frames": len(test)}

    spreads = {0: np.array([[0.9, 0.1], [0.8, 0.7], [0.2, 0.6], [0.1, 0.1]]),  # round 0: 4 above 0.5
               1: np.full((4, 2), 0.01)}                                       # round 1: nothing above

    def fake_md(cfg, manifest, starts, md_dir, seed, progress):
        r = int(md_dir.parent.name.split("_")[1])
        assert len(starts) == 2
        _fake_md_log(md_dir / "sim" / "simulation.hdf5", spreads[r])
        return md_dir / "sim" / "simulation.hdf5"

    monkeypatch.setattr(al, "train_committee", fake_train)
    monkeypatch.setattr(al, "evaluate_committee", fake_eval)
    monkeypatch.setattr(al, "run_md", fake_md)
    cfg_file = tmp_path / "al.yaml"
    cfg_file.write_text(textwrap.dedent(f"""
        work_dir: {tmp_path / 'work'}
        rounds: 2
        initial: {{file: {data}, n_frames: 10}}
        test: {{max_frames: 5}}
        md: {{replicas: 2}}
        selection: {{threshold_forces: 0.5, top_k: 10, min_separation_fs: 0.0, skip_fs: 0.0}}
        reference: {{_target_: "{__name__}:CountingReference"}}
    """))
    sys.modules[__name__].CountingReference = CountingReference
    CountingReference.calls = 0
    CountingReference.fail_positions = None
    CountingReference.stop_after = 2
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        al.run_loop(al.load_config(cfg_file), progress=lines.append)
    assert CountingReference.calls == 2
    CountingReference.stop_after = None
    CountingReference.fail_positions = 0  # the 3rd selected frame (the first computed now) fails
    res = al.run_loop(al.load_config(cfg_file), progress=lines.append)
    assert CountingReference.calls == 4  # only the 2 missing frames were computed after the restart
    r0, r1, r2 = res["rounds"]
    assert (r0["selected"], r0["added"], r0["failed"]) == (4, 3, 1)
    assert (r1["selected"], r1["added"]) == (0, 0)  # threshold selected nothing: said so, went on
    assert any("nothing to label" in s for s in lines)
    assert [r["n_labelled"] for r in (r0, r1, r2)] == [10, 13, 13]
    assert trained[-2:] == [13, 13] and (tmp_path / "work" / "rounds.png").exists()
    assert json.loads((tmp_path / "work" / "round_0" / "selected.json").read_text()) == [[0, 0], [1, 0], [1, 1], [2, 1]]
    # a complete loop re-run computes nothing and trains nothing new
    n_train = len(trained)
    monkeypatch.setattr(al, "train_committee", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")) if not
                        (a[3] / "ensemble.json").exists() else a[3] / "ensemble.json")
    al.run_loop(al.load_config(cfg_file), progress=lines.append)
    assert CountingReference.calls == 4 and len(trained) == n_train


class CountingReference(ToyReference):
    """Reference built by ``_target_`` in the loop test: counts calls across instances."""

    calls = 0
    stop_after: int | None = None
    fail_positions: int | None = None

    def __init__(self):
        Calculator.__init__(self)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        Calculator.calculate(self, atoms, properties, system_changes)
        cls = type(self)
        if cls.stop_after is not None and cls.calls >= cls.stop_after:
            raise KeyboardInterrupt("interrupted")
        n = cls.calls
        cls.calls += 1
        if cls.fail_positions is not None and n - 2 == cls.fail_positions:
            raise RuntimeError("reference exploded")
        r = self.atoms.positions
        self.results = {"energy": float((r ** 2).sum()), "forces": -2 * r}


# ------------------------------------------------------------------- spktrain ensemble
def test_ensemble_options_and_bootstrap_split(tmp_path):
    from click.testing import CliRunner

    from training.cli import main
    from training.data.splits import load_split, save_split
    from training.ensemble import bootstrap_split, split_overrides

    opts, rest = split_overrides(["experiment=ethanol_xtb", "ensemble.n_models=3", "ensemble.bootstrap=true"])
    assert (opts.n_models, opts.bootstrap, rest) == (3, True, ["experiment=ethanol_xtb"])
    with pytest.raises(ValueError, match="n_models"):
        split_overrides(["ensemble.n_models=1"])
    with pytest.raises(ValueError, match="unknown ensemble option"):
        split_overrides(["ensemble.members=3"])
    out = CliRunner().invoke(main, ["ensemble", "ensemble.size=4"])
    assert out.exit_code != 0 and "unknown ensemble option" in out.output
    train, val, test = np.arange(0, 40), np.arange(40, 45), np.arange(45, 50)
    save_split(tmp_path / "split.npz", (train, val, test))
    a = load_split(bootstrap_split(tmp_path / "split.npz", 1, tmp_path / "a.npz"), 50)
    b = load_split(bootstrap_split(tmp_path / "split.npz", 2, tmp_path / "b.npz"), 50)
    assert len(a[0]) == 40 and set(a[0]) <= set(train) and len(set(a[0])) < 40  # drawn with replacement
    assert not np.array_equal(a[0], b[0])  # members get different resamples
    np.testing.assert_array_equal(a[1], val)
    np.testing.assert_array_equal(a[2], test)


def test_spkmd_ensemble_switches_to_the_reference_for_flagged_molecules(committee):
    import torch
    from ase.calculators.lj import LennardJones

    from spkmd.calculators import EnsembleCalculator
    from spkmd.system import System
    from spkserve import units

    _, members = committee
    near = _water()
    far = Atoms("OH2", positions=[[0, 0, 0], [7.0, 0, 0], [0, 7.5, 0]])  # beyond the 5 Å cutoff: no spread
    system = System.from_atoms([near, far], 1, "Angstrom", torch.float64, "cpu")
    ref = LennardJones(sigma=1.0, epsilon=0.1, rc=3.0)
    calc = EnsembleCalculator(members, threshold_energy_eV=1e-4, on_exceed="reference", reference=ref, dtype="float64")
    calc.calculate(system)
    assert system.properties["reference_used"].tolist() == [[1.0, 0.0]]
    a = near.copy()
    a.calc = LennardJones(sigma=1.0, epsilon=0.1, rc=3.0)
    to_eV, to_eVA = units.factor("Hartree", "eV"), units.factor("Hartree/Bohr", "eV/Angstrom")
    np.testing.assert_allclose(system.forces[0, :3].numpy() * to_eVA, a.get_forces(), rtol=1e-9, atol=1e-12)
    assert float(system.energy[0, 0]) * to_eV == pytest.approx(a.get_potential_energy(), rel=1e-9)
    np.testing.assert_allclose(system.forces[0, 3:].numpy(), 0.0, atol=1e-12)  # unflagged: committee mean (zero here)
    with pytest.raises(ValueError, match="reference"):
        EnsembleCalculator(members, on_exceed="reference")
