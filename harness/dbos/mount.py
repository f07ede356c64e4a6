"""The DBOS file system as a FUSE mount: the kernel resolves paths and
caches attributes for a second, each request is one transaction over the
`dirs`, `files` and `blocks` tables, and what programs do is logged in
`events` with their pid and name, in batches.

Two servers of the same tables and rules (harness.dbos.vfs):
- a local database (`harness mount --db`, serve_native) is served by
  native/dbosfs, in C on libfuse3's low-level API and SQLite: a request
  through pyfuse3 and trio costs ~60 us of Python before any SQL, and a
  create with its fsyncs is six requests;
- a remote snode (`harness run --files dbos`) is served by DBOSMount, over
  pyfuse3, since its VFS is the Python DBOS layer that the snode already
  serves over the transport; there a request is an RPC, which the Python
  around it does not dominate.

Record locks (fcntl, which SQLite uses) are not forwarded: the kernel
keeps them for the mount, which is right for programs on one machine.
Hard links are EPERM. A SIGKILLed mount is unmounted by fusermount3
(auto_unmount); a stale mount of ours found at start is cleared."""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from harness.errors import DBOSError, FSError, HarnessError

ATTR_TIMEOUT = 1.0  # seconds the kernel may keep an attribute or a name
LOG_EVERY = 1.0  # seconds between provenance flushes
LOGGED = {"create": "file_create", "read": "file_read", "write": "file_write",
          "rename": "file_rename", "unlink": "file_unlink"}


def _entry(a: dict) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = a["ino"]
    e.st_mode, e.st_nlink = a["mode"], a["nlink"]
    e.st_uid, e.st_gid = a["uid"], a["gid"]
    e.st_size, e.st_blocks, e.st_blksize = a["size"], a["blocks"], 4096
    e.st_atime_ns = int(a["atime"] * 1e9)
    e.st_mtime_ns = int(a["mtime"] * 1e9)
    e.st_ctime_ns = int(a["ctime"] * 1e9)
    e.entry_timeout = e.attr_timeout = ATTR_TIMEOUT
    return e


