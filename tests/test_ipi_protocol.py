"""i-PI protocol framing and the client role's state machine, against in-process fake peers."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from spkserve import units
from spkserve.ipi import protocol as P
from spkserve.ipi.client import Address, ClientError, IPIClient, connect

pytestmark = pytest.mark.timeout(60)


def _pair():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    return a, b


def test_headers_are_12_bytes_upper_padded():
    for h in P.KNOWN_HEADERS:
        assert len(h) == P.HDRLEN and h == h.upper()
    assert P.FORCEREADY == b"FORCEREADY  "
    assert P.header_name(P.POSDATA) == "POSDATA"


def test_posdata_roundtrip_single_and_wire_layout():
    rng = np.random.default_rng(0)
    cell = np.array([[10.0, 0, 0], [1.0, 11.0, 0], [0.5, 0.2, 12.0]])  # rows
    pos = rng.normal(size=(1, 5, 3))
    msg = P.pack_posdata(cell[None], pos)
    assert msg[:12] == P.POSDATA
    # i-PI's h has the lattice vectors as columns: wire = cell.T in row-major order
    h_wire = np.frombuffer(msg[12:84], np.float64).reshape(3, 3)
    np.testing.assert_array_equal(h_wire, cell.T)
    ih_wire = np.frombuffer(msg[84:156], np.float64).reshape(3, 3)
    np.testing.assert_allclose(ih_wire @ h_wire, np.eye(3), atol=1e-14)
    assert np.frombuffer(msg[156:160], np.int32)[0] == 5
    a, b = _pair()
    a.sendall(msg)
    assert P.read_header(b) == P.POSDATA
    cells, got = P.read_posdata(b, 1)
    np.testing.assert_array_equal(cells[0], cell)
    np.testing.assert_array_equal(got, pos)


def test_posdata_roundtrip_batched():
    rng = np.random.default_rng(1)
    cells = rng.normal(size=(4, 3, 3)) + 10 * np.eye(3)
    pos = rng.normal(size=(4, 7, 3))
    msg = P.pack_posdata(cells, pos, batched=True)
    # batched layout: header, natoms, 4 x (h, ih), positions block
    assert len(msg) == 12 + 4 + 4 * 144 + 4 * 7 * 24
    assert np.frombuffer(msg[12:16], np.int32)[0] == 7
    a, b = _pair()
    a.sendall(msg)
    assert P.read_header(b) == P.POSDATA
    got_cells, got_pos = P.read_posdata(b, 4)
    np.testing.assert_array_equal(got_cells, cells)
    np.testing.assert_array_equal(got_pos, pos)


@pytest.mark.parametrize("batch", [1, 3])
def test_forceready_roundtrip(batch):
    rng = np.random.default_rng(2)
    e = rng.normal(size=batch)
    f = rng.normal(size=(batch, 6, 3))
    v = rng.normal(size=(batch, 3, 3))
    extras = [f'{{"dipole": [{k}, 0, 0]}}' for k in range(batch)]
    msg = P.pack_forceready(e, f, v, extras, batched=batch > 1)
    a, b = _pair()
    a.sendall(msg)
    assert P.read_header(b) == P.FORCEREADY
    r = P.read_forceready(b, batch, expect_atoms=6)
    np.testing.assert_array_equal(r.energies, e)
    np.testing.assert_array_equal(r.forces, f)
    np.testing.assert_array_equal(r.virials, v)
    assert r.extras == extras
    # the virial travels transposed, like the cell
    if batch == 1:
        wire_v = np.frombuffer(msg[12 + 8 + 4 + 6 * 24 : 12 + 8 + 4 + 6 * 24 + 72], np.float64).reshape(3, 3)
        np.testing.assert_array_equal(wire_v, v[0].T)


def test_forceready_wrong_atom_count_and_oversized_are_refused():
    a, b = _pair()
    a.sendall(P.pack_forceready(np.zeros(1), np.zeros((1, 4, 3)), np.zeros((1, 3, 3))))
    P.read_header(b)
    with pytest.raises(P.ProtocolError, match="4 atoms but 5"):
        P.read_forceready(b, 1, expect_atoms=5)
    a, b = _pair()  # the first stream is out of step now
    a.sendall(P.FORCEREADY + np.float64(0).tobytes() + np.int32(2**31 - 1).tobytes())
    P.read_header(b)
    with pytest.raises(P.ProtocolError, match="outside") as err:
        P.read_forceready(b, 1)
    assert err.value.header == P.FORCEREADY


def test_init_roundtrip_and_batch_token():
    a, b = _pair()
    a.sendall(P.pack_init(3, "foo:bar, batch_size:8"))
    assert P.read_header(b) == P.INIT
    bead, text = P.read_init(b)
    assert bead == 3
    assert P.parse_init_string(text) == (8, "foo:bar")
    assert P.parse_init_string("\x00") == (1, "")
    with pytest.raises(P.ProtocolError, match="batch_size"):
        P.parse_init_string("batch_size:x")


def test_truncated_message_is_not_a_clean_close():
    a, b = _pair()
    a.sendall(P.POSDATA + b"\x00" * 20)
    a.close()
    assert P.read_header(b) == P.POSDATA
    with pytest.raises(P.PeerClosed) as err:
        P.read_posdata(b, 1)
    assert not err.value.clean
    c, d = _pair()
    c.close()
    with pytest.raises(P.PeerClosed) as err:
        P.read_header(d)
    assert err.value.clean


# --- the client role against a scripted server --------------------------------------


class _Doubling:
    """Evaluator stand-in: energy = sum of positions (Ha), forces = -positions."""

    n_atoms = 3

    def __init__(self):
        self.calls = []

    def __call__(self, cells, pos):
        self.calls.append(len(pos))
        b = len(pos)
        return pos.sum(axis=(1, 2)), -pos, np.zeros((b, 3, 3)), ['{"k": 1}'] * b


def _serve_once(path, script, results):
    """Accept one client on ``path`` and run ``script(conn)``; store what it returns."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    conn, _ = srv.accept()
    conn.settimeout(5)
    try:
        results.append(script(conn))
    finally:
        conn.close()
        srv.close()


