"""``spkserve convert schnetpack``: SchNetPack 2.x model files -> bundles, without executing the pickle.

The fixtures in tests/fixtures/schnetpack/ were written by SchNetPack 2.2 itself
(``make_fixtures.py``, run with the benchmark venv): small SchNet and PaiNN
potentials with random non-zero weights and biases, saved with ``torch.save`` as
SchNetPack saves ``best_model``, and SchNetPack's own ASE-calculator predictions
in float64 on three ethanol geometries and one periodic (triclinic) cell.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from click.testing import CliRunner

from spkserve import units
from spkserve.bundle import load_bundle, read_metadata
from spkserve.cli import main as spkserve_main
from spkserve.provider import PROVIDER_UNITS
from spkserve.convert.schnetpack_model import ConversionError, convert_schnetpack
from spkserve.convert.torch_pickle import DisallowedGlobalError, ModelFileError

pytestmark = pytest.mark.timeout(300)
torch.set_num_threads(1)

FIX = Path(__file__).parent / "fixtures" / "schnetpack"
REF = json.loads((FIX / "references.json").read_text())
MODELS = sorted(REF["models"])


def _atoms(i: int) -> Atoms:
    s = REF["structures"][i]
    return Atoms(s["numbers"], s["positions"], cell=s["cell"], pbc=s["pbc"])


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("converted")
    return {
        name: convert_schnetpack(FIX / REF["models"][name]["file"], out / f"{name}.bundle", energy_unit="eV",
                                 species=[1, 6, 8])
        for name in MODELS
    }


def test_fixtures_are_not_trivial():
    # different structures give clearly different energies and non-zero forces, so a model that
    # drops a layer, a bias or an offset cannot match by accident
    assert set(MODELS) == {"schnet", "painn", "painn_response", "schnet_qm9", "so3net"}
    for name in MODELS:
        e = np.array(REF["models"][name]["energy"])
        assert np.ptp(e[:3]) > 1e-3, name
        forces = [f for f in REF["models"][name]["forces"] if f is not None]
        assert all(np.abs(np.array(f)).max() > 1e-2 for f in forces), name
    for key in ("dipole_moment", "polarizability"):
        values = np.array(REF["models"]["painn_response"][key])
        assert np.ptp(values[:3], axis=0).max() > 1e-3 and np.abs(values).max() > 1e-2, key
    assert REF["structures"][3]["pbc"] == [True, True, True]


def _close(got, want, what):
    got, want = np.asarray(got, dtype=float), np.asarray(want, dtype=float)
    err = np.abs(got - want).max()
    assert err <= 1e-6 * max(np.abs(want).max(), 1e-3), (what, err, np.abs(want).max())


@pytest.mark.parametrize("name", MODELS)
def test_converted_model_matches_schnetpack(name, bundles):
    """Energies (with mean and atom-reference offsets and scaling), forces, stress, dipoles and
    polarizabilities equal SchNetPack's own predictions to 1e-6 relative in float64."""
    from spkserve.ase import BundleCalculator

    ref = REF["models"][name]
    extras = [k for k in ("dipole_moment", "polarizability") if ref[k][0] is not None]
    calc = BundleCalculator(str(bundles[name]), dtype="float64", extra_properties=extras)
    for i in range(len(REF["structures"])):
        atoms = _atoms(i)
        atoms.calc = calc
        _close(atoms.get_potential_energy(), ref["energy"][i], (name, i, "energy"))
        if ref["forces"][i] is not None:
            _close(atoms.get_forces(), ref["forces"][i], (name, i, "forces"))
        if ref["stress"][i] is not None:
            # painn_response scales energy and forces by 2.5 (ScaleProperty) but SchNetPack leaves its
            # stress unscaled; the bundle's stress is the derivative of the scaled energy
            scale = 2.5 if name == "painn_response" else 1.0
            _close(atoms.get_stress(voigt=False), scale * np.array(ref["stress"][i]), (name, i, "stress"))
        for key in extras:  # ASE results come in the provider's units (e*Angstrom, e*Angstrom^2/V)
            f = units.factor(calc.provider.metadata["outputs"][key]["unit"], PROVIDER_UNITS[key])
            _close(calc.results[key], f * np.array(ref[key][i]), (name, i, key))


def test_forces_without_a_schnetpack_forces_module(bundles):
    """The qm9-style model has no Forces module in SchNetPack; the bundle's forces are still
    -dE/dR of SchNetPack's energy (central differences of the reference-matched energy)."""
    from spkserve.ase import BundleCalculator

    calc = BundleCalculator(str(bundles["schnet_qm9"]), dtype="float64")
    atoms = _atoms(0)
    atoms.calc = calc
    f = atoms.get_forces()
    h = 1e-5
    for a, c in ((0, 0), (3, 1), (8, 2)):
        e = []
        for sgn in (1, -1):
            b = atoms.copy()
            b.positions[a, c] += sgn * h
            b.calc = calc
            e.append(b.get_potential_energy())
        assert abs(-(e[0] - e[1]) / (2 * h) - f[a, c]) < 1e-6 * max(1.0, abs(f[a, c]))


