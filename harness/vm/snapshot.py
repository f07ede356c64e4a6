"""Snapshot starts: a guest's saved state, taken once at a clean point and
loaded by every later start instead of a cold TCG boot.

The clean point is before anything that is one start's own exists in the
guest: for `harness boot`, init with its modules loaded and the host root
not yet mounted (DH-SNAP); for a cluster node, the agent imported from the
root image (rootfs.py) and waiting for its spec (DH-WAITING). The state is
written by `migrate fd:` to a file the harness opens and hands QEMU (QEMU's
sandbox lets it open nothing; 7.2 has no `file:` migration). The guest's
RAM is not in it: the snapshot's guest ran on a shared file, which each
restore maps copy-on-write (x-ignore-shared, as in Kata's VM templating),
so a restore loads only the devices' state and its guest faults in the
pages it touches.

The ivshmem devices are not in the state: a region's contents would be
loaded over a peer's live ring, and with x-ignore-shared QEMU 7.2 refuses to
load a region mapped as a BAR ("Mismatched GPAs": it checks the address as
RAM loads, before any device's state). A restore has them on its command
line from the start, in PCI slots that were empty when the state was saved,
and the agent finds them by rescanning the bus (harness.nodes.agent).
Hot-plugging them through ACPI instead cost the restored guest ~0.5 s of
AML under TCG.

A restored guest is made fresh before it does anything: the host sends one
line on the dh.go port, which the guest's dh-fresh reads: the wall clock
(the saved one is old), 64 bytes of host entropy mixed in with an immediate
CRNG reseed (else two guests from one snapshot share a random stream), and
the start's own parameters (its run directory, script, kept paths). The
cluster's secret and links come afterwards in the agent's spec, so no
secret is ever in a snapshot.

Snapshots are cached by a key over everything that changes the saved state:
QEMU's command line with this start's paths taken out (the shm files and
the disk count by size), the QEMU binary, the image and the root image
(their keys are in their paths), and the source of the modules that make
the state (this one and the command line's). A snapshot that fails to load
anyway is dropped and taken again, once."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import select
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from harness.errors import BootTimeout, LaunchError
from harness.paths import cache_dir, prune_newest, run_root
from harness.progress import Progress, silent
from harness.vm import qemu
from harness.vm.machine import VM
from harness.vm.qemu import MachineConfig, command

SNAPSHOT_VERSION = 2  # 2: the RAM in a file of its own
KEEP = 12  # snapshots kept, the most recently used (other checkouts share the cache)
GO_PORT = "dh.go"
SNAP_RE = re.compile(rb"DH-SNAP")        # init, before the host root (harness boot)
WAITING_RE = re.compile(rb"DH-WAITING")  # the agent, before its spec (a cluster node)
FRESH_ACK = b"DH-FRESH\n"  # dh-fresh's answer on the dh.go port: restored and fresh
STATE_FD = "dhstate"


@dataclass
class Snapshot:
    key: str
    node: str        # the node (or boot role) it was built for
    state: str       # the saved VM state
    bytes: int       # on disk: the state and the RAM file's used blocks
    build_s: float   # the cold boot and the save
    built: float

    @property
    def ram(self) -> Path:
        """The guest's RAM as saved: a restore maps it copy-on-write."""
        return Path(self.state).with_name("ram")


def snapshots_dir() -> Path:
    return cache_dir() / "snapshots"


def why_not(cfg: MachineConfig) -> str | None:
    """Why this guest cannot start from a snapshot, or None if it can."""
    if cfg.deterministic:
        return "deterministic guests count instructions from boot"
    if cfg.streams:
        return "its links to other guests are socket streams, joined at QEMU's start"
    return None


