"""Python client of the msgpack model server, and a :class:`ForceProvider` on top of it.

    from spkserve.server.client import Client
    with Client(unix="/tmp/spk.sock") as c:            # or Client(host="127.0.0.1", port=N, token=...)
        c.metadata()["species"]
        r = c.compute(atoms, ["energy", "forces"])     # {"energy": float eV, "forces": [n, 3] eV/Å}
        rs = c.compute([atoms1, atoms2])               # list of such dicts, one model call
        c.stats()["mean_batch_requests"]

The client needs numpy and msgpack only (no torch). A lost connection is
re-established (with back-off) and the request sent again; every request is
idempotent. Over TCP the token comes from ``token=`` or ``SPKSERVE_TOKEN``.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from typing import Any, Iterable, Sequence

import numpy as np

from spkserve import keys
from spkserve.server import protocol as P


class ServerError(RuntimeError):
    """The server answered with a structured error; ``code`` names its kind."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Client:
    """Blocking client; one request at a time per connection (thread-safe through a lock).

    Args:
        unix: path of the server's unix socket, or
        host, port: TCP address (loopback unless the server allows remote clients);
        token: auth token (TCP: required; default ``$SPKSERVE_TOKEN``).
        timeout_s: how long to wait for one reply.
        reconnect_attempts: how often a lost connection is re-opened for one request.
    """

    def __init__(
        self,
        unix: str | os.PathLike | None = None,
        host: str | None = None,
        port: int | None = None,
        token: str | None = None,
        *,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 10.0,
        reconnect_attempts: int = 3,
        backoff_s: float = 0.05,
    ) -> None:
        if (unix is None) == (host is None):
            raise ValueError("give exactly one of unix=PATH or host=HOST (with port=N)")
        if host is not None and port is None:
            raise ValueError("a TCP client needs port=N")
        self.unix = os.fspath(unix) if unix is not None else None
        self.host = host
        self.port = port
        if token is None and host is not None:
            token = os.environ.get("SPKSERVE_TOKEN")
        self.token = token
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_attempts = reconnect_attempts
        self.backoff_s = backoff_s
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.reconnects = 0

    # ------------------------------------------------------------------ connection
    def connect(self) -> "Client":
        """Open the connection now (otherwise it opens on the first request)."""
        with self._lock:
            if self._sock is None:
                self._open()
        return self

    def _open(self) -> None:
        if self.unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = self.unix
        else:
            info = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(info[0], socket.SOCK_STREAM)
            address = info[4]
        try:
            sock.settimeout(self.connect_timeout_s)
            sock.connect(address)
            if self.unix is None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.timeout_s)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        if self.token is not None:
            try:
                self._roundtrip({"op": "auth", "token": self.token})
            except BaseException:
                self._drop()
                raise

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def close(self) -> None:
        """Close the connection (a later request opens a new one)."""
        with self._lock:
            self._drop()

    def __enter__(self) -> "Client":
        return self.connect()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ transport
    def _recv_exactly(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self._sock.recv_into(view[got:], n - got)
            if k == 0:
                raise ConnectionResetError(f"server closed the connection ({got} of {n} bytes received)")
            got += k
        return bytes(buf)

    def _roundtrip(self, message: dict) -> Any:
        rid = next(self._ids)
        message = {"id": rid, **message}
        try:
            self._sock.sendall(P.pack(message))
        except OSError as err:
            # the server may have refused this connection (overloaded, shutting down)
            # and closed it before we sent: its reason is waiting in our receive buffer
            reply = self._pending_reply()
            if reply is None:
                raise
            self._raise_error(reply)
            raise err
        reply = self._read_reply()
        self._raise_error(reply)
        if reply.get("id") != rid:
            self._drop()
            raise ConnectionError(f"reply id {reply.get('id')!r} does not match request id {rid}")
        return reply.get("result")

    def _read_reply(self) -> dict:
        (n,) = P.HEADER.unpack(self._recv_exactly(P.HEADER_SIZE))
        return P.unpack(self._recv_exactly(n))

    def _pending_reply(self) -> dict | None:
        """A reply already sent by the server, if one arrives within 0.5 s."""
        try:
            self._sock.settimeout(0.5)
            return self._read_reply()
        except (OSError, P.ProtocolError):
            return None

    def _raise_error(self, reply: dict) -> None:
        if reply.get("ok"):
            return
        err = reply.get("error") or {}
        code, msg = str(err.get("code", P.INTERNAL)), str(err.get("message", "malformed error reply"))
        if reply.get("id") is None or code == P.UNAUTHORIZED:
            self._drop()  # connection-level error: the server closes this connection
        raise ServerError(code, msg)

    def request(self, op: str, **fields: Any) -> Any:
        """Send one request, reconnecting if the connection was lost; return its result."""
        with self._lock:
            last: Exception | None = None
            for attempt in range(self.reconnect_attempts + 1):
                if attempt:
                    self.reconnects += 1
                    time.sleep(self.backoff_s * 2 ** (attempt - 1))
                try:
                    if self._sock is None:
                        self._open()
                    return self._roundtrip({"op": op, **fields})
                except socket.timeout as err:
                    self._drop()  # the stream is out of step now
                    raise TimeoutError(f"no reply to {op!r} within {self.timeout_s} s") from err
                except ServerError as err:
                    if err.code in (P.OVERLOADED, P.SHUTTING_DOWN) and attempt < self.reconnect_attempts:
                        last = err
                        continue
                    raise
                except (ConnectionError, EOFError, OSError) as err:
                    self._drop()
                    last = err
            raise ConnectionError(f"cannot reach the server at {self._where()}: {last}") from last

    def _where(self) -> str:
        return self.unix if self.unix is not None else f"{self.host}:{self.port}"

    # ------------------------------------------------------------------ ops
    def metadata(self) -> dict:
        """Model species, cutoff (Å), available properties, units, server limits."""
        return self.request("metadata")

    def health(self) -> dict:
        return self.request("health")

    def stats(self) -> dict:
        """Requests, batches, mean batch size, latency percentiles (ms)."""
        return self.request("stats")

    def compute(
        self,
        structures: Any,
        properties: Sequence[str] = ("energy", "forces"),
        timeout_s: float | None = None,
    ) -> dict | list[dict]:
        """Evaluate one structure (returns a dict) or a list of them (returns a list).

        A structure is an ``ase.Atoms``, a :class:`spkserve.batch.Structure` or a
        dict with ``numbers``, ``positions`` (Å) and optionally ``cell`` (Å), ``pbc``.
        Results are in provider units: eV, eV/Å, eV/Å³.
        """
        single = not isinstance(structures, (list, tuple))
        items = [structures] if single else list(structures)
        if not items:
            raise ValueError("compute needs at least one structure")
        fields: dict[str, Any] = {"structures": [to_wire(s) for s in items], "properties": list(properties)}
        if timeout_s is not None:
            fields["timeout_s"] = float(timeout_s)
        results = self.request("compute", **fields)["results"]
        if len(results) != len(items):
            raise ConnectionError(f"server returned {len(results)} results for {len(items)} structures")
        return results[0] if single else results


def to_wire(structure: Any) -> dict:
    """The wire map of an ``ase.Atoms``, a ``Structure`` or a dict."""
    if isinstance(structure, dict):
        unknown = set(structure) - {"numbers", "positions", "cell", "pbc"}
        if unknown:
            raise ValueError(f"structure dict has unknown keys {sorted(unknown)}")
        return P.structure_to_wire(structure["numbers"], structure["positions"],
                                   structure.get("cell"), structure.get("pbc"))
    try:
        numbers, positions, cell, pbc = structure.numbers, structure.positions, structure.cell, structure.pbc
    except AttributeError as err:
        raise TypeError(
            f"cannot send a {type(structure).__name__}: expected ase.Atoms, spkserve.batch.Structure or a dict"
        ) from err
    return P.structure_to_wire(numbers, positions, np.asarray(cell, dtype=np.float64), pbc)


class RemoteProvider:
    """A :class:`spkserve.provider.ForceProvider` backed by a model server.

    ``RemoteProvider(unix=PATH)`` or ``RemoteProvider(host=H, port=N, token=T)``;
    keyword arguments go to :class:`Client`. Results are float64 CPU tensors in
    provider units, in the batch layout of :mod:`spkserve.keys`.
    """

    def __init__(self, **client_kwargs: Any) -> None:
        self.client = Client(**client_kwargs)
        self.metadata = self.client.metadata()
        self.available_properties: tuple[str, ...] = tuple(self.metadata["available_properties"])
        #: model cutoff in Å (the MD engine checks cells against it)
        self.cutoff_angstrom: float | None = self.metadata.get("cutoff_angstrom")

    def compute(self, structures: Iterable[Any], properties: Sequence[str] = ("energy", "forces")) -> dict:
        import torch

        from spkserve.provider import ProviderError

        structures = list(structures)
        try:
            results = self.client.compute(structures, list(properties))
        except ServerError as err:
            raise ProviderError(f"model server at {self.client._where()} refused the request: {err}") from err
        out = {}
        for name in dict.fromkeys(("energy", *properties)):
            values = [np.asarray(r[name], dtype=np.float64) for r in results]
            arr = np.concatenate(values) if name in keys.PER_ATOM_OUTPUTS else np.stack(values)
            out[name] = torch.from_numpy(arr)
        return out

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "RemoteProvider":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
