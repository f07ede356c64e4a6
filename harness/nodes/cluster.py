"""A cluster: the nodes of a topology, started, linked and supervised.

Process placement runs each node agent as a host process; the controller
holds a control link to every node (it calls, the node answers) and creates
the links between nodes before starting them. Every wait has a timeout and
no node process outlives the controller (the agent sets a parent-death
signal)."""

from __future__ import annotations

import base64
import itertools
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness import remote_errors
from harness._native.excache import DEFAULT_PREFETCH, ExCache, Region
from harness._native.transport import Link, Op, reset_shm_file
from harness.dbos.remote import RemoteDBOS
from harness.errors import ClusterError, HarnessError, NotSupported, TransportError
from harness.nodes.links import link_ends
from harness.nodes.memory import DEFAULT_CACHE, Memory
from harness.nodes.runners import LibvirtRunner, ProcessRunner, VMRunner, guest_kit
from harness.nodes.spec import LinkEnd
from harness.paths import claim_shm_dir, private_dir, run_root, shm_dir_of
from harness.progress import Progress, silent
from harness.topology import Node, Topology, load, parse_size
from harness.vm import rootfs

_serial = itertools.count()


@dataclass
class ExecResult:
    returncode: int
    stdout: bytes
    stderr: bytes
    truncated: bool = False


class NodeHandle:
    """The controller's view of one node: its runner and its control link."""

    def __init__(self, node: Node, runner: ProcessRunner | VMRunner) -> None:
        self.node = node
        self.runner = runner
        self.control: Link | None = None
        self.lock = threading.Lock()
        self.state = "booting"
        self.boot_s: float | None = None
        self.peers: dict[str, float] = {}
        self.links: list[LinkEnd] = []  # kept to start the node again after a fault

    def call(self, opcode: int, payload: bytes = b"", timeout: float = 5.0) -> bytes:
        if self.control is None:
            raise ClusterError(f"{self.node.name} has no control link (it never started)")
        with self.lock:
            try:
                return remote_errors.call(self.control, opcode, payload, timeout)
            except TransportError as exc:
                raise type(exc)(f"{self.node.name}: {exc}", exc.errno) from exc


