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
from harness.nodes import netns
from harness.progress import Progress, silent

LINKS = ("shm", "unix", "tcp")
SIZES = {"rtt_64": 64, "rtt_4k": 4096}


def _pair(kind: str) -> tuple[socket.socket, socket.socket]:
    if kind == "unix":
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return netns.tcp_pair(None, None)  # loopback, TCP_NODELAY on both ends


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
def _framed(kind: str, pair: tuple[socket.socket, socket.socket] | None = None,
            model: tuple[int, int] = ()) -> Iterator[t.Link]:
    """A link to an ECHO server in another process: over a new shm channel,
    or a socket pair (this one if given); model (latency ns, bytes/s) is the
    sender-side link model, applied by both ends."""
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
    a, b = pair or _pair(kind)
    with a, b:
        link = t.Link.from_fd(a.fileno(), name="bench")
        if model:
            link.set_model(*model)
        with _server(["frame", "fd", str(b.fileno()), *map(str, model)], (b.fileno(),)):
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


# The network figures the veth path is shaped to, as (one-way latency us,
# Gbit/s): the link models of the same names (topology.MODELS).
SHAPES = ("none", "rdma", "25gbe")


def _tc(*args: str) -> bool:
    return subprocess.run(["tc", *args], capture_output=True, timeout=10).returncode == 0


def _shape(dev: str, ns: str, latency_us: float, gbps: float) -> str:
    """Shapes both directions of the veth pair as the network itself would:
    netem (delay and rate) where the kernel has it, else tbf (rate only).
    Returns what was applied."""
    for cmd in (["qdisc", "del", "dev", dev, "root"],
                ["-n", ns, "qdisc", "del", "dev", "eth0", "root"]):
        _tc(*cmd)
    if not gbps:
        return "none"
    rate = f"{gbps:.2f}gbit"
    netem = ["netem", "delay", f"{latency_us}us", "rate", rate, "limit", "100000"]
    if _tc("qdisc", "add", "dev", dev, "root", *netem):
        _tc("-n", ns, "qdisc", "add", "dev", "eth0", "root", *netem)
        return f"netem delay {latency_us:.2f}us rate {rate}"
    tbf = ["tbf", "rate", rate, "burst", "256kb", "latency", "10ms"]
    if not (_tc("qdisc", "add", "dev", dev, "root", *tbf)
            and _tc("-n", ns, "qdisc", "add", "dev", "eth0", "root", *tbf)):
        raise HarnessError(f"tc could not shape {dev} with netem or tbf")
    return f"tbf rate {rate} (no netem in this kernel: delay not shaped)"


def run_veth(n: int = 20000, progress: Progress | None = None) -> Report:
    """Framed round trips over TCP to a second host on this machine (a
    network namespace across a veth pair), the path shaped to each network
    figure, each beside the sender-side link model of the same figure over
    loopback, in the same run."""
    from harness.topology import MODELS

    say = progress or silent
    rep = Report("transport")
    name = f"dh-bench{os.getpid()}"
    with netns.veth_host(name) as dev:
        for shape in SHAPES:
            lat_us, gbps = MODELS[shape]
            applied = _shape(dev, name, lat_us, gbps)
            model = (int(lat_us * 1000), int(gbps * 1e9 / 8)) if gbps else ()
            rep.notes.append(f"{shape}: veth shaped by {applied}; model {lat_us:.2f} us "
                             f"one way, {gbps:g} Gbit/s")
            for metric, size in SIZES.items():
                say(f"{metric} over the veth pair ({applied})")
                with _framed("tcp", pair=netns.tcp_pair(None, name)) as lk:
                    lk.bench_rpc_rtt(size, 1000)  # warm-up: caches, the socket's windows
                    veth = lk.bench_rpc_rtt(size, n)
                say(f"{metric} over loopback with the {shape} link model")
                with _framed("tcp", model=model) as lk:
                    lk.bench_rpc_rtt(size, 1000)
                    modeled = lk.bench_rpc_rtt(size, n)
                rep.rows.append(Row.of(f"{metric}_veth_{shape}", "ns", veth,
                                       f"{metric}_model_{shape}", modeled))
    rep.notes.append("ratio: the shaped network path over the sender-side model of the same "
                     "figure (not a floor)")
    return rep
