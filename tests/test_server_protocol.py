"""Wire format of the model server: typed arrays, framing and request validation (no sockets)."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spkserve.server import protocol as P

LIMITS = P.Limits()


def _structure(n=3, **over):
    s = {"numbers": np.array([8, 1, 1][:n] + [1] * max(0, n - 3)), "positions": np.random.default_rng(0).normal(size=(n, 3))}
    s.update(over)
    return s


def _compute(**over):
    msg = {"op": "compute", "id": 1, "structures": [_structure()], "properties": ["energy", "forces"]}
    msg.update(over)
    return msg


@pytest.mark.parametrize(
    "arr",
    [
        np.arange(12, dtype=np.float64).reshape(4, 3),
        np.arange(5, dtype=np.float32),
        np.array([1, 6, 8], dtype=np.int64),
        np.array([[1, 2], [3, 4]], dtype=np.int32),
        np.array([True, False, True]),
        np.zeros((0, 3)),
        np.array(3.5),
        np.arange(6, dtype=np.uint8).reshape(1, 2, 3),
        np.arange(6, dtype=">f8"),  # big-endian input is sent little-endian
    ],
)
def test_array_roundtrip_keeps_dtype_shape_values(arr):
    body = P.pack({"a": arr})[4:]
    out = P.unpack(body)["a"]
    assert out.shape == arr.shape
    assert out.dtype == arr.dtype.newbyteorder("<") or (arr.dtype == bool and out.dtype == bool)
    np.testing.assert_array_equal(out, arr)
    out[...] = 0 if out.size else out  # decoded arrays are writable copies


def test_client_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, spkserve.server.client, spkserve.server.protocol; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_array_refuses_unsupported_dtypes_on_send():
    with pytest.raises(TypeError, match="complex128"):
        P.pack({"a": np.zeros(2, dtype=complex)})
    with pytest.raises(TypeError, match="cannot send"):
        P.pack({"a": object()})


def _ext(payload: bytes, code: int = P.ARRAY_EXT) -> bytes:
    return msgpack.packb({"a": msgpack.ExtType(code, payload)}, use_bin_type=True)


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"", "truncated"),
        (b"\x03<f8", "truncated"),
        (b"\x03<c8\x01" + struct.pack("<I", 1) + b"\0" * 8, "not allowed"),
        (b"\x03|O8\x01" + struct.pack("<I", 1) + b"\0" * 8, "not allowed"),
        (b"\x03<f8\x09" + b"\0" * 36, "dimensions"),
        (b"\x03<f8\x02" + struct.pack("<I", 2), "truncated shape"),
        (b"\x03<f8\x01" + struct.pack("<I", 3) + b"\0" * 16, "needs 24 bytes, got 16"),
        (b"\x03<f8\x01" + struct.pack("<I", 2**31) + b"\0" * 16, "needs"),
        (b"\x03\xff\xfe\x00\x01", "non-ASCII"),
    ],
)
def test_broken_array_extensions_are_bad_messages(payload, match):
    with pytest.raises(P.ProtocolError, match=match) as info:
        P.unpack(_ext(payload))
    assert info.value.code == P.BAD_MESSAGE


def test_unknown_extension_type_is_refused():
    with pytest.raises(P.ProtocolError, match="extension type 7"):
        P.unpack(_ext(b"xx", code=7))


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never-used msgpack byte
        msgpack.packb([1, 2, 3]),  # not a map
        msgpack.packb({"op": "health"})[:-2],  # truncated
        msgpack.packb({"op": "health"}) + b"\x00",  # trailing bytes
        msgpack.packb({1: "int key"}),  # non-string key
        b"\x91" * 100_000 + b"\x00",  # nested 100000 deep
        b"\xdb\xff\xff\xff\xff",  # str claiming 4 GB
    ],
)
def test_malformed_bodies_raise_protocol_error_only(body):
    with pytest.raises(P.ProtocolError) as info:
        P.unpack(body)
    assert info.value.code == P.BAD_MESSAGE


def test_frame_length_limits():
    assert P.frame_length(struct.pack(">I", 10), 100) == 10
    with pytest.raises(P.ProtocolError, match="exceeds the limit of 100") as info:
        P.frame_length(struct.pack(">I", 101), 100)
    assert info.value.code == P.TOO_LARGE
    with pytest.raises(P.ProtocolError, match="empty"):
        P.frame_length(struct.pack(">I", 0), 100)


def test_valid_compute_request_is_parsed_to_float64_structures():
    req = P.parse_request(_compute(timeout_s=2), LIMITS)
    assert req.op == "compute" and req.id == 1 and req.timeout_s == 2.0
    (s,) = req.structures
    assert s.positions.dtype == np.float64 and s.numbers.dtype == np.int64
    assert s.cell.shape == (3, 3) and not s.pbc.any()
    # plain lists are accepted too (clients without the array extension)
    lists = {"numbers": [1, 1], "positions": [[0, 0, 0], [0, 0, 0.74]], "cell": np.eye(3).tolist(), "pbc": True}
    req = P.parse_request(_compute(structures=[lists]), LIMITS)
    assert req.structures[0].pbc.all() and req.n_atoms == 2


@pytest.mark.parametrize(
    "msg, code, match",
    [
        ({"id": 1}, P.BAD_REQUEST, "no string field 'op'"),
        ({"op": "reboot"}, P.UNKNOWN_OP, "unknown op 'reboot'"),
        ({"op": "health", "v": 2}, P.BAD_REQUEST, "protocol version 2"),
        ({"op": "health", "id": True}, P.BAD_REQUEST, "'id'"),
        ({"op": "health", "id": [1]}, P.BAD_REQUEST, "'id'"),
        ({"op": "health", "extra": 1}, P.BAD_REQUEST, "does not take field"),
        ({"op": "auth"}, P.BAD_REQUEST, "token"),
        (_compute(structures=[]), P.BAD_REQUEST, "non-empty list"),
        (_compute(structures={"numbers": [1]}), P.BAD_REQUEST, "non-empty list"),
        (_compute(properties=[]), P.BAD_REQUEST, "properties"),
        (_compute(properties=["energy", 3]), P.BAD_REQUEST, "properties"),
        (_compute(timeout_s=-1), P.BAD_REQUEST, "timeout_s"),
        (_compute(timeout_s=True), P.BAD_REQUEST, "timeout_s"),
        (_compute(structures=[_structure(positions=np.zeros((2, 3)))]), P.BAD_REQUEST, r"shape \[2, 3\], expected \[3, 3\]"),
        (_compute(structures=[_structure(positions=np.zeros((3, 2)))]), P.BAD_REQUEST, "expected"),
        (_compute(structures=[_structure(positions=np.full((3, 3), np.nan))]), P.BAD_REQUEST, "NaN"),
        (_compute(structures=[_structure(positions=np.full((3, 3), np.inf))]), P.BAD_REQUEST, "NaN or infinite"),
        (_compute(structures=[_structure(numbers=np.array([8, 1, 0]))]), P.BAD_REQUEST, "1..118"),
        (_compute(structures=[_structure(numbers=np.array([8, 1, 119]))]), P.BAD_REQUEST, "1..118"),
        (_compute(structures=[_structure(numbers=np.array([8.0, 1, 1]))]), P.BAD_REQUEST, "integers"),
        (_compute(structures=[_structure(numbers=np.zeros(0, int), positions=np.zeros((0, 3)))]), P.BAD_REQUEST, "non-empty"),
        (_compute(structures=[_structure(positions="abc")]), P.BAD_REQUEST, "expected an array"),
        (_compute(structures=[_structure(positions=[[0, 0], [0, 0, 0], [1]])]), P.BAD_REQUEST, "positions"),
        (_compute(structures=[_structure(cell=np.eye(2))]), P.BAD_REQUEST, "cell"),
        (_compute(structures=[_structure(cell=np.zeros((3, 3)), pbc=True)]), P.BAD_REQUEST, "cell vector 0 is zero"),
        (_compute(structures=[_structure(cell=[[1, 0, 0], [2, 0, 0], [0, 0, 1]], pbc=True)]), P.BAD_REQUEST, "singular"),
        (_compute(structures=[_structure(pbc=[True, False])]), P.BAD_REQUEST, "pbc"),
        (_compute(structures=[_structure(charge=1)]), P.BAD_REQUEST, "unknown field"),
        (_compute(structures=[{"numbers": [1]}]), P.BAD_REQUEST, "needs 'numbers' and 'positions'"),
        (_compute(structures=[1]), P.BAD_REQUEST, "expected a map"),
    ],
)
def test_invalid_requests_name_the_problem(msg, code, match):
    with pytest.raises(P.ProtocolError, match=match) as info:
        P.parse_request(msg, LIMITS)
    assert info.value.code == code


def test_size_limits_are_enforced():
    small = P.Limits(max_atoms_per_structure=2, max_structures_per_request=2, max_atoms_per_request=4)
    with pytest.raises(P.ProtocolError, match="3 atoms exceed the limit of 2") as info:
        P.parse_request(_compute(), small)
    assert info.value.code == P.TOO_LARGE
    two = _structure(n=2, numbers=np.array([1, 1]))
    with pytest.raises(P.ProtocolError, match="3 structures exceed"):
        P.parse_request(_compute(structures=[two] * 3), small)
    with pytest.raises(P.ProtocolError, match="limit of 3 atoms"):
        P.parse_request(_compute(structures=[two, two]), P.Limits(max_atoms_per_request=3))
    with pytest.raises(ValueError, match="positive integer"):
        P.Limits(max_message_bytes=0)


def test_unsupported_property_is_named():
    with pytest.raises(P.ProtocolError, match=r"\['dipole_moment'\] are not available") as info:
        P.check_properties(["energy", "dipole_moment"], ("energy", "forces"))
    assert info.value.code == P.UNSUPPORTED_PROPERTY


@settings(max_examples=120, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_other_errors(body):
    try:
        msg = P.unpack(body)
        P.parse_request(msg, LIMITS)
    except P.ProtocolError:
        pass


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=5) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=120, deadline=None)
@given(
    st.fixed_dictionaries(
        {"op": st.sampled_from(list(P.OPS) + ["x"])},
        optional={"id": json_like, "structures": json_like, "properties": json_like, "timeout_s": json_like,
                  "token": json_like},
    )
)
def test_random_requests_are_validated_or_refused(msg):
    try:
        P.parse_request(P.unpack(P.pack(msg)[4:]), LIMITS)
    except P.ProtocolError:
        pass
