"""Stream links over real sockets, and RPC: matching, timeouts, late
replies, error replies, the link model."""

import socket
import threading
import time

import pytest

from harness._native import transport as t
from harness.errors import LinkClosed, ProtocolError, RemoteError, TransportTimeout


@pytest.fixture(params=["unix", "tcp"])
def sockets(request):
    if request.param == "unix":
        a, b = socket.socketpair()
    else:
        with socket.create_server(("127.0.0.1", 0)) as srv:
            a = socket.create_connection(srv.getsockname())
            b, _ = srv.accept()
    with a, b:
        yield a, b


def test_frames_cross_a_socket(sockets):
    a, b = sockets
    la, lb = t.Link.from_fd(a.fileno()), t.Link.from_fd(b.fileno())
    sizes = (0, 5, 70_000, t.MAX_PAYLOAD)  # larger than a socket buffer: needs a reader
    sender = threading.Thread(target=lambda: [la.send(t.Op.ECHO, bytes(n), req_id=n)
                                              for n in sizes])
    sender.start()
    for size in sizes:
        hdr, data = lb.recv(timeout=5)
        assert hdr.req_id == size and data == bytes(size)
    sender.join()


@pytest.mark.parametrize("garbage", [
    b"NOPE" + bytes(28),
    t.encode_frame(t.Op.ECHO, b"abc")[:-1] + b"X",
    t.encode_frame(t.Op.ECHO)[:6] + b"\x77\x77" + t.encode_frame(t.Op.ECHO)[8:],
    t.encode_frame(t.Op.ECHO)[:24] + b"\xff\xff\xff\x7f" + bytes(4),
])
def test_malformed_frame_closes_the_stream(sockets, garbage):
    a, b = sockets
    lb = t.Link.from_fd(b.fileno())
    a.sendall(garbage)
    with pytest.raises(ProtocolError):
        lb.recv(timeout=2)
    assert lb.closed
    a.settimeout(2)
    assert a.recv(10) == b""  # the peer sees the connection closed


def test_truncated_frame_at_eof_is_a_protocol_error(sockets):
    a, b = sockets
    lb = t.Link.from_fd(b.fileno())
    a.sendall(t.encode_frame(t.Op.ECHO, b"0123456789")[:-3])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError):
        lb.recv(timeout=2)


def test_clean_eof_is_link_closed(sockets):
    a, b = sockets
    lb = t.Link.from_fd(b.fileno())
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(LinkClosed):
        lb.recv(timeout=2)


def test_rpc_timeout_then_late_reply_is_dropped(sockets):
    a, b = sockets
    client, server = t.Link.from_fd(a.fileno()), t.Link.from_fd(b.fileno())
    with pytest.raises(TransportTimeout):
        client.call(t.Op.PING, b"first", timeout=0.1)
    hdr1, _ = server.recv(timeout=1)
    server.reply(hdr1, b"late answer to first")

    def answer_second():
        hdr2, payload = server.recv(timeout=5)
        server.reply(hdr2, b"answer to " + payload)

    th = threading.Thread(target=answer_second)
    th.start()
    assert client.call(t.Op.PING, b"second", timeout=5) == b"answer to second"
    th.join()
    assert client.stats()["stale_replies"] == 1


def test_error_reply_raises_remote_error(sockets):
    a, b = sockets
    client, server = t.Link.from_fd(a.fileno()), t.Link.from_fd(b.fileno())

    def fail():
        hdr, _ = server.recv(timeout=5)
        server.reply(hdr, b"no such table", error=True)

    th = threading.Thread(target=fail)
    th.start()
    with pytest.raises(RemoteError, match="no such table"):
        client.call(t.Op.SQL, b"select", timeout=5)
    th.join()


def test_request_where_a_reply_was_due_is_a_protocol_error(sockets):
    a, b = sockets
    client = t.Link.from_fd(a.fileno())
    b.sendall(t.encode_frame(t.Op.PING, req_id=1))  # a request, not a reply
    with pytest.raises(ProtocolError):
        client.call(t.Op.PING, timeout=2)


def test_link_model_adds_latency(tmp_path):
    path = str(tmp_path / "m.shm")
    t.create_shm_file(path, 1 << 20)
    a, b = t.Link.shm_open(path, 0), t.Link.shm_open(path, 1)
    a.set_model(latency_ns=2_000_000)  # 2 ms one way
    t0 = time.monotonic()
    for _ in range(5):
        a.send(t.Op.ECHO, b"x")
        b.recv(timeout=1)
    assert time.monotonic() - t0 >= 5 * 0.002


def test_link_model_caps_bandwidth(tmp_path):
    path = str(tmp_path / "m.shm")
    t.create_shm_file(path, 1 << 22)
    a, b = t.Link.shm_open(path, 0), t.Link.shm_open(path, 1)
    a.set_model(bytes_per_sec=10_000_000)  # 10 MB/s: 64 KiB takes 6.6 ms
    t0 = time.monotonic()
    for _ in range(8):
        a.send(t.Op.ECHO, bytes(65536 - 32))
        b.recv(timeout=1)
    assert time.monotonic() - t0 >= 8 * 65536 / 10_000_000


def test_timeout_must_not_be_negative(sockets):
    a, _ = sockets
    with pytest.raises(ValueError, match="timeout"):
        t.Link.from_fd(a.fileno()).recv(timeout=-1)


@pytest.mark.parametrize("cut", [1, 20, 32, 5000])  # in the header, at its end, in the body
def test_a_frame_that_straddles_the_receive_deadline_is_finished(sockets, cut):
    """A frame whose first bytes arrive just before a receive's deadline is
    read to its end under a deadline of its own: the agent polls with short
    timeouts, and a frame cut there would lose the stream and close the link."""
    a, b = sockets
    lb = t.Link.from_fd(b.fileno())
    body = bytes(range(256)) * 400  # 100 KiB: more than the link's read buffer
    frame = t.encode_frame(t.Op.ECHO, body, req_id=7)
    a.sendall(frame[:cut])

    def rest():
        time.sleep(0.3)  # well past the receive's 0.1 s
        a.sendall(frame[cut:cut + 7000])
        time.sleep(0.3)
        a.sendall(frame[cut + 7000:] + t.encode_frame(t.Op.PING, b"next", req_id=8))

    th = threading.Thread(target=rest)
    th.start()
    try:
        hdr, data = lb.recv(timeout=0.1)
    finally:
        th.join()
    assert (hdr.req_id, data) == (7, body) and not lb.closed
    assert lb.recv(timeout=1)[1] == b"next"  # the stream kept its framing


def test_a_receive_with_nothing_started_still_times_out_on_time(sockets):
    _, b = sockets
    lb = t.Link.from_fd(b.fileno())
    t0 = time.monotonic()
    with pytest.raises(TransportTimeout):
        lb.recv(timeout=0.1)
    assert time.monotonic() - t0 < 1.0 and not lb.closed