def test_bundle_metadata_and_provenance(bundles):
    m = read_metadata(bundles["painn_response"])
    assert set(m["outputs"]) == {"energy", "forces", "stress", "dipole_moment", "partial_charges", "polarizability"}
    m = read_metadata(bundles["schnet"])
    assert m["cutoff"] == REF["cutoff_angstrom"] and m["species"] == [1, 6, 8]
    assert m["units"] == {"length": "Ang", "energy": "eV"}
    assert set(m["outputs"]) == {"energy", "forces", "stress"}
    src = m["provenance"]["converted_from"]
    assert src["format"] == "schnetpack" and src["schnetpack_version"] == REF["schnetpack_version"]
    assert any("atom references" in n for n in src["notes"])
    # the schnet fixture was trained in float32 (CastTo64 post-processor): kept float32, outputs float64
    loaded = load_bundle(bundles["schnet"])
    assert loaded.dtype == torch.float32 and loaded.model.cast_float64
    assert load_bundle(bundles["painn"]).dtype == torch.float64
    assert "schnetpack" not in sys.modules  # converting never imported SchNetPack


def test_runs_in_spkmd(bundles):
    """The converted bundle drives spkmd: forces in spkmd's atomic units equal SchNetPack's,
    and a short velocity-Verlet run conserves the total energy."""
    from spkmd.calculators import BundleCalculator
    from spkmd.initializers import MaxwellBoltzmann
    from spkmd.integrators import VelocityVerlet
    from spkmd.simulator import Simulator
    from spkmd.system import System

    ev_a = units.factor("Hartree/Bohr", "eV/Angstrom")
    ev = units.factor("Hartree", "eV")
    s = System.from_atoms([_atoms(i) for i in range(3)])
    calc = BundleCalculator(bundles["schnet"], dtype="float64", skin_angstrom=0.5)
    calc.calculate(s)
    for m in range(3):
        sl = s.molecule_slice(m)
        np.testing.assert_allclose(s.forces[0, sl].numpy() * ev_a, REF["models"]["schnet"]["forces"][m], rtol=1e-6, atol=1e-9)
        assert abs(float(s.energy[0, m]) * ev - REF["models"]["schnet"]["energy"][m]) < 1e-9
    s = System.from_atoms(_atoms(0))
    MaxwellBoltzmann(100.0)(s, torch.Generator().manual_seed(0))
    calc.calculate(s)
    e0 = float(s.energy[0, 0] + s.kinetic_energy()[0, 0])
    Simulator(s, VelocityVerlet(0.1), calc).simulate(50)
    e1 = float(s.energy[0, 0] + s.kinetic_energy()[0, 0])
    assert np.isfinite(e1) and abs(e1 - e0) * ev < 1e-4, (e0 * ev, e1 * ev)
    assert float((s.positions[0] - torch.as_tensor(_atoms(0).positions) * units.factor("Ang", "Bohr")).abs().max()) > 1e-4


def test_cli_writes_a_float64_bundle(tmp_path):
    out = tmp_path / "p.bundle"
    res = CliRunner().invoke(spkserve_main, [
        "convert", "schnetpack", str(FIX / REF["models"]["schnet"]["file"]), "-o", str(out),
        "--energy-unit", "kcal/mol", "--species", "H,C,O", "--dtype", "float64"])
    assert res.exit_code == 0, res.output
    assert "species     H(1) C(6) O(8)" in res.output and "kcal/mol" in res.output
    b = load_bundle(out)
    assert b.dtype == torch.float64 and b.energy_unit == "kcal/mol"


