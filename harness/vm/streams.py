"""Stream links between guests: a virtio-serial port in each guest, whose
host sides QEMU joins by itself. The server's QEMU listens on a socket and
the client's QEMU connects to it (`reconnect=1`: it retries if it starts
first). Unix sockets on one host; TCP, the kind that also crosses hosts.
No byte of a link passes through the harness."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path


def port_name(link: str) -> str:
    """The virtio-serial port a link's end is in both guests."""
    return f"dh.s.{link}"


def chardevs(kind: str, link: str, run_dir: Path) -> tuple[str, str]:
    """QEMU chardev backends for a link: (the server's, the client's)."""
    if kind == "unix":
        path = run_dir / f"{link}.stream.sock"
        return f"socket,path={path},server=on,wait=off", f"socket,path={path},reconnect=1"
    with socket.socket() as s:  # a free loopback port for the server's QEMU
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return (f"socket,host=127.0.0.1,port={port},server=on,wait=off,nodelay=on",
            f"socket,host=127.0.0.1,port={port},reconnect=1,nodelay=on")


def _options(backend: str) -> dict[str, str]:
    return dict(kv.partition("=")[::2] for kv in backend.split(",")[1:])


def _tcp_listening(port: int) -> bool:
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return any(cols[1] == want and cols[3] == "0A"  # 0A: LISTEN
                   for cols in (line.split() for line in f.readlines()[1:]))


def wait_listening(client_backend: str, deadline: float) -> bool:
    """Waits until the socket a client backend connects to is listening (its
    server's QEMU has started), so the client's QEMU joins it at once rather
    than on its first retry a second later. False at the deadline."""
    opts = _options(client_backend)
    while time.monotonic() < deadline:
        if "path" in opts and os.path.exists(opts["path"]):
            return True
        if "port" in opts and _tcp_listening(int(opts["port"])):
            return True
        time.sleep(0.01)
    return False
