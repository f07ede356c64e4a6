"""Shared-memory rings: wraparound, full and empty, two real processes,
closing, a dead peer, and records that lie about their length."""

import os
import queue
import random
import signal
import struct
import threading
import time

import pytest

from harness._native import transport as t
from harness.errors import LinkClosed, ProtocolError, TransportTimeout

from .helpers import python_child

SMALL = 64 << 10  # rings of 16 KiB each: wraps quickly


@pytest.fixture
def pair(tmp_path):
    path = str(tmp_path / "ring.shm")
    t.create_shm_file(path, SMALL)
    a, b = t.Link.shm_open(path, 0), t.Link.shm_open(path, 1)
    yield a, b, path
    a.close()
    b.close()


def test_round_trip_both_ways(pair):
    a, b, _ = pair
    a.send(t.Op.ECHO, b"to b", req_id=1)
    hdr, data = b.recv(timeout=1)
    assert (hdr.opcode, hdr.req_id, data) == (t.Op.ECHO, 1, b"to b")
    b.send(t.Op.PING, b"to a")
    assert a.recv(timeout=1)[1] == b"to a"


def test_wraparound_keeps_every_byte_in_order(pair):
    a, b, _ = pair
    rng = random.Random(7)
    sent = []
    for i in range(3000):  # ~10 MiB through a 16 KiB ring: hundreds of wraps
        msg = rng.randbytes(rng.randint(0, 7000))
        a.send(t.Op.ECHO, msg, req_id=i)
        sent.append(msg)
        hdr, got = b.recv(timeout=1)
        assert hdr.req_id == i and got == msg
    assert a.stats()["frames_sent"] == 3000 and b.stats()["frames_recv"] == 3000


def test_bursts_and_catch_ups_keep_every_byte_in_order(pair):
    """Records written while the consumer is behind (natural wraps) and
    after it caught up (the ring starts over), mixed."""
    a, b, _ = pair
    rng = random.Random(11)
    n = 0
    for _ in range(1500):
        burst = [rng.randbytes(rng.choice([rng.randint(0, 200), rng.randint(1000, 5000)]))
                 for _ in range(rng.randint(1, 3))]
        for j, msg in enumerate(burst):
            a.send(t.Op.ECHO, msg, req_id=n + j)
        for j, msg in enumerate(burst):
            hdr, got = b.recv(timeout=1)
            assert (hdr.req_id, got) == (n + j, msg)
        n += len(burst)


TAIL0 = 4160  # shm.c's layout: ring 0's control at 4096, its tail a line on


def word_at(path: str, off: int) -> int:
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack("<I", f.read(4))[0]


