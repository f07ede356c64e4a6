"""Topology files: which nodes a cluster has and how they are linked.

A topology is TOML, validated into typed objects; an error names the file,
the key and what was expected. The built-in ones live in
harness/topologies/NAME.toml and are found by name.

    name = "lego3"
    placement = "process"            # or "vm", or "libvirt"; a node may override it
    host = "qemu:///system"          # libvirt placement: the libvirt URI nodes run on
    # netns = "hostb"                # a process node: runs in this network namespace
    [[nodes]]
    name = "pnode0"
    role = "pnode"                   # pnode | mnode | snode
    memory = "512MiB"                # guest RAM when the node is a VM
    [[links]]
    between = ["pnode0", "mnode0"]   # the first node calls the second
    kind = "shm"                     # shm | unix | tcp
    size = "4MiB"                    # shm file size (a power of two)
    model = "rdma"                   # none | rdma | 25gbe | {latency_us = .., bandwidth_gbps = ..}
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.errors import TopologyError

ROLES = ("pnode", "mnode", "snode")
PLACEMENTS = ("process", "vm", "libvirt")
GUEST_PLACEMENTS = ("vm", "libvirt")  # the node is a QEMU guest (libvirt's or our own)
DEFAULT_HOST = "qemu:///system"
LINK_KINDS = ("shm", "unix", "tcp")
BUILTIN_DIR = Path(__file__).parent / "topologies"

# LegoOS measured RPC round trips of 4.6 us (128 B) and 6.5 us (4 KB) over
# RDMA. As one-way latency L plus bandwidth B on the request (the reply is
# small): 2L + 128/B = 4.6 us and 2L + 4096/B = 6.5 us, so B = 3968 B / 1.9 us
# and L = (4.6 us - 128/B) / 2.
_RDMA_BW = 3968 / 1.9e-6
MODELS: dict[str, tuple[float, float]] = {
    "none": (0.0, 0.0),
    "rdma": ((4.6e-6 - 128 / _RDMA_BW) / 2 * 1e6, _RDMA_BW * 8 / 1e9),
    # Two servers in a rack on 25 GbE: 25 Gbit/s and ~2 us one way (NIC to NIC
    # through one cut-through switch, kernel bypass not counted).
    "25gbe": (2.0, 25.0),
}

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def parse_size(text: str | int) -> int:
    """'16MiB' -> 16777216; a bare integer is bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size must not be negative, got {text}")
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"expected a size such as 512MiB or 4096, got {text!r}")
    return int(m.group(1)) * _UNITS[(m.group(2) or "b").lower()]


@dataclass(frozen=True)
class LinkModel:
    """Injected one-way latency and bandwidth (0: unlimited)."""

    latency_us: float = 0.0
    bandwidth_gbps: float = 0.0

    @property
    def latency_ns(self) -> int:
        return round(self.latency_us * 1000)

    @property
    def bytes_per_sec(self) -> int:
        return round(self.bandwidth_gbps * 1e9 / 8)

    @property
    def active(self) -> bool:
        return self.latency_us > 0 or self.bandwidth_gbps > 0


@dataclass(frozen=True)
class Node:
    name: str
    role: str
    nid: int
    placement: str
    memory: int = 512 << 20
    cpus: int = 1
    disk: int = 0
    host: str = ""  # libvirt placement: the URI of the libvirt daemon that runs it
    netns: str | None = None  # process placement: the network namespace it runs in

    @property
    def in_vm(self) -> bool:
        return self.placement in GUEST_PLACEMENTS


@dataclass(frozen=True)
class Edge:
    """A link of the topology, between two nodes (a transport `Link` is one
    end of it, in a process)."""

    client: str  # the node that sends requests
    server: str  # the node that answers them
    kind: str = "shm"
    size: int = 4 << 20
    model: LinkModel = field(default_factory=LinkModel)

    @property
    def name(self) -> str:
        return f"{self.client}-{self.server}"


