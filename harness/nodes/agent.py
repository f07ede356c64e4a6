"""The node agent: opens its links, serves requests, prints READY.

Run as `python -m harness.nodes.agent SPEC.json`, on the host or in a guest.
It cannot tell which except through the links it is given. Each link it
serves gets a thread; a malformed frame closes that link only, and the node
keeps serving the others."""

from __future__ import annotations

import os
import sys
import threading
import time

from harness import remote_errors
from harness._native.transport import Link, Op
from harness.errors import (
    HarnessError,
    LinkClosed,
    ProtocolError,
    RemoteError,
    TransportError,
    TransportTimeout,
)
from harness.nodes.spec import AgentSpec, LinkEnd

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~60 ms in a guest
if TYPE_CHECKING:
    from harness.nodes.role import Role

READY = "DH-READY"
WAITING = "DH-WAITING"  # a snapshot's agent, imported, before its spec
HOST_ROOT = "/run/dh/host"  # a restored guest's view of the host root (its init mounts it)
FRESH = "/run/dh/fresh"  # init made the restored guest fresh and mounted its disk
GUEST_RUN_DIR = "/run/dh/run"
FRESH_TIMEOUT = 60.0
SPEC_PROMPT = "DH-SPEC?"  # a guest on another host, ready for its spec on the console
CONSOLE = "/dev/ttyS0"
SPEC_TIMEOUT = 120.0


def log(msg: str) -> None:
    """Agent logs go to stderr: the node's log file, or a guest's console.
    (Not the logging module: tests/unit/test_agent_startup.py keeps it out.)"""
    print(f"dh-agent: {msg}", file=sys.stderr, flush=True)


def _ivshmem(end: LinkEnd) -> Link:
    """Maps an ivshmem device's BAR2 (no driver needed: sysfs can map it)."""
    import mmap

    dev = f"/sys/bus/pci/devices/{end.path}"
    if not os.path.exists(f"{dev}/resource2"):
        raise HarnessError(f"no ivshmem device at {end.path} for the link to {end.peer}")
    with open(f"{dev}/enable", "w") as f:  # turns on memory decoding
        f.write("1")
    fd = os.open(f"{dev}/resource2", os.O_RDWR | os.O_SYNC)
    try:
        mem = mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return Link.shm_attach(memoryview(mem), end.side, name=end.peer)


def fit_reply(out: bytes, limit: int) -> tuple[bytes, bool]:
    """A reply the link can carry, and whether it is an error. One over its
    payload limit is never cut (a cut JSON answer only fails to parse far
    away): it becomes an error that names both sizes."""
    if len(out) <= limit:
        return out, False
    return remote_errors.encode(RemoteError(
        f"the reply is {len(out)} bytes, over this link's limit of {limit} bytes; "
        "ask for less at a time (read a file in parts, LIMIT a query)"), limit), True


def open_link(end: LinkEnd, nid: int) -> Link:
    if end.attach == "ivshmem":
        link = _ivshmem(end)
    elif end.attach == "shm":
        link = Link.shm_open(end.path, end.side, name=end.peer)
    elif end.attach == "fd":
        link = Link.from_fd(end.fd, name=end.peer)
        os.close(end.fd)  # the link holds its own duplicate
    elif end.attach == "dev":  # a virtio-serial port, in a guest
        fd = os.open(end.path, os.O_RDWR | os.O_CLOEXEC)
        link = Link.from_fd(fd, name=end.peer)
        os.close(fd)
    else:
        raise HarnessError(f"unknown link attachment {end.attach!r} for peer {end.peer}")
    link.set_src(nid)
    if end.latency_ns or end.bytes_per_sec:
        link.set_model(end.latency_ns, end.bytes_per_sec)
    return link


def role_class(name: str) -> type[Role]:
    """The class for a role, imported only when a node takes that role (a
    guest pays for every import)."""
    if name == "pnode":
        from harness.nodes.pnode import PNode

        return PNode
    if name == "snode":
        from harness.nodes.snode import SNode

        return SNode
    if name == "mnode":
        from harness.nodes.mnode import MNode

        return MNode
    raise HarnessError(f"unknown role {name!r}")