def key(cfg: MachineConfig) -> str:
    text = " ".join(command(cfg))
    subs = [(str(cfg.run_dir.resolve()), "@RUN"), (str(cfg.run_dir), "@RUN")]
    if cfg.disk is not None:
        subs.append((str(cfg.disk), f"@DISK:{cfg.disk.stat().st_size}"))
    for old, new in subs:
        text = text.replace(old, new)
    text = re.sub(rf"\b{re.escape(cfg.name)}\b", "@NAME", text)
    st = Path(os.path.realpath(cfg.accel.qemu)).stat()
    h = hashlib.sha256(f"{SNAPSHOT_VERSION}\0{text}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    h.update(_sources())
    return h.hexdigest()[:16]


@functools.cache
def _sources() -> bytes:
    """The modules that make the saved state, as loaded by this process."""
    return b"".join(hashlib.sha256(Path(m).read_bytes()).digest()
                    for m in (__file__, qemu.__file__))


def _load(d: Path) -> Snapshot | None:
    try:
        snap = Snapshot(**json.loads((d / "meta.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if not (Path(snap.state).is_file() and snap.ram.is_file()):
        return None
    os.utime(d)  # its last use: pruning keeps the recently used
    return snap


def ensure(cfg: MachineConfig, point: re.Pattern[bytes], say: Progress = silent,
           timeout: float = 120.0) -> Snapshot:
    """The snapshot for cfg, built by a cold boot to `point` if missing. A
    lock per key: two starts needing the same one build it once."""
    k = key(cfg)
    d = snapshots_dir() / k
    if (snap := _load(d)) is not None:
        return snap
    snapshots_dir().mkdir(parents=True, exist_ok=True)
    with open(snapshots_dir() / f"{k}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (snap := _load(d)) is not None:
            return snap
        return _build(cfg, k, point, say, timeout)


def _build(cfg: MachineConfig, k: str, point: re.Pattern[bytes], say: Progress,
           timeout: float) -> Snapshot:
    t0 = time.monotonic()
    say(f"{cfg.name}: no snapshot yet ({k}); booting once to take it")
    with tempfile.TemporaryDirectory(prefix=f"{k}.", dir=snapshots_dir()) as tmp, \
            tempfile.TemporaryDirectory(prefix=f"snap-{cfg.name}.", dir=run_root()) as run:
        work = Path(tmp)
        # The build guest never gets the start's own disk: a scratch one of
        # the same size. Its sockets go where socket paths are short.
        disk = None
        if cfg.disk is not None:
            disk = work / "disk"
            with open(disk, "wb") as f:
                f.truncate(cfg.disk.stat().st_size)
        bcfg = replace(cfg, name=f"snap-{cfg.name}", run_dir=Path(run), disk=disk,
                       incoming=False, ram_file=work / "ram", ram_private=False)
        state = work / "state"
        with VM(bcfg) as vm:
            vm.launch()
            vm.wait_for(point, timeout, f"{point.pattern.decode()} (the snapshot point)")
            _save(vm, state)
        out = work / "out"
        out.mkdir()
        state.rename(out / "state")
        (work / "ram").rename(out / "ram")
        d = snapshots_dir() / k
        snap = Snapshot(key=k, node=cfg.name, state=str(d / "state"),
                        bytes=(out / "state").stat().st_size
                        + (out / "ram").stat().st_blocks * 512,
                        build_s=round(time.monotonic() - t0, 2), built=time.time())
        (out / "meta.json").write_text(json.dumps(asdict(snap), indent=1))
        shutil.rmtree(d, ignore_errors=True)
        out.rename(d)  # atomic: a reader sees a whole snapshot or none
    _prune()
    say(f"{cfg.name}: snapshot {k} taken in {snap.build_s:.1f} s ({snap.bytes >> 20} MiB)")
    return snap


def _prune() -> None:
    for d in prune_newest(snapshots_dir(), "meta.json", KEEP):
        (snapshots_dir() / f"{d.name}.lock").unlink(missing_ok=True)


def _wait_status(vm: VM, cmd: str, want: set[str], timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = vm.qmp(cmd).get("status")  # type: ignore[union-attr]
        except Exception as exc:  # QMP goes when QEMU exits: say what QEMU said
            if vm.wait(1.0) is None:
                raise
            raise LaunchError(f"{vm.name}: QEMU exited with status {vm.exit_code} during "
                              f"{what}; it said:\n{vm.console_tail(10)}", cmdline=vm.cmdline,
                              console=vm.console_tail()) from exc
        if status in want:
            return status
        if status in ("failed", "cancelled"):
            raise LaunchError(f"{vm.name}: {what} {status}", cmdline=vm.cmdline)
        if time.monotonic() > deadline:
            raise BootTimeout(f"{vm.name}: {what} did not finish within {timeout:g} s "
                              f"(status {status})")
        time.sleep(0.005)


def _save(vm: VM, path: Path) -> None:
    vm.qmp("stop")  # a still guest: one pass, no dirty-page rounds
    _ignore_shared(vm)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        vm.qmp_fd(STATE_FD, fd)
    finally:
        os.close(fd)
    vm.qmp("migrate", uri=f"fd:{STATE_FD}")
    _wait_status(vm, "query-migrate", {"completed"}, 120.0, "saving the VM state")


def go_line(params: dict[str, str]) -> bytes:
    """The line dh-fresh reads: the time, fresh entropy, the start's own
    parameters (key=value, no spaces)."""
    words = [f"{k}={v}" for k, v in params.items()]
    if any(c.isspace() for w in words for c in w):
        raise ValueError(f"per-start parameters must not contain spaces: {words}")
    return f"{time.time_ns()} {os.urandom(64).hex()} {' '.join(words)}\n".encode()


def _ignore_shared(vm: VM) -> None:
    """The guest's RAM is the snapshot's file (shared at the save, mapped
    copy-on-write by a restore), so it stays out of the state: a restore
    loads only the devices' state. Both ends must say so."""
    vm.qmp("migrate-set-capabilities",
           capabilities=[{"capability": "x-ignore-shared", "state": True}])


def begin(cfg: MachineConfig, snap: Snapshot, params: dict[str, str]) -> VM:
    """QEMU started from the snapshot, waiting for its state (load() starts
    the load), and sent the guest's per-start line (held until the
    restored guest reads it)."""
    vm = VM(replace(cfg, incoming=True, ram_file=snap.ram, ram_private=True))
    try:
        vm.launch()
        vm.ports[GO_PORT].sendall(go_line(params))
        _ignore_shared(vm)
    except BaseException:
        vm.stop()
        raise
    return vm


def load(vm: VM, snap: Snapshot) -> Exception | None:
    """Starts a begun QEMU loading the snapshot's state (finish() waits
    for it); how that failed, if it did (QMP fails as QEMU exits)."""
    try:
        fd = os.open(snap.state, os.O_RDONLY)
        try:
            vm.qmp_fd(STATE_FD, fd)
        finally:
            os.close(fd)
        vm.qmp("migrate-incoming", uri=f"fd:{STATE_FD}")
    except Exception as exc:
        return exc
    return None


def finish(vm: VM, timeout: float = 30.0) -> None:
    """Waits for the state to load: the guest runs by itself then (its saved
    state has no run state, see qemu.command), and its dh-fresh answers on
    the dh.go port once it has made the guest fresh."""
    port, deadline = vm.ports[GO_PORT], time.monotonic() + timeout
    got = b""
    while not got.endswith(FRESH_ACK):
        if not vm.alive:
            raise vm.died("while loading the snapshot")
        if time.monotonic() > deadline:
            raise BootTimeout(f"{vm.name}: the snapshot did not load and run within "
                              f"{timeout:g} s")
        if not select.select([port], [], [], 0.05)[0]:
            continue
        try:
            chunk = port.recv(64)
        except OSError:  # reset as QEMU exits
            chunk = b""
        if not chunk:
            raise vm.died("while loading the snapshot")
        got += chunk


def drop(snap: Snapshot) -> None:
    """Removes a snapshot that did not load: the next start takes it again."""
    shutil.rmtree(Path(snap.state).parent, ignore_errors=True)


@dataclass
class Restore:
    """A restore under way: QEMU started (begin()); load() starts its load,
    wait() lets the guest run. A cluster begins every restore, then starts
    every load, so that no QEMU starts beside guests already running and
    the states load side by side."""
    cfg: MachineConfig
    point: re.Pattern[bytes]
    params: dict[str, str]
    say: Progress
    snap: Snapshot
    vm: VM
    loaded: bool = False
    _failed: Exception | None = None

    def load(self) -> None:
        if not self.loaded:
            self._failed, self.loaded = load(self.vm, self.snap), True

    def wait(self) -> VM:
        """The running guest. A snapshot that does not load is dropped and
        taken again, once: the guest is then a new QEMU (a new self.vm)."""
        self.load()
        try:
            _finish(self.vm, self.snap, self._failed)
            return self.vm
        except LaunchError as exc:
            self.say(f"{self.cfg.name}: snapshot {self.snap.key} did not load ({exc}); "
                     "taking it again")
        self.snap = ensure(self.cfg, self.point, self.say)
        self.vm = begin(self.cfg, self.snap, self.params)
        _finish(self.vm, self.snap, load(self.vm, self.snap))
        return self.vm


def _finish(vm: VM, snap: Snapshot, failed: Exception | None) -> None:
    """finish() after load() (failed: how that failed); a guest that fails
    is stopped, and a snapshot whose load fails is dropped."""
    try:
        if failed is not None:
            if not vm.alive:
                raise vm.died(f"as its load began ({failed!r})")
            raise LaunchError(f"{vm.name}: its load did not begin: {failed!r}",
                              cmdline=vm.cmdline, console=vm.console_tail())
        finish(vm)
    except LaunchError:
        vm.stop()
        drop(snap)
        raise
    except BaseException:
        vm.stop()
        raise


def restore(cfg: MachineConfig, point: re.Pattern[bytes], params: dict[str, str],
            say: Progress = silent) -> Restore:
    """A restore of cfg's snapshot begun (the snapshot taken first if
    missing); its wait() lets the guest run. A QEMU that fails to start is
    started again, once."""
    snap = ensure(cfg, point, say)
    try:
        vm = begin(cfg, snap, params)
    except LaunchError as exc:
        say(f"{cfg.name}: QEMU did not start from snapshot {snap.key} ({exc}); trying again")
        snap = ensure(cfg, point, say)
        vm = begin(cfg, snap, params)
    return Restore(cfg, point, params, say, snap, vm)


def start(cfg: MachineConfig, point: re.Pattern[bytes], params: dict[str, str],
          say: Progress = silent) -> VM:
    """A running guest restored from cfg's snapshot (restore() and wait())."""
    return restore(cfg, point, params, say).wait()


def list_snapshots() -> list[Snapshot]:
    d = snapshots_dir()
    found = [_load(p) for p in sorted(d.iterdir()) if p.is_dir()] if d.is_dir() else []
    return sorted((s for s in found if s is not None), key=lambda s: s.built)


def clean() -> int:
    """Removes every snapshot and root image; returns bytes freed."""
    from harness.vm.rootfs import roots_dir

    total = 0
    for d in (snapshots_dir(), roots_dir()):
        if d.is_dir():
            total += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            with contextlib.suppress(OSError):
                shutil.rmtree(d)
    return total
