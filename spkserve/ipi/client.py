"""i-PI client role: answer an i-PI server (or ASE's SocketIOCalculator) with a bundle.

One process holds one or more connections (``workers``). Requests that arrive
together on several connections, and the B structures of one batched POSDATA
(i-PI 3.x ``batch_size``), are evaluated in one model call.

Behaviour towards real peers (i-PI 3.3.1, ASE 3.29):

* POSDATA may be followed by GETFORCE with no STATUS between them.
* ASE never sends EXIT, it closes the socket: end-of-file is a clean exit.
* The inverse cell on the wire is ignored; the cell is all we use.
* Each reply goes out as one buffer; TCP sockets get TCP_NODELAY.
* Connecting retries with back-off until ``connect_timeout_s`` passes.
"""

from __future__ import annotations

import logging
import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from spkserve.ipi import protocol as P
from spkserve.ipi.evaluate import BundleEvaluator

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/tmp/ipi_"


class ClientError(RuntimeError):
    """The client could not connect or the server broke the protocol."""


@dataclass(frozen=True)
class Address:
    """Where the i-PI server listens: a unix socket path or a TCP host/port."""

    unix_path: str | None = None
    host: str | None = None
    port: int | None = None

    @classmethod
    def unix(cls, name: str, prefix: str = DEFAULT_PREFIX) -> "Address":
        """i-PI's naming: ``NAME`` means ``/tmp/ipi_NAME``; a name with a ``/`` is a full path."""
        return cls(unix_path=name if "/" in name else prefix + name)

    @classmethod
    def tcp(cls, host: str, port: int) -> "Address":
        if not 0 < int(port) < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")
        return cls(host=host, port=int(port))

    def describe(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"tcp:{self.host}:{self.port}"


def connect(address: Address, timeout_s: float = 60.0, first_wait_s: float = 0.02, max_wait_s: float = 1.0) -> socket.socket:
    """Connect, retrying with exponential back-off while the server is not up."""
    deadline = time.monotonic() + timeout_s
    wait = first_wait_s
    last_err: Exception | None = None
    while True:
        if address.unix_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: object = address.unix_path
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            target = (address.host, address.port)
        try:
            sock.connect(target)
            return sock
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError) as err:
            sock.close()
            last_err = err
        if time.monotonic() + wait > deadline:
            raise ClientError(
                f"no i-PI server at {address.describe()} after {timeout_s:g} s ({last_err}); "
                "start the server first or raise --connect-timeout"
            )
        time.sleep(wait)
        wait = min(wait * 2, max_wait_s)


@dataclass
class _Conn:
    sock: socket.socket
    index: int
    initialised: bool = False
    batch_size: int = 1
    bead: int = 0
    init_string: str = ""
    pending: tuple[np.ndarray, np.ndarray] | None = None  # (cells, positions) awaiting evaluation
    result: bytes | None = None  # the FORCEREADY reply, ready to send
    wants_force: bool = False
    t_pending: float = 0.0


@dataclass
class ClientStats:
    """What a client run did."""

    requests: int = 0
    structures: int = 0
    model_calls: int = 0
    model_time_s: float = 0.0
    exit_reason: str = ""
    batch_sizes: list[int] = field(default_factory=list)

    def summary(self) -> str:
        mean = self.structures / self.model_calls if self.model_calls else 0.0
        return (
            f"{self.requests} requests, {self.structures} structures in {self.model_calls} model calls "
            f"(mean {mean:.2f} per call), model time {self.model_time_s:.3f} s; exit: {self.exit_reason}"
        )


