"""The bundle format: round trip, integrity, every bad-input case, migration, dtype/device."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from click.testing import CliRunner

from spkserve import keys, registry
from spkserve.batch import Structure
from spkserve.bundle import BundleError, FORMAT_VERSION, load_bundle, read_bundle, write_bundle
from spkserve.potentials import reference_bundle
from spkserve.provider import ProviderError
from spkserve.runtime import ModelRunner


def _argon(seed=0):
    a = bulk("Ar", "fcc", a=5.26, cubic=True) * (2, 2, 2)
    a.rattle(0.1, seed=seed)
    return a


def test_round_trip_identical_outputs(lj_bundle, tmp_path):
    b = load_bundle(lj_bundle)
    copy = write_bundle(tmp_path / "copy.bundle", b.model, b.metadata, architecture=b.architecture)
    s = [Structure.from_atoms(_argon())]
    r1 = ModelRunner(lj_bundle).compute(s, ["energy", "forces", "stress"])
    r2 = ModelRunner(copy).compute(s, ["energy", "forces", "stress"])
    for k in r1:
        assert torch.equal(r1[k], r2[k]), k


def test_round_trip_with_weights(tmp_path):
    """A bundle with real tensors (buffers) restores them exactly."""
    model = registry.build({"name": "harmonic_bonds", "params": {"bonds": [[0, 1], [1, 2]], "k": [3.0, 4.0], "r0": [1.0, 1.1], "n_atoms": 3}})
    meta = {"species": [1, 8], "cutoff": 0.0, "units": {"length": "Angstrom", "energy": "eV"},
            "outputs": {"energy": {"unit": "eV", "per": "system"}, "forces": {"unit": "eV/Angstrom", "per": "atom"}}}
    p = write_bundle(tmp_path / "h.bundle", model, meta)
    b = load_bundle(p)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), b.model.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert read_bundle(p).metadata["provenance"]["versions"]["torch"] == torch.__version__


def test_hash_mismatch_detected(trap_bundle, tmp_path):
    blob = bytearray(trap_bundle.read_bytes())
    # flip a byte in the weights (the last bytes of the file are tensor data)
    blob[-3] ^= 0xFF
    bad = tmp_path / "tampered.bundle"
    bad.write_bytes(bytes(blob))
    with pytest.raises(BundleError, match="integrity hash mismatch"):
        load_bundle(bad)


def test_metadata_tamper_detected(trap_bundle, tmp_path):
    blob = trap_bundle.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    doc = json.loads(header["__metadata__"]["spkserve.bundle"])
    doc["metadata"]["cutoff"] = 99.0
    header["__metadata__"]["spkserve.bundle"] = json.dumps(doc)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    bad = tmp_path / "meta.bundle"
    bad.write_bytes(struct.pack("<Q", len(h)) + h + blob[8 + n :])
    with pytest.raises(BundleError, match="integrity hash mismatch"):
        load_bundle(bad)


@pytest.mark.parametrize("cut", [0, 5, 40])
def test_truncated_file(lj_bundle, trap_bundle, tmp_path, cut):
    blob = trap_bundle.read_bytes()
    bad = tmp_path / "trunc.bundle"
    bad.write_bytes(blob[:cut] if cut else b"")
    with pytest.raises(BundleError, match="truncated|not a bundle|corrupt"):
        load_bundle(bad)


def test_truncated_weights(trap_bundle, tmp_path):
    blob = trap_bundle.read_bytes()
    bad = tmp_path / "trunc.bundle"
    bad.write_bytes(blob[:-8])
    with pytest.raises(BundleError, match="corrupt or truncated"):
        load_bundle(bad)


def test_garbage_and_missing_files(tmp_path):
    g = tmp_path / "garbage.bundle"
    g.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(BundleError, match="corrupt bundle header"):
        load_bundle(g)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope.bundle")


def test_plain_safetensors_is_not_a_bundle(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, p)
    with pytest.raises(BundleError, match="not a spkserve bundle"):
        load_bundle(p)


def _rewrite_doc(src, dst, edit):
    blob = src.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    doc = json.loads(header["__metadata__"]["spkserve.bundle"])
    edit(doc)
    header["__metadata__"]["spkserve.bundle"] = json.dumps(doc)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    dst.write_bytes(struct.pack("<Q", len(h)) + h + blob[8 + n :])
    return dst


def test_newer_version_refused(trap_bundle, tmp_path):
    p = _rewrite_doc(trap_bundle, tmp_path / "new.bundle", lambda d: d.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(BundleError, match="newer than this spkserve supports"):
        load_bundle(p)


def test_unknown_architecture(trap_bundle, tmp_path):
    from spkserve.bundle import _hash

    def edit(d):
        d["architecture"]["name"] = "no_such_net"

    p = _rewrite_doc(trap_bundle, tmp_path / "arch.bundle", edit)
    # re-hash so only the architecture is wrong
    c_blob = p.read_bytes()
    n = struct.unpack("<Q", c_blob[:8])[0]
    header = json.loads(c_blob[8 : 8 + n])
    doc = json.loads(header["__metadata__"]["spkserve.bundle"])
    from safetensors.torch import load

    header["__metadata__"]["spkserve.sha256"] = _hash(doc, load(c_blob))
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    p.write_bytes(struct.pack("<Q", len(h)) + h + c_blob[8 + n :])
    with pytest.raises(BundleError, match="unknown architecture 'no_such_net'"):
        load_bundle(p)


def test_migration_from_v0(tmp_path):
    """A format-0 file (pre-release layout) loads through the documented migration and upgrades."""
    from safetensors.torch import save

    legacy = {
        "version": 0,
        "meta": {
            "species": [18], "cutoff": 8.5, "distance_unit": "Angstrom", "energy_unit": "eV",
            "outputs": {"energy": {"unit": "eV", "per": "system"}, "forces": {"unit": "eV/Angstrom", "per": "atom"}},
        },
        "spec": {"name": "lennard_jones", "params": {"sigma": 3.4, "epsilon": 0.0104, "cutoff": 8.5}},
    }
    p = tmp_path / "v0.bundle"
    p.write_bytes(save({}, metadata={"spk_bundle": json.dumps(legacy)}))
    b = load_bundle(p)
    assert b.metadata["units"] == {"length": "Angstrom", "energy": "eV"}
    assert read_bundle(p).format_version == 0
    res = CliRunner().invoke(__import__("spkserve.cli", fromlist=["main"]).main, ["verify", "--upgrade", str(p)])
    assert res.exit_code == 0, res.output
    assert read_bundle(p).format_version == FORMAT_VERSION


def test_unknown_species(tmp_path):
    p = reference_bundle("lj", tmp_path / "ar.bundle", species=[18], sigma=3.4, epsilon=0.0104, cutoff=8.5)
    r = ModelRunner(p)
    with pytest.raises(ProviderError, match=r"79 \(Au\) not among the bundle's species \[18\]"):
        r.compute([Structure.from_atoms(bulk("Au", "fcc", a=4.08))])


def test_dtype_and_device_requests(lj_bundle, tmp_path):
    with pytest.raises(BundleError, match="unsupported dtype"):
        load_bundle(lj_bundle, dtype="float16")
    if not torch.cuda.is_available():
        with pytest.raises(BundleError, match="CUDA is not available"):
            load_bundle(lj_bundle, device="cuda")
    # a float64 model evaluated in float32 and the other way round
    p32 = reference_bundle("harmonic_trap", tmp_path / "t32.bundle", k=2.0, dtype="float32")
    assert load_bundle(p32).dtype == torch.float32
    r64 = ModelRunner(p32, dtype="float64")
    r32 = ModelRunner(p32)
    s = [Structure.from_atoms(molecule("H2O"))]
    e64 = r64.compute_tensors(*_tensors(s), properties=["energy"])["energy"]
    e32 = r32.compute_tensors(*_tensors(s), properties=["energy"])["energy"]
    assert e64.dtype == torch.float64 and e32.dtype == torch.float32
    assert torch.allclose(e64.float(), e32, rtol=1e-6)


def _tensors(structures):
    from spkserve.batch import collate

    b = collate(structures)
    return b[keys.Z], b[keys.R], b[keys.cell], b[keys.pbc], b[keys.n_atoms]


def test_metadata_validation(tmp_path):
    model = registry.build({"name": "harmonic_trap", "params": {"k": 1.0}})
    good = {"species": [1], "cutoff": 0.0, "units": {"length": "Angstrom", "energy": "eV"},
            "outputs": {"energy": {"unit": "eV", "per": "system"}}}
    for bad, msg in [
        ({k: v for k, v in good.items() if k != "species"}, "lacks"),
        ({**good, "species": [0]}, "atomic numbers"),
        ({**good, "units": {"length": "parsec", "energy": "eV"}}, "invalid"),
        ({**good, "units": {"length": "eV", "energy": "eV"}}, "invalid"),
        ({**good, "outputs": {"forces": {"unit": "eV/Ang", "per": "atom"}}}, "including 'energy'"),
        ({**good, "outputs": {"energy": {"unit": "eV", "per": "molecule"}}}, "per"),
    ]:
        with pytest.raises(BundleError, match=msg):
            write_bundle(tmp_path / "x.bundle", model, bad)


def test_info_cli(lj_bundle):
    from spkserve.cli import main

    res = CliRunner().invoke(main, ["info", str(lj_bundle)])
    assert res.exit_code == 0, res.output
    assert "lennard_jones" in res.output and "8.5 Angstrom" in res.output and "eV/Angstrom" in res.output
    res = CliRunner().invoke(main, ["info", "--json", str(lj_bundle)])
    assert json.loads(res.output)["metadata"]["cutoff"] == 8.5
    res = CliRunner().invoke(main, ["info", "/nonexistent.bundle"])
    assert res.exit_code != 0 and "does not exist" in res.output


def test_reference_cli(tmp_path):
    from spkserve.cli import main

    out = tmp_path / "lj.bundle"
    res = CliRunner().invoke(main, ["reference", "lj", "--sigma", "3.4", "--epsilon", "0.0104", "--cutoff", "8.5", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert load_bundle(out).cutoff == 8.5
    res = CliRunner().invoke(main, ["reference", "harmonic", "--trap", "--k", "0.5", "-o", str(tmp_path / "t.bundle")])
    assert res.exit_code == 0, res.output
    assert load_bundle(tmp_path / "t.bundle").architecture["params"]["k"] == 0.5


def test_zero_dim_and_int_buffers_round_trip(tmp_path):
    """Scalar (0-dim) and integer buffers hash and load exactly."""

    class WithScalars(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.tensor(2.5, dtype=torch.float64))
            self.register_buffer("count", torch.tensor(7))

    model = WithScalars()
    meta = {"species": [1], "cutoff": 0.0, "units": {"length": "Angstrom", "energy": "eV"},
            "outputs": {"energy": {"unit": "eV", "per": "system"}}}
    registry.ARCHITECTURES.setdefault("_test_scalars", lambda: WithScalars())
    p = write_bundle(tmp_path / "s.bundle", model, meta, architecture={"name": "_test_scalars", "params": {}})
    b = load_bundle(p)
    assert b.model.scale.item() == 2.5 and b.model.count.item() == 7


def test_plugin_architecture_loads_through_entry_point(tmp_path, monkeypatch):
    """A bundle naming an architecture that only an installed plugin's entry point provides."""
    from importlib.metadata import EntryPoint

    import spkserve.registry as reg

    module = tmp_path / "my_plugin_mod.py"
    module.write_text(
        "from spkserve.potentials.harmonic import HarmonicTrap\n"
        "def build_plugin_trap(k):\n"
        "    return HarmonicTrap(2.0 * k)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = EntryPoint(name="plugin_trap", value="my_plugin_mod:build_plugin_trap", group=reg.ENTRY_POINT_GROUP)
    monkeypatch.setattr(reg, "entry_points", lambda group: [ep] if group == reg.ENTRY_POINT_GROUP else [])
    monkeypatch.delitem(reg.ARCHITECTURES, "plugin_trap", raising=False)
    model = reg.build({"name": "plugin_trap", "params": {"k": 1.5}})
    meta = {"species": [1], "cutoff": 0.0, "units": {"length": "Angstrom", "energy": "eV"},
            "outputs": {"energy": {"unit": "eV", "per": "system"}, "forces": {"unit": "eV/Angstrom", "per": "atom"}}}
    p = write_bundle(tmp_path / "plugin.bundle", model, meta)
    # a fresh lookup (as in another process) goes through the entry point again
    monkeypatch.delitem(reg.ARCHITECTURES, "plugin_trap")
    b = load_bundle(p)
    assert b.model.k == 3.0
    monkeypatch.delitem(reg.ARCHITECTURES, "plugin_trap")
