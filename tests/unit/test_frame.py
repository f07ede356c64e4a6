"""The frame codec: round trips and every kind of malformed frame."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness._native import transport as t
from harness.errors import ProtocolError

OPS = st.sampled_from(list(t.Op))


def test_crc32c_known_vector():
    assert t.crc32c(b"123456789") == 0xE3069283
    assert t.crc32c(b"") == 0


def test_crc32c_is_incremental():
    assert t.crc32c(b"6789", t.crc32c(b"12345")) == t.crc32c(b"123456789")


@given(op=OPS, payload=st.binary(max_size=5000), src=st.integers(0, 2**32 - 1),
       flags=st.integers(0, 7), req_id=st.integers(0, 2**64 - 1))
def test_round_trip(op, payload, src, flags, req_id):
    raw = t.encode_frame(op, payload, src=src, flags=flags, req_id=req_id)
    hdr, body, used = t.decode_frame(raw + b"trailing")
    assert (hdr.opcode, hdr.src, hdr.flags, hdr.req_id, hdr.length) == (
        op, src, flags, req_id, len(payload))
    assert body == payload and used == len(raw)


def test_header_layout_is_the_documented_one():
    raw = t.encode_frame(t.Op.PING, b"xy", src=7, flags=1, req_id=42)
    magic, ver, op, src, flags, req, length, _crc = struct.unpack("<IHHIIQII", raw[:32])
    assert (magic, ver, op, src, flags, req, length) == (0x31464844, 1, 2, 7, 1, 42, 2)


@given(st.binary(max_size=200), st.integers(0, 199))
def test_truncated_frame_is_incomplete_not_an_error(payload, cut):
    raw = t.encode_frame(t.Op.ECHO, payload)
    cut = min(cut, len(raw) - 1)
    assert t.decode_frame(raw[:cut]) is None


def _corrupt(raw: bytes, offset: int, value: bytes) -> bytes:
    return raw[:offset] + value + raw[offset + len(value):]


@pytest.mark.parametrize("what,offset,value", [
    ("bad magic", 0, b"XXXX"),
    ("bad version", 4, struct.pack("<H", 9)),
    ("unknown opcode", 6, struct.pack("<H", 0x7777)),
    ("huge length", 24, struct.pack("<I", 0xFFFFFFF0)),
    ("length over the limit", 24, struct.pack("<I", t.MAX_PAYLOAD + 1)),
    ("bad checksum", 28, b"\0\0\0\0"),
    ("flipped payload bit", 33, b"\x01"),
])
def test_malformed_frame_is_rejected(what, offset, value):
    raw = _corrupt(t.encode_frame(t.Op.ECHO, b"hello world" * 4), offset, value)
    with pytest.raises(ProtocolError):
        t.decode_frame(raw)


def test_encode_refuses_unknown_opcode_and_oversize():
    with pytest.raises(ValueError):
        t.encode_frame(0x7777)
    with pytest.raises(Exception, match="too big"):
        t.encode_frame(t.Op.ECHO, bytes(t.MAX_PAYLOAD + 1))