class IPIClient:
    """Answer an i-PI server over ``workers`` connections with one evaluator.

    Args:
        evaluator: turns cells/positions (Bohr) into energies/forces/virials (Hartree).
        address: where the server listens.
        workers: connections to open (each is one i-PI client).
        connect_timeout_s: how long to keep retrying the first connection.
        gather_window_s: with several connections, how long to wait for the
            requests of one step to arrive together before evaluating.
        io_timeout_s: a started message must complete within this time.
    """

    def __init__(
        self,
        evaluator: BundleEvaluator,
        address: Address,
        workers: int = 1,
        connect_timeout_s: float = 60.0,
        gather_window_s: float = 0.002,
        io_timeout_s: float = 60.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.evaluator = evaluator
        self.address = address
        self.workers = workers
        self.connect_timeout_s = connect_timeout_s
        self.gather_window_s = gather_window_s
        self.io_timeout_s = io_timeout_s
        self.stats = ClientStats()
        self._recent: list[int] = []

    # --- message handling ------------------------------------------------------

    def _handle(self, conn: _Conn) -> bool:
        """Read and answer one message; False when the connection is finished."""
        try:
            hdr = P.read_header(conn.sock)
        except P.PeerClosed as err:
            if err.clean:
                self.stats.exit_reason = self.stats.exit_reason or "server closed the connection"
                return False
            raise
        if hdr == P.STATUS:
            if not conn.initialised:
                conn.sock.sendall(P.NEEDINIT)
            elif conn.pending is not None or conn.result is not None:
                conn.sock.sendall(P.HAVEDATA)
            else:
                conn.sock.sendall(P.READY)
        elif hdr == P.INIT:
            conn.bead, text = P.read_init(conn.sock)
            conn.batch_size, conn.init_string = P.parse_init_string(text)
            conn.initialised = True
            log.debug("connection %d: INIT bead %d, batch_size %d", conn.index, conn.bead, conn.batch_size)
        elif hdr == P.POSDATA:
            if conn.pending is not None or conn.result is not None:
                raise P.ProtocolError("POSDATA while the previous result was not collected with GETFORCE", hdr)
            n = self.evaluator.n_atoms
            cells, pos = P.read_posdata(conn.sock, conn.batch_size, expect_atoms=n)
            if pos.shape[1] != n:
                raise P.ProtocolError(f"POSDATA carries {pos.shape[1]} atoms but the species list has {n}", hdr)
            if not (np.isfinite(pos).all() and np.isfinite(cells).all()):
                raise P.ProtocolError("POSDATA carries non-finite positions or cell", hdr)
            conn.initialised = True  # ASE may skip INIT
            conn.pending = (cells, pos)
            conn.t_pending = time.monotonic()
            self.stats.requests += 1
        elif hdr == P.GETFORCE:
            if conn.result is not None:
                self._send_result(conn)
            elif conn.pending is not None:
                conn.wants_force = True
            else:
                raise P.ProtocolError("GETFORCE before any POSDATA", hdr)
        elif hdr == P.EXIT:
            self.stats.exit_reason = "EXIT from server"
            return False
        else:
            raise P.ProtocolError("unexpected message from the i-PI server", hdr)
        return True

    def _send_result(self, conn: _Conn) -> None:
        conn.sock.sendall(conn.result)
        conn.result = None
        conn.wants_force = False

    def _evaluate(self, conns: list[_Conn]) -> None:
        """Evaluate every pending request of ``conns`` in one model call."""
        batch = [c for c in conns if c.pending is not None]
        cells = np.concatenate([c.pending[0] for c in batch])
        pos = np.concatenate([c.pending[1] for c in batch])
        t0 = time.perf_counter()
        energies, forces, virials, extras = self.evaluator(cells, pos)
        self.stats.model_time_s += time.perf_counter() - t0
        self.stats.model_calls += 1
        self.stats.structures += len(cells)
        start = 0
        for c in batch:
            b = len(c.pending[0])
            sl = slice(start, start + b)
            c.result = P.pack_forceready(energies[sl], forces[sl], virials[sl], extras[sl], batched=c.batch_size > 1)
            c.pending = None
            start += b
            if c.wants_force:
                self._send_result(c)
        self._recent = (self._recent + [len(batch)])[-20:]

    def _expected(self, n_conns: int) -> int:
        return max(self._recent) if self._recent else n_conns

    # --- main loop ---------------------------------------------------------------

    def _connector(self, count: int, out: "queue.Queue", wake: socket.socket) -> None:
        """Open ``count`` more connections in the background (the server may accept them one by one)."""
        try:
            for _ in range(count):
                out.put(connect(self.address, self.connect_timeout_s))
                wake.send(b"c")
        except (ClientError, OSError) as err:
            out.put(err)
        out.put(None)
        try:
            wake.send(b"d")
        except OSError:
            pass

    def run(self) -> ClientStats:
        """Serve until every connection got EXIT or end-of-file.

        The first connection is made here; further ``workers`` connect in a
        background thread while the first ones are already served (a server
        such as i-PI starts dispatching as soon as one client is connected, and
        accepts the others between its steps).
        """
        first = connect(self.address, self.connect_timeout_s)
        conns: list[_Conn] = []
        live: set[int] = set()
        sel = selectors.DefaultSelector()

        def add(sock: socket.socket) -> None:
            sock.settimeout(self.io_timeout_s)
            conn = _Conn(sock, len(conns))
            conns.append(conn)
            sel.register(sock, selectors.EVENT_READ, conn)
            live.add(conn.index)

        add(first)
        connecting = self.workers > 1
        if not connecting:
            log.info("connected to %s", self.address.describe())
        new: "queue.Queue" = queue.Queue()
        wake_r, wake_w = socket.socketpair()
        sel.register(wake_r, selectors.EVENT_READ, None)
        if connecting:
            threading.Thread(target=self._connector, args=(self.workers - 1, new, wake_w), daemon=True).start()
        try:
            while live or (connecting and not self.stats.exit_reason):
                pending = [c for c in conns if c.index in live and c.pending is not None]
                timeout = None
                if pending:
                    waited = time.monotonic() - min(c.t_pending for c in pending)
                    if len(pending) >= min(self._expected(len(live)), len(live)) or waited >= self.gather_window_s:
                        self._evaluate(pending)
                        continue
                    timeout = self.gather_window_s - waited
                for key, _ in sel.select(timeout):
                    if key.data is None:  # the connector thread has news
                        wake_r.recv(4096)
                        while not new.empty():
                            item = new.get()
                            if item is None:
                                connecting = False
                                log.info("connected %d worker(s) to %s", len(conns), self.address.describe())
                            elif isinstance(item, Exception):
                                log.warning("only %d of %d workers connected: %s", len(conns), self.workers, item)
                            else:
                                add(item)
                        continue
                    conn: _Conn = key.data
                    try:
                        alive = self._handle(conn)
                    except P.PeerClosed as err:
                        raise ClientError(f"connection {conn.index}: {err}") from err
                    except socket.timeout as err:
                        raise ClientError(
                            f"connection {conn.index}: the server stalled mid-message for {self.io_timeout_s:g} s"
                        ) from err
                    except P.ProtocolError as err:
                        raise ClientError(f"connection {conn.index}: protocol violation by the server: {err}") from err
                    except OSError as err:  # reset, broken pipe, ...: the documented client error
                        raise ClientError(f"connection {conn.index}: network failure: {type(err).__name__}: {err}") from err
                    if not alive:
                        sel.unregister(conn.sock)
                        conn.sock.close()
                        live.discard(conn.index)
        finally:
            sel.close()
            wake_r.close()
            wake_w.close()
            for c in conns:
                c.sock.close()
            while not new.empty():
                item = new.get()
                if isinstance(item, socket.socket):
                    item.close()
        log.info("i-PI client finished: %s", self.stats.summary())
        return self.stats


def run_client(
    runner,
    numbers,
    address: Address,
    workers: int = 1,
    pbc: str | bool = "auto",
    connect_timeout_s: float = 60.0,
    gather_window_s: float = 0.002,
) -> ClientStats:
    """Serve a model runner to an i-PI server until it says EXIT (or closes)."""
    evaluator = BundleEvaluator(runner, numbers, pbc=pbc)
    return IPIClient(evaluator, address, workers, connect_timeout_s, gather_window_s).run()