def _run_client(tmp_path, script, evaluator=None, delay_s=0.0):
    path = str(tmp_path / "s")
    results = []

    def server():
        time.sleep(delay_s)
        _serve_once(path, script, results)

    t = threading.Thread(target=server)
    t.start()
    ev = evaluator or _Doubling()
    client = IPIClient(ev, Address(unix_path=path), connect_timeout_s=10)
    try:
        stats = client.run()
    finally:
        t.join(10)
    return stats, results, ev


def test_client_answers_ipi_style_pipelined_exchange_and_exit(tmp_path):
    pos = np.arange(9.0).reshape(1, 3, 3)

    def script(conn):
        conn.sendall(P.STATUS)
        assert P.read_header(conn) == P.NEEDINIT
        conn.sendall(P.pack_init(0, "") + P.STATUS)
        assert P.read_header(conn) == P.READY
        conn.sendall(P.pack_posdata(np.eye(3)[None] * 20, pos) + P.GETFORCE)  # no STATUS between
        assert P.read_header(conn) == P.FORCEREADY
        r = P.read_forceready(conn, 1, expect_atoms=3)
        conn.sendall(P.EXIT)
        return r

    # the server starts late: the client must retry connecting
    stats, (r,), _ = _run_client(tmp_path, script, delay_s=0.3)
    assert r.energies[0] == pos.sum()
    np.testing.assert_array_equal(r.forces[0], -pos[0])
    assert r.extras == ['{"k": 1}']
    assert stats.exit_reason == "EXIT from server"


def test_client_batched_posdata_is_one_evaluation(tmp_path):
    rng = np.random.default_rng(3)
    pos = rng.normal(size=(5, 3, 3))

    def script(conn):
        conn.sendall(P.STATUS)
        P.read_header(conn)
        conn.sendall(P.pack_init(0, "batch_size:5") + P.STATUS)
        assert P.read_header(conn) == P.READY
        conn.sendall(P.pack_posdata(np.repeat(np.eye(3)[None] * 20, 5, 0), pos, batched=True) + P.GETFORCE)
        assert P.read_header(conn) == P.FORCEREADY
        return P.read_forceready(conn, 5, expect_atoms=3)
        # closes without EXIT, like ASE

    stats, (r,), ev = _run_client(tmp_path, script)
    np.testing.assert_allclose(r.energies, pos.sum(axis=(1, 2)))
    np.testing.assert_array_equal(r.forces, -pos)
    assert ev.calls == [5]
    assert stats.exit_reason == "server closed the connection"


