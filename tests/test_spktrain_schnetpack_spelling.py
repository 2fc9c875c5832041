"""spktrain accepts SchNetPack's experiment names and override paths (issue 12).

Checked by the resolved values and by the modules the config builds, so a mapping that lands
on the wrong key (or nowhere) fails."""

from __future__ import annotations

import pytest
import yaml

pytest.importorskip("pytorch_lightning", reason="pytorch-lightning (extra 'train') is not installed")

from click.testing import CliRunner  # noqa: E402

from training.cli import main  # noqa: E402
from training.config import ConfigError, compose_config, resolve  # noqa: E402
from training.run import build_model  # noqa: E402


def _cfg(*overrides: str):
    return resolve(compose_config(["data.datapath=x.db", *overrides]))


#: experiment -> (num_train, num_val, batch_size, task outputs, energy unit)
EXPERIMENTS = {
    "md17": (950, 50, 10, ["energy", "forces"], "eV"),
    "rmd17": (950, 50, 10, ["energy", "forces"], "kcal/mol"),
    "md22": (5700, 300, 10, ["energy", "forces"], "kcal/mol"),
    "iso17": (0.9, 0.1, 32, ["energy", "forces"], "eV"),
    "qm9_atomwise": (110000, 10000, 100, ["energy_U0"], "eV"),
    "qm9_dipole": (110000, 10000, 100, ["dipole_moment_norm"], "eV"),
}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_schnetpack_experiments_resolve(name):
    n_train, n_val, batch, outputs, energy_unit = EXPERIMENTS[name]
    cfg = _cfg(f"experiment={name}")
    assert (cfg.data.num_train, cfg.data.num_val, cfg.data.batch_size) == (n_train, n_val, batch)
    assert [o.name for o in cfg.task.outputs] == outputs
    assert cfg.globals.energy_unit == energy_unit
    if "forces" in outputs:
        assert cfg.data.property_units.forces == f"{energy_unit}/Angstrom"
    model = build_model(cfg)
    heads = [type(h).__name__ for h in model.output_heads]
    assert heads == (["DipoleMoment"] if name == "qm9_dipole" else ["Atomwise"])


def test_qm9_heads_predict_the_named_property():
    dip = next(h for h in build_model(_cfg("experiment=qm9_dipole")).output_heads)
    assert dip.dipole_key == "dipole_moment_norm" and dip.predict_magnitude is True
    cfg = _cfg("experiment=qm9_atomwise", "globals.property=energy_U")
    assert cfg.model.params.outputs[0].params.output_key == "energy_U" and cfg.task.outputs[0].name == "energy_U"
    assert cfg.run.name == "qm9_energy_U"


def test_schnetpack_override_paths_reach_the_model():
    cfg = _cfg("experiment=rmd17", "model/representation=so3net", "model.representation.n_atom_basis=24",
               "model.representation.n_interactions=2", "model.representation.lmax=1",
               "model/representation/radial_basis=bessel", "data.num_train=123", "data.num_val=17", "data.batch_size=3")
    rep = cfg.model.params.representation.params
    assert (rep.n_atom_basis, rep.n_interactions, rep.lmax, rep.radial_basis) == (24, 2, 1, "bessel")
    assert (cfg.data.num_train, cfg.data.num_val, cfg.data.batch_size) == (123, 17, 3)
    model = build_model(cfg)
    r = model.representation
    assert type(r).__name__ == "SO3net" and r.lmax == 1 and r.n_atom_basis == 24
    assert any(type(m).__name__ == "BesselRBF" for m in model.modules())
    assert not any(type(m).__name__ == "GaussianRBF" for m in model.modules())
    with pytest.raises(ConfigError, match="unknown radial basis 'cosine'"):
        compose_config(["model/representation/radial_basis=cosine"])


def test_cfg_job_prints_the_resolved_config():
    res = CliRunner().invoke(main, ["--cfg", "job", "experiment=md22", "data.datapath=m.db",
                                    "model.representation.n_atom_basis=48"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load(res.output)
    assert cfg["data"]["num_train"] == 5700 and cfg["model"]["params"]["representation"]["params"]["n_atom_basis"] == 48
    res = CliRunner().invoke(main, ["train", "--cfg", "hydra"], catch_exceptions=False)
    assert res.exit_code != 0 and "--cfg job" in res.output
