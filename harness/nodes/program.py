"""Running a user's unmodified program on the pnode, its anonymous memory on
the memory node (`harness run --memory remote`).

The program starts with the interposer (native/interpose) and Debian's
mimalloc preloaded; every process it becomes (forks, execs) asks the broker
for a channel of its own. With placement "process" the program is a host
process beside the nodes; with "vm" this module runs inside the pnode guest
(`python3 -m harness.nodes.program REQUEST`), over the guest's ivshmem
memory channels, and prints its result as one JSON line."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness import remote_errors
from harness._native.excache import DEFAULT_PREFETCH, PREFETCH_MAX
from harness.errors import HarnessError, NotSupported
from harness.nodes.broker import Broker, Channel, Process, summarize
from harness.text import tail

MIMALLOC = ("/usr/lib/x86_64-linux-gnu/libmimalloc.so.2", "/usr/lib/libmimalloc.so.2")
ARENA = 32 << 30  # address space reserved for a process's remote memory
CLIENT_WAIT = 60.0  # seconds a program may take to listen before its client starts


@dataclass
class ProgramResult:
    returncode: int
    seconds: float  # the program's wall time, start to exit
    stats: dict
    stdout: bytes = b""
    stderr: bytes = b""
    client_returncode: int | None = None
    client_seconds: float | None = None
    client_stdout: bytes = b""
    client_stderr: bytes = b""

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("stdout", "stderr", "client_stdout", "client_stderr"):
            d[k] = base64.b64encode(d[k]).decode()
        return d

    @classmethod
    def from_json(cls, d: dict) -> ProgramResult:
        for k in ("stdout", "stderr", "client_stdout", "client_stderr"):
            d[k] = base64.b64decode(d[k])
        return cls(**d)


@dataclass
class Options:
    """What `harness run` was asked for."""

    memory: str = "local"
    cache: int = 16 << 20
    policy: str = "fifo"
    prefetch: int = DEFAULT_PREFETCH
    client: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 600.0
    capture: bool = False

    def check(self) -> None:
        if self.memory not in ("local", "remote"):
            raise HarnessError(f"--memory must be local or remote, got {self.memory!r}")
        if self.policy not in ("fifo", "lru", "random"):
            raise HarnessError(f"--policy must be fifo, lru or random, got {self.policy!r}")
        if self.cache < 4096:
            raise HarnessError(f"--cache must hold at least one 4 KiB page, got {self.cache}")
        if not 1 <= self.prefetch <= PREFETCH_MAX:
            raise HarnessError(f"--prefetch must be 1 to {PREFETCH_MAX} lines, got "
                               f"{self.prefetch}")


def interposer() -> Path:
    """The interposer's shared object, built with the package."""
    from harness._native import shared_object

    return shared_object("dh_interpose")


def mimalloc() -> Path:
    for p in MIMALLOC:
        if Path(p).exists():
            return Path(p)
    raise HarnessError("remote memory needs Debian's mimalloc (libmimalloc.so.2): "
                       "`apt-get install libmimalloc2.0` (scripts/setup.sh installs it)")


def check_program(argv0: str, env_path: str | None = None) -> Path:
    """The program's file, or why its memory cannot be remote: LD_PRELOAD
    does not reach a static or a set-user-ID program."""
    found = shutil.which(argv0, path=env_path)
    if found is None:
        raise HarnessError(f"no such program: {argv0}")
    path = Path(found).resolve()
    mode = path.stat().st_mode
    if mode & (stat.S_ISUID | stat.S_ISGID):
        raise NotSupported(f"{argv0} is set-user-ID or set-group-ID: the kernel ignores "
                           "LD_PRELOAD for it, so its memory cannot be remote; run a copy "
                           "without the bit, or use --memory local")
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        with open(path, "rb") as f:
            dynamic = any(s["p_type"] == "PT_INTERP" for s in ELFFile(f).iter_segments())
    except ELFError:
        return path  # a script: its interpreter is what runs, and is checked when it execs
    if not dynamic:
        raise NotSupported(f"{argv0} is statically linked: the interposer cannot be loaded "
                           "into it, so its memory cannot be remote; use a dynamically "
                           "linked build, or --memory local")
    return path


def remote_env(broker: Path, opts: Options) -> dict[str, str]:
    preload = [str(interposer()), str(mimalloc())]
    if os.environ.get("LD_PRELOAD"):
        preload.append(os.environ["LD_PRELOAD"])
    return {"LD_PRELOAD": ":".join(preload), "DH_BROKER": str(broker),
            "DH_CACHE_BYTES": str(opts.cache), "DH_POLICY": opts.policy,
            "DH_PREFETCH": str(opts.prefetch), "DH_ARENA_BYTES": str(ARENA)}


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


def _listening(pid: int) -> bool:
    """Whether the process holds a listening TCP socket."""
    try:
        fds = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        return False
    inodes = {f[8:-1] for f in fds if f.startswith("socket:[")}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                        return True
        except OSError:
            continue
    return False


