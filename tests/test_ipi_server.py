"""The i-PI server role: real drivers (i-pi-py_driver, ASE SocketClient) and misbehaving ones."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from spkserve import units
from spkserve.batch import Structure
from spkserve.ipi import protocol as P
from spkserve.ipi.server import IPIServer, IPIServerProvider, provider_from_config
from spkserve.provider import ForceProvider, ProviderError

sys.path.insert(0, str(Path(__file__).parent))
from ipi_peers import IPI_PY_DRIVER, PROCESS_BOUND_S, stop, wait_for_drivers  # noqa: E402

pytestmark = pytest.mark.timeout(90)

K_AU = 0.3  # harmonic constant of i-PI's harmonic driver, Hartree/Bohr^2


def _name(tag: str) -> str:
    # ASE and LAMMPS only connect to /tmp/ipi_NAME
    return f"spkt_{tag}_{os.getpid()}"


def _harmonic_reference(structs):
    """i-PI's harmonic driver: E = k/2 sum x^2, F = -k x, in atomic units -> eV, eV/Å."""
    a2b = units.factor("Angstrom", "Bohr")
    e = np.array([0.5 * K_AU * ((s.positions * a2b) ** 2).sum() for s in structs]) * units.factor("Hartree", "eV")
    f = np.concatenate([-K_AU * s.positions * a2b for s in structs]) * units.factor("Hartree/Bohr", "eV/Angstrom")
    return e, f


