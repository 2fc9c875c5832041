"""The i-PI socket protocol: headers, framing and message bodies (atomic units).

Every message starts with a 12-byte ASCII header, upper case, padded with
spaces. Numbers are native-endian (little-endian everywhere we run) int32 and
float64. All lengths, energies, forces and virials on the wire are Hartree
atomic units (Bohr, Hartree, Hartree/Bohr, Hartree). Conversions to Å/eV
happen in :mod:`spkserve.ipi.client` and :mod:`spkserve.ipi.server`, never here.

Message bodies (after the header)::

    INIT        int32 bead_index, int32 n, n bytes init string
    POSDATA     float64 h[3,3], float64 ih[3,3], int32 natoms, float64 pos[natoms,3]
    FORCEREADY  float64 energy, int32 natoms, float64 forces[natoms,3],
                float64 virial[3,3], int32 n, n bytes extra string

Cells: the wire carries i-PI's ``h`` (lattice vectors as *columns*) in
row-major order, so ``cell_rows = h.T``. The inverse cell is ignored on
receipt and recomputed from the cell, because i-PI and ASE send different
things there (ASE sends a pseudo-inverse of the transposed cell). The virial
(``-dE/dstrain``, energy units) is sent transposed like the cell.

Batched beads (i-PI 3.x ``ffsocket`` with ``batch_size`` B > 1, announced as
``batch_size:B`` in the INIT string)::

    POSDATA     int32 natoms, B x (h[3,3], ih[3,3]), float64 pos[B, natoms, 3]
    FORCEREADY  float64 energy[B], int32 natoms, float64 forces[B, natoms, 3],
                float64 virial[B, 3, 3], B x (int32 n, n bytes extra)

This layout was read from i-PI 3.3.1 (``ipi/interfaces/sockets.py``,
``Driver.dispatch_send_batch`` / ``_recv_forces_bulk_batch``).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import numpy as np

HDRLEN = 12


def _header(name: str) -> bytes:
    return name.upper().ljust(HDRLEN).encode("ascii")


STATUS = _header("STATUS")
READY = _header("READY")
HAVEDATA = _header("HAVEDATA")
NEEDINIT = _header("NEEDINIT")
INIT = _header("INIT")
POSDATA = _header("POSDATA")
GETFORCE = _header("GETFORCE")
FORCEREADY = _header("FORCEREADY")
EXIT = _header("EXIT")

KNOWN_HEADERS = frozenset({STATUS, READY, HAVEDATA, NEEDINIT, INIT, POSDATA, GETFORCE, FORCEREADY, EXIT})

#: upper bounds that protect a peer from absurd sizes in a corrupt message
MAX_ATOMS = 10_000_000
MAX_STRING_BYTES = 64 * 1024 * 1024
MAX_BATCH = 100_000

_I32 = np.dtype("<i4")
_F64 = np.dtype("<f8")


class ProtocolError(RuntimeError):
    """The peer broke the protocol; ``header`` is the offending header (bytes) if any."""

    def __init__(self, message: str, header: bytes | None = None) -> None:
        if header is not None:
            message = f"{message} (header {header!r})"
        super().__init__(message)
        self.header = header


class PeerClosed(ConnectionError):
    """The peer closed the connection; ``clean`` is True at a message boundary."""

    def __init__(self, message: str, clean: bool) -> None:
        super().__init__(message)
        self.clean = clean


def header_name(header: bytes) -> str:
    """Printable name of a header (for logs and errors)."""
    return header.decode("ascii", errors="replace").strip()


# --- reading -------------------------------------------------------------------


def recv_exact(sock: socket.socket, nbytes: int, what: str = "data") -> bytearray:
    """Read exactly ``nbytes`` (raises :class:`PeerClosed` on end-of-file)."""
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        n = sock.recv_into(view[got:], nbytes - got)
        if n == 0:
            raise PeerClosed(f"peer closed the connection after {got} of {nbytes} bytes of {what}", clean=False)
        got += n
    return buf


def read_header(sock: socket.socket) -> bytes:
    """Read one 12-byte header. End-of-file before its first byte is a clean close."""
    first = sock.recv(HDRLEN)
    if not first:
        raise PeerClosed("peer closed the connection", clean=True)
    if len(first) < HDRLEN:
        first = bytes(first) + bytes(recv_exact(sock, HDRLEN - len(first), "a header"))
    return bytes(first)


def _read_int(sock: socket.socket, what: str) -> int:
    return int(np.frombuffer(recv_exact(sock, 4, what), _I32)[0])


def _read_f64(sock: socket.socket, count: int, what: str) -> np.ndarray:
    return np.frombuffer(recv_exact(sock, 8 * count, what), _F64).copy()


def _check_count(value: int, limit: int, what: str, header: bytes) -> int:
    if value < 0 or value > limit:
        raise ProtocolError(f"{what} = {value} is outside [0, {limit}]", header)
    return value


def parse_init_string(text: str) -> tuple[int, str]:
    """Split i-PI's ``batch_size:N`` token off an INIT string -> (batch_size, rest)."""
    batch = 1
    rest: list[str] = []
    for token in text.replace("\x00", "").split(","):
        key, sep, value = token.partition(":")
        if sep and key.strip() == "batch_size":
            try:
                batch = int(value.strip())
            except ValueError as err:
                raise ProtocolError(f"INIT string has a malformed batch_size token {token!r}", INIT) from err
            if batch < 1 or batch > MAX_BATCH:
                raise ProtocolError(f"INIT string asks for batch_size {batch}, outside [1, {MAX_BATCH}]", INIT)
        elif token.strip():
            rest.append(token)
    return batch, ",".join(rest)


