"""What a node agent is told at start: who it is and which links to open.

The cluster writes one spec per node as JSON; the agent reads it. The same
spec serves a host process and a guest, which is why links are described by
path or fd rather than handed over as objects. Plain classes, not
dataclasses: the agent imports this in a TCG guest, where every module
imported costs ~20 times what it costs on the host."""

from __future__ import annotations

import json
import os

_LINK_FIELDS = {"peer": str, "attach": str, "serve": bool, "path": str, "side": int, "fd": int,
                "latency_ns": int, "bytes_per_sec": int, "peer_role": str, "service": str,
                "chardev": str, "auth": bool}


class LinkEnd:
    """One end of a link. attach, how the node reaches it: "shm" (path + side), "fd" (an inherited
    stream fd), "dev" (a character device at path: a virtio-serial port) or
    "ivshmem" (a guest's ivshmem PCI device at path, e.g. 0000:00:10.0).
    serve: True when this end answers requests, False when it calls.
    service: "" for the agents' own link; "excache" for a memory channel
    (the mnode serves it; a workload on the pnode opens it).
    chardev: for a "dev" end in a guest, the host side of its port (a QEMU
    chardev backend: a Unix or TCP socket that the peer guest's QEMU joins).
    auth: the peers prove they know the cluster's secret first (tcp links)."""

    __slots__ = tuple(_LINK_FIELDS)

    def __init__(self, peer: str, attach: str, serve: bool, path: str = "", side: int = 0,
                 fd: int = -1, latency_ns: int = 0, bytes_per_sec: int = 0,
                 peer_role: str = "", service: str = "", chardev: str = "",
                 auth: bool = False) -> None:
        self.peer, self.attach, self.serve, self.path = peer, attach, serve, path
        self.side, self.fd = side, fd
        self.latency_ns, self.bytes_per_sec = latency_ns, bytes_per_sec
        self.peer_role, self.service, self.chardev = peer_role, service, chardev
        self.auth = auth

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in _LINK_FIELDS}


class AgentSpec:
    """A node's identity and links; parent_pid: the agent exits if this
    process is not its parent (0 in a guest); secret: the cluster's key for
    authenticating peers on tcp links (hex)."""

    def __init__(self, name: str, role: str, nid: int, cluster: str, placement: str,
                 control: LinkEnd, links: list[LinkEnd] | None = None, parent_pid: int = 0,
                 data_dir: str = "", secret: str = "") -> None:
        self.name, self.role, self.nid, self.cluster = name, role, nid, cluster
        self.placement, self.control, self.links = placement, control, links or []
        self.parent_pid, self.data_dir, self.secret = parent_pid, data_dir, secret

    def to_json(self) -> str:
        d = dict(self.__dict__)
        d["control"] = self.control.to_dict()
        d["links"] = [e.to_dict() for e in self.links]
        return json.dumps(d, indent=1)

    def dump(self, path) -> None:
        """Readable by its owner only: it holds the cluster's secret."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path) -> AgentSpec:
        with open(path) as f:
            return cls.from_json(f.read())

    @classmethod
    def from_json(cls, text: str | bytes) -> AgentSpec:
        raw = json.loads(text)
        raw["control"] = LinkEnd(**raw["control"])
        raw["links"] = [LinkEnd(**x) for x in raw["links"]]
        return cls(**raw)