def _run_client(p: subprocess.Popen, opts: Options, out: dict) -> None:
    deadline = time.monotonic() + CLIENT_WAIT
    while not _listening(p.pid):
        if p.poll() is not None or time.monotonic() > deadline:
            raise HarnessError(f"the program exited or did not listen within {CLIENT_WAIT:g} s, "
                               "so its client never started")
        time.sleep(0.02)
    t0 = time.monotonic()
    c = subprocess.run(opts.client, capture_output=True, timeout=opts.timeout, check=False,
                       env={**os.environ, **opts.env})
    out.update(client_returncode=c.returncode, client_seconds=time.monotonic() - t0,
               client_stdout=c.stdout, client_stderr=c.stderr)


def launch(argv: list[str], opts: Options, broker: Broker | None) -> ProgramResult:
    """Runs argv (with remote memory when a broker is given) and waits for it."""
    env = {**os.environ, **opts.env}
    if broker is not None:
        check_program(argv[0], env.get("PATH"))
        env.update(remote_env(broker.path, opts))
    pipe = subprocess.PIPE if opts.capture or opts.client else None
    t0 = time.monotonic()
    try:
        p = subprocess.Popen(argv, env=env, stdout=pipe, stderr=pipe,
                             stdin=subprocess.DEVNULL if opts.capture else None)
    except OSError as exc:
        raise HarnessError(f"cannot start {argv[0]}: {exc}") from exc
    peak = [0]
    done = threading.Event()

    def sample() -> None:  # the program's own local anonymous memory, at its peak
        while not done.wait(0.01):
            peak[0] = max(peak[0], _rss_anon(p.pid))

    threading.Thread(target=sample, daemon=True).start()
    client: dict = {}
    try:
        if opts.client:
            _run_client(p, opts, client)
            p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=opts.timeout)
    except (subprocess.TimeoutExpired, HarnessError):
        p.kill()
        p.communicate()
        raise
    except BaseException:
        p.kill()
        raise
    finally:
        done.set()
    seconds = time.monotonic() - t0
    stats: dict = {"exit": p.returncode, "memory": opts.memory, "local_peak_anon_bytes": peak[0]}
    if broker is not None:
        if not broker.wait_idle(5.0):
            stats["unfinished"] = "some processes of the program were still running"
        stats.update(cache_bytes=opts.cache, policy=opts.policy, prefetch=opts.prefetch,
                     **summarize(broker.processes))
        if broker.refused:
            stats["refused"] = broker.refused
    else:
        stats["peak_anon_bytes"] = peak[0]
    return ProgramResult(p.returncode, seconds, stats, stdout or b"", stderr or b"", **client)


def summary(res: ProgramResult) -> str:
    """A short account for the harness's stderr."""
    s = res.stats
    if s["memory"] != "remote":
        return (f"memory local: exit {res.returncode} in {res.seconds:.2f} s, peak anonymous "
                f"memory {s['peak_anon_bytes'] / 2**20:.1f} MiB")
    e = s["excache"]
    procs = s["processes"]
    silent = [p for p in procs if not p["reported"]]
    lines = [f"memory remote: exit {res.returncode} in {res.seconds:.2f} s; "
             f"{len(procs)} process{'es' if len(procs) != 1 else ''} on remote memory, "
             f"cache {s['cache_bytes'] / 2**20:g} MiB each ({s['policy']}, prefetch "
             f"{s['prefetch']}), peak remote {s['peak_remote_bytes'] / 2**20:.1f} MiB",
             f"  {e['misses']:,} misses ({e['remote_fetches']:,} fetched, {e['zero_fills']:,} "
             f"zero-filled), {e['evictions']:,} evictions, {e['dirty_flushes']:,} dirty "
             f"flushes, {e['prefetched']:,} prefetched"]
    if silent:
        names = ", ".join(f"{p['name']} ({p['pid']})" for p in silent)
        lines.append(f"  {len(silent)} process(es) ended without a report (exec, _exit or a "
                     f"signal): {names}")
    if s.get("local_fallback_bytes"):
        lines.append(f"  {s['local_fallback_bytes'] / 2**20:.1f} MiB stayed local: the arena "
                     "was full")
    for r in s.get("refused", []):
        lines.append(f"  refused a channel: {r}")
    return "\n".join(lines)


# ---- from the controller ------------------------------------------------------------

