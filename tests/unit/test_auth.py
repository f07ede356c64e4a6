"""Links that can cross hosts (tcp) authenticate peers with the cluster's
secret: a real node agent serves two tcp links; a stranger with the wrong
secret is refused and its link closed, a peer with the right one gets
answers, and a peer that skips the handshake gets nothing."""

import os
import socket
import threading
import time

import pytest

from harness._native.transport import Link, Op
from harness.errors import HarnessError, LinkClosed, RemoteError
from harness.nodes.auth import AuthError, Challenge, authenticate
from harness.nodes.cluster import open_cluster
from harness.nodes.runners import ProcessRunner
from harness.nodes.spec import LinkEnd
from harness.topology import Node

SECRET = os.urandom(32)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname(), timeout=5.0)
        b, _ = srv.accept()
    return a, b


@pytest.fixture
def node(tmp_path):
    """An mnode agent process serving three tcp links that require auth."""
    pairs = [_tcp_pair() for _ in range(3)]
    runner = ProcessRunner(Node("m", "mnode", 2, "process"), tmp_path, tmp_path, tmp_path)
    peers = ["stranger", "friend", "rude"]
    links = [LinkEnd(p, "fd", True, fd=b.fileno(), auth=True)
             for p, (_, b) in zip(peers, pairs, strict=True)]
    control = runner.start("t", links, SECRET.hex())
    for _, b in pairs:
        b.close()
    deadline = time.monotonic() + 30
    while True:
        try:
            control.call(Op.HELLO, timeout=0.5)
            break
        except HarnessError:
            assert time.monotonic() < deadline, runner.log_path.read_text()
    clients = {p: Link.from_fd(a.fileno(), name=p) for p, (a, _) in zip(peers, pairs,
                                                                      strict=True)}
    yield clients, runner
    control.call(Op.SHUTDOWN, timeout=5)
    runner.proc.wait(10)


def test_a_stranger_is_refused_and_a_friend_is_answered(node):
    clients, runner = node
    stranger = clients["stranger"]  # follows the protocol, without the secret
    stranger.call(Op.HELLO, b"AUTH1" + os.urandom(16), timeout=2.0)
    with pytest.raises(RemoteError, match="does not know this cluster's secret"):
        stranger.call(Op.HELLO, b"AUTH2" + os.urandom(32), timeout=2.0)
    with pytest.raises((LinkClosed, RemoteError)):  # the node closed that link
        clients["stranger"].call(Op.PING, timeout=2.0)
    authenticate(clients["friend"], SECRET, "friend")
    assert clients["friend"].call(Op.PING, timeout=2.0) == b""
    with pytest.raises(RemoteError, match="before authenticating"):
        clients["rude"].call(Op.STATS, timeout=2.0)
    assert "refused the peer on the link from stranger" in runner.log_path.read_text()


def test_a_server_that_does_not_know_the_secret_is_not_trusted():
    impostor = Challenge(b"wrong secret")
    a, b = socket.socketpair()
    client = Link.from_fd(a.fileno())
    server = Link.from_fd(b.fileno())

    def serve():
        hdr, payload = server.recv(timeout=5)
        server.reply(hdr, impostor.answer(hdr, payload))

    threading.Thread(target=serve, daemon=True).start()
    with pytest.raises(AuthError, match="does not know this cluster's secret"):
        authenticate(client, SECRET, "impostor")


def test_a_cluster_s_tcp_links_authenticate_and_work():
    from harness import topology

    topo = topology.parse({"name": "tcp3", "nodes": [
        {"name": "pnode0", "role": "pnode"}, {"name": "mnode0", "role": "mnode"}],
        "links": [{"between": ["pnode0", "mnode0"], "kind": "tcp"}]}, "<test>")
    with open_cluster(topo) as c:
        assert set(c.nodes["pnode0"].peers) == {"mnode0"}  # answered, so authenticated
        spec = c.run_dir / "pnode0.json"
        assert spec.stat().st_mode & 0o777 == 0o600 and c.secret in spec.read_text()
