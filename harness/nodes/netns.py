"""A second host on one machine: a network namespace (`ip netns`) with its
own address, joined to this one by a veth pair.

A node placed as a process may run in such a namespace (topology key
`netns`). Its links to nodes outside it are TCP connections whose two
sockets belong to the two namespaces, so every byte crosses the veth pair
and the kernel's network path (qdiscs included: `tc` on the veth shapes it);
the controller makes each connection, one end from a thread that has
entered the namespace, and hands the ends to the agents as it hands out
local socket pairs. Its control channel stays a shared-memory ring: the
namespace separates networks, not memory."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from harness.errors import HarnessError

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def _tool(argv: list[str], missing: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except FileNotFoundError as exc:
        raise HarnessError(missing) from exc
    if check and r.returncode:
        raise HarnessError(f"`{' '.join(argv)}` failed: {r.stderr.strip()}")
    return r


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _tool(["ip", *args], "network namespaces need iproute2's `ip`: apt-get install "
                 "iproute2", check)


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _tool(["iptables", "-w", "5", *args], "a libvirt host in a namespace needs iptables "
                 "(its daemon is closed to other users with it): `bash scripts/setup.sh` "
                 "installs it", check)


def _require(name: str) -> None:
    if not os.path.exists(f"/run/netns/{name}"):
        raise HarnessError(f"no network namespace {name!r} (/run/netns/{name}); make it with "
                           "`ip netns add` and give it an address on a veth pair")


def run_in(name: str | None, fn: Callable[[], T]) -> T:
    """fn() run in namespace name (None: this one), on a thread of its own:
    setns changes only the calling thread's namespace."""
    if name is None:
        return fn()
    _require(name)
    got: dict = {}

    def enter() -> None:
        try:
            with open(f"/run/netns/{name}") as f:
                if ctypes.CDLL(None, use_errno=True).setns(f.fileno(), CLONE_NEWNET):
                    raise OSError(ctypes.get_errno(), f"setns into {name}")
            got["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            got["error"] = exc

    t = threading.Thread(target=enter, name=f"netns {name}")
    t.start()
    t.join()
    if "error" in got:
        raise got["error"]
    return got["value"]


def address(name: str) -> str:
    """The namespace's first global IPv4 address."""
    _require(name)
    for link in json.loads(_ip("-n", name, "-j", "-4", "addr", "show").stdout or "[]"):
        for a in link.get("addr_info", []):
            if a.get("scope") == "global":
                return a["local"]
    raise HarnessError(f"network namespace {name!r} has no IPv4 address to reach it at")


def tcp_pair(client_ns: str | None, server_ns: str | None,
             timeout: float = 5.0) -> tuple[socket.socket, socket.socket]:
    """A TCP connection from client_ns to server_ns (None: this namespace):
    (the client's end, the server's end), each a socket of its namespace."""
    host = address(server_ns) if server_ns else "127.0.0.1"
    srv = run_in(server_ns, lambda: socket.create_server((host, 0)))
    with srv:
        srv.settimeout(timeout)
        try:
            a = run_in(client_ns, lambda: socket.create_connection(srv.getsockname(), timeout))
        except OSError as exc:
            raise HarnessError(f"cannot reach {host} (namespace {server_ns}) from namespace "
                               f"{client_ns or 'of the controller'}: {exc}") from exc
        b, _ = srv.accept()
    for s in (a, b):
        s.settimeout(None)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


@contextlib.contextmanager
def veth_host(name: str, addr: str = "10.77.0.2", local: str = "10.77.0.1",
              prefix: int = 24) -> Iterator[str]:
    """A namespace `name` reached over a veth pair (local address `local`
    here, `addr` there), removed on exit; yields the local end's device,
    where `tc` shapes what goes to the namespace."""
    dev = f"{name[:11]}-h"
    _ip("netns", "add", name)
    try:
        _ip("link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", name)
        _ip("addr", "add", f"{local}/{prefix}", "dev", dev)
        _ip("link", "set", dev, "up")
        _ip("-n", name, "addr", "add", f"{addr}/{prefix}", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        _ip("-n", name, "link", "set", "lo", "up")
        yield dev
    finally:
        _ip("link", "del", dev, check=False)  # takes its peer in the namespace with it
        _ip("netns", "del", name, check=False)


# The second daemon's private state: its own run, state, log and cache
# directories (tmpfs in its mount namespace), this machine's everything else.
_DAEMON = """set -e
for d in /run /var/lib/libvirt /var/log/libvirt /var/cache/libvirt; do
    mount -t tmpfs -o mode=0755 dh-libvirt "$d"
done
mkdir -p /run/lock /run/libvirt /var/lib/libvirt/qemu /var/log/libvirt/qemu /var/cache/libvirt
# This machine's probed QEMU capabilities (copied out before the mounts hid
# them): probing again costs seconds.
[ ! -d "$1" ] || cp -a "$1" /var/cache/libvirt/qemu
setpriv --pdeathsig KILL virtlogd &
exec libvirtd --listen -f "$2"
"""
# Kills what runs in the namespace once the process that made it is gone,
# even SIGKILLed: QEMU outlives a libvirtd that stops, by libvirt's design.
_WATCHDOG = """while kill -0 "$1" 2>/dev/null; do sleep 0.5; done
ip netns pids "$2" | xargs -r kill -9
shift 2; iptables -w 5 -D "$@" 2>/dev/null"""
LIBVIRTD_TCP = 16509


@contextlib.contextmanager
def libvirt_host(name: str, timeout: float = 30.0) -> Iterator[str]:
    """A libvirt daemon of its own in namespace `name` (a second host for
    placement = "libvirt"): yields its URI, qemu+tcp://ADDRESS/system. It
    listens on the namespace's address only, without authentication (only
    this machine reaches it); its guests' QEMU runs in the namespace and
    their TCP links cross the veth. It and everything it started are killed
    on exit, and by a watchdog if this process dies first."""
    import tempfile
    import time

    addr = address(name)
    uri = f"qemu+tcp://{addr}/system"
    work = tempfile.mkdtemp(prefix=f"dh-libvirtd-{name}-")
    conf, log = os.path.join(work, "libvirtd.conf"), os.path.join(work, "libvirtd.log")
    caps = os.path.join(work, "caps")
    with contextlib.suppress(OSError):
        shutil.copytree("/var/cache/libvirt/qemu", caps, symlinks=True)
    with open(conf, "w") as f:
        f.write(f'listen_tls = 0\nlisten_tcp = 1\nauth_tcp = "none"\nlisten_addr = "{addr}"\n')
    # No authentication: only this user's processes may reach the daemon
    # (another local user would otherwise get libvirt's root).
    rule = ["OUTPUT", "-d", addr, "-p", "tcp", "--dport", str(LIBVIRTD_TCP), "-m", "owner",
            "!", "--uid-owner", str(os.getuid()), "-m", "comment", "--comment",
            f"dh-libvirtd-{name}", "-j", "REJECT"]
    _iptables("-I", *rule)
    try:
        with open(log, "wb") as out:
            daemon = subprocess.Popen(
                ["ip", "netns", "exec", name, "unshare", "-m", "--propagation", "private",
                 "sh", "-c", _DAEMON, "sh", caps, conf],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    except FileNotFoundError as exc:
        _iptables("-D", *rule, check=False)
        raise HarnessError("a libvirt host in a namespace needs libvirtd and util-linux: "
                           "`bash scripts/setup.sh` installs them") from exc
    watchdog = subprocess.Popen(["sh", "-c", _WATCHDOG, "sh", str(os.getpid()), name, *rule],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while subprocess.run(["virsh", "-c", uri, "version"], capture_output=True,
                             timeout=timeout).returncode:
            if daemon.poll() is not None or time.monotonic() > deadline:
                with open(log, errors="replace") as f:
                    tail = f.read()[-2000:].strip()
                raise HarnessError(f"the libvirt daemon in namespace {name} did not answer at "
                                   f"{uri} within {timeout:g} s; its log ({log}) ends: {tail}")
            time.sleep(0.2)
        yield uri
    finally:
        for pid in _ip("netns", "pids", name, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        for proc in (watchdog, daemon):
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        _iptables("-D", *rule, check=False)  # the watchdog may have removed it
        shutil.rmtree(work, ignore_errors=True)
