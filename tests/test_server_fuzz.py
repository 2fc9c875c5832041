"""Fuzzing the model server: garbage, truncation, oversize, disorder, bad structures, killed clients.

After every abuse the server must still answer a well-behaved client, and it
must have logged what it rejected.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading

import msgpack
import numpy as np
import pytest

from server_support import client_for, ethanol, running_server, wait_for
from spkserve.server import protocol as P
from spkserve.server.client import ServerError

pytestmark = pytest.mark.timeout(120)
LIMIT = 1 << 20


@pytest.fixture(scope="module")
def cho_bundle(bundle_dir):
    from spkserve.potentials import reference_bundle

    return reference_bundle("lj", bundle_dir / "lj_cho.bundle", species=[1, 6, 8], sigma=1.2, epsilon=0.05, cutoff=5.0)


@pytest.fixture(scope="module")
def server(cho_bundle):
    limits = P.Limits(max_message_bytes=LIMIT, max_atoms_per_structure=1000)
    with running_server(cho_bundle, limits=limits, read_timeout_s=2.0, batch_window_us=50_000) as srv:
        yield srv


@pytest.fixture
def good(server):
    with client_for(server) as c:
        yield c


def _raw(server) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(server.address)
    return s


def _recv_exactly(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def _reply(s) -> dict:
    (n,) = P.HEADER.unpack(_recv_exactly(s, 4))
    return P.unpack(_recv_exactly(s, n))


def _send_body(s, body: bytes) -> None:
    s.sendall(P.HEADER.pack(len(body)) + body)


def _alive(good) -> None:
    assert good.health()["status"] == "ok"
    assert np.isfinite(good.compute(ethanol())["energy"])


def _closed(s) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


GARBAGE = [
    b"\xc1",
    b"not msgpack at all",
    msgpack.packb([1, 2, 3]),
    msgpack.packb({"op": "compute"})[:-3],
    msgpack.packb({"op": "health"}) + b"\x00\x01",
    msgpack.packb({1: 2}),
    b"\x91" * 50_000,
    msgpack.packb({"op": "compute", "structures": [{"numbers": msgpack.ExtType(1, b"\x03<f8\x01\x05\x00\x00\x00")}]}),
    msgpack.packb({"op": "health", "x": msgpack.ExtType(42, b"")}),
]


def test_garbage_bodies_get_errors_and_keep_the_connection(server, good, caplog):
    caplog.set_level(logging.WARNING, logger="spkserve.server")
    s = _raw(server)
    for body in GARBAGE:
        _send_body(s, body)
        reply = _reply(s)
        assert reply["ok"] is False and reply["error"]["code"] == P.BAD_MESSAGE, (body[:20], reply)
    _send_body(s, P.pack({"op": "health", "id": 7})[4:])  # the stream is still in step
    reply = _reply(s)
    assert reply["id"] == 7 and reply["ok"] and reply["result"]["status"] == "ok"
    s.close()
    _alive(good)
    assert sum("rejected (bad_message)" in r.getMessage() for r in caplog.records) >= len(GARBAGE)


def test_oversized_message_is_refused_and_connection_closed(server, good, caplog):
    caplog.set_level(logging.WARNING, logger="spkserve.server")
    s = _raw(server)
    s.sendall(P.HEADER.pack(LIMIT + 1) + b"\0" * 64)
    reply = _reply(s)
    assert reply["error"]["code"] == P.TOO_LARGE and str(LIMIT) in reply["error"]["message"]
    assert _closed(s)
    s.close()
    s = _raw(server)
    s.sendall(P.HEADER.pack(0))
    assert _reply(s)["error"]["code"] == P.BAD_MESSAGE
    s.close()
    _alive(good)
    assert any("rejected (too_large)" in r.getMessage() for r in caplog.records)


def test_truncated_streams_and_half_headers(server, good):
    for data in (b"\x00\x00", P.HEADER.pack(50) + b"\x81\xa2op", P.pack({"op": "health"})[:-1]):
        s = _raw(server)
        s.sendall(data)
        s.close()
    wait_for(lambda: server.stats.connections_open <= 1, 10, "truncated connections to be dropped")
    _alive(good)


def test_random_byte_streams(server, good):
    rng = np.random.default_rng(0)
    for k in range(20):
        s = _raw(server)
        if k % 2:  # framed random bodies
            for _ in range(10):
                _send_body(s, rng.bytes(int(rng.integers(1, 300))))
                assert _reply(s)["ok"] is False
        else:  # unframed noise: random lengths, then whatever follows
            s.sendall(rng.bytes(int(rng.integers(1, 4000))))
        s.close()
    _alive(good)


def test_structure_errors_are_structured_and_specific(server, good):
    cases = [
        ({"numbers": [8, 1, 1], "positions": np.zeros((2, 3))}, P.BAD_REQUEST, "expected [3, 3]"),
        ({"numbers": [8, 1], "positions": [[0, 0, 0], [np.nan, 0, 0]]}, P.BAD_REQUEST, "NaN"),
        ({"numbers": [26, 8], "positions": [[0, 0, 0], [2, 0, 0]]}, P.UNKNOWN_ELEMENT, "[26]"),
        ({"numbers": [1] * 1001, "positions": np.zeros((1001, 3))}, P.TOO_LARGE, "1001 atoms"),
    ]
    for structure, code, text in cases:
        with pytest.raises(ServerError) as info:
            good.compute(structure)
        assert info.value.code == code and text in info.value.message, info.value
    with pytest.raises(ServerError) as info:
        good.compute(ethanol(), ["energy", "dipole_moment"])
    assert info.value.code == P.UNSUPPORTED_PROPERTY
    _alive(good)


def test_out_of_order_and_pipelined_messages(server):
    s = _raw(server)
    # a reply sent to the server, an auth nobody asked for, then three requests back to back
    _send_body(s, P.pack({"id": 1, "ok": True, "result": {}})[4:])
    assert _reply(s)["error"]["code"] == P.BAD_REQUEST
    _send_body(s, P.pack({"op": "auth", "id": 2, "token": "whatever-token"})[4:])
    assert _reply(s)["ok"]  # no token configured on this unix server: accepted
    wire = {"numbers": ethanol().numbers, "positions": ethanol().positions}
    frames = [
        P.pack({"op": "compute", "id": 10, "structures": [wire]}),
        P.pack({"op": "stats", "id": 11}),
        P.pack({"op": "compute", "id": 12, "structures": [wire], "properties": ["energy"]}),
    ]
    s.sendall(b"".join(frames))
    replies = [_reply(s) for _ in frames]
    assert [r["id"] for r in replies] == [10, 11, 12] and all(r["ok"] for r in replies)
    assert "forces" in replies[0]["result"]["results"][0]
    assert set(replies[2]["result"]["results"][0]) == {"energy"}
    s.close()


_KILLED_CLIENT = r"""
import socket, sys, time
from spkserve.server import protocol as P
import numpy as np
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
mode = sys.argv[2]
frame = P.pack({"op": "compute", "id": 1, "structures": [{"numbers": np.ones(500, int),
                "positions": np.random.default_rng(0).uniform(0, 40, (500, 3))}]})
