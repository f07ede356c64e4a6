"""Stream links between guests: a virtio-serial port in each guest, whose
host sides QEMU joins by itself. The server's QEMU listens on a socket and
the client's QEMU connects to it (`reconnect=1`: it retries if it starts
first). The harness launches the servers first; a VM's launch returns once
QEMU has made its chardevs, so a client's QEMU finds its server listening
and joins at once rather than on its first retry a second later. Unix
sockets on one host; TCP, the kind that also crosses hosts. No byte of a
link passes through the harness."""

from __future__ import annotations

import socket
from pathlib import Path


def port_name(link: str) -> str:
    """The virtio-serial port a link's end is in both guests."""
    return f"dh.s.{link}"


def chardevs(kind: str, link: str, run_dir: Path, server_at: str = "127.0.0.1"
             ) -> tuple[str, str]:
    """QEMU chardev backends for a link: (the server's, the client's). A TCP
    server listens at server_at, its host's address as the client's host
    reaches it (loopback when both are this machine)."""
    if kind == "unix":
        path = run_dir / f"{link}.stream.sock"
        return f"socket,path={path},server=on,wait=off", f"socket,path={path},reconnect=1"
    port = free_port()
    return (f"socket,host={server_at},port={port},server=on,wait=off,nodelay=on",
            f"socket,host={server_at},port={port},reconnect=1,nodelay=on")


def free_port() -> int:
    """A TCP port free here; on another host only likely free (a port taken
    there fails that domain's start, with libvirt's message)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def facing(peer: str) -> str:
    """This machine's address on the route to peer (an IP address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer, 9))  # no packet: a UDP connect only picks the route
        return s.getsockname()[0]