def _structs(n: int, n_atoms: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [Structure([18] * n_atoms, rng.normal(0, 1.5, (n_atoms, 3)), np.zeros((3, 3)), False) for _ in range(n)]


def _py_driver(name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(IPI_PY_DRIVER), "-u", "-a", name, "-m", "harmonic", "-o", str(K_AU)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.peer
def test_py_driver_and_provider_protocol():
    name = _name("py")
    with IPIServerProvider(unix=name, n_atoms=4, timeout_s=30) as prov:
        assert isinstance(prov, ForceProvider)
        drivers = [_py_driver(name), _py_driver(name)]
        try:
            prov.server.wait_for_drivers(2, 30)
            structs = _structs(8)
            out = prov.compute(structs)
            e, f = _harmonic_reference(structs)
            np.testing.assert_allclose(out["energy"].numpy(), e, rtol=1e-12)
            np.testing.assert_allclose(out["forces"].numpy(), f, rtol=1e-12)
            with pytest.raises(ProviderError, match="5 atoms, the drivers expect 4"):
                prov.compute(_structs(1, n_atoms=5))
            with pytest.raises(ProviderError, match="cannot provide"):
                prov.compute(structs, ("energy", "dipole_moment"))
            bad = _structs(1)[0]
            bad.positions[0, 0] = np.nan
            with pytest.raises(ProviderError, match="non-finite"):
                prov.compute([bad])
        finally:
            prov.close()  # sends EXIT
            for d in drivers:
                d.wait(10)
                assert d.returncode == 0


@pytest.mark.peer
def test_ase_socketclient_emt_through_server_and_stale_socket_file():
    """ASE SocketClient around EMT == EMT evaluated directly (periodic, with stress)."""
    import ase.units
    from ase.build import bulk
    from ase.calculators.emt import EMT

    name = _name("ase")
    path = f"/tmp/ipi_{name}"
    # a stale socket file from a crashed run must not block the bind
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    assert os.path.exists(path)

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    rng = np.random.default_rng(7)
    script = textwrap.dedent(
        f"""
        from ase.build import bulk
        from ase.calculators.emt import EMT
        from ase.calculators.socketio import SocketClient
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
        atoms.calc = EMT()
        SocketClient(unixsocket="{name}").run(atoms, use_stress=True)
        """
    )
    with IPIServerProvider(unix=name, n_atoms=len(atoms), timeout_s=30) as prov:
        client = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
        try:
            prov.server.wait_for_drivers(1, 30)
            structs = []
            for _ in range(3):
                a = atoms.copy()
                a.positions += rng.normal(0, 0.05, a.positions.shape)
                structs.append(Structure.from_atoms(a))
            out = prov.compute(structs, ("energy", "forces", "stress"))
        finally:
            prov.close()
            client.wait(10)
    assert not os.path.exists(path)
    # ASE converts with CODATA 2014 constants, spkserve with CODATA 2018: map through both exactly
    pos_scale = units.factor("Bohr", "Angstrom") / ase.units.Bohr  # our Å -> the Å ASE reconstructs
    e_scale = units.factor("Hartree", "eV") / ase.units.Ha
    for k, s in enumerate(structs):
        ref = atoms.copy()
        ref.positions = s.positions / pos_scale
        ref.cell = s.cell / pos_scale
        ref.calc = EMT()
        assert out["energy"][k].item() == pytest.approx(ref.get_potential_energy() * e_scale, rel=1e-10)
        f = out["forces"].numpy()[k * len(atoms) : (k + 1) * len(atoms)]
        np.testing.assert_allclose(f, ref.get_forces() * e_scale * pos_scale, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(
            out["stress"][k].numpy(), ref.get_stress(voigt=False) * e_scale * pos_scale**3, rtol=1e-7, atol=1e-10
        )


def test_no_driver_raises_provider_error_in_time():
    with IPIServerProvider(unix=_name("none"), timeout_s=0.5) as prov:
        t0 = time.monotonic()
        with pytest.raises(ProviderError, match="no i-PI driver answered"):
            prov.compute(_structs(2))
        assert time.monotonic() - t0 < 3


def test_server_refuses_non_loopback_and_second_server():
    with pytest.raises(ValueError, match="loopback"):
        IPIServer(host="0.0.0.0", port=0)
    name = _name("dup")
    with IPIServer(unix=name):
        with pytest.raises(ProviderError, match="already listens"):
            IPIServer(unix=name)


def test_provider_from_config_tcp():
    with pytest.raises(ValueError, match="unknown i-PI server option"):
        provider_from_config(unix="x", colour="red")
    prov = provider_from_config(host="127.0.0.1", port=0, timeout_s=5)
    try:
        assert prov.server.port > 0 and prov.server.address.startswith("tcp:127.0.0.1")
    finally:
        prov.close()


# --- fuzzing: misbehaving drivers next to a good one ------------------------------------


def _bad_driver(path: str, mode: str, n_atoms: int) -> None:
    """A driver that misbehaves in one way (runs in a thread)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.settimeout(20)
    try:
        hdr = P.read_header(sock)  # STATUS
        if mode == "garbage":
            sock.sendall(b"HELLO WORLD!")
            return
        if mode == "havedata_first":
            sock.sendall(P.HAVEDATA)
            return
        if mode == "silent":
            time.sleep(3)
            return
        sock.sendall(P.READY)
        hdr = P.read_header(sock)  # STATUS before the job
        sock.sendall(P.READY)
        hdr = P.read_header(sock)
        assert hdr == P.POSDATA
        P.read_posdata(sock, 1)
        P.read_header(sock)  # GETFORCE
        zeros_f = np.zeros((1, n_atoms, 3))
        if mode == "wrong_atoms":
            sock.sendall(P.pack_forceready(np.zeros(1), np.zeros((1, n_atoms + 1, 3)), np.zeros((1, 3, 3))))
        elif mode == "nan":
            sock.sendall(P.pack_forceready(np.zeros(1), np.full_like(zeros_f, np.nan), np.zeros((1, 3, 3))))
        elif mode == "oversized":
            sock.sendall(P.FORCEREADY + np.float64(0).tobytes() + np.int32(2**30).tobytes())
        elif mode == "huge_extra":
            msg = P.pack_forceready(np.zeros(1), zeros_f, np.zeros((1, 3, 3)), [""])
            sock.sendall(msg[:-4] + np.int32(2**29).tobytes())
        elif mode == "truncated":
            sock.sendall(P.pack_forceready(np.zeros(1), zeros_f, np.zeros((1, 3, 3)))[:30])
        elif mode == "out_of_order":
            sock.sendall(P.READY)
        time.sleep(0.5)
    except (OSError, P.PeerClosed):
        pass
    finally:
        sock.close()


_KILLED_MID_MESSAGE = textwrap.dedent(
    """
    import os, signal, socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    s.recv(12); s.sendall(b"READY       ")
    s.recv(12); s.sendall(b"READY       ")
    s.recv(100000)
    s.sendall(b"FORCEREADY  " + b"\\x00" * 10)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)

_HANDSHAKE_BAD = ["garbage", "havedata_first", "silent"]
_JOB_BAD = ["wrong_atoms", "nan", "oversized", "huge_extra", "truncated", "out_of_order"]


@pytest.mark.peer
def test_fuzzed_drivers_are_rejected_and_good_driver_answers(caplog):
    name = _name("fuzz")
    path = f"/tmp/ipi_{name}"
    n_atoms = 4
    caplog.set_level(logging.WARNING, logger="spkserve.ipi.server")
    prov = IPIServerProvider(unix=name, n_atoms=n_atoms, timeout_s=40, io_timeout_s=2.0, max_attempts=20)
    server = prov.server
    threads = [threading.Thread(target=_bad_driver, args=(path, m, n_atoms)) for m in _HANDSHAKE_BAD + _JOB_BAD]
    killed = None
    good = None
    try:
        for t in threads:
            t.start()
        # the job-stage misbehavers pass the handshake; the killed one joins them
        killed = subprocess.Popen([sys.executable, "-c", _KILLED_MID_MESSAGE, path])
        server.wait_for_drivers(len(_JOB_BAD) + 1, 20)
        structs = _structs(6, n_atoms)
        result: dict = {}

        def run():
            try:
                result["out"] = prov.compute(structs)
            except Exception as err:  # reported below
                result["err"] = err

        worker = threading.Thread(target=run)
        worker.start()
        # once every misbehaving driver was dropped, a good one connects
        deadline = time.monotonic() + 20
        while len(server.rejections) < len(_JOB_BAD) + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        good = _py_driver(name)
        worker.join(40)
        assert "err" not in result, result.get("err")
        e, f = _harmonic_reference(structs)
        np.testing.assert_allclose(result["out"]["energy"].numpy(), e, rtol=1e-12)
        np.testing.assert_allclose(result["out"]["forces"].numpy(), f, rtol=1e-12)
        # the server keeps answering
        again = prov.compute(_structs(3, n_atoms, seed=9))
        assert again["energy"].shape == (3,)
        for t in threads:
            t.join(10)
        text = "\n".join(server.rejections)
        for reason in ["HELLO WORLD", "HAVEDATA", "5 atoms but 4", "non-finite", "outside", "closed the connection", "READY"]:
            assert reason in text, f"{reason!r} not among rejections:\n{text}"
        assert "stalled" in text or "timed out" in text  # the silent driver
        assert any("rejected driver" in r.message for r in caplog.records)
    finally:
        prov.close()
        stop(killed)
        if good is not None:
            good.wait(10)


@pytest.mark.peer
def test_spkmd_integrates_with_forces_from_ase_socketclients(lj_bundle):
    """spkmd (4 replicas, velocity Verlet) on forces from two ASE SocketClients (ASE's LJ) through the
    server role follows the same trajectory as spkmd on the LJ bundle in-process."""
    import torch
    from ase import Atoms

    from spkmd.calculators import ProviderCalculator, load_provider
    from spkmd.initializers import MaxwellBoltzmann
    from spkmd.integrators import VelocityVerlet
    from spkmd.simulator import Simulator
    from spkmd.system import System
    from spkserve.runtime import ModelRunner

    rng = np.random.default_rng(11)
    grid = np.array([[i, j, k] for i in range(2) for j in range(2) for k in range(2)], float)
    atoms = Atoms("Ar8", positions=grid * 3.8 + rng.normal(0, 0.05, (8, 3)))

    def simulate(calculator, steps=15):
        system = System.from_atoms(atoms, n_replicas=4)
        MaxwellBoltzmann(60.0)(system, torch.Generator().manual_seed(3))
        sim = Simulator(system, VelocityVerlet(time_step_fs=4.0), calculator, seed=0)
        conserved = []
        for _ in range(steps):
            sim.simulate(1)
            conserved.append(sim.conserved_energy().clone())
        return system, torch.stack(conserved)

    name = _name("md")
    script = textwrap.dedent(
        f"""
        import numpy as np
        from ase import Atoms
        from ase.calculators.lj import LennardJones
        from ase.calculators.socketio import SocketClient
        atoms = Atoms("Ar8", positions=np.zeros((8, 3)))
        atoms.calc = LennardJones(sigma=3.4, epsilon=0.0104, rc=8.5)
        SocketClient(unixsocket="{name}").run(atoms)
        """
    )
    provider = load_provider("spkserve.ipi.server:provider_from_config", unix=name, n_atoms=8, timeout_s=60)
    clients = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(2)]
    try:
        provider.server.wait_for_drivers(2, 60)
        via_socket, conserved = simulate(ProviderCalculator(provider))
    finally:
        provider.close()
        for c in clients:
            c.wait(10)
    direct, _ = simulate(ProviderCalculator(ModelRunner(lj_bundle)))
    # ASE converts with CODATA 2014, spkserve with 2018: forces differ by ~1e-8 relative
    torch.testing.assert_close(via_socket.positions, direct.positions, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(via_socket.energy, direct.energy, rtol=1e-6, atol=0)
    start = torch.as_tensor(atoms.positions * units.factor("Angstrom", "Bohr"))
    assert (direct.positions - start).abs().max() > 0.05  # the atoms moved: the comparison is not trivial
    # conserved energy flat compared with the kinetic energy the atoms carry
    assert (conserved - conserved[0]).abs().max() < 1e-3 * direct.kinetic_energy().abs().max()


@pytest.mark.peer
@pytest.mark.timeout(3 * PROCESS_BOUND_S)
def test_py_driver_with_spkserve_pes_module(lj_bundle, tmp_path):
    """`i-pi-py_driver -m custom -P spkserve/ipi/pes.py` answers with the bundle (periodic, with stress)."""
    from ase.build import bulk

    import spkserve.ipi.pes as pes_module
    from spkserve.runtime import ModelRunner

    atoms = bulk("Ar", "fcc", a=5.3, cubic=True).repeat(2)
    atoms.write(tmp_path / "t.xyz")
    name = _name("pes")
    rng = np.random.default_rng(2)
    structs = []
    for _ in range(3):
        a = atoms.copy()
        a.positions += rng.normal(0, 0.1, a.positions.shape)
        structs.append(Structure.from_atoms(a))
    with IPIServerProvider(unix=name, n_atoms=len(atoms), timeout_s=PROCESS_BOUND_S) as prov:
        driver = subprocess.Popen(
            [str(IPI_PY_DRIVER), "-u", "-a", name, "-m", "custom", "-P", pes_module.__file__,
             "-o", f"bundle={lj_bundle},template={tmp_path / 't.xyz'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            wait_for_drivers(prov.server, driver)  # until it connects (or dies); start-up may be slow
            out = prov.compute(structs, ("energy", "forces", "stress"))
        finally:
            prov.close()
            try:  # EXIT was sent: ends when the driver exits; the bound is only a backstop
                _, err = driver.communicate(timeout=PROCESS_BOUND_S)
            finally:
                stop(driver)
    assert driver.returncode == 0, err
    ref = ModelRunner(lj_bundle).compute(structs, ("energy", "forces", "stress"))
    for k in ("energy", "forces", "stress"):
        np.testing.assert_allclose(out[k].numpy(), ref[k].numpy(), rtol=1e-10, atol=1e-13)