def test_client_ase_style_status_between_and_no_init(tmp_path):
    pos = np.ones((1, 3, 3))

    def script(conn):
        conn.sendall(P.pack_posdata(np.zeros((1, 3, 3)), pos))  # ASE may skip INIT
        conn.sendall(P.STATUS)
        assert P.read_header(conn) == P.HAVEDATA
        conn.sendall(P.GETFORCE)
        assert P.read_header(conn) == P.FORCEREADY
        r = P.read_forceready(conn, 1, 3)
        conn.sendall(P.STATUS)
        assert P.read_header(conn) == P.READY
        return r

    _, (r,), _ = _run_client(tmp_path, script)
    assert r.energies[0] == 9.0


@pytest.mark.parametrize(
    "bad, match",
    [
        (P.pack_posdata(np.eye(3)[None], np.zeros((1, 4, 3))), "carries 4 atoms but 3 are expected"),
        (P.pack_posdata(np.eye(3)[None], np.full((1, 3, 3), np.nan)), "non-finite"),
        (b"FOOBAR      ", "unexpected message"),
        (P.GETFORCE, "GETFORCE before any POSDATA"),
    ],
)
def test_client_reports_protocol_violations_with_header(tmp_path, bad, match):
    def script(conn):
        conn.sendall(bad)
        time.sleep(0.2)

    with pytest.raises(ClientError, match=match) as err:
        _run_client(tmp_path, script)
    assert "header" in str(err.value)