def _read_exact(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise HarnessError("the control port closed before the spec came")
        out += chunk
    return out


def _await_init(path: str, what: str) -> None:
    """Waits for the file a restored guest's init makes once it has done
    what (images/init.sh)."""
    deadline = time.monotonic() + FRESH_TIMEOUT
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise HarnessError(f"the guest's init did not {what} in {FRESH_TIMEOUT:g} s; its "
                               "console says why")
        time.sleep(0.002)


def _warm_up() -> None:
    """Opens a database once before the snapshot, as the snode does first
    after a restore: what that leaves in memory (SQLite's one-time set-up,
    Python's lazy imports and caches) is in the saved state, TCG's
    translations are not. In a traced lego3 start it took the snode's
    DBOS.open from ~0.2 s to ~0.1 s."""
    import tempfile

    from harness.dbos import DBOS

    with tempfile.TemporaryDirectory() as d:
        DBOS.open(os.path.join(d, "warm.sqlite"), node="warm").close()


def wait_for_spec(port: str) -> AgentSpec:
    """The agent of a snapshot: imports what any role needs, says WAITING
    (the snapshot is taken there), then takes its spec from the control port
    (a 4-byte length and the JSON), and goes on once init has made the
    restored guest fresh. Before that nothing of a start is in it: no
    secret, no link."""
    import struct

    for name in ("pnode", "mnode", "snode"):  # one snapshot serves every role
        role_class(name)
    # What the roles import when they start; imported now, free after a restore.
    import base64  # noqa: F401
    import mmap  # noqa: F401
    import subprocess  # noqa: F401

    import harness.dbos.fs
    import harness.dbos.ipc
    import harness.dbos.sched
    import harness.dbos.services
    import harness.dbos.vfs
    import harness.nodes.auth  # noqa: F401

    _warm_up()
    fd = os.open(port, os.O_RDWR | os.O_CLOEXEC)
    print(WAITING, flush=True)
    n = struct.unpack("<I", _read_exact(fd, 4))[0]
    spec = AgentSpec.from_json(_read_exact(fd, n))
    if any(e.attach == "ivshmem" for e in spec.links):
        # Its ivshmem devices were not in the saved state (harness/vm/snapshot.py):
        # the restored kernel finds them on a rescan of the bus, which returns
        # once they are added.
        with open("/sys/bus/pci/rescan", "w") as f:
            f.write("1")
    _await_init(FRESH, "finish its restore")
    if "random" in sys.modules:  # seeded before the snapshot: the same in every restore
        sys.modules["random"].seed()
    spec.control = LinkEnd("controller", "fd", True, fd=fd)
    return spec


def spec_from_console() -> AgentSpec:
    """The agent of a guest on another libvirt host: its spec (the cluster's
    secret in it) comes as one base64 line on the serial console, which
    libvirt carries over its own connection (encrypted by ssh or TLS on a
    remote URI), never on the TCP control link, which it proves first."""
    import base64
    import select
    import tty

    fd = os.open(CONSOLE, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        tty.setraw(fd)  # no echo: the secret must not come back on the console
        from harness.fingerprint import code_fingerprint

        print(SPEC_PROMPT, code_fingerprint(), flush=True)  # the controller checks its code
        line, deadline = b"", time.monotonic() + SPEC_TIMEOUT
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise HarnessError(f"no whole spec came on the console in {SPEC_TIMEOUT:g} s")
            chunk = os.read(fd, 65536)
            if not chunk:  # a hangup: nothing more will come
                raise HarnessError("the console closed before the spec came")
            line += chunk
    finally:
        os.close(fd)
    return AgentSpec.from_json(base64.b64decode(line.strip()))


class Agent:
    def __init__(self, spec: AgentSpec, spec_path: str = "", host_root: str = "") -> None:
        self.spec = spec
        self.spec_path = spec_path
        self._host_root = host_root  # where the programs this node runs find the host root
        self._host_lock = threading.Lock()
        self._host_asked = False  # init mounts the host root once asked (images/init.sh)
        self.stop = threading.Event()
        self.control = open_link(spec.control, spec.nid)
        self.servers: dict[str, Link] = {}
        self.clients: dict[str, Link] = {}
        self._client_locks: dict[str, threading.Lock] = {}
        self._unproven: set[str] = set()  # peers on auth links not yet authenticated
        self._ends: dict[tuple[str, bool], LinkEnd] = {}  # (peer, serve) -> its end
        self.memory_channels: list[Link] = []
        for end in spec.links:
            if end.service == "excache":  # a workload's, not the agent's
                if end.serve:
                    self.memory_channels.append(open_link(end, spec.nid))
                continue
            link = open_link(end, spec.nid)
            self._ends[end.peer, end.serve] = end
            if end.serve:
                self.servers[end.peer] = link
            else:
                self.clients[end.peer] = link
                self._client_locks[end.peer] = threading.Lock()
                if end.auth:
                    self._unproven.add(end.peer)
        self.role = role_class(spec.role)(self)

    def all_links(self) -> list[tuple[str, Link]]:
        return [("controller", self.control), *self.servers.items(), *self.clients.items()]

    def call(self, peer: str, opcode: int, payload: bytes = b"", timeout: float = 5.0) -> bytes:
        """A request to a node this one calls; one caller per link at a time.
        On an auth link the first call proves both peers first."""
        with self._client_locks[peer]:
            if peer in self._unproven:
                from harness.nodes.auth import authenticate

                authenticate(self.clients[peer], bytes.fromhex(self.spec.secret), peer, timeout)
                self._unproven.discard(peer)
            link = self.clients[peer]
            if link.stale:  # the peer was restarted since the last call: reach the new one
                link = self._reopen(peer, serve=False)
            try:
                return remote_errors.call(link, opcode, payload, timeout)
            except LinkClosed:
                if link.stale:  # the peer was restarted: later calls reach it
                    self._reopen(peer, serve=False)
                raise

    def _reopen(self, peer: str, serve: bool) -> Link:
        """Opens a channel to peer again after a reset. The old link is
        dropped, not closed: its closed flag would now be the new one's."""
        links = self.servers if serve else self.clients
        links[peer] = open_link(self._ends[peer, serve], self.spec.nid)
        return links[peer]

    def serve(self, peer: str, link: Link, is_control: bool) -> None:
        """Serves a link until the node stops; a channel link whose peer went
        away is opened again, so a restarted peer is served on it."""
        while self._serve_until_closed(peer, link, is_control) and not is_control:
            while not link.stale:  # until the cluster resets the channel
                if self.stop.wait(0.1):
                    return
            link = self._reopen(peer, serve=True)
        if is_control:  # the controller is gone or said shut down
            self.stop.set()

    def _serve_until_closed(self, peer: str, link: Link, is_control: bool) -> bool:
        """True when the peer went away (the link closed under us); False when
        the node stops or the link was dropped for a bad frame or peer."""
        challenge = None
        if not is_control and self._ends[peer, True].auth:
            from harness.nodes.auth import Challenge

            challenge = Challenge(bytes.fromhex(self.spec.secret))
        while not self.stop.is_set():
            try:
                hdr, payload = link.recv(timeout=0.5)
            except TransportTimeout:
                continue
            except ProtocolError as exc:
                log(f"{self.spec.name}: {exc}; still serving the other links")
                return False
            except LinkClosed:
                return True
            if challenge is not None and not challenge.done:
                if not self._challenge(challenge, peer, link, hdr, payload):
                    return False
                continue
            try:
                out, err = fit_reply(self.role.handle(hdr.opcode, payload), link.max_payload)
            except Exception as exc:  # reported to the caller, never fatal here
                out, err = remote_errors.encode(exc, link.max_payload), True
            try:
                link.reply(hdr, out, error=err)
            except TransportError as exc:
                log(f"{self.spec.name}: reply to {peer} failed: {exc}")
                return isinstance(exc, LinkClosed)
            if hdr.opcode == Op.SHUTDOWN and not err:
                # Only once the reply is out: stopping closes every link.
                self.stop.set()
        return False

    def _challenge(self, challenge, peer: str, link: Link, hdr, payload: bytes) -> bool:
        """One step of a peer's authentication; False (the link is to be
        closed) when it fails."""
        from harness.nodes.auth import AuthError

        try:
            link.reply(hdr, challenge.answer(hdr, payload))
            return True
        except AuthError as exc:
            log(f"{self.spec.name}: refused the peer on the link from {peer}: {exc}")
            try:
                link.reply(hdr, f"not authenticated: {exc}".encode(), error=True)
            except TransportError:
                pass
            link.close()
            return False
        except TransportError:
            return False

    def host_root(self) -> str:
        """Where the programs this node runs find the host root: "" for the
        agent's own root; in a restored guest its init's mount, asked for on
        the first call and waited for (images/init.sh)."""
        if self._host_root:
            with self._host_lock:
                if not self._host_asked:
                    fd = os.open(self._host_root + ".want", os.O_WRONLY | os.O_NONBLOCK)
                    try:
                        os.write(fd, b"1\n")
                    finally:
                        os.close(fd)
                    self._host_asked = True
            _await_init(self._host_root + ".ready", f"mount the host root at {self._host_root}")
        return self._host_root

    def run(self) -> int:
        threads = [threading.Thread(target=self.serve, args=("controller", self.control, True),
                                    name="control", daemon=True)]
        threads += [threading.Thread(target=self.serve, args=(peer, link, False),
                                     name=f"serve-{peer}", daemon=True)
                    for peer, link in self.servers.items()]
        for t in threads:
            t.start()
        print(f"{READY} {self.spec.name} role={self.spec.role} pid={os.getpid()}", flush=True)
        self.role.start()
        self.stop.wait()
        self.role.close()
        for _, link in self.all_links():
            link.close()
        for t in threads:
            t.join(timeout=2.0)
        return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "--wait":
        try:
            spec = wait_for_spec(args[1])
            return Agent(spec, f"{GUEST_RUN_DIR}/{spec.name}.json", HOST_ROOT).run()
        except HarnessError as exc:
            print(f"dh-agent: {exc}", file=sys.stderr)
            return 1
    if args == ["--spec-on-console"]:
        try:
            spec = spec_from_console()
            agent = Agent(spec)
            from harness.nodes.auth import prove

            prove(agent.control, bytes.fromhex(spec.secret), "the controller", SPEC_TIMEOUT)
            return agent.run()
        except HarnessError as exc:
            print(f"dh-agent: {exc}", file=sys.stderr)
            return 1
    if len(args) != 1:
        print("usage: python -m harness.nodes.agent SPEC.json | --wait PORT | "
              "--spec-on-console", file=sys.stderr)
        return 2
    spec = AgentSpec.load(args[0])
    if spec.parent_pid:  # a host process: it must not outlive the harness
        import signal

        from harness.procs import die_with_parent

        die_with_parent(spec.parent_pid)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return Agent(spec, os.path.abspath(args[0])).run()
    except HarnessError as exc:
        print(f"{spec.name}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
