"""Wire format of the msgpack model server: framing, typed arrays, message validation.

Framing
    Every message is a 4-byte big-endian unsigned length followed by that many
    bytes of one msgpack map. Nothing is ever pickled; the decoder knows only
    msgpack's own types plus the array extension below.

Arrays
    msgpack extension type :data:`ARRAY_EXT` (1). Its payload is::

        u8   L            length of the dtype string
        L    dtype        numpy dtype string, one of :data:`ARRAY_DTYPES` (little-endian)
        u8   ndim         0..8
        ndim × u32 (LE)   shape
        ...  data         C-order raw bytes, exactly prod(shape) * itemsize of them

    Receivers also accept plain (nested) lists wherever an array is expected.

Requests (client → server), a map with ``op`` and an integer ``id`` echoed in the reply:
    ``{"op": "auth", "token": str}``
    ``{"op": "metadata"}`` · ``{"op": "health"}`` · ``{"op": "stats"}``
    ``{"op": "compute", "structures": [S...], "properties": [str...], "timeout_s": float?}``
    with each structure ``S = {"numbers": int[n], "positions": float[n, 3] (Å),
    "cell": float[3, 3] (Å, rows; optional), "pbc": bool | bool[3] (optional)}``.

Replies (server → client):
    ``{"id": id, "ok": true, "result": {...}}`` or
    ``{"id": id, "ok": false, "error": {"code": str, "message": str}}``.
    A compute result is ``{"results": [{"energy": float (eV), "forces": float[n, 3] (eV/Å),
    "stress": float[3, 3] (eV/Å³), ...} per structure], "units": {...}}``.

This module imports numpy and msgpack only (no torch), so light clients can use it.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
ARRAY_EXT = 1
HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
#: a frame length field cannot exceed this (u32)
MAX_FRAME = 2**32 - 1
ARRAY_DTYPES = frozenset({"<f8", "<f4", "<i8", "<i4", "|u1", "|b1"})
MAX_NDIM = 8
OPS = ("auth", "metadata", "health", "stats", "compute")
MAX_ELEMENT = 118

# error codes carried in {"code": ..., "message": ...}
BAD_MESSAGE = "bad_message"  # not msgpack, not a map, broken array
BAD_REQUEST = "bad_request"  # well-formed but fields wrong (shapes, NaN, types)
UNKNOWN_OP = "unknown_op"
UNKNOWN_ELEMENT = "unknown_element"
UNSUPPORTED_PROPERTY = "unsupported_property"
TOO_LARGE = "too_large"
UNAUTHORIZED = "unauthorized"
TIMEOUT = "timeout"
OVERLOADED = "overloaded"
SHUTTING_DOWN = "shutting_down"
MODEL_ERROR = "model_error"
INTERNAL = "internal"


class ProtocolError(Exception):
    """A message that breaks the protocol; ``code`` is one of the error codes above."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class Limits:
    """Size limits the server enforces (and the client checks before sending)."""

    max_message_bytes: int = 64 * 2**20
    max_atoms_per_structure: int = 100_000
    max_structures_per_request: int = 10_000
    max_atoms_per_request: int = 1_000_000

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_atoms_per_structure", "max_structures_per_request",
                     "max_atoms_per_request"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {name} must be a positive integer, got {value!r}")
        if self.max_message_bytes > MAX_FRAME:
            raise ValueError(f"max_message_bytes cannot exceed {MAX_FRAME} (u32 frame length)")

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- arrays
def encode_array(arr: np.ndarray) -> msgpack.ExtType:
    """Pack a numpy array as the :data:`ARRAY_EXT` extension (little-endian, C order)."""
    arr = np.asarray(arr)
    if arr.dtype == np.bool_:
        dtype = "|b1"
    else:
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        dtype = arr.dtype.str
    if dtype not in ARRAY_DTYPES:
        raise TypeError(f"arrays of dtype {arr.dtype} cannot be sent; use one of {sorted(ARRAY_DTYPES)}")
    if arr.ndim > MAX_NDIM:
        raise TypeError(f"arrays with {arr.ndim} dimensions cannot be sent (at most {MAX_NDIM})")
    head = bytes([len(dtype)]) + dtype.encode("ascii") + bytes([arr.ndim])
    head += struct.pack(f"<{arr.ndim}I", *arr.shape)
    return msgpack.ExtType(ARRAY_EXT, head + np.ascontiguousarray(arr).tobytes())