@dataclass(frozen=True)
class Topology:
    name: str
    source: str
    nodes: tuple[Node, ...]
    links: tuple[Edge, ...]
    description: str = ""

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes)
        raise TopologyError(f"{self.source}: no node named {name!r} (nodes: {known})")

    def links_of(self, name: str) -> list[Edge]:
        return [k for k in self.links if name in (k.client, k.server)]

    def with_placement(self, placement: str) -> Topology:
        """The same topology with every node moved to one placement."""
        if placement not in PLACEMENTS:
            raise TopologyError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        return replace(self, nodes=tuple(
            replace(n, placement=placement,
                    host=(n.host or DEFAULT_HOST) if placement == "libvirt" else "")
            for n in self.nodes))


class _Checker:
    """Pulls typed values out of a TOML table, naming the key on error."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, expected: str, got: Any) -> TopologyError:
        return TopologyError(f"{self.source}: {key}: expected {expected}, got {got!r}")

    def keys(self, table: dict, where: str, allowed: set[str]) -> None:
        extra = sorted(set(table) - allowed)
        if extra:
            raise self.fail(f"{where}{extra[0]}", f"one of the keys {sorted(allowed)}",
                            extra[0])

    def string(self, table: dict, key: str, where: str, choices: tuple[str, ...] = (),
               default: str | None = None) -> str:
        v = table.get(key, default)
        if v is None:
            raise self.fail(where + key, "a value (it is required)", None)
        if not isinstance(v, str) or (choices and v not in choices):
            raise self.fail(where + key, f"one of {list(choices)}" if choices else "a string", v)
        return v

    def size(self, table: dict, key: str, where: str, default: int) -> int:
        v = table.get(key, default)
        try:
            return parse_size(v)
        except ValueError:
            raise self.fail(where + key, "a size such as 512MiB", v) from None

    def positive_int(self, table: dict, key: str, where: str, default: int) -> int:
        v = table.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise self.fail(where + key, "a positive integer", v)
        return v


def _model(c: _Checker, raw: Any, where: str) -> LinkModel:
    if isinstance(raw, str):
        if raw not in MODELS:
            raise c.fail(where, f"one of {sorted(MODELS)} or a table", raw)
        lat, bw = MODELS[raw]
        return LinkModel(lat, bw)
    if isinstance(raw, dict):
        c.keys(raw, where + ".", {"latency_us", "bandwidth_gbps"})
        vals = []
        for k in ("latency_us", "bandwidth_gbps"):
            v = raw.get(k, 0)
            if not isinstance(v, int | float) or isinstance(v, bool) or v < 0:
                raise c.fail(f"{where}.{k}", "a number >= 0", v)
            vals.append(float(v))
        return LinkModel(*vals)
    raise c.fail(where, f"one of {sorted(MODELS)} or a table", raw)


_URI = re.compile(r"^qemu(\+[a-z]+)?://[^\s]*/(system|session)(\?\S*)?$")


def _host(c: _Checker, table: dict, where: str, default: str) -> str:
    """A libvirt URI for QEMU guests: qemu:///system, qemu+ssh://user@host/system, ..."""
    v = table.get("host", default)
    if not isinstance(v, str) or not _URI.match(v):
        raise c.fail(where + "host", "a libvirt URI of QEMU such as qemu:///system or "
                     "qemu+ssh://user@host/system", v)
    return v


