"""`spkserve ipi` (client role) and the i-PI PES module driven by the real peers: i-PI 3.x and ASE."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spkserve import units

sys.path.insert(0, str(Path(__file__).parent))
from ipi_peers import (  # noqa: E402
    PROCESS_BOUND_S,
    SPKSERVE,
    have_ipi,
    ipi_input,
    read_bin_trajectory,
    read_properties,
    short_tmpdir,
    start_ipi,
    stop,
    wait_or_kill,
    write_xyz,
)

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(not have_ipi(), reason="i-PI (the `i-pi` command of the ipi package) is not installed"),
]

N_ATOMS = 8
STEPS = 12


def _cluster(seed: int = 1) -> np.ndarray:
    """A slightly disordered 2x2x2 argon cube (Å) in the middle of a 30 Å box."""
    rng = np.random.default_rng(seed)
    grid = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)], float)
    return grid * 3.8 + rng.normal(0, 0.05, (N_ATOMS, 3)) + 12.0


def _evaluate_direct(bundle: Path, cells_bohr: np.ndarray, positions_bohr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Potential energies (Hartree) [F] and forces (Hartree/Bohr) [F, N, 3] of i-PI's frames,
    evaluated in-process with the bundle."""
    from spkserve.batch import Structure
    from spkserve.runtime import ModelRunner

    runner = ModelRunner(bundle, dtype="float64")
    b2a = units.factor("Bohr", "Angstrom")
    structs = [Structure([18] * N_ATOMS, p * b2a, c * b2a, True) for c, p in zip(cells_bohr, positions_bohr)]
    out = runner.compute(structs, ("energy", "forces"))
    forces = out["forces"].numpy().reshape(len(structs), N_ATOMS, 3) * units.factor("eV/Angstrom", "Hartree/Bohr")
    return out["energy"].numpy() * units.factor("eV", "Hartree"), forces


def _run_ipi_with_client(bundle: Path, nbeads: int, batch_size: int, client_args: list[str], forcefield=None):
    """Run i-PI NVE on the argon cluster with `spkserve ipi` (or an ffdirect PES) -> (props, cells, positions, client stderr)."""
    with short_tmpdir() as work:
        write_xyz(work / "init.xyz", ["Ar"] * N_ATOMS, _cluster(), 30.0)
        xml = ipi_input(
            work, str(work) + "/ipi_", STEPS, nbeads=nbeads, batch_size=batch_size,
            forcefield=forcefield(work) if forcefield else None,
        )
        ipi = start_ipi(work, xml)
        client = None
        try:
            if forcefield is None:
                client = subprocess.Popen(
                    [str(SPKSERVE), "ipi", str(bundle), "--unix", str(work) + "/ipi_spk",
                     "--species", ",".join(["Ar"] * N_ATOMS), "--connect-timeout", str(int(PROCESS_BOUND_S)), *client_args],
                    stderr=subprocess.PIPE, text=True,
                )
            rc = wait_or_kill(ipi, PROCESS_BOUND_S)  # ends when i-PI exits; generous backstop only
            assert rc == 0, (work / "ipi.log").read_text()[-3000:]
            client_err = ""
            if client is not None:
                _, client_err = client.communicate(timeout=PROCESS_BOUND_S)
                assert client.returncode == 0, client_err
            props = read_properties(work / "sim.out")
            frames = len(props)
            trajs = [read_bin_trajectory(work / f"sim.pos_{b}.bin", frames) for b in range(nbeads)]
            forces = [read_bin_trajectory(work / f"sim.frc_{b}.bin", frames)[1] for b in range(nbeads)]
            trajs = [(cells, pos, frc) for (cells, pos), frc in zip(trajs, forces)]
        finally:
            stop(ipi)
            stop(client)
    return props, trajs, client_err


def _check_agreement(bundle, props, trajs):
    """Columns: step, conserved, potential, kinetic_md, bead_potentials[nbeads]."""
    assert len(props) == STEPS + 1
    for b, (cells, pos, frc) in enumerate(trajs):
        direct_e, direct_f = _evaluate_direct(bundle, cells, pos)
        np.testing.assert_allclose(props[:, 4 + b], direct_e, rtol=1e-8, atol=0)
        # the forces i-PI received, atom by atom, against the model's own (a client that scaled,
        # permuted or sign-flipped forces could still keep a short NVE run's conserved energy flat)
        assert np.abs(direct_f).max() > 1e-4  # not a trivially force-free configuration
        np.testing.assert_allclose(frc, direct_f, rtol=1e-8, atol=1e-12 * np.abs(direct_f).max())
    # the cluster is moving: potential changes by far more than the conserved quantity drifts
    conserved, kinetic = props[:, 1], props[:, 3]
    assert np.ptp(kinetic) > 0
    assert np.ptp(conserved) < 0.01 * np.ptp(kinetic), (np.ptp(conserved), np.ptp(kinetic))


@pytest.mark.timeout(3 * PROCESS_BOUND_S)
def test_ipi_nve_energies_equal_direct_evaluation(lj_bundle):
    props, trajs, err = _run_ipi_with_client(lj_bundle, nbeads=1, batch_size=1, client_args=[])
    _check_agreement(lj_bundle, props, trajs)
    assert "EXIT from server" in err


@pytest.mark.timeout(3 * PROCESS_BOUND_S)
def test_ipi_pimd_8_beads_batched_one_model_call_per_step(lj_bundle):
    props, trajs, err = _run_ipi_with_client(lj_bundle, nbeads=8, batch_size=8, client_args=[])
    _check_agreement(lj_bundle, props, trajs)
    # every step's 8 beads arrive in one POSDATA and go through the model together
    m = re.search(r"(\d+) structures in (\d+) model calls", err)
    assert m and int(m.group(1)) == 8 * int(m.group(2)), err