def decode_array(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_array`; raises :class:`ProtocolError` on any inconsistency."""
    try:
        n = data[0]
        dtype = data[1 : 1 + n].decode("ascii")
        ndim = data[1 + n]
    except (IndexError, UnicodeDecodeError) as err:
        raise ProtocolError(BAD_MESSAGE, "array extension: truncated or non-ASCII dtype header") from err
    if dtype not in ARRAY_DTYPES:
        raise ProtocolError(BAD_MESSAGE, f"array extension: dtype {dtype!r} not allowed ({sorted(ARRAY_DTYPES)})")
    if ndim > MAX_NDIM:
        raise ProtocolError(BAD_MESSAGE, f"array extension: {ndim} dimensions (at most {MAX_NDIM})")
    start = 2 + n
    stop = start + 4 * ndim
    if len(data) < stop:
        raise ProtocolError(BAD_MESSAGE, "array extension: truncated shape")
    shape = struct.unpack(f"<{ndim}I", data[start:stop])
    dt = np.dtype(dtype)
    expected = math.prod(shape) * dt.itemsize
    if len(data) - stop != expected:
        raise ProtocolError(
            BAD_MESSAGE,
            f"array extension: shape {list(shape)} of {dtype} needs {expected} bytes, got {len(data) - stop}",
        )
    return np.frombuffer(data, dtype=dt, offset=stop).reshape(shape).copy()


def _ext_hook(code: int, data: bytes) -> Any:
    if code != ARRAY_EXT:
        raise ProtocolError(BAD_MESSAGE, f"unknown msgpack extension type {code}")
    return decode_array(data)


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return encode_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send an object of type {type(obj).__name__}")


# --------------------------------------------------------------------------- framing
def pack(message: dict) -> bytes:
    """One framed message: length header + msgpack body."""
    body = msgpack.packb(message, default=_default, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(TOO_LARGE, f"message of {len(body)} bytes does not fit a u32 frame")
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes, max_message_bytes: int) -> int:
    """Length announced by a 4-byte header, refused if above ``max_message_bytes``."""
    (n,) = HEADER.unpack(header)
    if n > max_message_bytes:
        raise ProtocolError(TOO_LARGE, f"message of {n} bytes exceeds the limit of {max_message_bytes} bytes")
    if n == 0:
        raise ProtocolError(BAD_MESSAGE, "empty message (length 0)")
    return n


def unpack(body: bytes) -> dict:
    """Decode one message body into a dict (string keys only); :class:`ProtocolError` if malformed."""
    try:
        msg = msgpack.unpackb(body, raw=False, ext_hook=_ext_hook, strict_map_key=True, use_list=True)
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as err:
        # ExtraData, FormatError, StackError, UnicodeDecodeError, OutOfData all end here
        raise ProtocolError(BAD_MESSAGE, f"not a valid msgpack message: {type(err).__name__}: {err}") from err
    if not isinstance(msg, dict):
        raise ProtocolError(BAD_MESSAGE, f"a message must be a msgpack map, got {type(msg).__name__}")
    return msg


# --------------------------------------------------------------------------- requests
@dataclass
class WireStructure:
    """A validated structure from the wire: Å, float64, numpy only."""

    numbers: np.ndarray  # [n] int64
    positions: np.ndarray  # [n, 3] float64
    cell: np.ndarray  # [3, 3] float64
    pbc: np.ndarray  # [3] bool


@dataclass
class Request:
    """A validated request (``structures``/``properties`` only for compute)."""

    op: str
    id: Any
    token: str | None = None
    structures: list[WireStructure] = field(default_factory=list)
    properties: tuple[str, ...] = ()
    timeout_s: float | None = None

    @property
    def n_atoms(self) -> int:
        return sum(len(s.numbers) for s in self.structures)


def request_id(msg: Any) -> Any:
    """The request's id if it is usable as one (int or str), else None."""
    if isinstance(msg, dict):
        rid = msg.get("id")
        if isinstance(rid, (int, str)) and not isinstance(rid, bool):
            return rid
    return None


_ALLOWED_FIELDS = {
    "auth": {"op", "id", "v", "token"},
    "metadata": {"op", "id", "v"},
    "health": {"op", "id", "v"},
    "stats": {"op", "id", "v"},
    "compute": {"op", "id", "v", "structures", "properties", "timeout_s"},
}
_STRUCTURE_FIELDS = {"numbers", "positions", "cell", "pbc"}


def parse_request(msg: dict, limits: Limits) -> Request:
    """Check a decoded message against the request schema (unknown fields are errors)."""
    op = msg.get("op")
    if not isinstance(op, str):
        raise ProtocolError(BAD_REQUEST, "request has no string field 'op'")
    if op not in _ALLOWED_FIELDS:
        raise ProtocolError(UNKNOWN_OP, f"unknown op {op!r}; expected one of {list(OPS)}")
    if "v" in msg and msg["v"] != PROTOCOL_VERSION:
        raise ProtocolError(BAD_REQUEST, f"protocol version {msg['v']!r} not supported (server speaks {PROTOCOL_VERSION})")
    if "id" in msg and request_id(msg) is None:
        raise ProtocolError(BAD_REQUEST, "field 'id' must be an integer or a string")
    extra = set(msg) - _ALLOWED_FIELDS[op]
    if extra:
        raise ProtocolError(BAD_REQUEST, f"op {op!r} does not take field(s) {sorted(extra)}")
    req = Request(op=op, id=request_id(msg))
    if op == "auth":
        token = msg.get("token")
        if not isinstance(token, str):
            raise ProtocolError(BAD_REQUEST, "auth needs a string field 'token'")
        req.token = token
    elif op == "compute":
        req.structures = _parse_structures(msg.get("structures"), limits)
        req.properties = _parse_properties(msg.get("properties", ["energy", "forces"]))
        timeout = msg.get("timeout_s")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
                raise ProtocolError(BAD_REQUEST, f"timeout_s must be a positive number, got {timeout!r}")
            req.timeout_s = float(timeout)
    return req


def _parse_properties(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
        raise ProtocolError(BAD_REQUEST, "'properties' must be a non-empty list of strings")
    if len(value) > 32:
        raise ProtocolError(BAD_REQUEST, "'properties' lists more than 32 names")
    return tuple(dict.fromkeys(value))  # unique, order kept


def _as_array(value: Any, what: str, kind: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        arr = value
    elif isinstance(value, (list, int, float, bool)):
        try:
            arr = np.array(value)
        except (ValueError, TypeError) as err:
            raise ProtocolError(BAD_REQUEST, f"{what}: not a rectangular array ({err})") from err
    else:
        raise ProtocolError(BAD_REQUEST, f"{what}: expected an array, got {type(value).__name__}")
    if kind == "float" and arr.dtype.kind not in "fiu":
        raise ProtocolError(BAD_REQUEST, f"{what}: expected numbers, got dtype {arr.dtype}")
    if kind == "int" and arr.dtype.kind not in "iu":
        raise ProtocolError(BAD_REQUEST, f"{what}: expected integers, got dtype {arr.dtype}")
    if kind == "bool" and arr.dtype.kind not in "bi":
        raise ProtocolError(BAD_REQUEST, f"{what}: expected booleans, got dtype {arr.dtype}")
    return arr


def _parse_structures(value: Any, limits: Limits) -> list[WireStructure]:
    if not isinstance(value, list) or not value:
        raise ProtocolError(BAD_REQUEST, "'structures' must be a non-empty list of maps")
    if len(value) > limits.max_structures_per_request:
        raise ProtocolError(
            TOO_LARGE, f"{len(value)} structures exceed the limit of {limits.max_structures_per_request} per request"
        )
    out = []
    total = 0
    for k, s in enumerate(value):
        ws = parse_structure(s, f"structure {k}", limits)
        total += len(ws.numbers)
        if total > limits.max_atoms_per_request:
            raise ProtocolError(TOO_LARGE, f"request exceeds the limit of {limits.max_atoms_per_request} atoms")
        out.append(ws)
    return out


def parse_structure(s: Any, what: str, limits: Limits) -> WireStructure:
    """Validate one structure map: shapes, finiteness, element range, cell."""
    if not isinstance(s, dict):
        raise ProtocolError(BAD_REQUEST, f"{what}: expected a map, got {type(s).__name__}")
    extra = set(s) - _STRUCTURE_FIELDS
    if extra:
        raise ProtocolError(BAD_REQUEST, f"{what}: unknown field(s) {sorted(extra)}")
    if "numbers" not in s or "positions" not in s:
        raise ProtocolError(BAD_REQUEST, f"{what}: needs 'numbers' and 'positions'")
    numbers = _as_array(s["numbers"], f"{what} numbers", "int")
    if numbers.ndim != 1 or numbers.size == 0:
        raise ProtocolError(BAD_REQUEST, f"{what}: 'numbers' must be a non-empty 1-d array, got shape {list(numbers.shape)}")
    n = numbers.shape[0]
    if n > limits.max_atoms_per_structure:
        raise ProtocolError(TOO_LARGE, f"{what}: {n} atoms exceed the limit of {limits.max_atoms_per_structure}")
    if numbers.min() < 1 or numbers.max() > MAX_ELEMENT:
        raise ProtocolError(BAD_REQUEST, f"{what}: atomic numbers must lie in 1..{MAX_ELEMENT}")
    positions = _as_array(s["positions"], f"{what} positions", "float")
    if positions.shape != (n, 3):
        raise ProtocolError(
            BAD_REQUEST, f"{what}: 'positions' has shape {list(positions.shape)}, expected [{n}, 3] for {n} atoms"
        )
    positions = positions.astype(np.float64)
    if not np.isfinite(positions).all():
        raise ProtocolError(BAD_REQUEST, f"{what}: positions contain NaN or infinite values")
    cell = np.zeros((3, 3))
    if s.get("cell") is not None:
        cell = _as_array(s["cell"], f"{what} cell", "float").astype(np.float64)
        if cell.shape != (3, 3):
            raise ProtocolError(BAD_REQUEST, f"{what}: 'cell' has shape {list(cell.shape)}, expected [3, 3]")
        if not np.isfinite(cell).all():
            raise ProtocolError(BAD_REQUEST, f"{what}: cell contains NaN or infinite values")
    pbc = np.zeros(3, dtype=bool)
    if s.get("pbc") is not None:
        p = _as_array(s["pbc"], f"{what} pbc", "bool")
        if p.shape not in ((), (3,)):
            raise ProtocolError(BAD_REQUEST, f"{what}: 'pbc' must be a bool or 3 bools, got shape {list(p.shape)}")
        pbc = np.broadcast_to(p.astype(bool), (3,)).copy()
    for d in range(3):
        if pbc[d] and not np.linalg.norm(cell[d]) > 0:
            raise ProtocolError(BAD_REQUEST, f"{what}: periodic along axis {d} but cell vector {d} is zero")
    if pbc.all() and not abs(np.linalg.det(cell)) > 1e-9:
        raise ProtocolError(BAD_REQUEST, f"{what}: periodic cell is singular (volume 0)")
    return WireStructure(numbers=numbers.astype(np.int64), positions=positions, cell=cell, pbc=pbc)


def structure_to_wire(numbers: Any, positions: Any, cell: Any = None, pbc: Any = None) -> dict:
    """The map a client sends for one structure (typed arrays, float64 Å)."""
    out = {
        "numbers": np.ascontiguousarray(numbers, dtype=np.int64).reshape(-1),
        "positions": np.ascontiguousarray(positions, dtype=np.float64).reshape(-1, 3),
    }
    if cell is not None:
        out["cell"] = np.ascontiguousarray(cell, dtype=np.float64).reshape(3, 3)
    if pbc is not None:
        out["pbc"] = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy()
    return out


def ok_reply(rid: Any, result: dict) -> dict:
    return {"id": rid, "ok": True, "result": result}


def error_reply(rid: Any, code: str, message: str) -> dict:
    return {"id": rid, "ok": False, "error": {"code": code, "message": message}}


def check_properties(properties: Sequence[str], available: Sequence[str]) -> None:
    """Refuse properties the model cannot produce."""
    missing = [p for p in properties if p not in available]
    if missing:
        raise ProtocolError(
            UNSUPPORTED_PROPERTY, f"properties {missing} are not available; this model offers {list(available)}"
        )
