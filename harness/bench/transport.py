"""`harness bench transport`: round trips and throughput between two
processes over one link, each beside its floor measured in the same run.

  rtt_64, rtt_4k   RPC round trips (ECHO of 64 B / 4 KiB), timed in C.
                   Floor, shm: the same bytes bounced between two threads
                   through shared memory (64 B: a cache-line ping-pong).
                   Floor, unix/tcp: a raw C echo of the same size over the
                   same kind of socket, with no framing.
  throughput_4k    one-way 4 KiB frames, MiB/s, one sample per batch.
                   Floor, shm: the two memcpys a ring message costs;
                   unix/tcp: a raw stream of the same bytes. A throughput
                   ratio below 1 means slower than the floor."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from harness._native import transport as t
from harness.bench.report import Report, Row
from harness.errors import HarnessError
from harness.progress import Progress, silent

LINKS = ("shm", "unix", "tcp")
SIZES = {"rtt_64": 64, "rtt_4k": 4096}


def _pair(kind: str) -> tuple[socket.socket, socket.socket]:
    if kind == "unix":
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname(), timeout=5.0)
        b, _ = srv.accept()
    a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    b.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    a.settimeout(None)
    return a, b


@contextlib.contextmanager
def _server(args: list[str], pass_fds: tuple[int, ...] = ()) -> Iterator[None]:
    p = subprocess.Popen([sys.executable, "-m", "harness.bench.echo", *args],
                         pass_fds=pass_fds, stdin=subprocess.DEVNULL)
    try:
        yield
    finally:
        try:
            p.wait(10.0)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise HarnessError(f"benchmark echo server {args} did not exit") from None
        if p.returncode:
            raise HarnessError(f"benchmark echo server {args} failed with status {p.returncode}")


@contextlib.contextmanager
def _framed(kind: str) -> Iterator[t.Link]:
    """A link to an ECHO server in another process."""
    if kind == "shm":
        with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="dh-bench-") as d:
            path = str(Path(d) / "bench.shm")
            t.create_shm_file(path, 4 << 20)
            link = t.Link.shm_open(path, 0, name="bench")
            with _server(["frame", "shm", path]):
                try:
                    yield link
                finally:
                    link.call(t.Op.SHUTDOWN, timeout=5.0)
        return
    a, b = _pair(kind)
    with a, b:
        link = t.Link.from_fd(a.fileno(), name="bench")
        with _server(["frame", "fd", str(b.fileno())], (b.fileno(),)):
            b.close()
            try:
                yield link
            finally:
                link.close()


@contextlib.contextmanager
def _raw(kind: str, mode: str, size: int) -> Iterator[socket.socket]:
    a, b = _pair(kind)
    with a, b, _server([mode, str(b.fileno()), str(size)], (b.fileno(),)):
        b.close()
        if a.recv(1) != b"R":
            raise HarnessError(f"benchmark server ({mode}) did not start")
        yield a
        if mode == "raw-echo":  # the sink closes its own stream; the echo needs EOF
            a.shutdown(socket.SHUT_WR)


def run(link: str = "shm", n: int = 20000, batches: int = 15, batch: int = 4000,
        progress: Progress | None = None) -> Report:
    if link not in LINKS:
        raise HarnessError(f"--link must be one of {', '.join(LINKS)}, got {link!r}")
    say = progress or silent
    rep = Report("transport")
    with _framed(link) as lk:
        lk.bench_rpc_rtt(64, 2000)  # warm-up: page faults, caches, CPU clocks
        rtt = {}
        for metric, size in SIZES.items():
            say(f"{metric}: {n} round trips over {link}")
            rtt[metric] = lk.bench_rpc_rtt(size, n)
        say(f"throughput_4k: {batches} batches of {batch} frames over {link}")
        thr = [batch * 4096 / lk.bench_stream(4096, batch) * 1e9 / 2**20
               for _ in range(batches)]
    for metric, size in SIZES.items():
        say(f"{metric} floor")
        if link == "shm":
            floor, fs = f"{size}B_thread_pingpong", t.floor_pingpong(size, n)
        else:
            floor = f"raw_{link}_echo_{size}"
            with _raw(link, "raw-echo", size) as s:
                fs = t.floor_sock_rtt(s.fileno(), size, n)
        rep.rows.append(Row.of(metric, "ns", rtt[metric], floor, fs))
    say("throughput_4k floor")
    if link == "shm":
        floor = "memcpy_in_and_out_4k"
        fthr = [batch * 4096 / t.floor_copy(4096, batch) * 1e9 / 2**20 for _ in range(batches)]
    else:
        floor, fthr = f"raw_{link}_stream_4k", []
        for _ in range(batches):
            with _raw(link, "raw-sink", 4096) as s:
                fthr.append(batch * 4096 / t.floor_sock_stream(s.fileno(), 4096, batch)
                            * 1e9 / 2**20)
    rep.rows.append(Row.of("throughput_4k", "MiB/s", thr, floor, fthr))
    rep.notes.append(f"link={link}; host cpus={os.cpu_count()}; throughput ratio < 1 is "
                     "slower than its floor")
    return rep