if mode == "mid":
    s.sendall(frame[: len(frame) // 2])
else:
    s.sendall(frame)
print("sent", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("mode", ["mid", "awaiting_reply"])
def test_clients_killed_mid_message_or_before_reply(server, good, mode, caplog):
    caplog.set_level(logging.INFO, logger="spkserve.server")
    before = server.stats.connections_total
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_CLIENT, server.address, mode], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "sent"
        wait_for(lambda: server.stats.connections_total > before, 10, "the client to connect")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_for(lambda: server.stats.connections_open <= 1, 20, "the killed client's connection to close")
    _alive(good)
    if mode == "mid":
        assert any("closed mid-message" in r.getMessage() for r in caplog.records)


def test_model_failure_reaches_only_the_request_that_caused_it(server):
    bad = {"numbers": [1, 1], "positions": [[0, 0, 0], [0, 0, 0]]}  # r = 0: infinite LJ energy
    results, errors = {}, {}
    barrier = threading.Barrier(4)

    def work(k):
        with client_for(server) as c:
            c.health()
            barrier.wait()
            try:
                results[k] = c.compute(bad if k == 0 else ethanol(seed=k))
            except ServerError as err:
                errors[k] = err

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert set(errors) == {0} and errors[0].code == P.MODEL_ERROR and "non-finite" in errors[0].message
    assert set(results) == {1, 2, 3} and all(np.isfinite(r["energy"]) for r in results.values())


def test_server_counted_every_rejection(server, good):
    stats = good.stats()
    assert stats["errors"] >= 10 and stats["errors_by_code"].get(P.BAD_MESSAGE, 0) >= len(GARBAGE)
    assert stats["connections"]["open"] >= 1
    assert os.path.exists(server.address)


# --------------------------------------------------------------------------- issue 14: native crash
_HOSTILE_GEOMETRY = {
    # one atom 1e6 Å away from a non-periodic molecule: vesin divided by zero (SIGFPE)
    "far_atom": ([[0.0, 0, 0], [1.0, 0, 0], [1e6, 0, 0]], None, False),
    # a periodic cell of 1e200 Å: SIGFPE in vesin
    "huge_cell": ([[0.0, 0, 0], [1.0, 0, 0]], (np.eye(3) * 1e200).tolist(), True),
    # a slab whose non-periodic extent is 1e5 Å: vesin hangs for minutes
    "far_slab": ([[0.0, 0, 0], [1.0, 0, 0], [0, 0, 1e5]], np.diag([10.0, 10.0, 0.0]).tolist(), [True, True, False]),
    # a 1 Å cube for a 5 Å cutoff: 1331 images, pair count explodes
    "thin_cell": ([[0.0, 0, 0], [0.5, 0.5, 0.5]], np.eye(3).tolist(), True),
}


@pytest.mark.parametrize("case", sorted(_HOSTILE_GEOMETRY))
def test_hostile_geometry_is_a_clear_error_in_every_backend(case):
    """In a child process, so that a native crash shows up as a signal instead of killing pytest."""
    positions, cell, pbc = _HOSTILE_GEOMETRY[case]
    code = f"""
import torch
from spkserve.neighbors import neighbor_list, NeighborListError
R = torch.tensor({positions!r}, dtype=torch.float64)
C = torch.tensor({cell!r}, dtype=torch.float64) if {cell!r} is not None else torch.zeros(3, 3, dtype=torch.float64)
P = torch.tensor({pbc!r}, dtype=torch.bool).expand(3).clone()
for backend in ("vesin", "matscipy", "ase", "torch"):
    try:
        neighbor_list(R, C, P, torch.tensor([len(R)]), 5.0, backend)
    except NeighborListError as err:
        print(backend, "REFUSED", err)
    else:
        print(backend, "ACCEPTED")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, f"child died (rc {proc.returncode}): {proc.stderr[-500:]}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4 and all("REFUSED" in line for line in lines), proc.stdout
    assert all(("span" in l) or ("cell vector" in l) or ("too thin" in l) for l in lines), proc.stdout


def test_far_atom_request_gets_an_error_and_the_server_survives(server, good):
    """One msgpack request with a far atom used to take `spkserve serve` down (SIGFPE)."""
    atoms = ethanol(seed=3)
    far = atoms.copy()
    far.positions[-1] = [1e6, 0.0, 0.0]
    with pytest.raises(ServerError) as err:
        good.compute(far)
    assert "span" in str(err.value)
    assert np.isfinite(good.compute(atoms)["energy"])


def test_bundle_calculator_refuses_a_far_atom(cho_bundle):
    """The ASE route shares the neighbor list: same clear error, no crash."""
    code = f"""
import numpy as np
from ase import Atoms
from spkserve.ase import BundleCalculator
from spkserve.neighbors import NeighborListError
atoms = Atoms("CHO", positions=[[0, 0, 0], [1.1, 0, 0], [1e6, 0, 0]])
atoms.calc = BundleCalculator({str(cho_bundle)!r})
try:
    atoms.get_potential_energy()
except Exception as err:
    print("REFUSED", type(err).__name__, err)
else:
    print("ACCEPTED")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, f"child died (rc {proc.returncode}): {proc.stderr[-500:]}"
    assert proc.stdout.startswith("REFUSED") and "span" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------- issue 14: malicious i-PI server
class _StubEvaluator:
    n_atoms = 3

    def __call__(self, cells, pos):  # never reached in these tests
        raise AssertionError("the client evaluated a structure from a malicious server")


@pytest.mark.parametrize("attack", ["huge_posdata", "reset"])
def test_ipi_client_facing_a_malicious_server(attack, tmp_path):
    """Counts are checked against the template before allocating; a reset is a ClientError."""
    import struct

    from spkserve.ipi import protocol as IP
    from spkserve.ipi.client import Address, ClientError, IPIClient

    path = str(tmp_path / "evil.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def evil():
        conn, _ = srv.accept()
        with conn:
            conn.sendall(IP.STATUS)
            IP.read_header(conn)  # NEEDINIT
            conn.sendall(IP.pack_init(0, "batch_size:1000"))
            if attack == "huge_posdata":  # 10^7 atoms announced, nothing behind it
                conn.sendall(IP.POSDATA + struct.pack("<i", 10_000_000))
                conn.recv(1)  # wait for the client to hang up
            else:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.sendall(IP.POSDATA)  # then an abortive close (RST)

    t = threading.Thread(target=evil, daemon=True)
    t.start()
    try:
        client = IPIClient(_StubEvaluator(), Address(unix_path=path), connect_timeout_s=10, io_timeout_s=10)
        with pytest.raises(ClientError) as err:
            client.run()
        if attack == "huge_posdata":
            assert "10000000 atoms" in str(err.value) and "3 are expected" in str(err.value)
    finally:
        t.join(10)
        srv.close()