def parse(data: dict, source: str) -> Topology:
    """Validates a parsed TOML document into a Topology."""
    c = _Checker(source)
    c.keys(data, "", {"name", "description", "placement", "host", "nodes", "links"})
    name = c.string(data, "name", "")
    if not _NAME.match(name):
        raise c.fail("name", "lower-case letters, digits, '-' or '_'", name)
    placement = c.string(data, "placement", "", PLACEMENTS, "process")
    host = _host(c, data, "", DEFAULT_HOST)
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise c.fail("nodes", "at least one [[nodes]] table", raw_nodes)
    nodes: list[Node] = []
    for i, rn in enumerate(raw_nodes):
        w = f"nodes[{i}]."
        if not isinstance(rn, dict):
            raise c.fail(f"nodes[{i}]", "a table", rn)
        c.keys(rn, w, {"name", "role", "placement", "host", "netns", "memory", "cpus", "disk"})
        nname = c.string(rn, "name", w)
        if not _NAME.match(nname):
            raise c.fail(w + "name", "lower-case letters, digits, '-' or '_'", nname)
        if any(n.name == nname for n in nodes):
            raise c.fail(w + "name", "a name no other node has", nname)
        nplace = c.string(rn, "placement", w, PLACEMENTS, placement)
        nhost = _host(c, rn, w, host)
        if "host" in rn and nplace != "libvirt":
            raise c.fail(w + "host", 'no host unless placement = "libvirt" (the other '
                         "placements run on this machine)", rn["host"])
        netns = rn.get("netns")
        if netns is not None and (nplace != "process" or not isinstance(netns, str)
                                  or not re.match(r"^[A-Za-z0-9_.-]{1,64}$", netns)):
            raise c.fail(w + "netns", 'the name of a network namespace (`ip netns`), on a '
                         'node with placement = "process"', netns)
        nodes.append(Node(
            name=nname,
            netns=netns,
            role=c.string(rn, "role", w, ROLES),
            nid=i + 1,
            placement=nplace,
            memory=c.size(rn, "memory", w, 512 << 20),
            cpus=c.positive_int(rn, "cpus", w, 1),
            disk=c.size(rn, "disk", w, 0),
            host=nhost if nplace == "libvirt" else "",
        ))
    names = {n.name for n in nodes}
    links: list[Edge] = []
    for i, rl in enumerate(data.get("links", [])):
        w = f"links[{i}]."
        if not isinstance(rl, dict):
            raise c.fail(f"links[{i}]", "a table", rl)
        c.keys(rl, w, {"between", "kind", "size", "model"})
        between = rl.get("between")
        if (not isinstance(between, list) or len(between) != 2
                or not all(isinstance(b, str) and b in names for b in between)
                or between[0] == between[1]):
            raise c.fail(w + "between", f"two different node names from {sorted(names)}",
                         between)
        if any({k.client, k.server} == set(between) for k in links):
            raise c.fail(w + "between", "a pair of nodes not linked already", between)
        size = c.size(rl, "size", w, 4 << 20)
        if size < (64 << 10) or size & (size - 1) or size > (1 << 30):
            raise c.fail(w + "size", "a power of two from 64KiB to 1GiB", rl.get("size"))
        kind = c.string(rl, "kind", w, LINK_KINDS, "shm")
        ends = [next(n for n in nodes if n.name == b) for b in between]
        if kind != "tcp" and (ends[0].netns != ends[1].netns or ends[0].host != ends[1].host):
            raise c.fail(w + "kind", f'"tcp": {between[0]} and {between[1]} are on different '
                         "hosts or network namespaces, and only TCP crosses a network", kind)
        links.append(Edge(
            client=between[0], server=between[1],
            kind=kind,
            size=size,
            model=_model(c, rl.get("model", "none"), w + "model"),
        ))
    desc = data.get("description", "")
    if not isinstance(desc, str):
        raise c.fail("description", "a string", desc)
    return Topology(name, source, tuple(nodes), tuple(links), desc)


def read_toml(path: str | Path) -> dict:
    """A TOML file's contents; a TopologyError naming the file if it cannot be
    read or parsed (topologies, compartment and exploration configs)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TopologyError(f"{path}: not valid TOML: {exc}") from exc


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def load(name_or_path: str | Path) -> Topology:
    """A built-in topology by name, or a TOML file by path."""
    text = str(name_or_path)
    path = Path(text)
    if not path.suffix and not path.exists():
        path = BUILTIN_DIR / f"{text}.toml"
        if not path.exists():
            raise TopologyError(
                f"no topology named {text!r}: built-in ones are {builtin_names()}, "
                "or give the path of a .toml file")
    return parse(read_toml(path), str(path))
