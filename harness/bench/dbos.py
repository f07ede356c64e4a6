"""`harness bench dbos`: DBOS services beside the operating system doing the
same thing on the same ext4, in the same run.

  fs_create        DBOS fs.create, one transaction each      vs open(O_CREAT|O_EXCL)
  fs_write_4k      DBOS fs.write of one 4 KiB block           vs pwrite 4 KiB
  fs_read_4k       DBOS fs.read of one 4 KiB block            vs pread 4 KiB (page cache)
      Durability is the same on both sides: fsync on both. SQLite runs with
      synchronous=FULL (each commit fsyncs its WAL); the OS side fsyncs the
      file and, for a create, its directory.
  ipc_rtt          DBOS send + receive, there and back between two threads
                                                              vs a unary gRPC echo (grpcio)
  ipc_rtt_vs_socketpair  the same round trips                 vs a socketpair round trip
      A send is durable when it returns; a receive's commit is not waited
      for (harness.dbos.ipc): two fsyncs per round trip.
  analytics_query  the ten largest files under a tree of thousands, and the
                   tree's total size: one recursive SQL query
                                                              vs `find -printf` walking ext4
  sched_dispatch_rate  tasks claimed per second by four workers (500 claims
                   per transaction); no floor

--placement vm runs the same code in an snode guest, on its virtio-blk ext4."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from harness.bench.report import Report, Row
from harness.dbos import DBOS
from harness.errors import HarnessError
from harness.progress import Progress, silent


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1000


WARM = 1500  # creates on each side before measuring: a database in its steady state


def _fs_rows(db: DBOS, osdir: Path, n: int) -> list[Row]:
    dfds = {}
    for sub in ("warm", "c"):  # the same two directories on both sides
        db.fs.mkdir(f"/{sub}")
        (osdir / sub).mkdir()
        dfds[sub] = os.open(osdir / sub, os.O_RDONLY | os.O_DIRECTORY)

    def os_create(sub: str, name: str) -> None:
        fd = os.open(osdir / sub / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.fsync(fd)
        os.close(fd)
        os.fsync(dfds[sub])

    # Warm up both sides alike. For SQLite this also lets the WAL reach its
    # working size, so commits overwrite it rather than grow it.
    for i in range(WARM):
        db.fs.create(f"/warm/w{i}")
        os_create("warm", f"w{i}")
    db.checkpoint("RESTART")
    rows = []
    a = [_time(lambda i=i: db.fs.create(f"/c/f{i}")) for i in range(n)]
    b = [_time(lambda i=i: os_create("c", f"f{i}")) for i in range(n)]
    rows.append(Row.of("fs_create", "us", a, "ext4_create_fsync", b))

    block = os.urandom(4096)
    db.fs.write("/c/f0", 0, bytes(4096 * 64))
    fd = os.open(osdir / "c" / "f0", os.O_RDWR)
    os.pwrite(fd, bytes(4096 * 64), 0)
    os.fsync(fd)

    def os_write(i: int) -> None:
        os.pwrite(fd, block, (i % 64) * 4096)
        os.fdatasync(fd)

    a = [_time(lambda i=i: db.fs.write("/c/f0", (i % 64) * 4096, block)) for i in range(n)]
    b = [_time(lambda i=i: os_write(i)) for i in range(n)]
    rows.append(Row.of("fs_write_4k", "us", a, "ext4_pwrite_fdatasync", b))
    a = [_time(lambda i=i: db.fs.read("/c/f0", (i % 64) * 4096, 4096)) for i in range(n)]
    b = [_time(lambda i=i: os.pread(fd, 4096, (i % 64) * 4096)) for i in range(n)]
    rows.append(Row.of("fs_read_4k", "us", a, "ext4_pread", b))
    os.close(fd)
    for dfd in dfds.values():
        os.close(dfd)
    return rows


def _ipc_rows(db: DBOS, n: int) -> list[Row]:
    def echo() -> None:
        for _ in range(n):
            m = db.ipc.recv("b", timeout=10)
            db.ipc.send("b", "a", m["data"])

    th = threading.Thread(target=echo)
    th.start()

    def rt() -> None:
        db.ipc.send("a", "b", b"x" * 64)
        if db.ipc.recv("a", timeout=10) is None:
            raise HarnessError("DBOS IPC round trip timed out")

    a = [_time(rt) for _ in range(n)]
    th.join()
    s1, s2 = socket.socketpair()

    def sock_echo() -> None:
        for _ in range(n):
            s2.sendall(s2.recv(64))

    th = threading.Thread(target=sock_echo)
    th.start()

    def srt() -> None:
        s1.sendall(b"x" * 64)
        s1.recv(64)

    b = [_time(srt) for _ in range(n)]
    th.join()
    s1.close()
    s2.close()
    g = _grpc_rtt(n)
    return [Row.of("ipc_rtt", "us", a, "ipc_rtt_grpc", g),
            Row.of("ipc_rtt_vs_socketpair", "us", a, "socketpair_rtt", b)]


def _grpc_rtt(n: int) -> list[float]:
    """µs per unary gRPC echo of the same 64 bytes (grpcio, a server thread
    in this process, over a unix socket): what DBOS compared its IPC with."""
    try:
        import grpc
    except ImportError:
        raise HarnessError("the gRPC floor needs grpcio: `bash scripts/setup.sh` installs "
                           "it") from None
    from concurrent import futures

    d = tempfile.mkdtemp(prefix="dh-grpc-")
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    srv.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "dh.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)})])
    srv.add_insecure_port(f"unix:{d}/echo.sock")
    srv.start()
    try:
        with grpc.insecure_channel(f"unix:{d}/echo.sock") as ch:
            echo = ch.unary_unary("/dh.Echo/Echo")
            for _ in range(max(10, n // 10)):  # the channel connected and warm
                echo(b"x" * 64, timeout=10)
            return [_time(lambda: echo(b"x" * 64, timeout=10)) for _ in range(n)]
    finally:
        srv.stop(None).wait(10)
        shutil.rmtree(d, ignore_errors=True)


def _tree(db: DBOS, root: Path, dirs: int, files: int) -> None:
    """The same tree in DBOS and on ext4; file sizes are set, not written
    (sparse on ext4), since the query only reads sizes."""
    import random

    rng = random.Random(42)
    now = time.time()
    with db.tx() as con:
        top = con.execute("INSERT INTO dirs (parent_id, name, created) VALUES (1, 'tree', ?) "
                          "RETURNING dir_id", (now,)).fetchone()[0]
        for d in range(dirs):
            did = con.execute("INSERT INTO dirs (parent_id, name, created) VALUES (?, ?, ?) "
                              "RETURNING dir_id", (top, f"d{d}", now)).fetchone()[0]
            (root / f"d{d}").mkdir(parents=True)
            for f in range(files):
                size = rng.randrange(1, 1 << 24)
                con.execute("INSERT INTO files (dir_id, name, size, created, modified) "
                            "VALUES (?, ?, ?, ?, ?)", (did, f"f{f}", size, now, now))
                _sparse(root / f"d{d}" / f"f{f}", size)


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _walk(root: Path) -> dict:
    out = subprocess.run(["find", str(root), "-type", "f", "-printf", "%s %p\\n"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    sizes = [(int(s), p) for s, p in (ln.split(" ", 1) for ln in out)]
    sizes.sort(reverse=True)
    return {"largest": sizes[:10], "total": sum(s for s, _ in sizes)}


def _analytics_row(db: DBOS, root: Path, n: int) -> Row:
    _tree(db, root, dirs=50, files=100)
    sql, walk = db.fs.largest("/tree", 10), _walk(root)
    if sql["total"] != walk["total"] or [s for _, s in sql["largest"]] != \
            [s for s, _ in walk["largest"]]:
        raise HarnessError("the SQL and the ext4 walk disagree on the tree's sizes")
    a = [_time(lambda: db.fs.largest("/tree", 10)) for _ in range(n)]
    b = [_time(lambda: _walk(root)) for _ in range(n)]
    return Row.of("analytics_query", "us", a, "find_walk_ext4", b)


def _dispatch_row(db: DBOS, tasks: int = 20000, batch: int = 500) -> Row:
    for w in range(4):
        db.sched.add_worker(f"w{w}", "pnode0", capacity=tasks)
    with db.tx() as con:
        now = time.time()
        con.executemany("INSERT INTO tasks (command, created) VALUES (?, ?)",
                        [('["true"]', now)] * tasks)
    rates, w = [], 0
    while True:
        t0 = time.perf_counter()
        got = db.sched.claim_many(f"w{w % 4}", "fifo", batch)
        dt = time.perf_counter() - t0
        if len(got) < batch:
            break
        rates.append(batch / dt)
        w += 1
    return Row.of("sched_dispatch_rate", "tasks/s", rates)


def fs_of(path: Path) -> str:
    """The file system holding path and its source, e.g. "ext4 /dev/vda"."""
    return subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(path)],
                          capture_output=True, text=True).stdout.strip()


def run_here(workdir: Path, n: int = 200, progress: Progress | None = None) -> Report:
    """The benchmark in this process, on the file system holding workdir."""
    say = progress or silent
    workdir.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="dh-bench-dbos-", dir=workdir))
    try:
        db = DBOS.open(d / "bench.sqlite")
        (d / "os").mkdir()
        rep = Report("dbos", placement="process")
        say(f"file system: {n} creates, writes and reads on each side")
        rep.rows += _fs_rows(db, d / "os", n)
        say("ipc round trips")
        rep.rows += _ipc_rows(db, n)
        say("analytics: a tree of 5,000 files")
        rep.rows.append(_analytics_row(db, d / "tree", max(5, n // 20)))
        say("scheduler dispatch")
        rep.rows.append(_dispatch_row(db))
        db.close()
        rep.notes.append(f"on {fs_of(d)} at {workdir}; SQLite {sqlite3.sqlite_version} in WAL "
                         f"mode, synchronous=FULL; fsync on both sides; {WARM} creates on each "
                         "side before measuring")
        return rep
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run(placement: str = "process", n: int = 200, progress: Progress | None = None) -> Report:
    if placement == "process":
        from harness.paths import run_root

        return run_here(run_root() / "bench-dbos", n, progress)
    from harness.guest_run import guest_json
    from harness.vm import accel

    rep = Report.from_json(guest_json([sys.executable, "-m", "harness.bench.dbos", "--here",
                                       "/run/dh/disk/bench", "-n", str(n)],
                                      "the DBOS benchmark", role="snode", progress=progress))
    rep.placement, rep.accel = "vm", accel.probe().accel
    rep.notes.append("in an snode guest, on its virtio-blk ext4 disk; fsync on both sides")
    return rep


def main(argv: list[str]) -> int:
    """In a guest: `python -m harness.bench.dbos --here DIR [-n N]` prints JSON."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--here", required=True)
    p.add_argument("-n", type=int, default=200)
    a = p.parse_args(argv)
    print(run_here(Path(a.here), a.n).to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