def _program(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _fuse(fn: Callable) -> Callable:
    """Turns an FSError from the VFS into the errno the kernel returns, and
    a lost snode (any other harness error) into EIO, said on stderr. Any
    other exception is a bug: EIO and its traceback, and the mount goes on
    (pyfuse3 would end its loop, and every program would lose the mount)."""
    async def call(self: Any, *args: Any) -> Any:
        try:
            return fn(self, *args)
        except FSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except HarnessError as exc:
            print(f"[mount] {fn.__name__}: {exc} (the program sees EIO)", file=sys.stderr,
                  flush=True)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            import traceback

            print(f"[mount] {fn.__name__} failed (the program sees EIO):\n"
                  f"{traceback.format_exc()}", file=sys.stderr, flush=True)
            raise pyfuse3.FUSEError(errno.EIO) from None
    call.__name__ = fn.__name__
    return call


class DBOSMount(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, vfs: Any, task: int | None = None) -> None:
        super().__init__()
        self.vfs, self.task = vfs, task
        self.lookups: dict[int, int] = {}
        self.pending: dict[tuple, float] = {}  # (kind, ino, pid) -> first time
        self.names: dict[int, str] = {}
        self.handles: dict[int, tuple[int, int]] = {}  # fh -> (inode, opener's pid)
        self.orphans: set[int] = set()  # unlinked inodes the kernel still knows
        self.next_fh = 1

    # ---- bookkeeping --------------------------------------------------------

    def _known(self, a: dict) -> pyfuse3.EntryAttributes:
        self.lookups[a["ino"]] = self.lookups.get(a["ino"], 0) + 1
        return _entry(a)

    def _open(self, ino: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        """A handle per open: pyfuse3 gives read and write no request
        context, so their events name the process that opened the file.
        The kernel drops its cached pages at each open (keep_cache off), so
        every program's reads reach here and are logged."""
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.handles[fh] = (ino, ctx.pid)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False)

    def _orphaned(self, ino: int) -> None:
        """A file lost its name; if the kernel knows it, it is an orphan."""
        if ino in self.lookups and not ino % 2:
            self.orphans.add(ino)

    def _note(self, op: str, ino: int, pid: int) -> None:
        """One event per (operation, file, process) per flush interval: a
        program reading a file block by block is one read."""
        self.pending.setdefault((LOGGED[op], ino, pid), time.time())
        if pid not in self.names:
            self.names[pid] = _program(pid)

    def flush_log(self) -> None:
        """Writes the pending events in one transaction; while the snode is
        unreachable they stay pending (at most one per operation, file and
        process) for the next flush."""
        if not self.pending:
            return
        events = [(t, kind, ino, pid, self.names.get(pid, "?"), self.task)
                  for (kind, ino, pid), t in sorted(self.pending.items(), key=lambda kv: kv[1])]
        try:
            self.vfs.log(events)
        except (HarnessError, sqlite3.Error) as exc:  # a failed flush must not end the mount
            print(f"[mount] provenance: {exc}; {len(events)} events kept for the next flush",
                  file=sys.stderr, flush=True)
            return
        self.pending.clear()
        self.names.clear()

    # ---- operations ---------------------------------------------------------

    @_fuse
    def lookup(self, parent, name, ctx=None):
        return self._known(self.vfs.lookup(parent, name))

    @_fuse
    def getattr(self, ino, ctx=None):
        return _entry(self.vfs.getattr(ino))

    @_fuse
    def setattr(self, ino, attr, fields, fh, ctx):
        kw = {}
        if fields.update_mode:
            kw["mode"] = attr.st_mode
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_size:
            kw["size"] = attr.st_size
            self._note("write", ino, ctx.pid)
        if fields.update_atime:
            kw["atime"] = attr.st_atime_ns / 1e9
        if fields.update_mtime:
            kw["mtime"] = attr.st_mtime_ns / 1e9
        return _entry(self.vfs.setattr(ino, **kw))

    @_fuse
    def readlink(self, ino, ctx):
        return self.vfs.readlink(ino)

    @_fuse
    def mknod(self, parent, name, mode, rdev, ctx):
        a = self.vfs.create(parent, name, mode & ~ctx.umask, ctx.uid, ctx.gid)
        self._note("create", a["ino"], ctx.pid)
        return self._known(a)

    @_fuse
    def mkdir(self, parent, name, mode, ctx):
        return self._known(self.vfs.mkdir(parent, name, mode & ~ctx.umask, ctx.uid, ctx.gid))

    @_fuse
    def symlink(self, parent, name, target, ctx):
        return self._known(self.vfs.symlink(parent, name, target, ctx.uid, ctx.gid))

    @_fuse
    def link(self, ino, new_parent, new_name, ctx):
        raise FSError(errno.EPERM, "hard links are not supported on the DBOS mount")

    @_fuse
    def unlink(self, parent, name, ctx):
        ino = self.vfs.lookup(parent, name)["ino"]
        self.vfs.unlink(parent, name, keep=ino in self.lookups)
        self._orphaned(ino)
        self._note("unlink", ino, ctx.pid)

    @_fuse
    def rmdir(self, parent, name, ctx):
        self.vfs.rmdir(parent, name)

    @_fuse
    def rename(self, old_parent, old, new_parent, new, flags, ctx):
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FSError(errno.EINVAL, "RENAME_EXCHANGE is not supported")
        ino = self.vfs.lookup(old_parent, old)["ino"]
        try:
            replaced = self.vfs.lookup(new_parent, new)["ino"]
        except FSError:
            replaced = None
        self.vfs.rename(old_parent, old, new_parent, new,
                        noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE),
                        keep=replaced in self.lookups)
        if replaced is not None and replaced != ino:
            self._orphaned(replaced)
        if not ino % 2:
            self._note("rename", ino, ctx.pid)

    @_fuse
    def forget(self, inode_list):
        for ino, n in inode_list:
            left = self.lookups.get(ino, 0) - n
            if left > 0:
                self.lookups[ino] = left
            else:
                self.lookups.pop(ino, None)
                self.orphans.discard(ino)
                self.vfs.forget(ino)

    @_fuse
    def open(self, ino, flags, ctx):
        a = self.vfs.getattr(ino)
        if stat.S_ISDIR(a["mode"]):
            raise FSError(errno.EISDIR, f"inode {ino}")
        if flags & os.O_TRUNC and a["size"]:  # libfuse lets the open truncate (atomic O_TRUNC)
            self.vfs.setattr(ino, size=0)
            self._note("write", ino, ctx.pid)
        return self._open(ino, ctx)

    @_fuse
    def create(self, parent, name, mode, flags, ctx):
        a = self.vfs.create(parent, name, mode & ~ctx.umask, ctx.uid, ctx.gid)
        self._note("create", a["ino"], ctx.pid)
        return self._open(a["ino"], ctx), self._known(a)

    @_fuse
    def read(self, fh, off, size):
        ino, pid = self.handles[fh]
        self._note("read", ino, pid)
        return self.vfs.read(ino, off, size)

    @_fuse
    def write(self, fh, off, buf):
        ino, pid = self.handles[fh]
        self._note("write", ino, pid)
        return self.vfs.write(ino, off, buf)

    @_fuse
    def flush(self, fh):
        # Writes reach the VFS as they happen, so a close has nothing to
        # flush; ENOSYS tells the kernel to stop asking (one round trip less
        # per close).
        raise FSError(errno.ENOSYS, "flush")

    @_fuse
    def release(self, fh):
        ino, _ = self.handles.pop(fh, (None, None))
        if ino in self.orphans and all(i != ino for i, _ in self.handles.values()):
            # Nothing can reach an unlinked file once its last handle closes,
            # so it goes now rather than at the kernel's FORGET, which comes
            # only when the kernel evicts the inode (seconds later, or never
            # while it keeps the inode cached).
            self.orphans.discard(ino)
            self.vfs.forget(ino)

    @_fuse
    def fsync(self, fh, datasync):
        # The program's data, not the provenance batch: events go out at the
        # next flush (LOG_EVERY), in their own commit.
        self.vfs.sync()

    @_fuse
    def opendir(self, ino, ctx):
        self.vfs.readdir(ino, limit=0)  # ENOENT/ENOTDIR now, not at the first read
        return ino

    @_fuse
    def readdir(self, fh, start_id, token):
        after = start_id
        while True:
            batch = self.vfs.readdir(fh, after)
            for name, a in batch:
                if not pyfuse3.readdir_reply(token, name.encode(), _entry(a), a["ino"]):
                    return
                self.lookups[a["ino"]] = self.lookups.get(a["ino"], 0) + 1
                after = a["ino"]
            if not batch:
                return

    @_fuse
    def releasedir(self, fh):
        pass

    @_fuse
    def fsyncdir(self, fh, datasync):
        self.vfs.sync()

    @_fuse
    def statfs(self, ctx):
        s, out = self.vfs.statfs(), pyfuse3.StatvfsData()
        out.f_bsize, out.f_frsize = s["bsize"], s["frsize"]
        out.f_blocks, out.f_bfree, out.f_bavail = s["blocks"], s["bfree"], s["bavail"]
        out.f_files, out.f_ffree, out.f_favail = s["files"], s["ffree"], s["ffree"]
        out.f_namemax = s["namemax"]
        return out


