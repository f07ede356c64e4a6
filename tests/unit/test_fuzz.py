"""Bounded-time fuzzing of the frame decoder, in memory and on a live link:
garbage must give a ProtocolError (or an incomplete frame), never a crash,
a hang or a frame that was not sent."""

import os
import random
import socket
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from harness._native import transport as t
from harness.errors import LinkClosed, ProtocolError

BUDGET_S = float(os.environ.get("HARNESS_FUZZ_SECONDS", "3"))


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_on_random_bytes(data):
    try:
        r = t.decode_frame(data)
    except ProtocolError:
        return
    if r is not None:  # only a real frame decodes; re-encoding gives it back
        hdr, payload, used = r
        assert data[:used] == t.encode_frame(hdr.opcode, payload, src=hdr.src,
                                              flags=hdr.flags, req_id=hdr.req_id)


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.6 and b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif choice < 0.8:
            del b[rng.randrange(len(b) + 1):]
        else:
            b[rng.randrange(len(b) + 1):0] = rng.randbytes(rng.randint(1, 16))
    return bytes(b)


def test_mutated_frames_for_a_bounded_time():
    rng = random.Random(1234)
    seeds = [t.encode_frame(op, rng.randbytes(rng.randint(0, 600)), req_id=rng.getrandbits(64))
             for op in t.Op]
    deadline, n, rejected = time.monotonic() + BUDGET_S, 0, 0
    while time.monotonic() < deadline:
        data = _mutate(rng, rng.choice(seeds))
        try:
            r = t.decode_frame(data)
        except ProtocolError:
            rejected += 1
        else:
            if r is not None:
                hdr, payload, used = r
                assert data[:used] == t.encode_frame(hdr.opcode, payload, src=hdr.src,
                                                      flags=hdr.flags, req_id=hdr.req_id)
        n += 1
    assert n > 1000 and rejected > n // 2


def test_garbage_on_a_stream_link_closes_it_without_hanging():
    rng = random.Random(99)
    deadline, n = time.monotonic() + BUDGET_S / 2, 0
    while time.monotonic() < deadline:
        data = _mutate(rng, t.encode_frame(t.Op.ECHO, rng.randbytes(64)))
        a, b = socket.socketpair()
        with a, b:
            rx = t.Link.from_fd(b.fileno())
            a.sendall(data)
            a.shutdown(socket.SHUT_WR)  # EOF: a cut frame must not look like a slow one
            try:
                hdr, payload = rx.recv(timeout=2.0)
            except ProtocolError:
                assert rx.closed
            except LinkClosed:
                assert data == b""
            else:
                assert data.startswith(t.encode_frame(hdr.opcode, payload, flags=hdr.flags,
                                                      req_id=hdr.req_id, src=hdr.src))
        n += 1
    assert n > 50