def test_units_from_the_run_config_or_an_error(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    shutil.copy(FIX / REF["models"]["painn"]["file"], run / "best_model")
    with pytest.raises(ConversionError, match="--energy-unit"):
        convert_schnetpack(run / "best_model", tmp_path / "a.bundle")
    (run / ".hydra" / "config.yaml").write_text(
        "data:\n  distance_unit: Ang\n  property_units:\n    energy: kcal/mol\n    forces: kcal/mol/Ang\n")
    convert_schnetpack(run / "best_model", tmp_path / "b.bundle")
    m = read_metadata(tmp_path / "b.bundle")
    assert m["units"] == {"length": "Ang", "energy": "kcal/mol"}
    assert m["outputs"]["forces"]["unit"] == "kcal/mol/Ang"
    # an explicit unit wins over the config
    convert_schnetpack(run / "best_model", tmp_path / "c.bundle", energy_unit="eV")
    assert read_metadata(tmp_path / "c.bundle")["units"]["energy"] == "eV"


# ---- hostile and unsupported files --------------------------------------------------------
def _torch_zip(path: Path, pickle_bytes: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/version", "3\n")
    return path


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    # a real torch.save file whose model dict hides an os.system call next to real tensors
    evil = tmp_path / "best_model"
    torch.save({"weights": torch.randn(3), "payload": _Evil(marker)}, evil)
    with pytest.raises(DisallowedGlobalError, match=r"refusing to load global '(posix|os)\.system'") as err:
        convert_schnetpack(evil, tmp_path / "x.bundle", energy_unit="eV")
    assert err.value.name in ("posix.system", "os.system")
    assert not marker.exists() and not (tmp_path / "x.bundle").exists()
    # the CLI says the same and fails
    res = CliRunner().invoke(spkserve_main, ["convert", "schnetpack", str(evil), "-o", str(tmp_path / "y.bundle"),
                                             "--energy-unit", "eV"])
    assert res.exit_code != 0 and "system" in res.output and not marker.exists()
    # hand-written pickles: builtins.eval via REDUCE, subprocess via STACK_GLOBAL
    for payload, name in (
        (b"\x80\x02cbuiltins\neval\nX\x0b\x00\x00\x00print(1+1)\x85R.", "builtins.eval"),
        (b"\x80\x04\x8c\nsubprocess\x94\x8c\x05Popen\x94\x93X\x02\x00\x00\x00ls\x85R.", "subprocess.Popen"),
    ):
        path = _torch_zip(tmp_path / f"{name}.pt", payload)
        with pytest.raises(DisallowedGlobalError, match=name.replace(".", r"\.")):
            convert_schnetpack(path, tmp_path / "z.bundle", energy_unit="eV")


def test_unsupported_schnetpack_class_is_named(tmp_path):
    # a FieldSchNet model (not converted): the message names the class and the supported set
    payload = b"\x80\x02cschnetpack.representation.field_schnet\nFieldSchNet\n)\x81}b."
    path = _torch_zip(tmp_path / "field.pt", payload)
    with pytest.raises(ConversionError, match=r"SchNetPack class 'schnetpack\.representation\.field_schnet\."
                                              r"FieldSchNet'.*SchNet, PaiNN, SO3net"):
        convert_schnetpack(path, tmp_path / "z.bundle", energy_unit="eV")


def test_not_a_model_file(tmp_path):
    legacy = tmp_path / "old.pt"
    legacy.write_bytes(b"\x80\x02}q\x00.")  # a bare pickle, not a torch zip archive
    with pytest.raises(ModelFileError, match="not a torch.save zip archive"):
        convert_schnetpack(legacy, tmp_path / "z.bundle", energy_unit="eV")
    with pytest.raises(ModelFileError, match="does not exist"):
        convert_schnetpack(tmp_path / "missing", tmp_path / "z.bundle", energy_unit="eV")
    # a torch file whose object is a plain tensor dict, not a NeuralNetworkPotential
    state = tmp_path / "state.pt"
    torch.save({"w": torch.ones(2)}, state)
    with pytest.raises(ConversionError, match="expected schnetpack.model.base.NeuralNetworkPotential"):
        convert_schnetpack(state, tmp_path / "z.bundle", energy_unit="eV")


def test_tensor_bounds_are_checked(tmp_path):
    # a tensor that claims more values than its storage holds is refused (no out-of-bounds view)
    buf = io.BytesIO()
    torch.save(torch.arange(4.0), buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        names = z.namelist()
        files = {n: z.read(n) for n in names}
    pkl_name = next(n for n in names if n.endswith("data.pkl"))
    data_name = next(n for n in names if "/data/" in n)
    files[data_name] = files[data_name][:8]  # 2 floats instead of 4
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(bad, "w") as z:
        for n, b in files.items():
            z.writestr(n, b)
    from spkserve.convert.torch_pickle import load_records

    with pytest.raises(ModelFileError, match="fewer than 4"):
        load_records(bad, (), ())
    assert pkl_name  # the archive layout was the one torch writes


def test_converted_models_are_rotation_equivariant(bundles):
    """Rotating a molecule about the origin: energy unchanged, forces and dipole rotate as
    vectors, the polarizability as Q alpha Q^T (SO3net with SchNetPack's conventions, PaiNN heads)."""
    from scipy.spatial.transform import Rotation

    from spkserve.ase import BundleCalculator

    Q = Rotation.from_rotvec([0.3, -1.1, 0.7]).as_matrix()
    for name, extras in (("so3net", ["dipole_moment"]), ("painn_response", ["dipole_moment", "polarizability"])):
        calc = BundleCalculator(str(bundles[name]), dtype="float64", extra_properties=extras)
        a, b = _atoms(1), _atoms(1)
        b.positions = a.positions @ Q.T
        res = []
        for atoms in (a, b):
            atoms.calc = calc
            atoms.get_potential_energy()
            res.append(dict(calc.results))
        assert abs(res[0]["energy"] - res[1]["energy"]) < 1e-9 * max(1.0, abs(res[0]["energy"]))
        np.testing.assert_allclose(res[0]["forces"] @ Q.T, res[1]["forces"], atol=1e-9)
        np.testing.assert_allclose(Q @ res[0]["dipole_moment"], res[1]["dipole_moment"], atol=1e-9)
        if "polarizability" in extras:
            np.testing.assert_allclose(Q @ res[0]["polarizability"] @ Q.T, res[1]["polarizability"], atol=1e-8)


def _records(name: str):
    from spkserve.convert.schnetpack_model import CLASSES, FUNCTIONS
    from spkserve.convert.torch_pickle import load_records

    return load_records(FIX / REF["models"][name]["file"], CLASSES, FUNCTIONS)


def _drop(module_list, cls_suffix: str, key: str | None = None) -> None:
    mods = module_list.state["_modules"]
    for k in list(mods):
        if mods[k].class_name.endswith(cls_suffix) and (key is None or key in mods[k].state.values()):
            del mods[k]
            return
    raise AssertionError(f"no {cls_suffix} {key} to drop")


def test_inconsistent_or_energy_free_models_are_refused():
    from spkserve.convert.schnetpack_model import convert_records

    assert convert_records(_records("painn_response")).architecture["params"]["representation"]["name"] == "painn"
    # ScaleProperty on the energy but not on the forces: forces would not be -dE/dR
    root = _records("painn_response")
    _drop(root.child("postprocessors"), "ScaleProperty", "forces")
    with pytest.raises(ConversionError, match="forces are then not -dE/dR"):
        convert_records(root)
    # ... but without a Forces module there are no SchNetPack forces to disagree with
    _drop(root.child("output_modules"), "Forces")
    conv = convert_records(root)
    assert float(conv.tensors["scale"]) == 2.5 and not any("stress" in n for n in conv.notes)
    # no energy head (like SchNetPack's qm9_dipole experiment): a bundle always predicts an energy
    root = _records("painn_response")
    _drop(root.child("output_modules"), "Forces")
    _drop(root.child("output_modules"), "Atomwise")
    with pytest.raises(ConversionError, match="no Atomwise energy head"):
        convert_records(root)
    # offsets of another property than the energy
    root = _records("schnet")
    root.child("postprocessors").children()[1].state["_property"] = "dipole_moment"
    with pytest.raises(ConversionError, match="offsets of 'dipole_moment' are not supported"):
        convert_records(root)


def test_units_from_an_unresolved_run_config(tmp_path):
    # SchNetPack writes config.yaml unresolved into the run directory, next to best_model
    shutil.copy(FIX / REF["models"]["schnet_qm9"]["file"], tmp_path / "best_model")
    (tmp_path / "config.yaml").write_text(
        "globals:\n  unit: kcal/mol\n"
        "data:\n  distance_unit: Bohr\n  property_units:\n    energy_U0: ${globals.unit}\n    gap: ${oops.missing}\n")
    out = convert_schnetpack(tmp_path / "best_model", tmp_path / "q.bundle")
    m = read_metadata(out)
    assert m["units"] == {"length": "Bohr", "energy": "kcal/mol"}  # energy_U0 found as the energy key
    assert m["cutoff"] == REF["cutoff_angstrom"]  # the cutoff stays in the model's own length unit


@pytest.mark.parametrize("name", ["schnet", "painn"])
def test_fused_inference_path_matches_schnetpack(name, bundles):
    """Large systems take the memory-lean fused path (SchNet: filters from a Hermite table);
    forced on here for small ones, the converted models still match SchNetPack to 1e-6."""
    from spkserve.ase import BundleCalculator

    calc = BundleCalculator(str(bundles[name]), dtype="float64")
    rep = calc.provider.model.representation
    rep.fused_min_elements = 0
    ref = REF["models"][name]
    for i in (0, 3):
        atoms = _atoms(i)
        atoms.calc = calc
        _close(atoms.get_potential_energy(), ref["energy"][i], (name, i, "energy"))
        _close(atoms.get_forces(), ref["forces"][i], (name, i, "forces"))
    if name == "schnet":
        assert rep._table is not None  # the tabulated filters were really used
