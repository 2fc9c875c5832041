"""The ``spktrain`` command: config printing, override errors, train -> export -> eval round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("pytorch_lightning", reason="pytorch-lightning (extra 'train') is not installed")

from click.testing import CliRunner  # noqa: E402

from training.cli import main  # noqa: E402

from testdata import data_file  # noqa: E402

# the first 240 frames of the shared ethanol xTB set, shipped in tests/data (never skips)
ETHANOL = data_file("xtb/ethanol_gfn2xtb_500K.extxyz")

TINY = [
    "model.params.representation.params.n_atom_basis=16",
    "model.params.representation.params.n_interactions=1",
    "model.params.representation.params.n_rbf=20",
    "data.batch_size=5",
    "data.num_train=15",
    "data.num_val=5",
    "data.num_test=10",
    "data.split_gap=0",
    "trainer.enable_progress_bar=false",
    "run.threads=1",
    "task.warmup_steps=0",
]


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_print_config_shows_resolved_overrides():
    res = _invoke("train", "--print-config", "experiment=md17", "data.datapath=/x/eth.db",
                  "model/representation=schnet", "globals.lr=2e-3", "globals.cutoff=4.5")
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load(res.output)
    assert cfg["task"]["lr"] == pytest.approx(2e-3)  # interpolated from globals
    rep = cfg["model"]["params"]["representation"]
    assert rep["name"] == "schnet" and rep["params"]["cutoff_angstrom"] == pytest.approx(4.5)
    nl = [t for t in cfg["data"]["transforms"] if t["name"] == "neighbor_list"][0]
    assert nl["cutoff"] == pytest.approx(4.5)
    assert cfg["data"]["datapath"] == "/x/eth.db"
    assert cfg["data"]["num_train"] == 950  # from experiment=md17


def test_train_is_the_default_subcommand():
    res = _invoke("experiment=qm9", "data.datapath=q.db", "--print-config")
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load(res.output)
    assert [o["name"] for o in cfg["task"]["outputs"]] == ["energy", "dipole_moment"]
    assert [h["name"] for h in cfg["model"]["params"]["outputs"]] == ["atomwise", "dipole_moment"]


def test_unknown_override_key_is_a_clear_error():
    res = CliRunner().invoke(main, ["train", "--print-config", "experiment=md17", "trainer.max_epoch=3"])
    assert res.exit_code != 0
    assert "trainer.max_epoch" in res.output and "Error" in res.output
    res = CliRunner().invoke(main, ["train", "--print-config", "experiment=nosuch"])
    assert res.exit_code != 0 and "experiment/nosuch" in res.output and "md17" in res.output


def test_user_config_dir_adds_experiments(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\nglobals:\n  lr: 0.0042\ndata:\n  datapath: mine.db\n"
    )
    res = _invoke("train", "--config-dir", str(tmp_path), "--print-config", "experiment=mine")
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load(res.output)
    assert cfg["task"]["lr"] == pytest.approx(0.0042) and cfg["data"]["datapath"] == "mine.db"


def test_missing_datapath_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(main, ["train", f"run.dir={tmp_path / 'r'}"])
    assert res.exit_code != 0
    assert "data.datapath" in res.output


@pytest.mark.timeout(150)
def test_train_export_eval_round_trip(tmp_path, monkeypatch):
    from ase.io import read, write

    monkeypatch.chdir(tmp_path)
    write(tmp_path / "eth.extxyz", read(ETHANOL, index=":40"))  # the importer path: a plain extxyz file
    run = tmp_path / "run"
    res = _invoke("experiment=ethanol_xtb", "data.datapath=eth.extxyz", f"run.dir={run}", "trainer.max_epochs=2",
                  *TINY)
    assert res.exit_code == 0, res.output
    assert "test_forces_mae" in res.output
    assert (run / "data" / "eth.db").exists()

    res = _invoke("export", str(run), "-o", str(tmp_path / "m.bundle"))
    assert res.exit_code == 0, res.output
    from spkserve.bundle import read_metadata

    meta = read_metadata(tmp_path / "m.bundle")
    assert meta["outputs"]["energy"]["unit"] == "eV" and meta["dtype"] == "float32"

    png = tmp_path / "test_parity.png"
    res = _invoke("eval", str(tmp_path / "m.bundle"), str(run / "data" / "eth.db"), "--split",
                  str(run / "split.npz"), "--plot", str(png))
    assert res.exit_code == 0, res.output
    lines = {ln.split()[0]: ln.split() for ln in res.output.splitlines() if ln.split()}
    assert lines["energy"][1] == "eV" and lines["forces"][1] == "eV/Angstrom"
    assert float(lines["forces"][2]) > 0 and int(lines["forces"][4]) == 10 * 9 * 3  # 10 test frames
    assert "10 systems" in res.output
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # any ASE-readable file works too (imported on the fly, values in eV, eV/Ang, Ang)
    res = _invoke("eval", str(tmp_path / "m.bundle"), str(tmp_path / "eth.extxyz"), "--plot", str(tmp_path / "all.png"))
    assert res.exit_code == 0, res.output
    assert "40 systems" in res.output and (tmp_path / "all.png").exists()
    # without --plot nothing is written (it used to drop parity.png into the working directory)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = _invoke("eval", str(tmp_path / "m.bundle"), str(tmp_path / "eth.extxyz"))
    assert res.exit_code == 0, res.output
    assert "40 systems" in res.output and "parity plot" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not (tmp_path / "parity.png").exists()

    # resume a finished run for more epochs
    res = _invoke("resume", str(run), "trainer.max_epochs=3")
    assert res.exit_code == 0, res.output
    import torch

    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2
    res = CliRunner().invoke(main, ["export", str(tmp_path), "-o", str(tmp_path / "x.bundle")])
    assert res.exit_code != 0 and "config.yaml" in res.output


@pytest.mark.parametrize("rep", ["schnet", "painn", "so3net", "field_schnet"])
def test_every_representation_config_builds_a_model(rep):
    from training.config import compose_config, resolve
    from training.run import build_model

    cfg = resolve(compose_config(["experiment=md17", "data.datapath=x.db", f"model/representation={rep}",
                                  "model.params.representation.params.n_atom_basis=8", "globals.cutoff=4.0"]))
    model = build_model(cfg)
    assert model.architecture_spec["params"]["representation"]["name"] == rep
    assert model.cutoff == pytest.approx(4.0)


def test_qm9_experiment_builds_energy_and_dipole_heads():
    from training.config import compose_config, resolve
    from training.run import build_model

    cfg = resolve(compose_config(["experiment=qm9", "data.datapath=x.db",
                                  "model.params.representation.params.n_atom_basis=8"]))
    model = build_model(cfg)
    assert "dipole_moment" in model.extra_outputs
