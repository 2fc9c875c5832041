"""Every shipped spkmd config group option runs a few steps with its defaults.

The shipped GLE matrix once did not even load (a prose comment was read as a matrix header),
so `dynamics/thermostat=gle` failed with its default config and no test noticed. Here each
option file under configs/md/<group>/ is selected once, with the least context it needs (a
periodic LJ box for barostats, beads for ring-polymer thermostats, model files where the
option has a required ``???`` field), and must run to the end with a finite conserved energy.
A new option file without a case here fails :func:`test_every_option_has_a_case`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ase.lattice.cubic import FaceCenteredCubic
from click.testing import CliRunner

from spkserve.potentials import reference_bundle
from spkmd.cli import main
from spkmd.data import HDF5Loader
from spkmd.factory import config_root

pytestmark = pytest.mark.timeout(300)
torch.set_num_threads(1)

N_STEPS = 3
FAST = ["calculator=reference", f"dynamics.n_steps={N_STEPS}", "plots=false", "seed=5"]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """Files some options need: an Ar FCC box with an LJ bundle (stress), two trap bundles, a PIGLET file."""
    d = tmp_path_factory.mktemp("cfg")
    box = FaceCenteredCubic("Ar", size=(2, 2, 2), latticeconstant=5.4, pbc=True)
    box.positions += np.random.default_rng(0).normal(0.0, 0.05, box.positions.shape)
    box.write(d / "ar32.extxyz")
    lj = reference_bundle("lj", d / "lj.bundle", sigma=3.4, epsilon=0.0104, cutoff=6.0)
    traps = [reference_bundle("harmonic_trap", d / f"trap{k}.bundle", k=k) for k in (1.0, 1.1)]
    # PIGLET for 4 beads: one A and one C block per normal mode (here canonical at the bead temperature)
    blocks_a = "\n".join(" 0.00  0.01\n-0.01  0.01" for _ in range(4))
    blocks_c = "\n".join(" 1200  0\n 0  1200" for _ in range(4))
    piglet = d / "piglet4.dat"
    piglet.write_text(f"# A MATRIX: (femtoseconds^-1)\n{blocks_a}\n# C MATRIX: (K)\n{blocks_c}\n")
    return {"dir": d, "box": d / "ar32.extxyz", "lj": lj, "traps": traps, "piglet": piglet}


def periodic(ctx, integrator="npt", replicas=1):
    return [f"calculator.model_file={ctx['lj']}", "calculator.stress=true", f"system.molecule_file={ctx['box']}",
            f"system.n_replicas={replicas}", f"dynamics/integrator={integrator}", "system.initializer.temperature=80",
            f"dynamics.n_steps={N_STEPS}", "plots=false", "seed=5", "dynamics.integrator.time_step=2"]


RING = ["dynamics/integrator=rpmd", "system.n_replicas=4"]

CASES = {
    # group/option: overrides (a function of the context)
    "calculator/bundle": lambda c: [f"dynamics.n_steps={N_STEPS}", "plots=false", "seed=5"],  # the shipped bundle
    "calculator/reference": lambda c: FAST,
    "calculator/ensemble": lambda c: [*FAST[1:], "calculator=ensemble",
                                      f"calculator.model_files=[{c['traps'][0]},{c['traps'][1]}]"],
    "calculator/provider": lambda c: [*FAST[1:], "calculator=provider", "calculator.provider=spkserve.runtime:ModelRunner",
                                      f"+calculator.params.bundle={c['traps'][0]}"],
    "callbacks/checkpoint": lambda c: FAST,
    "callbacks/hdf5": lambda c: FAST,
    "callbacks/progress": lambda c: [*FAST, "callbacks.progress.every_n_steps=1"],
    "callbacks/remove_com": lambda c: [*FAST, "callbacks=[checkpoint,hdf5,progress,remove_com]", "callbacks.remove_com.every_n_steps=1"],
    "callbacks/tensorboard": lambda c: [*FAST, "callbacks=[checkpoint,hdf5,progress,tensorboard]", "callbacks.tensorboard.every_n_steps=1"],
    "dynamics/integrator/verlet": lambda c: [*FAST, "dynamics/integrator=verlet"],
    "dynamics/integrator/rpmd": lambda c: [*FAST, *RING, "dynamics/thermostat=pile_local"],
    "dynamics/integrator/npt": lambda c: [*periodic(c), "+dynamics/barostat=mtk", "~dynamics/thermostat"],
    "dynamics/integrator/rpmd_npt": lambda c: [*periodic(c, "rpmd_npt", 2), "+dynamics/barostat=pile",
                                               "dynamics/thermostat=pile_local"],
    "dynamics/barostat/mtk": lambda c: [*periodic(c), "+dynamics/barostat=mtk", "~dynamics/thermostat"],
    "dynamics/barostat/nhc_anisotropic": lambda c: [*periodic(c), "+dynamics/barostat=nhc_anisotropic",
                                                    "~dynamics/thermostat"],
    "dynamics/barostat/scr": lambda c: [*periodic(c), "+dynamics/barostat=scr"],
    "dynamics/barostat/pile": lambda c: [*periodic(c, "rpmd_npt", 2), "+dynamics/barostat=pile",
                                         "dynamics/thermostat=pile_local"],
    **{f"dynamics/thermostat/{t}": (lambda t: lambda c: [*FAST, f"dynamics/thermostat={t}"])(t)
       for t in ("berendsen", "gle", "langevin", "nhc", "svr")},
    **{f"dynamics/thermostat/{t}": (lambda t: lambda c: [*FAST, *RING, f"dynamics/thermostat={t}"])(t)
       for t in ("nhc_rpmd", "pile_global", "pile_local", "rpmd_gle", "trpmd")},
    "dynamics/thermostat/piglet": lambda c: [*FAST, *RING, "dynamics/thermostat=piglet",
                                             f"dynamics.thermostat.matrix_file={c['piglet']}"],
    "system/ethanol": lambda c: FAST,
}


def shipped_options() -> set[str]:
    root = config_root()
    return {str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml") if p.parent != root}


def test_every_option_has_a_case():
    assert shipped_options() == set(CASES), "add a case for each new config option (and drop removed ones)"


@pytest.mark.parametrize("option", sorted(CASES))
def test_option_runs_a_few_steps(option, ctx, tmp_path):
    if option == "callbacks/tensorboard":
        pytest.importorskip("tensorboard", reason="the tensorboard callback needs the 'tensorboard' package")
    run = tmp_path / "run"
    res = CliRunner().invoke(main, [f"simulation_dir={run}", *CASES[option](ctx)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert f"done: step {N_STEPS}" in res.output
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / "config.yaml")
    group, name = option.rsplit("/", 1)
    if group.startswith("dynamics/"):  # the option really was selected
        assert cfg.dynamics[group.split("/")[1]].type == name
    log = HDF5Loader(run / "simulation.hdf5")
    assert log.steps.tolist() == list(range(N_STEPS + 1))
    assert np.isfinite(log.get_property("conserved_energy", None)).all()
    if option == "callbacks/tensorboard":
        assert any((run / "tensorboard").iterdir())
    if option == "callbacks/progress":
        assert sum(ln.startswith("step ") for ln in res.output.splitlines()) == N_STEPS
