"""i-PI server role: external force providers connect to us and compute forces.

Drivers that speak the i-PI client protocol connect to an :class:`IPIServer`:
i-PI's ``i-pi-py_driver``, ASE's ``SocketClient`` around any ASE calculator, and
LAMMPS ``fix ipi``. :class:`IPIServerProvider` wraps the server as a
:class:`~spkserve.provider.ForceProvider`, so ``spkmd`` integrates with forces
from those programs. The structures of one ``compute`` call (e.g. the beads of
a ring polymer) are shared out to all connected drivers concurrently.

Robustness: every driver runs in its own thread with an I/O timeout. A driver
that sends a malformed, truncated, oversized or out-of-order message, a wrong
atom count or non-finite results, or that disconnects mid-message, is logged,
dropped, and its structure is handed to another driver; the server keeps
serving the others. ``compute`` raises :class:`~spkserve.provider.ProviderError`
when no driver delivered within ``timeout_s``.

Quirks handled:

* ASE's ``SocketClient`` never answers NEEDINIT; LAMMPS ``fix ipi`` neither.
  i-PI's Python driver does, and gets INIT (bead index, empty string).
* LAMMPS and ASE only connect to ``/tmp/ipi_NAME``; a stale socket file left
  by a crash is detected (nobody accepts on it) and removed before binding.
* LAMMPS ``fix ipi`` fills only one off-diagonal triangle of the virial; a
  virial with one all-zero and one non-zero triangle is mirrored.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from spkserve import keys, units
from spkserve.batch import Structure
from spkserve.ipi import protocol as P
from spkserve.ipi.client import DEFAULT_PREFIX
from spkserve.provider import ProviderError

log = logging.getLogger(__name__)

#: extra strings longer than this are treated as an attack / corruption
MAX_EXTRA_BYTES = 1 << 20


class DriverRejected(RuntimeError):
    """A connected driver misbehaved and was dropped (message names what it did)."""


@dataclass
class _Job:
    index: int
    cell_bohr: np.ndarray  # [3, 3] rows
    positions_bohr: np.ndarray  # [N, 3]
    attempts: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class _Result:
    energy_hartree: float
    forces_hartree_per_bohr: np.ndarray  # [N, 3]
    virial_hartree: np.ndarray  # [3, 3]
    extra: str


class _Batch:
    """The jobs of one ``compute`` call and their results."""

    def __init__(self, jobs: list[_Job], max_attempts: int) -> None:
        self.jobs = jobs
        self.max_attempts = max_attempts
        self.results: dict[int, _Result] = {}
        self.failed: dict[int, str] = {}
        self.cond = threading.Condition()

    def done(self) -> bool:
        return len(self.results) + len(self.failed) == len(self.jobs)


def _bind_unix(path: str) -> socket.socket:
    """Bind a unix socket, removing a stale file nobody listens on."""
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.warning("removing stale socket file %s (nobody listens on it)", path)
            os.unlink(path)
        else:
            raise ProviderError(f"another server already listens on {path}; pick another --unix name")
        finally:
            probe.close()
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    return srv


def _fix_triangular(virial: np.ndarray) -> np.ndarray:
    """Mirror a virial with one all-zero off-diagonal triangle (LAMMPS fix ipi sends only xy, xz, yz)."""
    lower = virial[np.tril_indices(3, -1)]
    upper = virial[np.triu_indices(3, 1)]
    if not lower.any() and upper.any():
        return np.triu(virial) + np.triu(virial, 1).T
    if not upper.any() and lower.any():
        return np.tril(virial) + np.tril(virial, -1).T
    return virial


class IPIServer:
    """Accept i-PI drivers and farm structures out to them.

    Args:
        unix: unix socket name (``NAME`` -> ``/tmp/ipi_NAME``, which is where
            LAMMPS and ASE connect) or a full path.
        host, port: TCP address instead (loopback only).
        n_atoms: if given, structures with another atom count are refused.
        timeout_s: how long :meth:`evaluate` waits for results.
        io_timeout_s: a driver that stalls mid-exchange longer than this is dropped.
        max_attempts: drivers tried per structure before it fails.
    """

    def __init__(
        self,
        unix: str | None = None,
        host: str | None = None,
        port: int | None = None,
        n_atoms: int | None = None,
        timeout_s: float = 60.0,
        io_timeout_s: float | None = None,
        max_attempts: int = 3,
    ) -> None:
        if (unix is None) == (port is None):
            raise ValueError("give exactly one of unix=NAME or port=N")
        if host is not None and host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"the i-PI server binds loopback only, got host {host!r}")
        self.n_atoms = n_atoms
        self.timeout_s = float(timeout_s)
        self.io_timeout_s = float(io_timeout_s if io_timeout_s is not None else timeout_s)
        self.max_attempts = max_attempts
        self.rejections: list[str] = []
        self._jobs: "queue.Queue[tuple[_Batch, _Job]]" = queue.Queue()
        self._stop = threading.Event()
        self._drivers: dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        self._next_id = 0
        self._threads: list[threading.Thread] = []
        self._compute_lock = threading.Lock()
        if unix is not None:
            self.unix_path: str | None = unix if "/" in unix else DEFAULT_PREFIX + unix
            self._server = _bind_unix(self.unix_path)
            self.address = f"unix:{self.unix_path}"
        else:
            self.unix_path = None
            self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._server.bind((host or "127.0.0.1", int(port)))
            self.address = f"tcp:{host or '127.0.0.1'}:{self._server.getsockname()[1]}"
        self.port = None if unix is not None else self._server.getsockname()[1]
        self._server.listen(socket.SOMAXCONN)
        self._server.settimeout(0.2)
        acceptor = threading.Thread(target=self._accept_loop, name="ipi-accept", daemon=True)
        acceptor.start()
        self._threads.append(acceptor)
        log.info("i-PI server listening on %s", self.address)

    # --- connections --------------------------------------------------------------

    @property
    def n_drivers(self) -> int:
        with self._lock:
            return len(self._drivers)

    def wait_for_drivers(self, count: int = 1, timeout_s: float | None = None) -> None:
        """Block until ``count`` drivers completed the handshake."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while self.n_drivers < count:
            if time.monotonic() > deadline:
                raise ProviderError(f"only {self.n_drivers} of {count} i-PI drivers connected to {self.address}")
            time.sleep(0.01)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            if conn.family == socket.AF_INET:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.io_timeout_s)
            with self._lock:
                ident = self._next_id
                self._next_id += 1
            t = threading.Thread(target=self._driver_loop, args=(ident, conn), name=f"ipi-driver-{ident}", daemon=True)
            t.start()
            self._threads.append(t)

    def _reject(self, ident: int, why: str) -> None:
        msg = f"driver {ident}: {why}"
        log.warning("rejected %s", msg)
        self.rejections.append(msg)

    def _status(self, ident: int, conn: socket.socket) -> bytes:
        """STATUS round trip; initialises a driver that asks for it. Returns READY or raises."""
        conn.sendall(P.STATUS)
        reply = P.read_header(conn)
        if reply == P.NEEDINIT:
            conn.sendall(P.pack_init(ident, "") + P.STATUS)
            reply = P.read_header(conn)
        if reply != P.READY:
            raise P.ProtocolError("expected READY in answer to STATUS", reply)
        return reply

    def _exchange(self, ident: int, conn: socket.socket, job: _Job) -> _Result:
        self._status(ident, conn)
        conn.sendall(P.pack_posdata(job.cell_bohr[None], job.positions_bohr[None]) + P.GETFORCE)
        hdr = P.read_header(conn)
        if hdr != P.FORCEREADY:
            raise P.ProtocolError("expected FORCEREADY after POSDATA+GETFORCE", hdr)
        n = len(job.positions_bohr)
        reply = P.read_forceready(conn, 1, expect_atoms=n, max_string_bytes=MAX_EXTRA_BYTES)
        if not (np.isfinite(reply.energies).all() and np.isfinite(reply.forces).all() and np.isfinite(reply.virials).all()):
            raise P.ProtocolError("FORCEREADY carries non-finite energy, forces or virial", hdr)
        return _Result(float(reply.energies[0]), reply.forces[0], _fix_triangular(reply.virials[0]), reply.extras[0])

    def _driver_loop(self, ident: int, conn: socket.socket) -> None:
        try:
            try:
                self._status(ident, conn)
            except (OSError, P.ProtocolError, P.PeerClosed) as err:
                self._reject(ident, f"handshake failed: {err}")
                return
            with self._lock:
                self._drivers[ident] = conn
            log.info("driver %d connected to %s", ident, self.address)
            while not self._stop.is_set():
                try:
                    batch, job = self._jobs.get(timeout=0.2)
                except queue.Empty:
                    continue
                job.attempts += 1
                try:
                    result = self._exchange(ident, conn, job)
                except (OSError, P.ProtocolError, P.PeerClosed) as err:
                    why = "stalled mid-exchange" if isinstance(err, socket.timeout) else str(err)
                    self._reject(ident, why)
                    job.errors.append(f"driver {ident}: {why}")
                    with batch.cond:
                        if job.attempts >= batch.max_attempts:
                            batch.failed[job.index] = "; ".join(job.errors)
                            batch.cond.notify_all()
                        else:
                            self._jobs.put((batch, job))
                    return
                with batch.cond:
                    batch.results[job.index] = result
                    batch.cond.notify_all()
        finally:
            with self._lock:
                self._drivers.pop(ident, None)
            try:
                if self._stop.is_set():
                    conn.sendall(P.EXIT)
            except OSError:
                pass
            conn.close()

    # --- evaluation ---------------------------------------------------------------

    def evaluate(self, cells_bohr: np.ndarray, positions_bohr: Sequence[np.ndarray]) -> list[_Result]:
        """Evaluate structures (Bohr) on the connected drivers; results in the input order."""
        if self._stop.is_set():
            raise ProviderError("the i-PI server is closed")
        jobs = [_Job(i, np.asarray(c, np.float64), np.asarray(p, np.float64)) for i, (c, p) in enumerate(zip(cells_bohr, positions_bohr))]
        batch = _Batch(jobs, self.max_attempts)
        with self._compute_lock:
            for job in jobs:
                self._jobs.put((batch, job))
            deadline = time.monotonic() + self.timeout_s
            with batch.cond:
                while not batch.done():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    batch.cond.wait(min(left, 0.5))
                missing = [j.index for j in jobs if j.index not in batch.results and j.index not in batch.failed]
            if missing:
                self._drain(batch)
                raise ProviderError(
                    f"no i-PI driver answered structures {missing[:10]} within {self.timeout_s:g} s "
                    f"({self.n_drivers} driver(s) connected to {self.address}; rejected: {self.rejections[-3:]})"
                )
            if batch.failed:
                idx, why = next(iter(sorted(batch.failed.items())))
                raise ProviderError(f"structure {idx} failed on {self.max_attempts} driver(s): {why}")
        return [batch.results[i] for i in range(len(jobs))]

    def _drain(self, batch: _Batch) -> None:
        """Remove this batch's queued jobs after a timeout."""
        keep = []
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                break
            if item[0] is not batch:
                keep.append(item)
        for item in keep:
            self._jobs.put(item)

    def close(self) -> None:
        """Send EXIT to every driver, stop threads and remove the socket file."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self._server.close()
        except OSError:
            pass
        for t in self._threads:
            t.join(timeout=2.0)
        if self.unix_path and os.path.exists(self.unix_path):
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass

    def __enter__(self) -> "IPIServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class IPIServerProvider:
    """A :class:`~spkserve.provider.ForceProvider` whose forces come from i-PI drivers.

    Args:
        unix / host / port / n_atoms / timeout_s / io_timeout_s / max_attempts:
            as for :class:`IPIServer`.
        vacuum_box_angstrom: cubic box sent for non-periodic structures
            (drivers such as LAMMPS need a box); None sends a zero cell.
    """

    available_properties = (keys.energy, keys.forces, keys.stress)

    def __init__(
        self,
        unix: str | None = None,
        host: str | None = None,
        port: int | None = None,
        n_atoms: int | None = None,
        timeout_s: float = 60.0,
        io_timeout_s: float | None = None,
        max_attempts: int = 3,
        vacuum_box_angstrom: float | None = None,
    ) -> None:
        self.server = IPIServer(unix, host, port, n_atoms, timeout_s, io_timeout_s, max_attempts)
        self.vacuum_box_angstrom = vacuum_box_angstrom
        self._A_to_bohr = units.factor("Angstrom", "Bohr")
        self._Ha_to_eV = units.factor("Hartree", "eV")
        self._HaBohr_to_eVA = units.factor("Hartree/Bohr", "eV/Angstrom")

    def _cell(self, s: Structure) -> np.ndarray:
        if s.pbc.any():
            if not s.pbc.all():
                raise ProviderError("i-PI drivers handle fully periodic or non-periodic structures, not mixed pbc")
            return s.cell
        if self.vacuum_box_angstrom is not None:
            return np.eye(3) * self.vacuum_box_angstrom
        return np.zeros((3, 3))

    def compute(
        self, structures: Sequence[Structure], properties: Sequence[str] = (keys.energy, keys.forces)
    ) -> dict[str, torch.Tensor]:
        """Evaluate structures (Å) on the connected drivers; results in eV, eV/Å, eV/Å³."""
        unknown = [p for p in properties if p not in self.available_properties]
        if unknown:
            raise ProviderError(f"i-PI drivers cannot provide {unknown}; available: {list(self.available_properties)}")
        if len(structures) == 0:
            raise ProviderError("no structures to compute")
        expected = self.server.n_atoms
        cells, positions = [], []
        for k, s in enumerate(structures):
            if expected is not None and len(s.numbers) != expected:
                raise ProviderError(f"structure {k} has {len(s.numbers)} atoms, the drivers expect {expected}")
            if not np.isfinite(s.positions).all() or not np.isfinite(s.cell).all():
                raise ProviderError(f"structure {k} has non-finite positions or cell")
            cells.append(self._cell(s) * self._A_to_bohr)
            positions.append(s.positions * self._A_to_bohr)
        results = self.server.evaluate(np.array(cells), positions)
        out = {
            keys.energy: torch.tensor([r.energy_hartree * self._Ha_to_eV for r in results], dtype=torch.float64),
            keys.forces: torch.from_numpy(
                np.concatenate([r.forces_hartree_per_bohr for r in results]) * self._HaBohr_to_eVA
            ),
        }
        if keys.stress in properties:
            stress = []
            for k, (s, r) in enumerate(zip(structures, results)):
                if not s.pbc.all():
                    raise ProviderError(f"stress needs a periodic structure; structure {k} is not periodic")
                volume_A3 = abs(np.linalg.det(s.cell))
                stress.append(-r.virial_hartree * self._Ha_to_eV / volume_A3)
            out[keys.stress] = torch.from_numpy(np.array(stress))
        return out

    def close(self) -> None:
        self.server.close()

    def __enter__(self) -> "IPIServerProvider":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def provider_from_config(**kwargs) -> IPIServerProvider:
    """Build an :class:`IPIServerProvider` from config keys (for spkmd).

    Keys: ``unix`` or ``port`` (with optional ``host``), ``n_atoms``,
    ``timeout_s``, ``io_timeout_s``, ``max_attempts``, ``vacuum_box_angstrom``,
    and ``wait_for_drivers`` (block until this many drivers connected).
    """
    allowed = {"unix", "host", "port", "n_atoms", "timeout_s", "io_timeout_s", "max_attempts", "vacuum_box_angstrom", "wait_for_drivers"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"unknown i-PI server option(s) {unknown}; allowed: {sorted(allowed)}")
    wait = kwargs.pop("wait_for_drivers", 0)
    provider = IPIServerProvider(**kwargs)
    if wait:
        provider.server.wait_for_drivers(int(wait))
    return provider