@pytest.mark.timeout(3 * PROCESS_BOUND_S)
def test_ipi_pimd_8_beads_unbatched_with_workers(lj_bundle):
    props, trajs, err = _run_ipi_with_client(lj_bundle, nbeads=8, batch_size=1, client_args=["--workers", "4"])
    _check_agreement(lj_bundle, props, trajs)
    m = re.search(r"(\d+) structures in (\d+) model calls", err)
    assert m and int(m.group(1)) > int(m.group(2)), f"requests on the 4 connections were never evaluated together: {err}"


@pytest.mark.timeout(3 * PROCESS_BOUND_S)
def test_ipi_ffdirect_pes_module_batched(lj_bundle):
    import spkserve.ipi.pes as pes_module

    def ff(work):
        return f"""
  <ffdirect name="spk">
    <pes>custom</pes>
    <pes_path>{pes_module.__file__}</pes_path>
    <parameters>{{bundle: {lj_bundle}, template: init.xyz}}</parameters>
    <batch_size>8</batch_size>
  </ffdirect>"""

    props, trajs, _ = _run_ipi_with_client(lj_bundle, nbeads=8, batch_size=8, client_args=[], forcefield=ff)
    _check_agreement(lj_bundle, props, trajs)


def test_pes_module_batched_call_is_one_model_call(lj_bundle, tmp_path):
    """The PES i-PI loads: lists of (h, positions) in, one model call, same results as single calls."""
    from ipi.pes import load_pes

    import spkserve.ipi.pes as pes_module

    write_xyz(tmp_path / "t.xyz", ["Ar"] * N_ATOMS, _cluster(), 30.0)
    cls = load_pes("custom", pes_module.__file__)
    pes = cls(bundle=str(lj_bundle), template=str(tmp_path / "t.xyz"), verbosity=1)
    a2b = units.factor("Angstrom", "Bohr")
    h = np.diag([30.0, 31.0, 32.0]) * a2b
    h[0, 1] = 2.0 * a2b  # i-PI's h: vectors as columns (b has an x component)
    pos = [(_cluster(s) * a2b) for s in range(3)]
    batched = pes([h] * 3, pos)
    assert pes.evaluator.n_calls == 1
    for b in range(3):
        single = pes(h, pos[b])
        assert single[0] == pytest.approx(batched[b][0], rel=1e-12)
        np.testing.assert_allclose(single[1], batched[b][1], rtol=1e-10, atol=1e-14)
    direct_e, direct_f = _evaluate_direct(lj_bundle, np.array([h.T] * 3), np.array(pos))
    np.testing.assert_allclose([r[0] for r in batched], direct_e, rtol=1e-12)
    for b in range(3):  # the forces the PES hands i-PI (Hartree/Bohr) are the model's
        np.testing.assert_allclose(np.reshape(batched[b][1], (N_ATOMS, 3)), direct_f[b], rtol=1e-10,
                                   atol=1e-12 * np.abs(direct_f).max())
    with pytest.raises(ValueError, match="unknown spkserve PES parameter"):
        cls(bundle=str(lj_bundle), template=str(tmp_path / "t.xyz"), cutof=3)


@pytest.mark.timeout(120)
def test_ase_socketio_calculator_drives_spkserve_ipi(lj_bundle):
    """ASE's SocketIOCalculator (server) + `spkserve ipi` (client) == direct BundleCalculator."""
    import ase.units
    from ase import Atoms
    from ase.calculators.socketio import SocketIOCalculator

    from spkserve.ase import BundleCalculator

    name = f"spkase{__import__('os').getpid()}"
    atoms = Atoms("Ar8", positions=_cluster(), cell=np.eye(3) * 30.0, pbc=True)
    client = subprocess.Popen(
        [str(SPKSERVE), "ipi", str(lj_bundle), "--unix", name, "--species", ",".join(["Ar"] * 8)],
        stderr=subprocess.PIPE, text=True,
    )
    # ASE converts with its own (CODATA 2014) Bohr and Hartree, spkserve with CODATA 2018:
    # the exact expectation maps positions and results through both sets of constants.
    bohr_ours, ha_ours = units.factor("Bohr", "Angstrom"), units.factor("Hartree", "eV")
    pos_scale = bohr_ours / ase.units.Bohr
    e_scale = ase.units.Ha / ha_ours
    f_scale = e_scale / pos_scale
    rng = np.random.default_rng(5)
    try:
        with SocketIOCalculator(unixsocket=name, timeout=60) as calc:
            atoms.calc = calc
            for _ in range(3):
                atoms.positions += rng.normal(0, 0.03, atoms.positions.shape)
                e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
                ref = Atoms("Ar8", positions=atoms.positions * pos_scale, cell=atoms.cell * pos_scale, pbc=True)
                ref.calc = BundleCalculator(str(lj_bundle))
                assert e == pytest.approx(ref.get_potential_energy() * e_scale, rel=1e-10)
                np.testing.assert_allclose(f, ref.get_forces() * f_scale, rtol=1e-8, atol=1e-12)
                np.testing.assert_allclose(s, ref.get_stress() * e_scale / pos_scale**3, rtol=1e-8, atol=1e-12)
        _, err = client.communicate(timeout=30)
    finally:
        stop(client)
    assert client.returncode == 0, err
    assert "server closed the connection" in err  # ASE never sends EXIT
