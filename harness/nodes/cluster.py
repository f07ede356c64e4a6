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
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness._native.excache import DEFAULT_PREFETCH, PAGE, ExCache, Region, prefetch_for
from harness._native.transport import Link, Op, create_shm_file, reset_shm_file
from harness.dbos.remote import RemoteDBOS
from harness.errors import ClusterError, HarnessError, NotSupported, TransportError
from harness.nodes.broker import Channel, Process
from harness.nodes.runners import ProcessRunner, VMRunner
from harness.nodes.spec import AgentSpec, LinkEnd
from harness.paths import private_dir, shm_root
from harness.topology import LinkModel, Node, Topology, load, parse_size
from harness.vm.streams import chardevs, port_name

Progress = Callable[[str], None]
DEFAULT_CACHE = 16 << 20
_serial = itertools.count()


def run_root() -> Path:
    """Where clusters keep their run directories (logs, state, sockets):
    made, or checked, private to this user (paths.private_dir)."""
    env = os.environ.get("HARNESS_RUN_DIR")
    if env:
        return private_dir(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return private_dir(Path(xdg) / "disagg-harness" if xdg
                       else Path(f"/tmp/disagg-harness-{os.getuid()}"))


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
                return self.control.call(opcode, payload, timeout=timeout)
            except TransportError as exc:
                raise type(exc)(f"{self.node.name}: {exc}") from exc


class Cluster:
    """The nodes of one topology. Use as a context manager, or start()/stop()."""

    def __init__(self, topology: Topology, run_dir: Path | None = None,
                 cache: str | int | None = None, disk_dir: Path | None = None,
                 deterministic: bool = False, ways: int = 64, policy: str = "fifo",
                 fault_mode: str = "sigbus", prefetch: int = DEFAULT_PREFETCH,
                 memory_channels: int = 1) -> None:
        vm = {n.name for n in topology.nodes if n.placement == "vm"}
        for k in topology.links:
            ends = {k.client, k.server} & vm
            if len(ends) == 1:
                raise NotSupported(
                    f"link {k.name}: a node in a VM links only to other VMs (over ivshmem or "
                    "a virtio-serial stream); place both ends in VMs or both as processes")
        self.topology = topology
        self.deterministic = deterministic
        self.cache_bytes = parse_size(cache) if cache is not None else DEFAULT_CACHE
        self.cache_options = {"ways": ways, "policy": policy, "fault_mode": fault_mode,
                              "prefetch": prefetch}
        # Between VMs, channels to the mnode for workloads in the pnode guest:
        # one per process that runs on remote memory (ivshmem devices are fixed
        # when the guest starts).
        self.memory_channels = memory_channels
        self._channel_serial = itertools.count()
        self._excache: ExCache | None = None
        self._regions: list[Region] = []
        # A private run directory is removed after a clean stop; a given one is kept.
        self._private = run_dir is None
        self.run_dir = run_dir or run_root() / f"{topology.name}.{os.getpid()}.{next(_serial)}"
        self.shm_dir = shm_root() / self.run_dir.name
        # Disks outlive a node's restart; a private cluster keeps them in its run dir.
        self.disk_dir = disk_dir or self.run_dir
        self.nodes: dict[str, NodeHandle] = {}
        self.failovers: list[dict] = []  # the ExCache's switches to a backup mnode
        self.secret = secrets.token_hex(32)  # peers on tcp links prove they know it
        self.started_at: float | None = None
        self._stopped = False

    @property
    def name(self) -> str:
        return self.topology.name

    # ---- start -----------------------------------------------------------

    def _link_ends(self) -> tuple[dict[str, list[LinkEnd]], list[int]]:
        """Creates every inter-node link; returns each node's ends and the fds
        the controller must close once the agents have inherited them."""
        ends: dict[str, list[LinkEnd]] = {n: [] for n in self.nodes}
        fds: list[int] = []
        role = {n.name: n.role for n in self.topology.nodes}
        placement = {n.name: n.placement for n in self.topology.nodes}
        for k in self.topology.links:
            model = {"latency_ns": k.model.latency_ns, "bytes_per_sec": k.model.bytes_per_sec}
            auth = {"auth": True} if k.kind == "tcp" else {}  # the kind that can cross hosts
            cl = {**model, "peer_role": role[k.server], **auth}
            sv = {**model, "peer_role": role[k.client], **auth}
            if k.kind == "shm":
                # Between VMs the same file backs an ivshmem device in each guest.
                kind = "ivshmem" if placement[k.client] == "vm" else "shm"
                channels = [("", k.name)]
                if kind == "ivshmem" and {role[k.client], role[k.server]} == {"pnode", "mnode"}:
                    channels += [("excache", f"{k.name}.excache{i or ''}")  # for workloads
                                 for i in range(self.memory_channels)]
                for service, fname in channels:
                    path = str(self.shm_dir / f"{fname}.shm")
                    create_shm_file(path, k.size)
                    ends[k.client].append(LinkEnd(k.server, kind, False, path=path, side=0,
                                                  service=service, **cl))
                    ends[k.server].append(LinkEnd(k.client, kind, True, path=path, side=1,
                                                  service=service, **sv))
                continue
            if placement[k.client] == "vm":  # both are (the constructor checked)
                server, client = chardevs(k.kind, k.name, self.run_dir)
                dev = f"/dev/virtio-ports/{port_name(k.name)}"
                ends[k.client].append(LinkEnd(k.server, "dev", False, path=dev, chardev=client,
                                              **cl))
                ends[k.server].append(LinkEnd(k.client, "dev", True, path=dev, chardev=server,
                                              **sv))
                continue
            a, b = _socket_pair(k.kind)
            fds += [a.detach(), b.detach()]
            ends[k.client].append(LinkEnd(k.server, "fd", False, fd=fds[-2], **cl))
            ends[k.server].append(LinkEnd(k.client, "fd", True, fd=fds[-1], **sv))
        return ends, fds

    def _runners(self, say: Progress) -> None:
        vm_nodes = [n for n in self.topology.nodes if n.placement == "vm"]
        image = probe = None
        if vm_nodes:
            from harness import images
            from harness.vm import accel

            image, probe = images.build(progress=say), accel.probe()
        for n in self.topology.nodes:
            runner = (VMRunner(n, self.run_dir, image, probe, self.disk_dir, self.deterministic)
                      if n.placement == "vm" and image and probe
                      else ProcessRunner(n, self.run_dir, self.shm_dir, self.disk_dir))
            self.nodes[n.name] = NodeHandle(n, runner)

    def start(self, timeout: float = 30.0, progress: Progress | None = None) -> Cluster:
        """Starts every node (VMs are launched from this thread: QEMU's
        parent-death signal is tied to it) and waits until all answer."""
        say = progress or (lambda _msg: None)
        private_dir(self.run_dir)
        private_dir(self.shm_dir)
        self.started_at = time.time()
        try:
            self._runners(say)
            ends, fds = self._link_ends()
            try:
                # A node that calls over a stream between VMs starts after the
                # servers: its QEMU joins the sockets theirs listen on.
                for h in sorted(self.nodes.values(), key=lambda h: any(
                        e.kind == "dev" and not e.serve for e in ends[h.node.name])):
                    h.links = ends[h.node.name]
                    self._spawn(h)
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
        n = h.node
        spec = AgentSpec(name=n.name, role=n.role, nid=n.nid, cluster=self.name,
                         secret=self.secret,
                         placement=n.placement, control=LinkEnd("controller", "", True),
                         links=list(h.links))
        if h.control is not None:
            h.control.close()
        h.state = "booting"
        h.control = h.runner.start(spec, [e.fd for e in h.links if e.kind == "fd"])

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
        if self._snode() is None:
            return
        for h in self.nodes.values():
            self.dbos.state.report_node(h.node.name, h.node.role, h.node.nid,
                                        h.node.placement, h.state)

    # ---- use -------------------------------------------------------------

    def _snode(self) -> str | None:
        return next((n.name for n in self.topology.nodes if n.role == "snode"), None)

    @property
    def dbos(self) -> RemoteDBOS:
        """The DBOS services of the cluster's snode (scheduler, IPC, files, …)."""
        snode = self._snode()
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
             stdin: bytes = b"") -> ExecResult:
        """Runs a command on a node and returns its status and output."""
        if not argv:
            raise ValueError("exec needs a command")
        req = {"argv": list(argv), "timeout": timeout, "stdin": base64.b64encode(stdin).decode()}
        r = json.loads(self.call(node, Op.EXEC, json.dumps(req).encode(), timeout=timeout + 5))
        return ExecResult(r["returncode"], base64.b64decode(r["stdout"]),
                          base64.b64decode(r["stderr"]), r["truncated"])

    def free(self, region: Region) -> None:
        """Gives a region's memory back (its memoryviews must be released)."""
        region.free()
        if region in self._regions:
            self._regions.remove(region)

    def stats(self) -> dict:
        """Each node's STATS, and "excache": this process's cache counters. The
        regions' page counts also go to the snode's `pages` table."""
        out = {}
        for name, h in self.nodes.items():
            try:
                out[name] = json.loads(self.call(name, Op.STATS))
            except HarnessError as exc:  # a node that is down has no counters
                out[name] = {"state": h.state, "error": str(exc)}
        if self._excache is not None:
            out["excache"] = self._excache.stats()
            if self._snode() is not None:
                for r in self._regions:
                    if r.address:
                        s = r.stats()
                        self.dbos.state.report_pages(r.id, "pnode0", s["resident"], s["dirty"])
        return out

    @property
    def excache(self) -> ExCache:
        """This process's ExCache over the first memory node (made on first use):
        the caller plays the processor node's workload."""
        if self._excache is None:
            self._excache = self._attach_excache()
        return self._excache

    def _attach_excache(self) -> ExCache:
        primary = self._first_mnode()
        if primary.placement != "process":
            raise NotSupported("alloc() from the host needs the mnode placed as a process; "
                               "with VMs, run the workload on the pnode with exec()")
        link = self._memory_channel(primary.name)
        ways = min(self.cache_options["ways"], max(1, self.cache_bytes // PAGE))
        capacity = self.cache_bytes - self.cache_bytes % (ways * PAGE)
        cache = ExCache(link, capacity, ways, self.cache_options["policy"],
                        self.cache_options["fault_mode"],
                        prefetch=prefetch_for(capacity, ways, self.cache_options["prefetch"]))
        backup = self._backup_of(primary.name)
        if backup is not None:
            # The primary forwards every write to the backup before it answers;
            # the cache fails over only while the primary says the backup is
            # in sync. The backup's side of that channel is an ordinary
            # excache channel: forwards are told apart by their opcode.
            path = str(self.shm_dir / f"replica-{primary.name}-{backup}.shm")
            create_shm_file(path, 1 << 22)
            self.call(backup, Op.ATTACH, json.dumps(
                {"service": "excache", "path": path, "side": 1}).encode())
            self.call(primary.name, Op.ATTACH, json.dumps(
                {"service": "replica", "path": path, "side": 0}).encode())
            cache.set_backup(self._memory_channel(backup))
            threading.Thread(target=self._watch_failover, args=(cache, primary.name, backup),
                             name="failover-watch", daemon=True).start()
        return cache

    def _backup_of(self, mnode: str) -> str | None:
        """The mnode that `mnode` links to (the topology's replica), if any."""
        role = {n.name: n.role for n in self.topology.nodes}
        return next((k.server for k in self.topology.links
                     if k.client == mnode and role[k.server] == "mnode"), None)

    def memory_channel_file(self, mnode: str, name: str) -> tuple[str, LinkModel | None]:
        """A new shm channel file that mnode's store serves (ATTACH), for this
        process or a program's; its link model is the topology's link to mnode."""
        k = next((k for k in self.topology.links if mnode in (k.client, k.server)), None)
        model = k.model if k is not None and k.model.active else None
        path = str(self.shm_dir / f"{name}.shm")
        create_shm_file(path, 1 << 22)
        req: dict = {"service": "excache", "path": path, "side": 1}
        if model is not None:
            req.update(latency_ns=model.latency_ns, bytes_per_sec=model.bytes_per_sec)
        self.call(mnode, Op.ATTACH, json.dumps(req).encode())
        return path, model

    def _memory_channel(self, mnode: str) -> Link:
        """A new channel from this process to mnode's store."""
        path, model = self.memory_channel_file(mnode, f"excache-{mnode}")
        link = Link.shm_open(path, 0, name=f"excache-{mnode}")
        if model is not None:
            link.set_model(model.latency_ns, model.bytes_per_sec)
        return link

    def program_channel(self, proc: Process) -> Channel:
        """A channel to the first mnode for one process of a program on
        remote memory (the broker's source, with placement "process")."""
        mnode = self._first_mnode().name
        path, model = self.memory_channel_file(
            mnode, f"program-{proc.pid}-{next(self._channel_serial)}")
        return Channel("shm", path, 0, mnode, model.latency_ns if model else 0,
                       model.bytes_per_sec if model else 0)

    def _first_mnode(self) -> Node:
        mnodes = [n for n in self.topology.nodes if n.role == "mnode"]
        if not mnodes:
            raise NotSupported(f"{self.name} has no mnode to hold disaggregated memory")
        return mnodes[0]

    def _watch_failover(self, cache: ExCache, primary: str, backup: str) -> None:
        """Logs the cache's failover in the snode's events table (the fault
        handler that performs it cannot: it runs in a signal handler), and
        the moment the backup fell behind (the primary lost it and went on
        alone: from then on the cache refuses to fail over to it)."""
        def event(kind: str, detail: str) -> None:
            if self._snode() is not None:
                self.sql("INSERT INTO events (time, node, kind, detail) VALUES (?,?,?,?)",
                         (time.time(), "pnode0", kind, detail), write=True)

        behind = False
        while not self._stopped and self._excache in (None, cache):  # None: being made
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
        """Disaggregated memory: pages live on the mnode, a cache of
        `cache` bytes in this process, filled by page faults. Writable buffer
        protocol (memoryview, numpy.frombuffer)."""
        if nbytes <= 0:
            raise ValueError(f"alloc needs a positive size, got {nbytes}")
        region = self.excache.alloc(-(-nbytes // PAGE) * PAGE)
        self._regions.append(region)
        if self._snode() is not None:
            mnode = next(n.name for n in self.topology.nodes if n.role == "mnode")
            self.dbos.state.report_region(region.id, mnode, region.size, owner="pnode0")
        return region

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
            if any(e.kind in ("fd", "dev") for e in h.links):
                raise NotSupported(f"{node} has stream links, whose peers cannot rejoin a new "
                                   "node; restart works on shm links")
            h.runner.kill()
            # Its channels start afresh; its peers see that and open them again.
            for e in h.links:
                if e.kind in ("shm", "ivshmem"):
                    reset_shm_file(e.path)
            self._spawn(h)
            self._wait_ready(time.monotonic() + timeout, lambda _m: None, [h])

    # ---- stop ------------------------------------------------------------

    def stop(self, timeout: float = 5.0) -> None:
        """Asks every node to shut down, then terminates and kills stragglers."""
        if self._stopped:
            return
        self._stopped = True
        # The cache first: its regions' memory lives on the nodes about to stop.
        for r in self._regions:
            try:
                r.free()
            except (BufferError, HarnessError):
                pass  # still in use by the caller: the mapping dies with the cache
        self._regions.clear()
        self._excache = None
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


def _socket_pair(kind: str) -> tuple[socket.socket, socket.socket]:
    """A connected pair of the given kind; tcp stays on loopback."""
    if kind == "unix":
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname(), timeout=5.0)
        srv.settimeout(5.0)
        b, _ = srv.accept()
    a.settimeout(None)
    b.settimeout(None)
    return a, b


def open_cluster(topology: str | Path | Topology = "lego3", placement: str | None = None,
                 cache: str | int | None = None, run_dir: Path | None = None,
                 timeout: float = 30.0, progress: Progress | None = None,
                 prefetch: int = DEFAULT_PREFETCH, memory_channels: int = 1) -> Cluster:
    """Starts a cluster and returns it; use it in a `with` block. `cache` and
    `prefetch` (lines a miss brings in, LegoOS's pcache prefetch) shape the
    ExCache behind alloc(); `memory_channels` is how many processes of programs
    in a pnode guest can be on remote memory at once (see run_program)."""
    topo = topology if isinstance(topology, Topology) else load(topology)
    if placement is not None:
        topo = topo.with_placement(placement)
    return Cluster(topo, run_dir=run_dir, cache=cache, prefetch=prefetch,
                   memory_channels=memory_channels).start(timeout, progress)