def read_init(sock: socket.socket) -> tuple[int, str]:
    """Body of INIT -> (bead index, init string)."""
    bead = _read_int(sock, "INIT bead index")
    n = _check_count(_read_int(sock, "INIT string length"), MAX_STRING_BYTES, "INIT string length", INIT)
    text = bytes(recv_exact(sock, n, "INIT string")).decode("utf-8", errors="replace")
    return bead, text


def cells_from_wire(h_wire: np.ndarray) -> np.ndarray:
    """Wire ``h`` blocks [B, 3, 3] (vectors as columns) -> cells [B, 3, 3] (vectors as rows)."""
    return np.ascontiguousarray(np.swapaxes(h_wire.reshape(-1, 3, 3), 1, 2))


def _check_expected(n: int, expect_atoms: int | None) -> None:
    if expect_atoms is not None and n != expect_atoms:
        raise ProtocolError(f"POSDATA carries {n} atoms but {expect_atoms} are expected", POSDATA)


def read_posdata(sock: socket.socket, batch_size: int = 1, expect_atoms: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Body of POSDATA -> (cells_bohr [B, 3, 3] rows, positions_bohr [B, N, 3]).

    With ``expect_atoms`` the atom count is checked before anything is allocated.
    """
    if batch_size == 1:
        block = _read_f64(sock, 18, "POSDATA cell")
        n = _check_count(_read_int(sock, "POSDATA atom count"), MAX_ATOMS, "POSDATA atom count", POSDATA)
        _check_expected(n, expect_atoms)
        pos = _read_f64(sock, 3 * n, "POSDATA positions").reshape(1, n, 3)
        return cells_from_wire(block[:9]), pos
    n = _check_count(_read_int(sock, "POSDATA atom count"), MAX_ATOMS, "POSDATA atom count", POSDATA)
    _check_expected(n, expect_atoms)
    blocks = _read_f64(sock, 18 * batch_size, "POSDATA cells").reshape(batch_size, 18)
    pos = _read_f64(sock, 3 * n * batch_size, "POSDATA positions").reshape(batch_size, n, 3)
    return cells_from_wire(blocks[:, :9]), pos


@dataclass
class ForceReply:
    """Body of FORCEREADY, batched: energies [B] (Ha), forces [B, N, 3] (Ha/Bohr), virials [B, 3, 3] (Ha)."""

    energies: np.ndarray
    forces: np.ndarray
    virials: np.ndarray
    extras: list[str]


def read_forceready(
    sock: socket.socket,
    batch_size: int = 1,
    expect_atoms: int | None = None,
    max_string_bytes: int = MAX_STRING_BYTES,
) -> ForceReply:
    """Body of FORCEREADY (after its header); checks the atom count if ``expect_atoms`` is given."""
    if batch_size == 1:
        energies = _read_f64(sock, 1, "FORCEREADY energy")
    else:
        energies = _read_f64(sock, batch_size, "FORCEREADY energies")
    n = _check_count(_read_int(sock, "FORCEREADY atom count"), MAX_ATOMS, "FORCEREADY atom count", FORCEREADY)
    if expect_atoms is not None and n != expect_atoms:
        raise ProtocolError(f"FORCEREADY carries {n} atoms but {expect_atoms} were sent", FORCEREADY)
    forces = _read_f64(sock, 3 * n * batch_size, "FORCEREADY forces").reshape(batch_size, n, 3)
    virials = np.swapaxes(_read_f64(sock, 9 * batch_size, "FORCEREADY virials").reshape(batch_size, 3, 3), 1, 2)
    extras = []
    for _ in range(batch_size):
        m = _check_count(_read_int(sock, "FORCEREADY extra length"), max_string_bytes, "extra length", FORCEREADY)
        extras.append(bytes(recv_exact(sock, m, "FORCEREADY extra")).decode("utf-8", errors="replace"))
    return ForceReply(energies, forces, np.ascontiguousarray(virials), extras)


# --- writing -------------------------------------------------------------------


def _i32(value: int) -> bytes:
    return np.asarray(value, _I32).tobytes()


def pack_init(bead_index: int, init_string: str = "") -> bytes:
    """Header + body of INIT (ASE sends one zero byte when it has nothing to say)."""
    data = init_string.encode("utf-8")
    return INIT + _i32(bead_index) + _i32(len(data)) + data


def inverse_cell(cell_rows: np.ndarray) -> np.ndarray:
    """Inverse of a cell [3, 3] (rows), zeros if it is singular (no periodicity)."""
    if abs(np.linalg.det(cell_rows)) < 1e-12:
        return np.zeros((3, 3))
    return np.linalg.inv(cell_rows)


def _cell_block(cell_rows: np.ndarray) -> bytes:
    h = np.ascontiguousarray(np.asarray(cell_rows, _F64).reshape(3, 3).T)
    ih = np.ascontiguousarray(inverse_cell(h))
    return h.tobytes() + ih.tobytes()


def pack_posdata(cells_bohr: np.ndarray, positions_bohr: np.ndarray, batched: bool = False) -> bytes:
    """Header + body of POSDATA for cells [B, 3, 3] (rows) and positions [B, N, 3].

    ``batched=False`` requires B == 1 and writes the classic layout.
    """
    cells = np.asarray(cells_bohr, _F64).reshape(-1, 3, 3)
    pos = np.ascontiguousarray(np.asarray(positions_bohr, _F64).reshape(len(cells), -1, 3))
    n = pos.shape[1]
    if not batched:
        if len(cells) != 1:
            raise ValueError(f"the unbatched POSDATA layout carries one structure, got {len(cells)}")
        return POSDATA + _cell_block(cells[0]) + _i32(n) + pos.tobytes()
    return POSDATA + _i32(n) + b"".join(_cell_block(c) for c in cells) + pos.tobytes()


def pack_forceready(
    energies_hartree: np.ndarray,
    forces_hartree_per_bohr: np.ndarray,
    virials_hartree: np.ndarray,
    extras: list[str] | None = None,
    batched: bool = False,
) -> bytes:
    """Header + body of FORCEREADY as one buffer (i-PI gives up on replies that stall).

    Shapes: energies [B], forces [B, N, 3], virials [B, 3, 3]; ``batched=False``
    requires B == 1.
    """
    e = np.asarray(energies_hartree, _F64).reshape(-1)
    b = len(e)
    f = np.ascontiguousarray(np.asarray(forces_hartree_per_bohr, _F64).reshape(b, -1, 3))
    v = np.ascontiguousarray(np.swapaxes(np.asarray(virials_hartree, _F64).reshape(b, 3, 3), 1, 2))
    extras = list(extras) if extras is not None else [""] * b
    if len(extras) != b:
        raise ValueError(f"{b} structures but {len(extras)} extra strings")
    if not batched and b != 1:
        raise ValueError(f"the unbatched FORCEREADY layout carries one structure, got {b}")
    tail = b"".join(_i32(len(x)) + x for x in (s.encode("utf-8") for s in extras))
    return FORCEREADY + e.tobytes() + _i32(f.shape[1]) + f.tobytes() + v.tobytes() + tail
