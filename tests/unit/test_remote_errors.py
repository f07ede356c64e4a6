"""One remote-error convention: an exception a node agent's handler raises
arrives at its caller as the same class, with its errno; an unknown class
arrives as a RemoteError naming it."""

import errno
import os
import socket
import threading

import pytest

from harness import remote_errors
from harness._native.transport import Link, Op
from harness.dbos.remote import RemoteDBOS
from harness.errors import (
    DBOSError,
    FSError,
    HarnessError,
    NotSupported,
    RemoteError,
    TransportError,
)
from harness.nodes.agent import Agent, fit_reply
from harness.nodes.spec import AgentSpec, LinkEnd


@pytest.fixture
def serve(tmp_path):
    """An agent in this process, on a socket pair: serve(role) -> (agent, the
    caller's end of its control link)."""
    started = []

    def start(role: str = "pnode"):
        a, b = socket.socketpair()
        end = LinkEnd("controller", "fd", True, fd=os.dup(b.fileno()))
        b.close()
        agent = Agent(AgentSpec("node9", role, 9, "t", "process", end,
                                data_dir=str(tmp_path)))
        thread = threading.Thread(target=agent.serve, args=("controller", agent.control, True),
                                  daemon=True)
        thread.start()
        caller = Link.from_fd(a.fileno(), name="node9 control")
        a.close()
        started.append((agent, caller, thread))
        return agent, caller

    yield start
    for agent, caller, thread in started:
        agent.stop.set()
        caller.close()
        thread.join(5)
        agent.role.close()


def raising(exc: BaseException):
    def handler(_payload: bytes) -> bytes:
        raise exc

    return handler


def test_an_fs_error_arrives_as_an_fs_error_with_its_errno(serve):
    agent, caller = serve()
    agent.role.handlers[Op.SQL] = raising(FSError(errno.ENOENT, "/no/such"))
    with pytest.raises(FSError) as e:
        remote_errors.call(caller, Op.SQL, b"")
    assert e.value.errno == errno.ENOENT and e.value.filename == "/no/such"
    assert isinstance(e.value, DBOSError) and str(e.value) == str(FSError(errno.ENOENT, "/no/such"))


def test_not_supported_arrives_as_not_supported(serve):
    agent, caller = serve()
    agent.role.handlers[Op.SQL] = raising(NotSupported("node9 cannot do that here"))
    with pytest.raises(NotSupported, match=r"^node9 cannot do that here$"):
        remote_errors.call(caller, Op.SQL, b"")


def test_an_unknown_type_is_a_remote_error_naming_it(serve):
    class Weird(Exception):
        pass

    agent, caller = serve()
    agent.role.handlers[Op.SQL] = raising(Weird("it broke"))
    with pytest.raises(RemoteError, match=r"^node9 control: Weird: it broke$") as e:
        remote_errors.call(caller, Op.SQL, b"")
    assert e.value.remote_type == "Weird"


def test_a_remote_transport_error_is_not_the_callers_link_failing(serve):
    agent, caller = serve()
    agent.role.handlers[Op.SQL] = raising(TransportError("peer: broken pipe", errno.EPIPE))
    with pytest.raises(RemoteError, match="TransportError: peer: broken pipe") as e:
        remote_errors.call(caller, Op.SQL, b"")
    assert (e.value.remote_type, e.value.errno) == ("TransportError", errno.EPIPE)
    assert caller.call(Op.PING) == b""  # the link itself is fine


def test_a_snode_fs_error_keeps_its_errno_through_remote_dbos(serve):
    _, caller = serve("snode")
    fs = RemoteDBOS(lambda p: remote_errors.call(caller, Op.SQL, p)).fs
    fs.create("/f")
    with pytest.raises(FSError) as e:
        fs.create("/f")
    assert e.value.errno == errno.EEXIST
    with pytest.raises(FSError) as e:
        fs.read("/nope")
    assert e.value.errno == errno.ENOENT


def test_a_plain_text_error_reply_stays_a_remote_error():
    a, b = socket.socketpair()
    caller, server = Link.from_fd(a.fileno(), name="peer"), Link.from_fd(b.fileno())
    a.close()
    b.close()

    def answer():
        hdr, _ = server.recv(timeout=5)
        server.reply(hdr, b"replaced", error=True)

    t = threading.Thread(target=answer)
    t.start()
    with pytest.raises(RemoteError, match=r"^peer: replaced$"):
        remote_errors.call(caller, Op.PING)
    t.join(5)
    caller.close()
    server.close()


def test_an_envelope_fits_the_link_and_says_it_was_cut():
    out = remote_errors.encode(HarnessError("E" * 1000), 150)
    assert len(out) <= 150
    exc = remote_errors.decode(out, "peer")
    assert type(exc) is HarnessError and str(exc).endswith("cut at the link's limit]")
    assert remote_errors.decode(b"not an envelope", "peer") is None


def test_fit_reply_never_cuts_an_answer():
    assert fit_reply(b"x" * 10, 10) == (b"x" * 10, False)
    out, err = fit_reply(b"{" * 1000, 200)
    assert err and len(out) <= 200
    exc = remote_errors.decode(out, "peer")
    assert type(exc) is RemoteError
    assert str(exc).startswith("the reply is 1000 bytes, over this link's limit of 200")