def run_program(cluster, argv: list[str], memory: str = "local", cache: int = 16 << 20,
                policy: str = "fifo", prefetch: int | None = None,
                client: list[str] | None = None, env: dict[str, str] | None = None,
                timeout: float = 600.0, capture: bool = True,
                task: int | None = None, files: dict | None = None) -> ProgramResult:
    """Runs argv on the cluster's pnode: a host process beside process-placed
    nodes, or inside the pnode guest. With memory="remote" its anonymous
    memory lives on the first mnode behind an ExCache of `cache` bytes per
    process, and the run is recorded in DBOS (a task, its regions and pages).
    `client` runs alongside, on local memory, once the program listens on a
    TCP port; when it exits the program gets SIGTERM (a server and its load).
    `task`: an existing DBOS task to record the run in, instead of a new one.
    `files`: in a pnode guest, the DBOS mount for the run (Cluster.exec)."""
    if not argv:
        raise HarnessError("give the program to run")
    opts = Options(memory, cache, policy, DEFAULT_PREFETCH if prefetch is None else prefetch,
                   client, dict(env or {}), timeout, capture)
    opts.check()
    pnode = next((n for n in cluster.topology.nodes if n.role == "pnode"), None)
    if pnode is None:
        raise NotSupported(f"{cluster.name} has no pnode to run programs on")
    if pnode.placement == "process":
        broker = (Broker(cluster.run_dir / "broker.sock", cluster.memory.program_channel)
                  if memory == "remote" else None)
        try:
            res = launch(argv, opts, broker)
        finally:
            if broker is not None:
                broker.stop()
    else:
        opts.capture = True  # the agent returns the guest's output when the program ends
        req = json.dumps({"argv": argv, "options": asdict(opts)})
        r = cluster.exec(pnode.name, [sys.executable, "-m", "harness.nodes.program", req],
                         timeout=timeout + 60, files=files)
        lines = r.stdout.decode(errors="replace").strip().splitlines()
        failed = remote_errors.decode(lines[-1], pnode.name) if lines else None
        if failed is not None:
            raise failed
        try:
            res = ProgramResult.from_json(json.loads(lines[-1]))
        except (IndexError, ValueError, KeyError, TypeError) as exc:
            raise HarnessError(f"the launcher in {pnode.name} failed (status {r.returncode}): "
                               f"{tail(r.stderr, 2000)}") from exc
    if memory == "remote" and any(n.role == "snode" for n in cluster.topology.nodes):
        record(cluster, pnode.name, argv, res, task)
    return res


def record(cluster, pnode: str, argv: list[str], res: ProgramResult,
           task: int | None = None) -> int:
    """The run in DBOS: a task (new, or the given one finished), each
    process's region in `regions` (owned by the task) and its cached lines in
    `pages`, and an event. Returns the task."""
    s = res.stats
    mnode = cluster.memory.first_mnode().name
    now = time.time()
    state = "done" if res.returncode == 0 else "failed"
    result = json.dumps({k: v for k, v in s.items() if k != "processes"})
    if task is None:
        [[task]] = cluster.sql(
            "INSERT INTO tasks (state, worker_id, command, result, created, started, finished) "
            "VALUES (?, NULL, ?, ?, ?, ?, ?) RETURNING task_id",
            (state, json.dumps(argv), result, now - res.seconds, now - res.seconds, now),
            write=True)
    else:
        cluster.sql("UPDATE tasks SET state = ?, result = ?, finished = ? WHERE task_id = ?",
                    (state, result, now, task), write=True)
    for p in s["processes"]:
        if not p["reported"]:
            continue
        owner = f"task {task}: {p['name']} (pid {p['pid']})"
        cluster.dbos.state.report_region(p["region"], mnode, ARENA, owner=owner)
        cluster.dbos.state.report_pages(p["region"], pnode, p["resident_pages"],
                                        p["dirty_pages"])
    cluster.sql("INSERT INTO events (time, node, task_id, kind, detail) VALUES (?,?,?,?,?)",
                (now, pnode, task, "program",
                 f"{argv[0]} exit {res.returncode}: {s['excache']['misses']} misses, "
                 f"peak remote {s['peak_remote_bytes']} bytes"), write=True)
    s["task"] = task
    return task


# ---- inside the pnode guest -------------------------------------------------------

class GuestChannels:
    """The guest's ivshmem memory channels, one per live process. A channel
    is taken back when its process is gone: its rings are then idle (a late
    reply to a process that was killed mid-call is dropped by its request id)."""

    def __init__(self) -> None:
        from harness.nodes.guest import node_spec

        self.spec = node_spec()
        self.pool = [e for e in self.spec.links if e.service == "excache" and not e.serve]
        self.total = len(self.pool)
        self.lock = threading.Lock()

    def take(self, proc: Process) -> Channel:
        with self.lock:
            if not self.pool:
                raise HarnessError(
                    f"{self.spec.name} has no memory channel left ({self.total} in all, one per "
                    "live process on remote memory); run with more: `harness run --channels N` "
                    "or open_cluster(memory_channels=N)")
            end = self.pool.pop(0)
        return Channel("ivshmem", end.path, end.side, end.peer, end.latency_ns,
                       end.bytes_per_sec)

    def give(self, ch: Channel) -> None:
        with self.lock:
            self.pool.append(next(e for e in self.spec.links if e.path == ch.path))


def main(argv: list[str] | None = None) -> int:
    req = json.loads((argv or sys.argv[1:])[0])
    opts = Options(**req["options"])
    broker = None
    if opts.memory == "remote":
        pool = GuestChannels()
        broker = Broker(Path(f"/tmp/dh-broker.{os.getpid()}.sock"), pool.take, pool.give)
    try:
        res = launch(req["argv"], opts, broker)
    except HarnessError as exc:
        print(remote_errors.encode(exc).decode())
        return 0
    finally:
        if broker is not None:
            broker.stop()
    print(json.dumps(res.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
