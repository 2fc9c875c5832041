"""The msgpack model server: asyncio sockets in front of one model worker thread.

Usage from Python (the ``spkserve serve`` command wraps the same class)::

    from spkserve.server import ModelServer
    with ModelServer.from_bundle("lj.bundle", unix_path="/tmp/spk.sock").start() as server:
        ...                       # clients connect to server.address
    # leaving the block calls server.shutdown(): queued requests are answered first

Security: binds loopback or a unix socket (mode 0600) only; a non-loopback
host needs ``allow_remote=True`` and a token. TCP always needs a token (first
request of a connection: ``{"op": "auth", "token": ...}``, compared in
constant time); on a unix socket a token is optional.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import ipaddress
import logging
import os
import signal
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from spkserve.provider import PROVIDER_UNITS
from spkserve.server import protocol as P
from spkserve.server.batching import DynamicBatcher
from spkserve.server.stats import ServerStats

log = logging.getLogger("spkserve.server")


class ServerSetupError(RuntimeError):
    """The server cannot start as configured (address, token, socket file)."""


@dataclass
class ServerConfig:
    """Where to listen and how to behave. Exactly one of ``unix_path`` / ``host`` is set."""

    unix_path: str | None = None
    host: str | None = None
    port: int = 0
    token: str | None = None
    allow_remote: bool = False
    batch_window_us: float = 500.0
    max_batch_atoms: int = 20_000
    max_batch_requests: int | None = None  # 1 = batching off
    request_timeout_s: float = 60.0
    read_timeout_s: float = 30.0  # a message that has started must be complete within this
    max_connections: int = 64
    shutdown_grace_s: float = 30.0
    limits: P.Limits = field(default_factory=P.Limits)
    #: torch intra-op threads for the model (process-wide); None leaves torch's setting.
    #: Small molecules run fastest with 1, and 2 threads collapse on a busy machine.
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        if (self.unix_path is None) == (self.host is None):
            raise ServerSetupError("give exactly one of a unix socket path or a TCP host (with a port)")
        if self.host is not None:
            if not self.token:
                raise ServerSetupError(
                    "serving over TCP needs a token (--token-file FILE or the SPKSERVE_TOKEN environment variable)"
                )
            if not _is_loopback(self.host) and not self.allow_remote:
                raise ServerSetupError(
                    f"refusing to bind non-loopback host {self.host!r}; use 127.0.0.1, or pass "
                    "--allow-remote (with a token) if you really want other machines to connect"
                )
            if not 0 <= int(self.port) <= 65535:
                raise ServerSetupError(f"port must be 0..65535, got {self.port}")
        if self.token is not None and len(self.token) < 8:
            raise ServerSetupError("the token must have at least 8 characters")
        for name in ("request_timeout_s", "read_timeout_s", "shutdown_grace_s"):
            if not getattr(self, name) > 0:
                raise ServerSetupError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_connections < 1:
            raise ServerSetupError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ServerSetupError(f"torch_threads must be >= 1, got {self.torch_threads}")


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as err:
        raise ServerSetupError(f"cannot resolve host {host!r}: {err}") from err
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def prepare_unix_path(path: str) -> None:
    """Remove a stale socket file left by a crashed server; refuse live sockets and other files."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServerSetupError(f"{path} exists and is not a socket; choose another --unix path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.warning("removing stale socket file %s (no server behind it)", path)
        os.unlink(path)
        return
    except OSError as err:
        raise ServerSetupError(f"cannot probe existing socket {path}: {err}") from err
    finally:
        probe.close()
    raise ServerSetupError(f"another server is already listening on {path}")


def _private_unix_socket(path: str) -> socket.socket:
    """A listening unix socket at ``path`` that only this user can connect to (mode 0600).

    It is bound under a temporary name, restricted, then renamed into place, so
    there is no moment at which others could connect.
    """
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(socket.SOMAXCONN)
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    sock.setblocking(False)
    return sock


class _Connection:
    __slots__ = ("reader", "writer", "peer", "authenticated", "computing", "task")

    def __init__(self, reader, writer, peer: str, authenticated: bool) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.authenticated = authenticated
        self.computing = False
        self.task: asyncio.Task | None = None


