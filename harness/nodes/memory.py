"""A cluster's disaggregated memory: channels to the memory nodes, the
ExCache in the controller's process behind Cluster.alloc, its failover to a
replica, and channels for programs on remote memory (the broker's source).

Every channel the controller makes is one kind, for both uses: an shm file
that the mnode's store serves once asked to (ATTACH). Between VMs, a pnode
guest's channels are ivshmem devices fixed when it starts (links.py)."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from harness._native.excache import DEFAULT_PREFETCH, PAGE, ExCache, Region, prefetch_for
from harness._native.transport import Link, Op, create_shm_file
from harness.dbos.remote import RemoteDBOS
from harness.errors import ClusterError, HarnessError, NotSupported
from harness.nodes import netns
from harness.nodes.auth import authenticate
from harness.nodes.broker import Channel, Process
from harness.topology import LinkModel, Node, Topology

DEFAULT_CACHE = 16 << 20
OWNER = "controller"  # the node that runs Cluster.alloc's code: the caller's process


class Host(Protocol):
    """What memory needs of its cluster (cluster.py's Cluster), named here so
    that this module does not import the one that imports it."""

    name: str
    topology: Topology
    shm_dir: Path
    stopped: bool

    @property
    def dbos(self) -> RemoteDBOS: ...
    def snode(self) -> str | None: ...
    def call(self, node: str, opcode: int, payload: bytes = b"",
             timeout: float = 5.0) -> bytes: ...
    def sql(self, query: str, params: Sequence = (), write: bool = False) -> list[list]: ...


class Memory:
    def __init__(self, cluster: Host, cache_bytes: int, ways: int = 64,
                 policy: str = "fifo", fault_mode: str = "sigbus",
                 prefetch: int = DEFAULT_PREFETCH) -> None:
        self.cluster = cluster
        self.cache_bytes = cache_bytes
        self.options = {"ways": ways, "policy": policy, "fault_mode": fault_mode,
                        "prefetch": prefetch}
        self.failovers: list[dict] = []  # the ExCache's switches to a backup mnode
        self._excache: ExCache | None = None
        self._regions: list[Region] = []
        self._serial = itertools.count()

    # ---- channels ------------------------------------------------------------

    def first_mnode(self) -> Node:
        mnodes = [n for n in self.cluster.topology.nodes if n.role == "mnode"]
        if not mnodes:
            raise NotSupported(f"{self.cluster.name} has no mnode to hold disaggregated memory")
        return mnodes[0]

    def backup_of(self, mnode: str) -> str | None:
        """The mnode that `mnode` links to (the topology's replica), if any."""
        topo = self.cluster.topology
        role = {n.name: n.role for n in topo.nodes}
        return next((k.server for k in topo.links
                     if k.client == mnode and role[k.server] == "mnode"), None)

    def _model(self, mnode: str) -> LinkModel | None:
        """The topology's link model for channels to mnode."""
        k = next((k for k in self.cluster.topology.links if mnode in (k.client, k.server)), None)
        return k.model if k is not None and k.model.active else None

    def channel_file(self, mnode: str, name: str) -> tuple[str, LinkModel | None]:
        """A new shm channel file that mnode's store serves (ATTACH); its link
        model is the topology's link to mnode."""
        c = self.cluster
        ns = c.topology.node(mnode).netns
        if ns is not None:
            raise NotSupported(f"{mnode} is in network namespace {ns}: only this process's "
                               "own cache (alloc) reaches it, over TCP")
        model = self._model(mnode)
        path = str(c.shm_dir / f"{name}.shm")
        create_shm_file(path, 1 << 22)
        req: dict = {"service": "excache", "path": path, "side": 1}
        if model is not None:
            req.update(latency_ns=model.latency_ns, bytes_per_sec=model.bytes_per_sec)
        c.call(mnode, Op.ATTACH, json.dumps(req).encode())
        return path, model

    def channel(self, mnode: str) -> Link:
        """A new channel from this process to mnode's store."""
        node = self.cluster.topology.node(mnode)
        if node.netns is not None:
            return self._tcp_channel(mnode, node.netns)
        path, model = self.channel_file(mnode, f"excache-{mnode}")
        link = Link.shm_open(path, 0, name=f"excache-{mnode}")
        if model is not None:
            link.set_model(model.latency_ns, model.bytes_per_sec)
        return link

    def _tcp_channel(self, mnode: str, ns: str) -> Link:
        """A channel to an mnode on another host (here: in a network
        namespace): it listens, we connect across the network and prove we
        know the cluster's secret, as on any tcp link."""
        c = self.cluster
        model = self._model(mnode)
        req: dict = {"service": "excache", "listen": "tcp"}
        if model is not None:
            req.update(latency_ns=model.latency_ns, bytes_per_sec=model.bytes_per_sec)
        port = json.loads(c.call(mnode, Op.ATTACH, json.dumps(req).encode()))["port"]
        host = netns.address(ns)
        try:
            sock = socket.create_connection((host, port), timeout=10.0)
        except OSError as exc:
            raise ClusterError(f"{mnode}: cannot reach its ExCache port {host}:{port} "
                               f"(network namespace {ns}): {exc}") from exc
        sock.settimeout(None)
        link = Link.from_fd(sock.detach(), name=f"excache-{mnode}")  # sets TCP_NODELAY
        authenticate(link, bytes.fromhex(c.secret), mnode)
        if model is not None:
            link.set_model(model.latency_ns, model.bytes_per_sec)
        return link

    def program_channel(self, proc: Process) -> Channel:
        """A channel to the first mnode for one process of a program on
        remote memory (the broker's source, with placement "process")."""
        mnode = self.first_mnode().name
        path, model = self.channel_file(mnode, f"program-{proc.pid}-{next(self._serial)}")
        return Channel("shm", path, 0, mnode, model.latency_ns if model else 0,
                       model.bytes_per_sec if model else 0)

    # ---- the controller's ExCache ---------------------------------------------------

    @property
    def excache(self) -> ExCache:
        """This process's ExCache over the first memory node (made on first use):
        the caller plays the processor node's workload."""
        if self._excache is None:
            self._excache = self._attach()
        return self._excache

    def _attach(self) -> ExCache:
        c = self.cluster
        primary = self.first_mnode()
        if primary.placement != "process":
            raise NotSupported("alloc() from the host needs the mnode placed as a process; "
                               "with VMs, run the workload on the pnode with exec()")
        link = self.channel(primary.name)
        o = self.options
        ways = min(o["ways"], max(1, self.cache_bytes // PAGE))
        capacity = self.cache_bytes - self.cache_bytes % (ways * PAGE)
        cache = ExCache(link, capacity, ways, o["policy"], o["fault_mode"],
                        prefetch=prefetch_for(capacity, ways, o["prefetch"]))
        backup = self.backup_of(primary.name)
        if backup is not None:
            # The primary forwards every write to the backup before it answers;
            # the cache fails over only while the primary says the backup is
            # in sync. The backup's side of that channel is an ordinary
            # excache channel: forwards are told apart by their opcode.
            path = str(c.shm_dir / f"replica-{primary.name}-{backup}.shm")
            create_shm_file(path, 1 << 22)
            c.call(backup, Op.ATTACH, json.dumps(
                {"service": "excache", "path": path, "side": 1}).encode())
            c.call(primary.name, Op.ATTACH, json.dumps(
                {"service": "replica", "path": path, "side": 0}).encode())
            cache.set_backup(self.channel(backup))
            threading.Thread(target=self._watch_failover, args=(cache, primary.name, backup),
                             name="failover-watch", daemon=True).start()
        return cache

    def _watch_failover(self, cache: ExCache, primary: str, backup: str) -> None:
        """Logs the cache's failover in the snode's events table (the fault
        handler that performs it cannot: it runs in a signal handler), and
        the moment the backup fell behind (the primary lost it and went on
        alone: from then on the cache refuses to fail over to it)."""
        c = self.cluster

        def event(kind: str, detail: str) -> None:
            if c.snode() is not None:
                c.sql("INSERT INTO events (time, node, kind, detail) VALUES (?,?,?,?)",
                      (time.time(), OWNER, kind, detail), write=True)

        behind = False
        while not c.stopped and self._excache in (None, cache):  # None: being made
            s = cache.stats()
            if s["failovers"]:
                self.failovers.append({"from": primary, "to": backup,
                                       "seconds": s["failover_ns"] / 1e9})
                event("failover", f"excache: {primary} -> {backup} in "
                                  f"{s['failover_ns'] / 1e6:.1f} ms")
                return
            if not s["backup_in_sync"] and not behind:
                behind = True
                event("replica_behind",
                      f"excache: {backup} missed writes {primary} acknowledged; "
                      "no failover to it")
            time.sleep(0.05)

    def alloc(self, nbytes: int) -> Region:
        if nbytes <= 0:
            raise ValueError(f"alloc needs a positive size, got {nbytes}")
        region = self.excache.alloc(-(-nbytes // PAGE) * PAGE)
        self._regions.append(region)
        if self.cluster.snode() is not None:
            self.cluster.dbos.state.report_region(region.id, self.first_mnode().name,
                                                  region.size, owner=OWNER)
        return region

    def free(self, region: Region) -> None:
        region.free()
        if region in self._regions:
            self._regions.remove(region)

    def stats(self) -> dict | None:
        """This process's cache counters (None before the first alloc); the
        regions' page counts also go to the snode's `pages` table."""
        if self._excache is None:
            return None
        if self.cluster.snode() is not None:
            for r in self._regions:
                if r.address:
                    s = r.stats()
                    self.cluster.dbos.state.report_pages(r.id, OWNER, s["resident"],
                                                         s["dirty"])
        return self._excache.stats()

    def close(self) -> None:
        """The cache first when a cluster stops: its regions' memory lives on
        the nodes about to stop."""
        for r in self._regions:
            try:
                r.free()
            except (BufferError, HarnessError):
                pass  # still in use by the caller: the mapping dies with the cache
        self._regions.clear()
        self._excache = None
