"""Model server end to end: results equal in-process evaluation, batching, auth, shutdown, limits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from server_support import (
    SlowRunner,
    argon_cluster,
    argon_crystal,
    client_for,
    ethanol,
    running_server,
    short_tmpdir,
    wait_for,
)
from spkserve.batch import Structure
from spkserve.server import protocol as P
from spkserve.server.client import Client, RemoteProvider, ServerError
from spkserve.server.server import ModelServer, ServerSetupError

pytestmark = pytest.mark.timeout(120)
TOKEN = "test-token-0123456789"


@pytest.fixture(scope="module")
def runner(lj_bundle):
    from spkserve.runtime import ModelRunner

    return ModelRunner(lj_bundle, skin_angstrom=0.0)


@pytest.fixture(scope="module")
def server(lj_bundle):
    with running_server(lj_bundle, batch_window_us=500) as srv:
        yield srv


def _reference(runner, atoms_list, properties):
    out = runner.compute([Structure.from_atoms(a) for a in atoms_list], properties)
    return {k: v.numpy() for k, v in out.items()}


def test_roundtrip_equals_in_process(server, runner):
    systems = [ethanol(seed=1), argon_cluster(7, seed=2), ethanol(seed=3, scale=1.5)]
    with client_for(server) as c:
        single = c.compute(systems[0])
        many = c.compute(systems, ["energy", "forces"])
    assert isinstance(single, dict) and isinstance(many, list) and len(many) == 3
    ref = _reference(runner, systems, ("energy", "forces"))
    np.testing.assert_allclose(single["energy"], ref["energy"][0], rtol=1e-12)
    np.testing.assert_allclose(single["forces"], ref["forces"][:9], rtol=1e-12, atol=1e-12)
    bounds = np.cumsum([0] + [len(a) for a in systems])
    for k, r in enumerate(many):
        assert isinstance(r["energy"], float)
        assert r["forces"].dtype == np.float64 and r["forces"].shape == (len(systems[k]), 3)
        np.testing.assert_allclose(r["energy"], ref["energy"][k], rtol=1e-12)
        np.testing.assert_allclose(r["forces"], ref["forces"][bounds[k]:bounds[k + 1]], rtol=1e-12, atol=1e-12)


def test_stress_on_periodic_systems(server, runner):
    crystal = argon_crystal(seed=4)
    with client_for(server) as c:
        r = c.compute(crystal, ["energy", "forces", "stress"])
        with pytest.raises(ServerError, match="stress needs a cell periodic") as info:
            c.compute(ethanol(), ["energy", "stress"])
        assert info.value.code == P.BAD_REQUEST
    ref = _reference(runner, [crystal], ("energy", "forces", "stress"))
    assert r["stress"].shape == (3, 3)
    np.testing.assert_allclose(r["stress"], ref["stress"][0], rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(r["forces"], ref["forces"], rtol=1e-10, atol=1e-12)


def test_metadata_health_stats(server, lj_bundle):
    with client_for(server) as c:
        meta = c.metadata()
        health = c.health()
        c.compute(ethanol())
        stats = c.stats()
    assert meta["cutoff_angstrom"] == pytest.approx(8.5)
    assert set(meta["available_properties"]) >= {"energy", "forces", "stress"}
    assert meta["units"]["forces"] == "eV/Angstrom"
    assert meta["server"]["protocol"] == P.PROTOCOL_VERSION
    assert meta["server"]["limits"]["max_message_bytes"] == P.Limits().max_message_bytes
    assert health["status"] == "ok" and health["connections"] >= 1
    assert stats["requests_by_op"]["compute"] >= 1 and stats["batches"] >= 1
    lat = stats["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]


def test_dtype_option_reaches_the_runner(lj_bundle, runner):
    from spkserve.runtime import ModelRunner

    atoms = argon_cluster(8, seed=11)
    expected = str(ModelRunner(lj_bundle, dtype="float32").dtype).replace("torch.", "")
    with running_server(lj_bundle, dtype="float32") as srv:
        with client_for(srv) as c:
            assert c.metadata()["dtype"] == expected
            r = c.compute(atoms)
    ref = _reference(runner, [atoms], ("energy", "forces"))
    assert r["forces"].dtype == np.float64  # always float64 on the wire
    np.testing.assert_allclose(r["energy"], ref["energy"][0], rtol=1e-5)
    np.testing.assert_allclose(r["forces"], ref["forces"], rtol=1e-4, atol=1e-6)


def test_remote_provider_is_a_force_provider(server, runner):
    from spkserve.provider import ForceProvider

    systems = [ethanol(seed=5), argon_cluster(5, seed=6)]
    with RemoteProvider(unix=server.address) as provider:
        assert isinstance(provider, ForceProvider)
        assert "forces" in provider.available_properties
        out = provider.compute([Structure.from_atoms(a) for a in systems], ("energy", "forces"))
    ref = _reference(runner, systems, ("energy", "forces"))
    assert out["energy"].shape == (2,) and out["forces"].shape == (14, 3)
    np.testing.assert_allclose(out["energy"].numpy(), ref["energy"], rtol=1e-12)
    np.testing.assert_allclose(out["forces"].numpy(), ref["forces"], rtol=1e-12, atol=1e-12)


def test_spkmd_runs_on_a_remote_provider(server, lj_bundle):
    import torch

    from spkmd.calculators import BundleCalculator, ProviderCalculator, load_provider
    from spkmd.system import System

    remote = ProviderCalculator(load_provider("spkserve.server.client:RemoteProvider", unix=server.address))
    local = BundleCalculator(lj_bundle)
    systems = [System.from_atoms([argon_cluster(7, seed=8), ethanol(seed=9)], n_replicas=2) for _ in range(2)]
    for system, calc in zip(systems, (remote, local)):
        system.positions = system.positions + 0.01 * torch.arange(2, dtype=system.positions.dtype).view(2, 1, 1)
        calc.check(system)
        calc.calculate(system)
    remote.close()
    assert systems[0].forces.shape == (2, 16, 3)
    torch.testing.assert_close(systems[0].energy, systems[1].energy, rtol=1e-12, atol=0)
    torch.testing.assert_close(systems[0].forces, systems[1].forces, rtol=1e-10, atol=1e-14)


def _concurrent(server, n_clients, make_atoms, properties=("energy", "forces")):
    """n_clients threads each send one compute at the same moment; returns their results."""
    barrier = threading.Barrier(n_clients)
    results: list = [None] * n_clients
    errors: list = []

    def work(k):
        try:
            with client_for(server) as c:
                c.health()
                barrier.wait()
                results[k] = c.compute(make_atoms(k), list(properties))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_concurrent_requests_share_model_calls(lj_bundle, runner):
    make = lambda k: ethanol(seed=100 + k)  # noqa: E731
    with running_server(lj_bundle, batch_window_us=200_000, skin_angstrom=0.0) as srv:
        results = _concurrent(srv, 6, make)
        stats = client_for(srv).stats()
    assert stats["batches"] < 6, stats
    assert stats["mean_batch_requests"] > 1
    ref = _reference(runner, [make(k) for k in range(6)], ("energy", "forces"))
    for k, r in enumerate(results):  # every client got its own structure's result
        np.testing.assert_allclose(r["energy"], ref["energy"][k], rtol=1e-12)
        np.testing.assert_allclose(r["forces"], ref["forces"][9 * k:9 * k + 9], rtol=1e-12, atol=1e-12)


def test_batches_respect_atom_limit_and_batching_off(lj_bundle):
    make = lambda k: ethanol(seed=k)  # noqa: E731
    with running_server(lj_bundle, batch_window_us=200_000, max_batch_atoms=20) as srv:
        _concurrent(srv, 6, make)
        stats = client_for(srv).stats()
    assert stats["mean_batch_atoms"] <= 20 and stats["max_batch_requests"] <= 2
    assert stats["batches"] >= 3
    with running_server(lj_bundle, batch_window_us=200_000, max_batch_requests=1) as srv:
        _concurrent(srv, 4, make)
        stats = client_for(srv).stats()
    assert stats["batches"] == 4 and stats["mean_batch_requests"] == 1


def test_clients_taking_turns_stop_paying_the_window(lj_bundle):
    from spkserve.server.batching import FUTILE_LIMIT, PROBE_EVERY

    n = 48
    with running_server(lj_bundle, batch_window_us=100_000) as srv:
        clients = [client_for(srv).connect() for _ in range(3)]
        for k in range(n):  # three connections used in turn by one thread, like NEB images
            clients[k % 3].compute(ethanol())
        stats = clients[0].stats()
        [c.close() for c in clients]
    assert stats["batches"] == n and stats["window_expired"] == stats["window_waits"]
    # without adaptation all 48 would wait 100 ms; with it: FUTILE_LIMIT, then one probe per PROBE_EVERY
    assert stats["window_waits"] <= FUTILE_LIMIT + (n - FUTILE_LIMIT) // PROBE_EVERY + 1
    assert stats["window_waits"] >= FUTILE_LIMIT


def test_different_property_sets_are_not_merged(lj_bundle, runner):
    crystals = [argon_crystal(seed=k) for k in range(4)]
    props = lambda k: ("energy", "forces", "stress") if k % 2 else ("energy", "forces")  # noqa: E731
    with running_server(lj_bundle, batch_window_us=100_000) as srv:
        barrier = threading.Barrier(4)
        out = [None] * 4

        def work(k):
            with client_for(srv) as c:
                c.health()
                barrier.wait()
                out[k] = c.compute(crystals[k], list(props(k)))

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
    for k in range(4):
        assert ("stress" in out[k]) == (k % 2 == 1)
        ref = _reference(runner, [crystals[k]], props(k))
        np.testing.assert_allclose(out[k]["energy"], ref["energy"][0], rtol=1e-12)


def test_tcp_requires_token(lj_bundle):
    with pytest.raises(ServerSetupError, match="needs a token"):
        ModelServer.from_bundle(lj_bundle, host="127.0.0.1", port=0)
    with pytest.raises(ServerSetupError, match="refusing to bind non-loopback host"):
        ModelServer.from_bundle(lj_bundle, host="0.0.0.0", port=0, token=TOKEN)
    with running_server(lj_bundle, host="127.0.0.1", port=0, token=TOKEN) as srv:
        host, port = srv.address
        assert host == "127.0.0.1" and port > 0
        # no auth: refused, connection closed
        with Client(host=host, port=port, token=None, reconnect_attempts=0) as c:
            with pytest.raises(ServerError) as info:
                c.compute(ethanol())
            assert info.value.code == P.UNAUTHORIZED
        # wrong token
        with pytest.raises(ServerError) as info:
            Client(host=host, port=port, token="wrong-token-xxxxxxxxx", reconnect_attempts=0).connect()
        assert info.value.code == P.UNAUTHORIZED
        # right token, also from the environment
        with Client(host=host, port=port, token=TOKEN) as c:
            assert np.isfinite(c.compute(ethanol())["energy"])
        os.environ["SPKSERVE_TOKEN"] = TOKEN
        try:
            with Client(host=host, port=port) as c:
                assert c.health()["status"] == "ok"
        finally:
            del os.environ["SPKSERVE_TOKEN"]
        stats = client_for(srv).stats()
    assert stats["errors_by_code"][P.UNAUTHORIZED] == 2


def test_unix_token_optional_but_enforced_when_set(lj_bundle):
    with running_server(lj_bundle, token=TOKEN) as srv:
        with Client(unix=srv.address, reconnect_attempts=0) as c:
            with pytest.raises(ServerError, match="unauthorized"):
                c.health()
        with Client(unix=srv.address, token=TOKEN) as c:
            assert c.health()["status"] == "ok"
        assert oct(os.stat(srv.address).st_mode & 0o777) == oct(0o600)


def test_stale_socket_live_socket_and_regular_file(lj_bundle):
    with short_tmpdir() as d:
        path = str(d / "stale.sock")
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()  # the file stays, nobody listens: like after a crash
        assert os.path.exists(path)
        with running_server(lj_bundle, unix_path=path) as srv:
            assert client_for(srv).health()["status"] == "ok"
            with pytest.raises(ServerSetupError, match="already listening"):
                ModelServer.from_bundle(lj_bundle, unix_path=path).start()
        assert not os.path.exists(path)  # removed on shutdown
        regular = d / "file"
        regular.write_text("x")
        with pytest.raises(ServerSetupError, match="not a socket"):
            ModelServer.from_bundle(lj_bundle, unix_path=str(regular)).start()


def test_graceful_shutdown_answers_accepted_requests(runner):
    slow = SlowRunner(runner, delay_s=0.5)
    info = {"species": list(range(1, 119)), "cutoff_angstrom": 8.5}
    with short_tmpdir() as d:
        srv = ModelServer(slow, info, unix_path=str(d / "g.sock"), batch_window_us=0).start()
        results, errors = [], []

        def work(k):
            try:
                with client_for(srv, reconnect_attempts=0) as c:
                    results.append(c.compute(ethanol(seed=k)))
            except Exception as err:  # noqa: BLE001
                errors.append(err)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        [t.start() for t in threads]
        assert slow.started.wait(30)
        wait_for(lambda: srv.stats.requests["compute"] == 4, 30, "all four requests accepted")
        srv.shutdown()
        [t.join(30) for t in threads]
        assert not errors and len(results) == 4
        assert not os.path.exists(d / "g.sock")
        with pytest.raises(ConnectionError):
            Client(unix=str(d / "g.sock"), reconnect_attempts=1, backoff_s=0.01).health()


def test_connection_limit(lj_bundle):
    with running_server(lj_bundle, max_connections=2) as srv:
        a, b = client_for(srv).connect(), client_for(srv).connect()
        wait_for(lambda: srv.stats.connections_open == 2, 10, "two connections")
        with pytest.raises(ServerError) as info:
            client_for(srv, reconnect_attempts=0).health()
        assert info.value.code == P.OVERLOADED
        assert a.health()["status"] == "ok" and b.health()["status"] == "ok"
        a.close()
        wait_for(lambda: srv.stats.connections_open == 1, 10, "one connection closed")
        assert client_for(srv).health()["status"] == "ok"
        b.close()


def test_request_timeout_and_server_keeps_serving(runner):
    slow = SlowRunner(runner, delay_s=1.0)
    info = {"species": list(range(1, 119)), "cutoff_angstrom": 8.5}
    with running_server(runner=slow, info=info, batch_window_us=0) as srv:
        with client_for(srv) as c:
            with pytest.raises(ServerError) as err:
                c.compute(ethanol(), timeout_s=0.1)
            assert err.value.code == P.TIMEOUT
            slow.delay_s = 0.0
            assert np.isfinite(c.compute(ethanol())["energy"])


def test_client_reconnects_after_server_restart(lj_bundle):
    with short_tmpdir() as d:
        path = str(d / "r.sock")
        c = Client(unix=path, reconnect_attempts=5, backoff_s=0.05)
        with running_server(lj_bundle, unix_path=path):
            e1 = c.compute(ethanol())["energy"]
        with running_server(lj_bundle, unix_path=path):
            e2 = c.compute(ethanol())["energy"]
        c.close()
    assert e1 == e2 and c.reconnects >= 1


def test_stalled_message_is_dropped_after_read_timeout(lj_bundle):
    with running_server(lj_bundle, read_timeout_s=0.3) as srv:
        s = socket.socket(socket.AF_UNIX)
        s.connect(srv.address)
        s.sendall(P.HEADER.pack(100) + b"\x80")  # promises 100 bytes, sends 1
        s.settimeout(5)
        assert client_for(srv).health()["status"] == "ok"  # others are served meanwhile
        assert s.recv(10) == b""  # server hung up after the read timeout
        s.close()
        assert srv.stats.errors["timeout"] == 1


@pytest.mark.timeout(200)
def test_cli_serve_unix_and_sigterm(lj_bundle):
    with short_tmpdir() as d:
        path = str(d / "cli.sock")
        proc = subprocess.Popen(
            [sys.executable, "-c", "from spkserve.cli import main; main()", "serve", str(lj_bundle), "--unix", path],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            wait_for(lambda: os.path.exists(path) or proc.poll() is not None, 150, "the server socket")
            assert proc.poll() is None, proc.stderr.read()
            with Client(unix=path) as c:
                r = c.compute(ethanol())
            assert np.isfinite(r["energy"])
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        assert "spkserve stopped" in err
        assert not os.path.exists(path)


def test_cli_refuses_tcp_without_token(lj_bundle):
    from click.testing import CliRunner

    from spkserve.cli import main

    env = {k: v for k, v in os.environ.items() if k != "SPKSERVE_TOKEN"}
    result = CliRunner(env=env).invoke(main, ["serve", str(lj_bundle), "--host", "127.0.0.1", "--port", "0"])
    assert result.exit_code != 0 and "needs a token" in result.output
    result = CliRunner().invoke(main, ["serve", str(lj_bundle)])
    assert result.exit_code != 0 and "exactly one of --unix" in result.output
