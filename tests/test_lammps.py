"""LAMMPS routes: a bundle inside LAMMPS (fix external) and LAMMPS as an i-PI driver (fix ipi)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from spkserve import units
from spkserve.batch import Structure

sys.path.insert(0, str(Path(__file__).parent))
from ipi_peers import PROCESS_BOUND_S, VENV_BIN, stop, wait_for_drivers  # noqa: E402

pytestmark = [pytest.mark.peer, pytest.mark.timeout(120)]

A_FCC = 5.26  # Å, argon-like lattice (a little compressed, so forces and pressure are not small)


def _lammps():
    try:
        from spkserve.lammps import import_lammps

        return import_lammps()
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"the lammps Python module cannot be loaded: {err}")


def _script(tmp_path: Path, units_style: str, steps: int, extra: str = "") -> Path:
    # σ 3.4 Å, ε 0.0104 eV in the unit style's own units
    if units_style == "metal":
        eps, mass, dt = 0.0104, 39.948, 0.002
    else:  # real: kcal/mol, fs
        eps, mass, dt = 0.0104 * units.factor("eV", "kcal/mol"), 39.948, 2.0
    text = textwrap.dedent(
        f"""
        units {units_style}
        atom_style atomic
        boundary p p p
        lattice fcc {A_FCC}
        region box block 0 3 0 3 0 3
        create_box 1 box
        create_atoms 1 box
        mass 1 {mass}
        displace_atoms all random 0.1 0.1 0.1 4321
        velocity all create 60.0 87287 loop geom
        {extra}
        fix nve all nve
        timestep {dt}
        thermo_style custom step pe press
        thermo 1
        run {steps}
        """
    )
    path = tmp_path / f"in.{units_style}"
    path.write_text(text)
    return path, eps


def _state(lmp):
    n = lmp.extract_global("nlocal")
    x = lmp.numpy.extract_atom("x")[:n].copy()
    f = lmp.numpy.extract_atom("f")[:n].copy()
    lo, hi, xy, yz, xz, _, _ = lmp.extract_box()
    cell = np.array([[hi[0] - lo[0], 0, 0], [xy, hi[1] - lo[1], 0], [xz, yz, hi[2] - lo[2]]])
    return x, f, cell


@pytest.mark.parametrize("units_style", ["metal", "real"])
def test_fix_external_matches_direct_and_lammps_own_lj(lj_bundle, tmp_path, units_style):
    _lammps()
    from spkserve.lammps import run_lammps
    from spkserve.runtime import ModelRunner

    script, eps = _script(tmp_path, units_style, steps=10)
    lmp, cb = run_lammps(script, lj_bundle, ["Ar"], cmdargs=["-log", "none", "-screen", "none"])
    try:
        assert cb.calls == 11  # setup + 10 steps
        x, f, cell = _state(lmp)
        pe, press = lmp.get_thermo("pe"), lmp.get_thermo("press")
        # direct evaluation of the final LAMMPS configuration
        ref = ModelRunner(lj_bundle).compute([Structure([18] * len(x), x, cell, True)], ("energy", "forces", "stress"))
        e_unit = "eV" if units_style == "metal" else "kcal/mol"
        assert pe == pytest.approx(ref["energy"].item() * units.factor("eV", e_unit), rel=1e-10)
        np.testing.assert_allclose(f, ref["forces"].numpy() * units.factor("eV/Ang", f"{e_unit}/Ang"), rtol=1e-9, atol=1e-10)
        assert np.abs(f).max() > 1e-3  # not a trivial configuration
        # LAMMPS' own shifted lj/cut on the same atoms: energy and pressure (virial via fix_modify virial yes)
        lmp.command(f"unfix {cb.fix_id}")
        lmp.commands_string(f"pair_style lj/cut 8.5\npair_coeff 1 1 {eps} 3.4\npair_modify shift yes\nrun 0")
        assert lmp.get_thermo("pe") == pytest.approx(pe, rel=1e-10)
        assert lmp.get_thermo("press") == pytest.approx(press, rel=1e-8)
    finally:
        lmp.close()


def test_fix_external_rejects_unknown_types_and_units(lj_bundle, tmp_path):
    _lammps()
    from spkserve.lammps import LammpsError, run_lammps

    script, _ = _script(tmp_path, "metal", steps=1)
    with pytest.raises(LammpsError, match="unknown element"):
        run_lammps(script, lj_bundle, ["Xx"])
    lj_units = tmp_path / "in.lj"
    lj_units.write_text(script.read_text().replace("units metal", "units lj"))
    with pytest.raises(LammpsError, match="units 'lj' are not supported"):
        run_lammps(lj_units, lj_bundle, ["Ar"], cmdargs=["-log", "none", "-screen", "none"])


@pytest.mark.timeout(2 * PROCESS_BOUND_S)
def test_spkserve_lammps_command(lj_bundle, tmp_path):
    _lammps()
    script, _ = _script(tmp_path, "metal", steps=3)
    # ends when the command exits; the bound only stops a hung run (start-up is slow on a loaded machine)
    out = subprocess.run(
        [str(VENV_BIN / "spkserve"), "lammps", str(script), "--model", str(lj_bundle), "--types", "Ar", "--log", "none"],
        capture_output=True, text=True, timeout=PROCESS_BOUND_S, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "4 force evaluations" in out.stderr


@pytest.mark.timeout(2 * PROCESS_BOUND_S)
def test_lammps_fix_ipi_drives_the_server_role(lj_bundle):
    """LAMMPS (lj/cut, shifted) as an i-PI driver == the LJ bundle evaluated directly."""
    _lammps()
    from ase.build import bulk

    from spkserve.ipi.server import IPIServerProvider
    from spkserve.runtime import ModelRunner

    name = f"spklmp_{os.getpid()}"  # fix ipi connects to /tmp/ipi_NAME only
    script = textwrap.dedent(
        f"""
        units metal
        atom_style atomic
        boundary p p p
        lattice fcc {A_FCC}
        region box block 0 3 0 3 0 3
        create_box 1 box
        create_atoms 1 box
        mass 1 39.948
        pair_style lj/cut 8.5
        pair_coeff 1 1 0.0104 3.4
        pair_modify shift yes
        thermo 100000
        fix ipi all ipi {name} 32345 unix
        run 1000000
        """
    )
    atoms = bulk("Ar", "fcc", a=A_FCC, cubic=True).repeat(3)
    rng = np.random.default_rng(3)
    structs = []
    for _ in range(4):
        a = atoms.copy()
        a.positions += rng.normal(0, 0.1, a.positions.shape)
        structs.append(Structure.from_atoms(a))
    with IPIServerProvider(unix=name, n_atoms=len(atoms), timeout_s=PROCESS_BOUND_S) as prov:
        proc = subprocess.Popen(
            [str(VENV_BIN / "lmp"), "-log", "none", "-screen", "none"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
        )
        try:
            proc.stdin.write(script)
            proc.stdin.close()
            wait_for_drivers(prov.server, proc)
            out = prov.compute(structs, ("energy", "forces", "stress"))
        finally:
            prov.close()  # EXIT: LAMMPS stops (with an error code, by design of fix ipi)
            try:
                proc.wait(PROCESS_BOUND_S)
            finally:
                stop(proc)
    ref = ModelRunner(lj_bundle).compute(structs, ("energy", "forces", "stress"))
    # fix ipi converts with its own 8-digit constants (Bohr 0.52917721, Ha/K 3.1668152e-6)
    np.testing.assert_allclose(out["energy"].numpy(), ref["energy"].numpy(), rtol=5e-8)
    np.testing.assert_allclose(out["forces"].numpy(), ref["forces"].numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out["stress"].numpy(), ref["stress"].numpy(), rtol=1e-6, atol=1e-9)
    assert ref["forces"].abs().max() > 0.05