def test_connect_gives_up_after_timeout(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(ClientError, match="no i-PI server"):
        connect(Address(unix_path=str(tmp_path / "nobody")), timeout_s=0.3)
    assert time.monotonic() - t0 < 3


def test_evaluator_units_match_direct_runner(lj_bundle):
    """BundleEvaluator: Bohr in, Hartree out, virial = -V * stress."""
    import torch

    from spkserve.batch import Structure
    from spkserve.ipi.evaluate import BundleEvaluator
    from spkserve.runtime import ModelRunner

    runner = ModelRunner(lj_bundle)
    rng = np.random.default_rng(4)
    pos_A = rng.uniform(0, 9, size=(2, 6, 3))
    cell_A = np.eye(3) * 9.5
    ev = BundleEvaluator(runner, [18] * 6)
    A_to_bohr = units.factor("Angstrom", "Bohr")
    e, f, v, _ = ev(np.stack([cell_A, cell_A]) * A_to_bohr, pos_A * A_to_bohr)
    assert ev.n_calls == 1
    ref = runner.compute([Structure([18] * 6, p, cell_A, True) for p in pos_A], ("energy", "forces", "stress"))
    np.testing.assert_allclose(e, ref["energy"].numpy() * units.factor("eV", "Hartree"), rtol=1e-12)
    np.testing.assert_allclose(f.reshape(-1, 3), ref["forces"].numpy() * units.factor("eV/Ang", "Hartree/Bohr"), rtol=1e-12, atol=1e-15)
    vol = np.linalg.det(cell_A)
    np.testing.assert_allclose(v, -vol * ref["stress"].numpy() * units.factor("eV", "Hartree"), rtol=1e-12, atol=1e-15)
    assert torch.is_tensor(ref["energy"])


def test_client_over_tcp_sets_nodelay_and_workers_share_one_evaluation():
    """Two connections of one client (--workers 2) over TCP: requests sent together -> one model call."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(2)
    port = srv.getsockname()[1]
    rng = np.random.default_rng(8)
    pos = rng.normal(size=(2, 1, 3, 3))
    got = {}

    def server():
        conns = []
        for _ in range(2):
            c, _ = srv.accept()
            c.settimeout(5)
            c.sendall(P.STATUS)
            assert P.read_header(c) == P.NEEDINIT
            c.sendall(P.pack_init(len(conns), "") + P.STATUS)
            assert P.read_header(c) == P.READY
            conns.append(c)
        for k, c in enumerate(conns):  # the same step's requests, back to back
            c.sendall(P.pack_posdata(np.eye(3)[None] * 20, pos[k]) + P.GETFORCE)
        for k, c in enumerate(conns):
            assert P.read_header(c) == P.FORCEREADY
            got[k] = P.read_forceready(c, 1, 3)
            c.sendall(P.EXIT)
            c.close()
        srv.close()

    t = threading.Thread(target=server)
    t.start()
    ev = _Doubling()
    client = IPIClient(ev, Address.tcp("127.0.0.1", port), workers=2, gather_window_s=1.0, connect_timeout_s=5)
    stats = client.run()
    t.join(10)
    assert ev.calls == [2]  # both connections' structures in one evaluation
    for k in range(2):
        assert got[k].energies[0] == pytest.approx(pos[k].sum())
    assert stats.requests == 2 and stats.model_calls == 1


def test_tcp_sockets_get_nodelay():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    sock = connect(Address.tcp("127.0.0.1", srv.getsockname()[1]), timeout_s=2)
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        sock.close()
        srv.close()


def test_ipi_command_refuses_unknown_species_before_connecting(tmp_path):
    from click.testing import CliRunner

    from spkserve.cli import main
    from spkserve.potentials import reference_bundle

    argon_only = reference_bundle("lj", tmp_path / "ar.bundle", species=[18], sigma=3.4, epsilon=0.0104, cutoff=8.5)
    runner = CliRunner()
    out = runner.invoke(main, ["ipi", str(argon_only), "--unix", str(tmp_path / "nobody"), "--species", "Ar,H", "--connect-timeout", "30"])
    assert out.exit_code != 0
    assert "1 (H)" in out.output and "not among the bundle's species" in out.output
    out = runner.invoke(main, ["ipi", str(argon_only), "--unix", "x"])
    assert out.exit_code != 0 and "--template FILE or --species" in out.output
    out = runner.invoke(main, ["ipi", str(argon_only), "--species", "Ar"])
    assert out.exit_code != 0 and "--unix NAME or --port N" in out.output


def test_client_serves_first_connection_while_others_still_connect(tmp_path):
    """Like i-PI: a small listen backlog and accept() only between exchanges. The client must
    answer connection 1 while its connects 2..4 are still waiting (regression: it used to deadlock)."""
    path = str(tmp_path / "s")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(0)
    energies = []

    def exchange(c, k):
        c.settimeout(5)
        c.sendall(P.STATUS)
        assert P.read_header(c) == P.NEEDINIT
        c.sendall(P.pack_init(k, "") + P.STATUS)
        assert P.read_header(c) == P.READY
        c.sendall(P.pack_posdata(np.eye(3)[None] * 20, np.full((1, 3, 3), float(k))) + P.GETFORCE)
        assert P.read_header(c) == P.FORCEREADY
        energies.append(P.read_forceready(c, 1, 3).energies[0])

    def server():
        conns = []
        for k in range(4):
            c, _ = srv.accept()
            conns.append(c)
            exchange(c, k)
        for c in conns:
            c.sendall(P.EXIT)
            c.close()
        srv.close()

    t = threading.Thread(target=server)
    t.start()
    stats = IPIClient(_Doubling(), Address(unix_path=path), workers=4, connect_timeout_s=5).run()
    t.join(10)
    assert energies == [0.0, 9.0, 18.0, 27.0]
    assert stats.exit_reason == "EXIT from server"


def test_extra_string_carries_other_outputs_in_atomic_units():
    """Outputs besides energy/forces/stress go into the extra string as JSON, in atomic units."""
    import json

    import torch

    from spkserve.ipi.evaluate import BundleEvaluator

    class DipoleRunner:
        available_properties = ("energy", "forces", "dipole_moment", "partial_charges")

        def compute_tensors(self, numbers, positions, cells, pbc, n_atoms, properties):
            s, n = len(n_atoms), len(numbers)
            return {
                "energy": torch.zeros(s, dtype=torch.float64),
                "forces": torch.zeros(n, 3, dtype=torch.float64),
                "dipole_moment": torch.tensor([[1.0, 0.0, -2.0]] * s, dtype=torch.float64),  # e*Å
                "partial_charges": torch.arange(n, dtype=torch.float64),  # e
            }

    ev = BundleEvaluator(DipoleRunner(), [8, 1, 1])
    _, _, _, extras = ev(np.zeros((2, 3, 3)), np.zeros((2, 3, 3)))
    a2b = units.factor("Angstrom", "Bohr")
    for s, text in enumerate(extras):
        d = json.loads(text)
        np.testing.assert_allclose(d["dipole_moment"], [a2b, 0.0, -2 * a2b], rtol=1e-14)
        assert d["dipole"] == d["dipole_moment"]  # the key i-PI's tools read
        assert d["partial_charges"] == [3.0 * s, 3.0 * s + 1, 3.0 * s + 2]
