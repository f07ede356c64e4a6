"""The memory broker: hands each process of a program run with remote memory
(the program, its forked children, what they exec) its own channel to the
memory node, and takes its counters when it exits.

The interposer (native/interpose) speaks one line each way over a Unix
socket: `hello PID PPID NAME`, answered by `KIND PATH SIDE LATENCY_NS
BYTES_PER_SEC LABEL` or `err MESSAGE`; at exit `stats {JSON}`. The
connection lives as long as the process, so its end says the process is
gone, whether it reported or not."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import HarnessError


@dataclass
class Channel:
    """Where a process's ExCache finds the memory node: an shm file (host) or
    an ivshmem device's PCI address (in a guest), and its side of it."""

    attach: str  # "shm" | "ivshmem", as a LinkEnd's
    path: str
    side: int
    label: str
    latency_ns: int = 0
    bytes_per_sec: int = 0

    def line(self) -> str:
        return (f"{self.attach} {self.path} {self.side} {self.latency_ns} {self.bytes_per_sec} "
                f"{self.label}\n")


@dataclass
class Process:
    pid: int
    ppid: int
    name: str
    started: float
    ended: float | None = None
    stats: dict | None = None  # None: it ended without exit() (a signal, _exit, exec)
    channel: Channel | None = None


@dataclass
class Broker:
    """Serves the interposer's protocol at `path` until stop(); `source` makes
    a channel for a new process (it raises HarnessError when it cannot), and
    `release`, when given, takes it back once the process is gone."""

    path: Path
    source: Callable[[Process], Channel]
    release: Callable[[Channel], None] | None = None
    processes: list[Process] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._sock.bind(str(self.path))
        os.chmod(self.path, 0o600)  # a channel to the memory node is for our processes only
        self._sock.listen(64)
        self._lock = threading.Lock()
        self._open = 0
        self._stopped = False
        self._acceptor = threading.Thread(target=self._accept, name="broker", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self._open += 1
            threading.Thread(target=self._serve, args=(conn,), name="broker-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        proc = None
        try:
            with conn, conn.makefile("rwb", buffering=0) as f:
                words = f.readline().decode(errors="replace").split(maxsplit=3)
                if len(words) != 4 or words[0] != "hello":
                    return
                proc = Process(int(words[1]), int(words[2]), words[3].strip(), time.time())
                try:
                    proc.channel = self.source(proc)
                except HarnessError as exc:
                    self.refused.append(f"{proc.name} (pid {proc.pid}): {exc}")
                    f.write(f"err {exc}\n".encode())
                    return
                with self._lock:
                    self.processes.append(proc)
                f.write(proc.channel.line().encode())
                for line in f:  # until the process is gone
                    if line.startswith(b"stats "):
                        proc.stats = json.loads(line[6:])
        except (OSError, ValueError):
            pass  # a process that died mid-line: it simply has no report
        finally:
            if proc is not None:
                proc.ended = time.time()
                if proc.channel is not None and self.release is not None:
                    self.release(proc.channel)
            with self._lock:
                self._open -= 1

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Waits until every process that connected has gone (their reports are
        in); False when some are still running after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._open == 0:
                    return True
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        self._stopped = True
        # close() alone leaves a thread blocked in accept() on Linux; a
        # shutdown wakes it.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._acceptor.join(5.0)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


COUNTERS = ("misses", "remote_fetches", "zero_fills", "wp_faults", "evictions", "clean_drops",
            "dirty_flushes", "piggybacked", "prefetched", "failovers", "resident")


def summarize(processes: list[Process]) -> dict:
    """The counters of every process that reported, added up (hist too), and
    which processes did not report."""
    reported = [p for p in processes if p.stats]
    excache: dict = {k: sum(p.stats["excache"][k] for p in reported) for k in COUNTERS}
    hists = [p.stats["excache"]["hist"] for p in reported]
    excache["hist"] = [sum(col) for col in zip(*hists, strict=True)] if hists else []
    return {
        "peak_remote_bytes": sum(p.stats["peak_remote_bytes"] for p in reported),
        "local_fallback_bytes": sum(p.stats["local_fallback_bytes"] for p in reported),
        "excache": excache,
        "processes": [{"pid": p.pid, "ppid": p.ppid, "name": p.name,
                       "seconds": round((p.ended or time.time()) - p.started, 6),
                       "reported": p.stats is not None, **(p.stats or {})}
                      for p in processes],
    }