class Cluster:
    """The nodes of one topology. Use as a context manager, or start()/stop()."""

    def __init__(self, topology: Topology, run_dir: Path | None = None,
                 cache: str | int | None = None, disk_dir: Path | None = None,
                 deterministic: bool = False, ways: int = 64, policy: str = "fifo",
                 fault_mode: str = "sigbus", prefetch: int = DEFAULT_PREFETCH,
                 memory_channels: int = 1, cold: bool = False) -> None:
        vm = {n.name for n in topology.nodes if n.in_vm}
        for k in topology.links:
            ends = {k.client, k.server} & vm
            if len(ends) == 1:
                raise NotSupported(
                    f"link {k.name}: a node in a VM links only to other VMs (over ivshmem or "
                    "a virtio-serial stream); place both ends in VMs or both as processes")
        self.topology = topology
        self.deterministic = deterministic
        self.cold = cold  # VM nodes boot instead of restoring their snapshots
        self.memory = Memory(self, parse_size(cache) if cache is not None else DEFAULT_CACHE,
                             ways, policy, fault_mode, prefetch)
        # Between VMs, channels to the mnode for workloads in the pnode guest:
        # one per process that runs on remote memory (ivshmem devices are fixed
        # when the guest starts).
        self.memory_channels = memory_channels
        # A private run directory is removed after a clean stop; a given one is kept.
        self._private = run_dir is None
        self.run_dir = run_dir or run_root() / f"{topology.name}.{os.getpid()}.{next(_serial)}"
        self.shm_dir = shm_dir_of(self.run_dir)
        # Disks outlive a node's restart; a private cluster keeps them in its run dir.
        self.disk_dir = disk_dir or self.run_dir
        self.nodes: dict[str, NodeHandle] = {}
        self.secret = secrets.token_hex(32)  # peers on tcp links prove they know it
        self.started_at: float | None = None
        self.stopped = False

    @property
    def name(self) -> str:
        return self.topology.name

    # ---- start -----------------------------------------------------------

    def _runners(self, say: Progress) -> None:
        vm_nodes = [n.name for n in self.topology.nodes if n.in_vm]
        image, probe = guest_kit(vm_nodes, say) if vm_nodes else (None, None)
        # One root image for every restored node: checking it stats ~1,800 files.
        root = (rootfs.build(say).path
                if any(n.placement == "vm" for n in self.topology.nodes)
                and not (self.cold or self.deterministic) else None)
        for n in self.topology.nodes:
            if n.placement == "vm":
                runner = VMRunner(n, self.run_dir, image, probe, self.disk_dir,
                                  self.deterministic, self.cold, say, root)
            elif n.placement == "libvirt":
                runner = LibvirtRunner(n, self.run_dir, image, probe, self.disk_dir, say)
            else:
                runner = ProcessRunner(n, self.run_dir, self.shm_dir, self.disk_dir)
            self.nodes[n.name] = NodeHandle(n, runner)

    def start(self, timeout: float = 30.0, progress: Progress | None = None) -> Cluster:
        """Starts every node (VMs are launched from this thread: QEMU's
        parent-death signal is tied to it) and waits until all answer."""
        say = progress or silent
        private_dir(self.run_dir)
        claim_shm_dir(self.shm_dir)
        self.started_at = time.time()
        try:
            self._runners(say)
            ends, fds = link_ends(self.topology, self.shm_dir, self.run_dir,
                                  self.memory_channels)
            try:
                # A node that calls over a stream between VMs starts after the
                # servers: its QEMU joins the sockets theirs listen on. Nodes
                # with a disk (the snode: its database to open) go first, so
                # their start overlaps the others'.
                order = sorted(self.nodes.values(), key=lambda h: (any(
                    e.attach == "dev" and not e.serve for e in ends[h.node.name]),
                    not h.node.disk))
                for h in order:
                    h.links = ends[h.node.name]
                    self._spawn(h)
                for h in order:
                    h.runner.load()
                for h in order:
                    self._settle(h)
            finally:
                for fd in fds:
                    os.close(fd)
            self._wait_ready(time.monotonic() + timeout, say, list(self.nodes.values()))
            self._check_links(say)
            self._report_nodes()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, h: NodeHandle) -> None:
        if h.control is not None:
            h.control.close()
        h.state = "booting"
        h.control = h.runner.start(self.name, h.links, self.secret)

    def _settle(self, h: NodeHandle) -> None:
        """Lets a node whose start was begun run (a restored guest)."""
        control = h.runner.settle()
        if control is not None:
            h.control.close()
            h.control = control

    def _wait_ready(self, deadline: float, say: Progress, handles: list[NodeHandle]) -> None:
        t0 = time.monotonic()
        pending = {h.node.name: h for h in handles}
        while pending:
            for name, h in list(pending.items()):
                if not h.runner.alive:
                    h.state = "failed"
                    raise ClusterError(h.runner.failure())
                if not h.runner.console_ready():
                    continue
                try:
                    h.call(Op.HELLO, timeout=0.2)
                except TransportError:
                    continue
                h.state, h.boot_s = "ready", time.monotonic() - t0
                say(f"{name} ({h.node.role}, {h.node.placement}) ready in {h.boot_s:.2f} s")
                del pending[name]
            if pending and time.monotonic() > deadline:
                raise ClusterError(
                    f"timed out waiting for {', '.join(pending)} to answer HELLO; "
                    f"see the logs in {self.run_dir}")
            if pending:
                time.sleep(0.01)

    def _check_links(self, say: Progress) -> None:
        """Every link answers: each node pings the nodes it calls."""
        for name, h in self.nodes.items():
            if not any(k.client == name for k in self.topology.links):
                continue
            h.peers = json.loads(h.call(Op.PING, b"peers", timeout=10.0))
            for peer, rtt in h.peers.items():
                say(f"link {name} -> {peer} answers ({rtt:.0f} us round trip from Python)")

    def _report_nodes(self) -> None:
        """Cluster state goes into the snode's DBOS tables."""
        if self.snode() is None:
            return
        self.dbos.state.report_nodes([[h.node.name, h.node.role, h.node.nid, h.node.placement,
                                       h.state] for h in self.nodes.values()])

    # ---- use -------------------------------------------------------------

    def snode(self) -> str | None:
        return next((n.name for n in self.topology.nodes if n.role == "snode"), None)

    @property
    def dbos(self) -> RemoteDBOS:
        """The DBOS services of the cluster's snode (scheduler, IPC, files, …)."""
        snode = self.snode()
        if snode is None:
            raise NotSupported(f"{self.name} has no snode, so no DBOS tables")
        return RemoteDBOS(lambda p: self.call(snode, Op.SQL, p, timeout=60.0))

    def sql(self, query: str, params: Sequence = (), write: bool = False) -> list[list]:
        """Rows of one SQL statement on the snode's DBOS database; write=True
        to let it change anything."""
        return self.dbos.sql(query, list(params), write=write).rows

    def wait_tasks(self, ids: Sequence[int], timeout: float = 300.0) -> int:
        """Waits until the DBOS tasks `ids` are all done (or the timeout
        passes); returns how many are done."""
        deadline = time.monotonic() + timeout
        marks = ",".join("?" * len(ids))
        while True:
            [[done]] = self.sql(f"SELECT count(*) FROM tasks WHERE state = 'done' AND task_id "
                                f"IN ({marks})", list(ids))
            if done == len(ids) or time.monotonic() >= deadline:
                return done
            time.sleep(0.2)

    def node(self, name: str) -> NodeHandle:
        if name not in self.nodes:
            raise ClusterError(f"no node named {name!r} in {self.name} "
                               f"(nodes: {', '.join(self.nodes)})")
        return self.nodes[name]

    def call(self, node: str, opcode: int, payload: bytes = b"", timeout: float = 5.0) -> bytes:
        return self.node(node).call(opcode, payload, timeout)

    def status(self) -> list[dict]:
        rows = []
        for name, h in self.nodes.items():
            if h.state == "ready":
                alive = h.runner.alive
                try:
                    if alive:
                        h.call(Op.PING, timeout=1.0)
                except TransportError:
                    alive = False
                if not alive:
                    h.state = "down"
            elif h.state == "paused" and not h.runner.alive:
                h.state = "down"
            rows.append({
                "name": name, "role": h.node.role, "state": h.state,
                "placement": h.node.placement, "nid": h.node.nid,
                "pid": h.runner.pid, "accel": h.runner.accel,
                "memory": h.node.memory, "boot_s": h.boot_s,
                "links": [k.name for k in self.topology.links_of(name)],
            })
        return rows

    def exec(self, node: str, argv: Sequence[str], timeout: float = 60.0,
             stdin: bytes = b"", files: dict | None = None) -> ExecResult:
        """Runs a command on a node and returns its status and output. files
        ({"path", "task", "source"}): the snode's DBOS file system mounted
        at path on that node while the command runs (a pnode)."""
        if not argv:
            raise ValueError("exec needs a command")
        req = {"argv": list(argv), "timeout": timeout, "stdin": base64.b64encode(stdin).decode(),
               "files": files}
        r = json.loads(self.call(node, Op.EXEC, json.dumps(req).encode(), timeout=timeout + 5))
        return ExecResult(r["returncode"], base64.b64decode(r["stdout"]),
                          base64.b64decode(r["stderr"]), r["truncated"])

    def stats(self) -> dict:
        """Each node's STATS, and "excache": this process's cache counters. The
        regions' page counts also go to the snode's `pages` table."""
        out = {}
        for name, h in self.nodes.items():
            try:
                out[name] = json.loads(self.call(name, Op.STATS))
            except HarnessError as exc:  # a node that is down has no counters
                out[name] = {"state": h.state, "error": str(exc)}
        cache = self.memory.stats()
        if cache is not None:
            out["excache"] = cache
        return out

    # ---- memory (memory.py) -----------------------------------------------------

    @property
    def excache(self) -> ExCache:
        """This process's ExCache over the first mnode (made on first use)."""
        return self.memory.excache

    @property
    def failovers(self) -> list[dict]:
        return self.memory.failovers

    def alloc(self, nbytes: int) -> Region:
        """Disaggregated memory: pages live on the mnode, a cache of
        `cache` bytes in this process, filled by page faults. Writable buffer
        protocol (memoryview, numpy.frombuffer)."""
        return self.memory.alloc(nbytes)

    def free(self, region: Region) -> None:
        """Gives a region's memory back (its memoryviews must be released)."""
        self.memory.free(region)

    FAULTS = ("kill", "pause", "resume", "restart")

    def fault(self, node: str, action: str, timeout: float = 120.0) -> None:
        """Injects a fault: kill (SIGKILL; for a VM, QEMU dies: a power cut),
        pause and resume (SIGSTOP/SIGCONT; QMP stop/cont), restart (kill if
        needed, then start the node again on the same links and disk, and
        wait until it answers)."""
        if action not in self.FAULTS:
            raise ValueError(f"fault must be one of {', '.join(self.FAULTS)}, got {action!r}")
        h = self.node(node)
        if action == "kill":
            h.runner.kill()
            h.state = "down"
        elif action == "pause":
            h.runner.pause()
            h.state = "paused"
        elif action == "resume":
            h.runner.resume()
            h.state = "ready"
        else:
            if any(e.attach in ("fd", "dev") for e in h.links):
                raise NotSupported(f"{node} has stream links, whose peers cannot rejoin a new "
                                   "node; restart works on shm links")
            h.runner.kill()
            # Its channels start afresh; its peers see that and open them again.
            for e in h.links:
                if e.attach in ("shm", "ivshmem"):
                    reset_shm_file(e.path)
            self._spawn(h)
            self._settle(h)
            self._wait_ready(time.monotonic() + timeout, silent, [h])

    # ---- stop ------------------------------------------------------------

    def stop(self, timeout: float = 5.0) -> None:
        """Asks every node to shut down, then terminates and kills stragglers."""
        if self.stopped:
            return
        self.stopped = True
        self.memory.close()
        for h in self.nodes.values():
            if h.runner.alive and h.state == "ready":
                try:
                    h.call(Op.SHUTDOWN, timeout=1.0)
                except HarnessError:
                    pass
        deadline = time.monotonic() + timeout
        clean = True
        for h in self.nodes.values():
            ok = h.runner.stop(max(0.0, deadline - time.monotonic()))
            if h.control is not None:
                h.control.close()
            clean = clean and ok and h.state != "failed"
            h.state = "down"
        shutil.rmtree(self.shm_dir, ignore_errors=True)
        if clean and self._private:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def open_cluster(topology: str | Path | Topology = "lego3", placement: str | None = None,
                 cache: str | int | None = None, run_dir: Path | None = None,
                 timeout: float = 30.0, progress: Progress | None = None,
                 prefetch: int = DEFAULT_PREFETCH, memory_channels: int = 1,
                 fault_mode: str = "sigbus", cold: bool = False) -> Cluster:
    """Starts a cluster and returns it; use it in a `with` block. `cache` and
    `prefetch` (lines a miss brings in, LegoOS's pcache prefetch) shape the
    ExCache behind alloc(); `memory_channels` is how many processes of programs
    in a pnode guest can be on remote memory at once (see run_program).

    `fault_mode` is how alloc()'s pages come in: "sigbus" (the faulting
    thread serves its own miss in a signal handler; the fastest) or "thread"
    (a handler thread). In "sigbus" mode the kernel's own accesses to pages
    not in the cache fail with EFAULT: os.write(fd, region),
    socket.send(region), f.readinto(region). Use fault_mode="thread" for
    memory the kernel reads or writes.

    VM nodes start from their snapshots (taken on the first start of each
    kind of node, see harness.vm.snapshot); `cold` boots them instead."""
    topo = topology if isinstance(topology, Topology) else load(topology)
    if placement is not None:
        topo = topo.with_placement(placement)
    return Cluster(topo, run_dir=run_dir, cache=cache, prefetch=prefetch,
                   fault_mode=fault_mode, memory_channels=memory_channels,
                   cold=cold).start(timeout, progress)