def test_a_ring_its_consumer_emptied_starts_over_at_its_beginning(pair):
    """Lines both ends touched a moment ago move between cores faster than
    lines a lap away: a sender that finds its ring emptied and its consumer
    waiting writes at the ring's start again (a WRAP where it was), so a
    ping-pong keeps using the same lines. A consumer busy elsewhere keeps
    the whole ring: the sender writes on after its last record."""
    a, b, path = pair
    data0 = SMALL // 2  # ring 0's data; its consumer's index is at TAIL0
    got: queue.Queue = queue.Queue()

    def receive(n: int) -> threading.Thread:
        th = threading.Thread(target=lambda: [got.put(b.recv(timeout=5)) for _ in range(n)])
        th.start()
        time.sleep(0.2)  # waiting in recv by now
        return th

    a.send(t.Op.ECHO, bytes(4096), req_id=0)
    rec = word_at(path, data0)
    span = (4 + rec + 7) & ~7
    assert b.recv(timeout=1)[0].req_id == 0
    for i in range(1, 4):
        th = receive(1)
        a.send(t.Op.ECHO, bytes([i]) * 4096, req_id=i)
        th.join()
        hdr, data = got.get_nowait()
        assert (hdr.req_id, data) == (i, bytes([i]) * 4096)
        assert word_at(path, TAIL0) % (SMALL // 4) == span  # the record was at the start
    a.send(t.Op.ECHO, bytes(4096), req_id=4)  # nobody waits: right after the last
    assert word_at(path, data0 + span) == rec
    assert b.recv(timeout=1)[0].req_id == 4
    assert word_at(path, TAIL0) % (SMALL // 4) == 2 * span


def test_full_ring_times_out_then_drains(pair):
    a, b, _ = pair
    n = 0
    with pytest.raises(TransportTimeout):
        while True:
            a.send(t.Op.ECHO, bytes(1000), req_id=n, timeout=0.05)
            n += 1
    assert 10 < n < 17  # 16 KiB of ~1 KiB records
    for i in range(n):
        assert b.recv(timeout=1)[0].req_id == i
    a.send(t.Op.ECHO, b"room again", timeout=0.05)
    assert b.recv(timeout=1)[1] == b"room again"


def test_empty_ring_times_out_quickly(pair):
    _, b, _ = pair
    t0 = time.monotonic()
    with pytest.raises(TransportTimeout):
        b.recv(timeout=0.1)
    assert time.monotonic() - t0 < 2.0


def test_idle_receiver_sleeps_instead_of_spinning(pair):
    _, b, _ = pair
    cpu0 = time.process_time()
    with pytest.raises(TransportTimeout):
        b.recv(timeout=0.5)
    assert time.process_time() - cpu0 < 0.25  # spins ~50 us, then blocks in a futex
    assert b.stats()["sleeps"] >= 1


def test_payload_over_the_ring_limit_is_refused(pair):
    a, _, _ = pair
    with pytest.raises(Exception, match="too big"):
        a.send(t.Op.ECHO, bytes(a.max_payload + 1))


def test_close_wakes_the_peer(pair):
    a, b, _ = pair
    a.close()
    with pytest.raises(LinkClosed):
        b.recv(timeout=5)


def test_frames_sent_before_close_are_still_delivered(pair):
    a, b, _ = pair
    a.send(t.Op.ECHO, b"last words")
    a.close()
    assert b.recv(timeout=1)[1] == b"last words"
    with pytest.raises(LinkClosed):
        b.recv(timeout=1)


@pytest.mark.parametrize("raw", [
    b"\x01\x02\x03",                                   # shorter than a header
    b"X" * 40,                                          # bad magic
    t.encode_frame(t.Op.ECHO, b"abc")[:-1] + b"d",      # bad checksum
    t.encode_frame(t.Op.ECHO, b"abcdef")[:34],          # header says 6, record has 2
])
def test_malformed_record_closes_the_link(pair, raw):
    a, b, _ = pair
    a.send_raw(raw)
    with pytest.raises(ProtocolError):
        b.recv(timeout=1)
    assert b.closed and b.stats()["proto_errors"] == 1
    with pytest.raises(LinkClosed):
        a.send(t.Op.ECHO, b"x", timeout=0.1)


def test_corrupt_length_word_is_caught(tmp_path):
    """A peer that scribbles a huge length into the ring gets ProtocolError,
    not an out-of-bounds read."""
    path = str(tmp_path / "ring.shm")
    t.create_shm_file(path, SMALL)
    b = t.Link.shm_open(path, 1)
    with open(path, "r+b") as f:  # ring 0 data starts at half the file
        f.seek(SMALL // 2)
        f.write(struct.pack("<I", 0x7FFFFFF0))
    with pytest.raises(ProtocolError):
        b.recv(timeout=1)


def test_bad_file_is_rejected(tmp_path):
    path = tmp_path / "junk.shm"
    path.write_bytes(os.urandom(SMALL))
    with pytest.raises(ProtocolError):
        t.Link.shm_open(str(path), 1)
    with pytest.raises(ValueError):
        t.create_shm_file(str(tmp_path / "odd.shm"), 100_000)  # not a power of two
    with pytest.raises(Exception, match="File exists"):
        t.create_shm_file(str(path), SMALL)


def test_two_real_processes(tmp_path):
    path = str(tmp_path / "ring.shm")
    t.create_shm_file(path, 1 << 20)
    a = t.Link.shm_open(path, 0)
    child = python_child(f"""
        from harness._native import transport as t
        t.Link.shm_open({path!r}, 1).echo_serve()
    """)
    try:
        for size in (0, 1, 64, 4096, 100_000):
            payload = os.urandom(size)
            assert a.call(t.Op.ECHO, payload, timeout=10) == payload
        a.call(t.Op.SHUTDOWN, timeout=5)
        assert child.wait(10) == 0
    finally:
        child.kill()


def test_dead_peer_is_noticed(tmp_path):
    """A receiver blocked on a peer that was SIGKILLed returns LinkClosed."""
    path = str(tmp_path / "ring.shm")
    t.create_shm_file(path, SMALL)
    a = t.Link.shm_open(path, 0)
    child = python_child(f"""
        import time
        from harness._native import transport as t
        l = t.Link.shm_open({path!r}, 1)
        print("open", flush=True)
        time.sleep(60)
    """)
    assert child.stdout.readline() == b"open\n"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    t0 = time.monotonic()
    with pytest.raises(LinkClosed):
        a.call(t.Op.PING, timeout=10)
    assert time.monotonic() - t0 < 2.0


def test_a_reset_channel_closes_old_ends_and_serves_new_ones(tmp_path):
    """What a node restart does to its channels: ends opened before the reset
    see their peer gone and report stale; ends opened after work."""
    path = str(tmp_path / "c.shm")
    t.create_shm_file(path, 1 << 16)
    a, b = t.Link.shm_open(path, 0), t.Link.shm_open(path, 1)
    a.send(t.Op.PING, b"before")
    t.reset_shm_file(path)
    assert a.stale and b.stale
    with pytest.raises(LinkClosed):
        b.recv(timeout=1.0)  # the frame sent before the reset is gone with it
    a2, b2 = t.Link.shm_open(path, 0), t.Link.shm_open(path, 1)
    del a, b  # dropped, not closed: the flags now belong to the new ends
    assert not a2.stale
    a2.send(t.Op.PING, b"after")
    assert b2.recv(timeout=1.0)[1] == b"after"
