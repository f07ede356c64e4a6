"""For workloads that a node runs (`Cluster.exec`): reach this node's
services from inside it, e.g. its ExCache channel to the memory node."""

from __future__ import annotations

import os

from harness._native.excache import DEFAULT_PREFETCH, PAGE, ExCache, prefetch_for
from harness._native.transport import Link
from harness.errors import NotSupported
from harness.nodes.agent import open_link
from harness.nodes.spec import AgentSpec


def node_spec() -> AgentSpec:
    path = os.environ.get("HARNESS_NODE_SPEC")
    if not path:
        raise NotSupported("not running on a harness node (HARNESS_NODE_SPEC is unset); "
                           "start the workload with Cluster.exec or `harness run`")
    return AgentSpec.load(path)


def excache_link() -> Link:
    """This node's channel to its mnode's memory store (it also answers ECHO)."""
    spec = node_spec()
    end = next((e for e in spec.links if e.service == "excache" and not e.serve), None)
    if end is None:
        raise NotSupported(f"{spec.name} has no ExCache channel (only a pnode linked to an "
                           "mnode, both in VMs, has one)")
    return open_link(end, spec.nid)


def open_excache(capacity: int, ways: int = 64, policy: str = "fifo",
                 fault_mode: str = "sigbus", prefetch: int = DEFAULT_PREFETCH,
                 link: Link | None = None) -> ExCache:
    """An ExCache in this process over this node's memory channel to its mnode
    (or over `link`, from excache_link(), to make several in turn). prefetch
    is capped at one line per set."""
    ways = min(ways, max(1, capacity // PAGE))
    capacity -= capacity % (ways * PAGE)
    return ExCache(link or excache_link(), capacity, ways, policy, fault_mode,
                   prefetch=prefetch_for(capacity, ways, prefetch))
