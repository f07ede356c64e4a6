"""What a node agent is told at start: who it is and which links to open.

The cluster writes one spec per node as JSON; the agent reads it. The same
spec serves a host process and (later) a guest, which is why links are
described by path or fd rather than handed over as objects."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class LinkEnd:
    peer: str            # the node (or "controller") at the other end
    kind: str            # "shm" (path + side) or "fd" (an inherited stream fd)
    serve: bool          # True: this end answers requests; False: it calls
    path: str = ""
    side: int = 0
    fd: int = -1
    latency_ns: int = 0
    bytes_per_sec: int = 0


@dataclass
class AgentSpec:
    name: str
    role: str
    nid: int
    cluster: str
    placement: str
    control: LinkEnd
    links: list[LinkEnd] = field(default_factory=list)
    parent_pid: int = 0  # the agent exits if this process is not its parent

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> AgentSpec:
        raw = json.loads(path.read_text())
        raw["control"] = LinkEnd(**raw["control"])
        raw["links"] = [LinkEnd(**x) for x in raw["links"]]
        return cls(**raw)