GUEST_MODULES = Path("/run/dh/modules")  # what a guest's init left to load on demand
SYS_FINIT_MODULE = 313  # x86_64


def ensure_fuse() -> None:
    """/dev/fuse, loading the fuse module in a guest that has it in
    GUEST_MODULES (finit_module: the guest's root has no modprobe for its
    kernel)."""
    if os.path.exists("/dev/fuse"):
        return
    order = GUEST_MODULES / "order"
    names = order.read_text().split() if order.is_file() else []
    if not any(n.startswith("fuse") for n in names):
        raise DBOSError("/dev/fuse is missing: load the fuse module (modprobe fuse) and "
                        "install fuse3")
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for n in names:
        fd = os.open(GUEST_MODULES / n, os.O_RDONLY | os.O_CLOEXEC)
        try:
            loaded = libc.syscall(SYS_FINIT_MODULE, fd, b"", 0) == 0
            if not loaded and ctypes.get_errno() != errno.EEXIST:
                raise DBOSError(f"cannot load {n}: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(fd)
    deadline = time.monotonic() + 5  # devtmpfs makes the node
    while not os.path.exists("/dev/fuse"):
        if time.monotonic() > deadline:
            raise DBOSError("the fuse module is loaded but /dev/fuse never appeared")
        time.sleep(0.01)


def clear_stale(mountpoint: str) -> None:
    """A mount of ours whose daemon died ("Transport endpoint is not
    connected") is unmounted; anything else mounted there is an error."""
    with open("/proc/mounts") as f:
        mounts = [line.split() for line in f]
    for dev, where, fstype, *_ in mounts:
        if where == os.path.realpath(mountpoint):
            try:
                os.stat(mountpoint)
            except OSError as exc:
                if exc.errno == errno.ENOTCONN and fstype.startswith("fuse") and \
                        dev.startswith("dbos"):
                    subprocess.run(["fusermount3", "-u", "-z", mountpoint],
                                   capture_output=True, check=False, timeout=10)
                    return
            raise DBOSError(f"{mountpoint} is already a mount point ({dev}, {fstype}): "
                            f"unmount it (fusermount3 -u {mountpoint}) or choose another")


def serve(vfs: Any, mountpoint: str, task: int | None = None,
          ready: Callable[[Callable[[], None]], None] | None = None, source: str = "") -> None:
    """Mounts the VFS at mountpoint and serves it until unmounted
    (fusermount3 -u), SIGINT/SIGTERM (when run in the main thread) or the
    `stop` that `ready(stop)` is handed is called; orphans are purged at
    both ends. `source` (the database or the snode) names the mount in
    /proc/mounts as dbos:SOURCE."""
    if not os.path.isdir(mountpoint):
        raise DBOSError(f"mount point {mountpoint} is not a directory: mkdir it first")
    ensure_fuse()
    clear_stale(mountpoint)
    vfs.purge_orphans()
    ops = DBOSMount(vfs, task)
    opts = set(pyfuse3.default_options) | {f"fsname=dbos:{source}",
                                           "subtype=dbos", "noatime", "auto_unmount"}
    with _watched(_dbosfs(), mountpoint):  # told to go only after the unmount below
        try:
            pyfuse3.init(ops, mountpoint, opts)
        except RuntimeError as exc:
            raise DBOSError(f"cannot mount at {mountpoint} ({exc}): is /dev/fuse there and "
                            "fusermount3 installed (apt-get install fuse3)?") from exc
        try:
            trio.run(_serving, ops, ready)
        finally:
            ops.flush_log()
            pyfuse3.close(unmount=True)
            vfs.purge_orphans()


async def _serving(ops: DBOSMount, ready: Callable[[Callable[[], None]], None] | None) -> None:
    """pyfuse3's loop beside the provenance flusher, until unmounted from
    outside, SIGINT/SIGTERM (in the main thread) or the stop handed to ready."""
    async with trio.open_nursery() as nursery:
        async def fuse_main() -> None:
            await pyfuse3.main()
            nursery.cancel_scope.cancel()  # unmounted from outside
        nursery.start_soon(fuse_main)

        async def flusher() -> None:
            while True:
                await trio.sleep(LOG_EVERY)
                ops.flush_log()
        nursery.start_soon(flusher)

        async def stopper() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                async for _ in sigs:
                    nursery.cancel_scope.cancel()
                    return
        if threading.current_thread() is threading.main_thread():
            nursery.start_soon(stopper)
        if ready:
            token = trio.lowlevel.current_trio_token()
            ready(lambda: trio.from_thread.run_sync(nursery.cancel_scope.cancel,
                                                    trio_token=token))


def _dbosfs(lib: str | Path | None = None) -> Any:
    """native/dbosfs, loaded (lib: another build of it, the tests' sanitized one)."""
    import ctypes

    from harness._native import shared_object

    so = ctypes.CDLL(str(lib or shared_object("dh_dbosfs")), use_errno=True)
    so.dh_dbosfs.argtypes = [ctypes.c_char_p] * 4 + [ctypes.c_longlong, ctypes.c_int]
    so.dh_unmount_when_gone.argtypes = [ctypes.c_char_p]
    return so


@contextmanager
def _watched(so: Any, mountpoint: str) -> Iterator[None]:
    """A watcher process that unmounts mountpoint if this process dies and
    leaves the mount dead there (libfuse's auto_unmount can miss it: see
    dh_unmount_when_gone); after a clean end it is told to go."""
    import ctypes

    fd = so.dh_unmount_when_gone(os.fsencode(mountpoint))
    if fd < 0:
        raise DBOSError(f"cannot start the watcher of the mount at {mountpoint}: "
                        f"{os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        os.close(fd)


def serve_native(db: str | Path, mountpoint: str, task: int | None = None,
                 node: str = "local", ready: Callable[[], None] | None = None,
                 lib: str | Path | None = None) -> None:
    """Mounts the local DBOS database db at mountpoint with native/dbosfs
    and serves it until unmounted (fusermount3 -u) or SIGINT/SIGTERM, in
    this thread (the main one: the C server takes those signals); ready()
    is called once the mount is up. Orphans are purged at both ends. lib
    is another build of native/dbosfs (the tests' sanitized one)."""
    from harness.dbos import DBOS

    db = os.path.abspath(db)
    if not os.path.isdir(mountpoint):
        raise DBOSError(f"mount point {mountpoint} is not a directory: mkdir it first")
    ensure_fuse()
    clear_stale(mountpoint)
    store = DBOS.open(db, synchronous="normal", node=node)  # made and migrated here
    try:
        store.vfs.purge_orphans()
        so = _dbosfs(lib)
        up_r, up_w = os.pipe()

        def wait_up() -> None:
            with os.fdopen(up_r, "rb") as f:
                if f.readline() and ready:
                    ready()
        waiter = threading.Thread(target=wait_up, daemon=True)
        waiter.start()
        # libfuse takes SIGINT only where nothing else does: Python's own
        # handler would just set a flag the C loop never reads.
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_DFL) if main else None
        try:
            with _watched(so, mountpoint):  # up_w: closed by the C side, always
                rc = so.dh_dbosfs(db.encode(), os.fsencode(mountpoint), f"dbos:{db}".encode(),
                                  node.encode(), -1 if task is None else task, up_w)
        finally:
            if main:
                signal.signal(signal.SIGINT, old)
        if rc != 0:
            raise DBOSError(f"cannot mount {db} at {mountpoint} (said above): is /dev/fuse "
                            "there and fusermount3 installed (apt-get install fuse3)?")
        waiter.join(1)
    finally:
        store.vfs.purge_orphans()
        store.close()


@contextmanager
def process_mount(argv: list[str], mountpoint: str | Path, what: str,
                  timeout: float = 30.0) -> Iterator[None]:
    """The FUSE file system that the command argv mounts at mountpoint and
    serves from a process of its own, for a with block; unmounted after it.
    A program timed on it then shares no interpreter with its server."""
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + timeout
            while not os.path.ismount(mountpoint):
                if p.poll() is not None:
                    err.seek(0)
                    raise DBOSError(f"{what} did not mount at {mountpoint}: "
                                    f"{err.read().decode(errors='replace').strip()[-500:]}")
                if time.monotonic() > deadline:
                    raise DBOSError(f"{what} was not mounted at {mountpoint} in {timeout:g} s")
                time.sleep(0.01)
            yield
        finally:
            subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True,
                           timeout=timeout)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@contextmanager
def mounted(vfs: Any, mountpoint: str, task: int | None = None, source: str = "",
            timeout: float = 30.0) -> Iterator[None]:
    """The VFS mounted at mountpoint, served by a thread of this process,
    for the length of a with block (one mount per process: pyfuse3's)."""
    stop: list[Callable[[], None]] = []
    failed: list[BaseException] = []
    up = threading.Event()

    def body() -> None:
        try:
            serve(vfs, mountpoint, task, lambda s: (stop.append(s), up.set()), source)
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)
            up.set()
    t = threading.Thread(target=body, name="dbos-mount", daemon=True)
    t.start()
    if not up.wait(timeout):
        raise DBOSError(f"the DBOS mount at {mountpoint} was not up in {timeout:g} s")
    if failed:
        raise failed[0]
    try:
        yield
    finally:
        if not failed:
            stop[0]()
        t.join(timeout)
        if t.is_alive():
            raise DBOSError(f"the DBOS mount at {mountpoint} did not stop in {timeout:g} s")
        if failed:
            raise failed[0]