class ModelServer:
    """Serve a force provider (normally a :class:`spkserve.runtime.ModelRunner`) over msgpack.

    Args:
        runner: anything with ``compute(structures, properties) -> dict[str, Tensor]``
            in provider units and ``available_properties``.
        info: what ``metadata`` answers: at least ``species`` (list of atomic
            numbers the model knows) and ``cutoff_angstrom``.
        config: :class:`ServerConfig`; keyword arguments build one if not given.
    """

    def __init__(self, runner: Any, info: dict, config: ServerConfig | None = None, **config_kwargs: Any) -> None:
        if config is not None and config_kwargs:
            raise TypeError("give either config or keyword options, not both")
        self.config = config if config is not None else ServerConfig(**config_kwargs)
        self.runner = runner
        self.available_properties = tuple(runner.available_properties)
        self.info = dict(info)
        if "species" not in self.info:
            raise ValueError("info must list the model's 'species'")
        self._species = np.asarray(sorted(int(z) for z in self.info["species"]), dtype=np.int64)
        self._known = np.zeros(P.MAX_ELEMENT + 1, dtype=bool)  # lookup table by atomic number
        self._known[self._species] = True
        self.stats = ServerStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._stopped = threading.Event()
        self._start_error: BaseException | None = None
        self._conns: set[_Connection] = set()
        self._closing = False
        self._address: Any = None
        self._batcher: DynamicBatcher | None = None
        self._owns_runner = False  # from_bundle: the server closes the runner it made

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bundle(
        cls,
        bundle_path: str | os.PathLike,
        *,
        dtype: str | None = None,
        device: str = "cpu",
        skin_angstrom: float = 1.0,
        **config_kwargs: Any,
    ) -> "ModelServer":
        """Load a bundle into a :class:`spkserve.runtime.ModelRunner` and serve it."""
        from spkserve.ensemble import open_runner

        config = ServerConfig(**config_kwargs)  # fail on a bad address before loading the model
        # a bundle, or an ensemble manifest (committee mean + energy/forces_uncertainty outputs)
        runner = open_runner(os.fspath(bundle_path), dtype=dtype, device=device, skin_angstrom=skin_angstrom)
        bundle = runner.bundle
        info = {
            "species": [int(z) for z in bundle.species],
            "cutoff_angstrom": float(runner.cutoff_angstrom),
            "outputs": {k: dict(v) for k, v in dict(bundle.outputs).items()},
            "bundle": os.fspath(bundle_path),
            "bundle_metadata": _jsonable(bundle.metadata),
            "dtype": str(runner.dtype).replace("torch.", ""),
            "device": str(runner.device),
        }
        server = cls(runner, info, config)
        server._owns_runner = True
        return server

    # ------------------------------------------------------------------ public API
    @property
    def address(self) -> str | tuple[str, int]:
        """The unix socket path, or (host, port) with the port actually bound."""
        return self._address

    def start(self, timeout_s: float = 60.0) -> "ModelServer":
        """Run the server in a background thread; returns once it listens."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._thread = threading.Thread(target=self._thread_main, name="spkserve-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise ServerSetupError(f"server did not start within {timeout_s} s")
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error
        return self

    def serve_forever(self, handle_signals: bool = True) -> None:
        """Run in the calling thread until SIGTERM/SIGINT or :meth:`shutdown`."""
        asyncio.run(self._main(handle_signals=handle_signals))
        if self._start_error is not None:
            raise self._start_error

    def shutdown(self, timeout_s: float | None = None) -> None:
        """Stop accepting, answer every accepted request, close; safe from any thread."""
        if self._loop is not None and not self._stopped.is_set():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # loop already closed
                pass
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s if timeout_s is not None else self.config.shutdown_grace_s + 30)
        else:
            self._stopped.wait(timeout_s)

    def wait_closed(self, timeout_s: float | None = None) -> bool:
        return self._stopped.wait(timeout_s)

    def __enter__(self) -> "ModelServer":
        if self._thread is None and self._loop is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ main loop
    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main(handle_signals=False))
        except BaseException as err:  # noqa: BLE001 - surfaced through start()
            if self._start_error is None:
                self._start_error = err
            log.exception("server thread failed")
        finally:
            self._started.set()
            self._stopped.set()

    async def _main(self, handle_signals: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        cfg = self.config
        self._batcher = DynamicBatcher(
            self._evaluate,
            window_us=cfg.batch_window_us,
            max_batch_atoms=cfg.max_batch_atoms,
            max_batch_requests=cfg.max_batch_requests,
            idle_clients=self._idle_clients,
            on_batch=self.stats.record_batch,
        )
        try:
            server = await self._listen()
        except BaseException as err:
            self._start_error = err if isinstance(err, ServerSetupError) else ServerSetupError(str(err))
            self._started.set()
            self._stopped.set()
            return
        if cfg.torch_threads is not None:
            import torch

            torch.set_num_threads(cfg.torch_threads)
        self._batcher.start()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stop.set)
        log.info("spkserve serving %s on %s", self.info.get("bundle", "model"), self._address)
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            await self._graceful_close(server)
            self._stopped.set()
            log.info("spkserve stopped; %s", self._summary())

    async def _listen(self) -> asyncio.AbstractServer:
        cfg = self.config
        if cfg.unix_path is not None:
            prepare_unix_path(cfg.unix_path)
            server = await asyncio.start_unix_server(self._on_connect, sock=_private_unix_socket(cfg.unix_path))
            self._address = cfg.unix_path
        else:
            try:
                server = await asyncio.start_server(
                    self._on_connect, host=cfg.host, port=cfg.port, reuse_address=True, backlog=socket.SOMAXCONN
                )
            except OSError as err:
                hint = " (port in use)" if err.errno == errno.EADDRINUSE else ""
                raise ServerSetupError(f"cannot bind {cfg.host}:{cfg.port}{hint}: {err}") from err
            sockname = server.sockets[0].getsockname()
            self._address = (sockname[0], sockname[1])
        return server

    async def _graceful_close(self, server: asyncio.AbstractServer) -> None:
        self._closing = True
        server.close()
        if self.config.unix_path is not None:
            try:
                os.unlink(self.config.unix_path)
            except FileNotFoundError:
                pass
        # idle connections: stop reading, let buffered complete requests through, then EOF
        for conn in list(self._conns):
            self._stop_reading(conn)
        tasks = [c.task for c in self._conns if c.task is not None]
        grace = self.config.shutdown_grace_s
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                log.warning("shutdown: %d connection(s) did not finish within %s s", len(pending), grace)
                await asyncio.wait(pending, timeout=5)
        try:
            await asyncio.wait_for(self._batcher.close(), timeout=grace)
        except asyncio.TimeoutError:
            log.error("shutdown: model worker still busy after %s s", grace)
        try:
            await asyncio.wait_for(server.wait_closed(), timeout=5)
        except asyncio.TimeoutError:
            pass
        if self._owns_runner:
            self.runner.close()

    @staticmethod
    def _stop_reading(conn: _Connection) -> None:
        transport = conn.writer.transport
        try:
            transport.pause_reading()
        except (RuntimeError, AttributeError):
            pass
        if not conn.reader.at_eof():
            conn.reader.feed_eof()

    def _idle_clients(self) -> int:
        return sum(1 for c in self._conns if not c.computing)

    def _summary(self) -> str:
        s = self.stats.snapshot()
        return f"{s['requests']} requests, {s['batches']} batches, {s['errors']} errors"

    # ------------------------------------------------------------------ connections
    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        is_tcp = sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)
        if is_tcp:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = "%s:%s" % writer.get_extra_info("peername")[:2]
        else:
            peer = f"unix:{self.config.unix_path}#{self.stats.connections_total + 1}"
        self.stats.connections_total += 1
        if self._closing or len(self._conns) >= self.config.max_connections:
            code, msg = (
                (P.SHUTTING_DOWN, "server is shutting down")
                if self._closing
                else (P.OVERLOADED, f"connection limit of {self.config.max_connections} reached; try again later")
            )
            self.stats.connections_refused += 1
            self._reject(peer, code, msg)
            await self._send_and_close(writer, P.error_reply(None, code, msg))
            return
        conn = _Connection(reader, writer, peer, authenticated=self.config.token is None)
        conn.task = asyncio.current_task()
        self._conns.add(conn)
        self.stats.connections_open = len(self._conns)
        try:
            await self._serve_connection(conn)
        except (ConnectionError, asyncio.IncompleteReadError) as err:
            log.info("%s: connection lost (%s)", peer, type(err).__name__)
        except asyncio.CancelledError:
            log.warning("%s: connection cancelled at shutdown", peer)
        except Exception:  # noqa: BLE001 - never let one connection take the server down
            log.exception("%s: unexpected error, connection closed", peer)
        finally:
            self._conns.discard(conn)
            self.stats.connections_open = len(self._conns)
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), timeout=1.0)
            except (Exception, asyncio.CancelledError):  # noqa: BLE001 - peer already gone
                pass

    async def _send_and_close(self, writer: asyncio.StreamWriter, reply: dict) -> None:
        try:
            writer.write(P.pack(reply))
            await asyncio.wait_for(writer.drain(), timeout=1.0)
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 - best effort
            pass
        writer.close()

    def _reject(self, peer: str, code: str, message: str) -> None:
        self.stats.record_error(code)
        log.warning("%s: rejected (%s): %s", peer, code, message)

    async def _serve_connection(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        limits = self.config.limits
        reader, writer = conn.reader, conn.writer
        while True:
            try:
                header = await reader.readexactly(P.HEADER_SIZE)
            except asyncio.IncompleteReadError as err:
                if err.partial:
                    self._reject(conn.peer, P.BAD_MESSAGE, f"connection closed inside a header ({len(err.partial)} of 4 bytes)")
                return  # clean end of stream
            try:
                n = P.frame_length(header, limits.max_message_bytes)
            except P.ProtocolError as err:
                # the stream cannot be resynchronised after a bad length: answer and close
                self._reject(conn.peer, err.code, err.message)
                await self._send_and_close(writer, P.error_reply(None, err.code, err.message))
                return
            timer = loop.call_later(self.config.read_timeout_s, self._read_timed_out, conn, n)
            try:
                body = await reader.readexactly(n)
            except asyncio.IncompleteReadError as err:
                self._reject(conn.peer, P.BAD_MESSAGE, f"connection closed mid-message ({len(err.partial)} of {n} bytes)")
                return
            finally:
                timer.cancel()
            received = time.perf_counter()
            reply, close = await self._handle_body(conn, body)
            data = self._pack_reply(conn, reply)
            writer.write(data)
            await writer.drain()
            if reply.get("result", {}).get("results") is not None:
                self.stats.record_latency(time.perf_counter() - received)
            if close:
                writer.close()
                return

    def _read_timed_out(self, conn: _Connection, n: int) -> None:
        self._reject(conn.peer, P.TIMEOUT, f"message of {n} bytes not complete after {self.config.read_timeout_s} s")
        conn.writer.transport.abort()

    def _pack_reply(self, conn: _Connection, reply: dict) -> bytes:
        try:
            return P.pack(reply)
        except Exception as err:  # noqa: BLE001 - a reply we cannot encode is our bug
            log.exception("%s: cannot encode reply", conn.peer)
            return P.pack(P.error_reply(reply.get("id"), P.INTERNAL, f"cannot encode reply: {err}"))

    async def _handle_body(self, conn: _Connection, body: bytes) -> tuple[dict, bool]:
        """Reply to one message; the bool says whether to close the connection after it."""
        rid = None
        try:
            msg = P.unpack(body)
            rid = P.request_id(msg)
            req = P.parse_request(msg, self.config.limits)
            self.stats.record_request(req.op)
            if req.op == "auth":
                return self._auth(conn, req)
            if not conn.authenticated:
                raise P.ProtocolError(P.UNAUTHORIZED, "send {'op': 'auth', 'token': ...} first")
            if req.op == "compute":
                return P.ok_reply(rid, await self._compute(conn, req)), False
            if req.op == "metadata":
                return P.ok_reply(rid, self._metadata()), False
            if req.op == "health":
                return P.ok_reply(rid, self._health()), False
            if req.op == "stats":
                return P.ok_reply(rid, self._stats()), False
            raise P.ProtocolError(P.UNKNOWN_OP, f"unknown op {req.op!r}")  # parse_request prevents this
        except P.ProtocolError as err:
            self._reject(conn.peer, err.code, err.message)
            return P.error_reply(rid, err.code, err.message), err.code == P.UNAUTHORIZED
        except Exception as err:  # noqa: BLE001 - model failures become structured errors
            self._reject(conn.peer, P.MODEL_ERROR, f"{type(err).__name__}: {err}")
            return P.error_reply(rid, P.MODEL_ERROR, f"{type(err).__name__}: {err}"), False

    def _auth(self, conn: _Connection, req: P.Request) -> tuple[dict, bool]:
        expected = self.config.token
        if expected is None:
            conn.authenticated = True
            return P.ok_reply(req.id, {"authenticated": True}), False
        if hmac.compare_digest(req.token.encode("utf-8"), expected.encode("utf-8")):
            conn.authenticated = True
            return P.ok_reply(req.id, {"authenticated": True}), False
        raise P.ProtocolError(P.UNAUTHORIZED, "wrong token")

    # ------------------------------------------------------------------ ops
    def _metadata(self) -> dict:
        cfg = self.config
        return {
            **self.info,
            "available_properties": list(self.available_properties),
            "units": dict(PROVIDER_UNITS),
            "server": {
                "protocol": P.PROTOCOL_VERSION,
                "batch_window_us": cfg.batch_window_us,
                "max_batch_atoms": cfg.max_batch_atoms,
                "max_batch_requests": cfg.max_batch_requests,
                "request_timeout_s": cfg.request_timeout_s,
                "limits": cfg.limits.as_dict(),
            },
        }

    def _stats(self) -> dict:
        snap = self.stats.snapshot()
        snap["window_waits"] = self._batcher.window_waits
        snap["window_expired"] = self._batcher.window_expired
        return snap

    def _health(self) -> dict:
        return {
            "status": "shutting_down" if self._closing else "ok",
            "uptime_s": time.monotonic() - self.stats.started,
            "queued": self._batcher.queued if self._batcher else 0,
            "connections": len(self._conns),
        }

    async def _compute(self, conn: _Connection, req: P.Request) -> dict:
        P.check_properties(req.properties, self.available_properties)
        for k, s in enumerate(req.structures):
            if not self._known[s.numbers].all():
                unknown = np.setdiff1d(s.numbers, self._species)
                raise P.ProtocolError(
                    P.UNKNOWN_ELEMENT,
                    f"structure {k}: atomic numbers {unknown.tolist()} unknown to this model "
                    f"(it knows {self._species.tolist()})",
                )
            if "stress" in req.properties and not s.pbc.all():
                raise P.ProtocolError(P.BAD_REQUEST, f"structure {k}: stress needs a cell periodic in all directions")
        timeout = min(req.timeout_s or float("inf"), self.config.request_timeout_s)
        fut = self._batcher.submit(req.structures, req.n_atoms, req.properties)
        conn.computing = True
        try:
            results = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise P.ProtocolError(P.TIMEOUT, f"no result within {timeout} s (server busy?)") from None
        finally:
            conn.computing = False
        return {"results": results}

    def _evaluate(self, wire: Sequence[P.WireStructure], properties: tuple[str, ...]) -> list[dict]:
        """Worker thread: one model call for all structures, split per structure."""
        from spkserve import keys
        from spkserve.batch import Structure

        structures = [Structure(numbers=s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc) for s in wire]
        wanted = ("energy",) + tuple(p for p in properties if p != "energy")
        out = self.runner.compute(structures, wanted)
        bounds = np.cumsum([0] + [len(s.numbers) for s in wire])
        results: list[dict] = [{} for _ in wire]
        for name in wanted:
            if name not in out:
                raise RuntimeError(f"the model returned no {name!r}")
            t = out[name].detach().cpu()
            arr = (t.double() if t.is_floating_point() else t).numpy()
            for k in range(len(wire)):
                value = arr[bounds[k] : bounds[k + 1]] if name in keys.PER_ATOM_OUTPUTS else arr[k]
                results[k][name] = float(value) if np.ndim(value) == 0 else np.ascontiguousarray(value)
        for k, r in enumerate(results):
            if not np.isfinite(r["energy"]):
                raise ValueError(f"structure {k}: the model returned a non-finite energy")
        return results


def _jsonable(obj: Any) -> Any:
    """Keep only msgpack-friendly values of a metadata dict (str keys, plain values)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)

