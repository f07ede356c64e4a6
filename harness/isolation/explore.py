"""`harness explore CONFIG`: design-space exploration in FlexOS's manner, on
real C libraries.

An application stores records: each request compresses a value with zlib
and INSERTs the compressed bytes into SQLite, each its own statement (both
Debian's libraries, unmodified; see libs). Every assignment of SQLite and
zlib to a backend this host really has (`none`: no isolation, a plain call;
`mprotect`; `mpk`; `rpc`: in a node of its own) is built, run and measured,
and the table each one leaves is checked against Python's zlib and the
statements' values. Configuration A is safer than B when every component is
at least as isolated in A (none < mprotect, mpk < rpc: mprotect and mpk
share the address space and are not ranked against each other), which
orders the configurations only partially. The safest configurations whose
throughput stays within the budget (a fraction of the fastest one) are
marked, as a table and a PNG.

    [workload]
    requests = 2000          # per configuration
    value_bytes = 256        # each value compressed, then inserted
    level = 6                # zlib's
    [explore]
    backends = ["none", "mprotect", "mpk", "rpc"]   # those the host lacks are skipped, and said so

Each run is in a process of its own (`python -m harness.isolation.explore`),
where SQLite has not started: its allocator is process-wide (see sqlbox)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import HarnessError, TopologyError
from harness.isolation import libs
from harness.isolation.compartments import BACKENDS, Domain, available_backends
from harness.progress import Progress, silent
from harness.text import tail
from harness.topology import read_toml

COMPONENTS = libs.LIBRARIES  # the application is the caller, always compartment "app"
LEVEL = {"none": 0, "mprotect": 1, "mpk": 1, "rpc": 2}
SHARED_SPACE = ("mprotect", "mpk")  # mechanisms within the application's address space
TABLE = "CREATE TABLE t(a INTEGER PRIMARY KEY, b BLOB)"
CHECK_ROWS = 500  # rows per query when the table is checked (the shared buffer is 1 MiB)
WORDS = ("page", "fault", "node", "memory", "gate", "key", "table", "region", "cache",
         "split", "kernel", "remote", "local", "dirty", "clean", "evict")


@dataclass
class Outcome:
    assignment: dict[str, str]
    requests_per_s: float
    safest_in_budget: bool = False
    dominated_by: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return ",".join(f"{c}={b}" for c, b in self.assignment.items())


def safer_or_equal(a: dict[str, str], b: dict[str, str]) -> bool:
    """Is every component at least as isolated in a as in b? (Same backend,
    or a higher level: mprotect and mpk share one and are not ranked.)"""
    return all(a[c] == b[c] or LEVEL[a[c]] > LEVEL[b[c]] for c in a)


def values(requests: int, size: int) -> list[bytes]:
    """The application's records: text, so zlib has something to do."""
    out = []
    for i in range(requests):
        words = " ".join(WORDS[(i * 7 + k * 5) % len(WORDS)] for k in range(size // 4 + 1))
        out.append(f"record {i}: {words}".encode()[:size])
    return out


def _library_calls(d: Domain, assignment: dict[str, str], level: int,
                   opened: list) -> dict[str, Callable[[Any], Any]]:
    """For each library, the call the application makes: a gate into its box
    here, or an RPC into its node."""
    calls: dict[str, Callable[[Any], Any]] = {}
    for lib, backend in assignment.items():
        if backend == "rpc":
            node = d[lib]
            node.call(libs.remote_open, lib, level)
            fn = libs.remote_sqlite if lib == "sqlite" else libs.remote_compress
            calls[lib] = lambda arg, node=node, fn=fn: node.call(fn, arg)
        else:
            box = libs.open_box(lib, d[lib], level=level)
            opened.append(box)
            calls[lib] = box.execute if lib == "sqlite" else box.compress
    return calls


def _run(assignment: dict[str, str], records: list[bytes], level: int) -> float:
    """Requests per second of one configuration; HarnessError if the table
    it left is not the one the records make."""
    app_backend = next((b for b in assignment.values() if b in SHARED_SPACE), "none")
    specs = [{"name": "app", "backend": app_backend, "heap": 64 << 10, "private_stack": False}]
    specs += [{"name": lib, "backend": b, "heap": libs.HEAP[lib], "private_stack": False}
              for lib, b in assignment.items()]  # none too: a heap of its own, no isolation
    opened: list = []
    with Domain(specs, "<explore>") as d:
        try:
            d.enter("app")
            calls = _library_calls(d, assignment, level, opened)
            execute, compress = calls["sqlite"], calls["zlib"]
            execute(TABLE)
            t0 = time.perf_counter()
            for i, v in enumerate(records):
                execute(f"INSERT INTO t VALUES ({i}, X'{compress(v).hex()}')")
            rate = len(records) / (time.perf_counter() - t0)
            for start in range(0, len(records), CHECK_ROWS):
                got = execute(f"SELECT a, hex(b) FROM t WHERE a >= {start} AND a < "
                              f"{start + CHECK_ROWS} ORDER BY a")
                want = [(str(i), zlib.compress(v, level).hex().upper())
                        for i, v in enumerate(records[start:start + CHECK_ROWS], start)]
                if list(map(tuple, got)) != want:
                    raise HarnessError(
                        f"explore: configuration {assignment} left rows {start}.. that differ "
                        "from Python's zlib and the statements' values")
        finally:
            for box in opened:
                box.close()
    return rate


def explore(requests: int = 2000, value: int = 256, level: int = 6,
            backends: tuple[str, ...] = BACKENDS, budget: float = 0.5,
            progress: Progress | None = None) -> tuple[list[Outcome], list[str]]:
    """In this process, which must not have started SQLite (see run())."""
    say = progress or silent
    have = available_backends()
    usable = [b for b in backends if have.get(b)]
    notes = [f"backend {b!r} skipped: not available here" for b in backends if not have.get(b)]
    if "none" not in usable:
        usable.insert(0, "none")
    combos = [c for c in itertools.product(usable, repeat=len(COMPONENTS))
              if len({b for b in c if b in SHARED_SPACE}) <= 1]  # one mechanism per space
    records = values(requests, value)
    outcomes = []
    for k, combo in enumerate(combos):
        assignment = dict(zip(COMPONENTS, combo, strict=True))
        say(f"configuration {k + 1} of {len(combos)}: "
            + ", ".join(f"{c}={b}" for c, b in assignment.items()))
        outcomes.append(Outcome(assignment, _run(assignment, records, level)))
    best = max(o.requests_per_s for o in outcomes)
    within = [o for o in outcomes if o.requests_per_s >= budget * best]
    for o in outcomes:
        o.dominated_by = [p.name for p in outcomes if p is not o and
                          safer_or_equal(p.assignment, o.assignment) and
                          not safer_or_equal(o.assignment, p.assignment)]
    for o in within:
        o.safest_in_budget = not any(
            p is not o and safer_or_equal(p.assignment, o.assignment) and
            not safer_or_equal(o.assignment, p.assignment) for p in within)
    if len([b for b in usable if b in SHARED_SPACE]) > 1:
        notes.append("assignments mixing mprotect and mpk are skipped: the application's "
                     "compartment uses one mechanism")
    notes.append(f"{requests} requests per configuration, each a zlib compression of "
                 f"{value} bytes (level {level}) and an INSERT of the result, each through "
                 "its own gate; every table equals what Python's zlib makes of the records")
    notes.append(f"budget: at least {budget:.0%} of the fastest ({best:,.0f} requests/s)")
    return outcomes, notes


def load(path: str | Path) -> dict:
    data = read_toml(path)
    w, e = data.get("workload", {}), data.get("explore", {})
    cfg = {"requests": w.get("requests", 2000), "value": w.get("value_bytes", 256),
           "level": w.get("level", 6)}
    for key, v, lo, hi in (("workload.requests", cfg["requests"], 1, 10 ** 7),
                           ("workload.value_bytes", cfg["value"], 1, 64 << 10),
                           ("workload.level", cfg["level"], 0, 9)):
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise TopologyError(f"{path}: {key}: expected an integer from {lo} to {hi}, "
                                f"got {v!r}")
    backends = e.get("backends", list(BACKENDS))
    if not isinstance(backends, list) or not set(backends) <= set(LEVEL):
        raise TopologyError(f"{path}: explore.backends: expected a list from {list(LEVEL)}, "
                            f"got {backends!r}")
    return {**cfg, "backends": tuple(backends)}


def run(config: str | Path, placement: str = "process", budget: float = 0.5,
        progress: Progress | None = None,
        timeout: float = 1800.0) -> tuple[list[Outcome], list[str]]:
    """explore() on config's workload in a process of its own on this host,
    or in a TCG guest (`vm`: protection keys for mpk)."""
    load(config)  # its errors here, before anything starts
    argv = [sys.executable, "-m", "harness.isolation.explore", str(Path(config).resolve()),
            "--budget", str(budget)]
    if placement == "vm":
        from harness.guest_run import guest_json

        raw = guest_json(argv, "explore", progress=progress)
    else:
        raw = _in_a_process(argv, progress or silent, timeout)
    outcomes = [Outcome(c["assignment"], c["requests_per_s"], c["safest_in_budget"],
                        c["dominated_by"]) for c in raw["configurations"]]
    notes = raw["notes"]
    if placement == "vm":
        notes.append("measured in a TCG guest (protection keys for mpk)")
    return outcomes, notes


def _in_a_process(argv: list[str], say: Progress, timeout: float) -> dict:
    """Runs argv, passing its progress lines on; the JSON it prints."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([*argv, "--progress"], stdout=out, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        err = []
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                text = line.decode(errors="replace").rstrip()
                if text.startswith("progress: "):
                    say(text.removeprefix("progress: "))
                else:
                    err.append(line)
            code = proc.wait()
        finally:
            killer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if code:
            why = f"killed after {timeout:g} s" if code == -9 else f"status {code}"
            raise HarnessError(f"explore failed ({why}):\n{tail(b''.join(err), 2000)}")
        out.seek(0)
        return json.loads(out.read())


def plot(outcomes: list[Outcome], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for o in outcomes:
        safety = sum(LEVEL[b] for b in o.assignment.values())
        ax.scatter(safety, o.requests_per_s, s=80, marker="*" if o.safest_in_budget else "o",
                   color="tab:red" if o.safest_in_budget else "tab:blue")
        ax.annotate(o.name, (safety, o.requests_per_s), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xlabel("isolation (sum over components: none 0, mprotect/mpk 1, rpc 2)")
    ax.set_xticks(range(2 * len(COMPONENTS) + 1))
    ax.set_yscale("log")
    ax.set_ylabel("requests per second")
    ax.set_title("SQLite + zlib: safety against throughput (red: safest within budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def to_json(outcomes: list[Outcome], notes: list[str]) -> dict:
    return {"configurations": [{"assignment": o.assignment, "requests_per_s": o.requests_per_s,
                                "safest_in_budget": o.safest_in_budget,
                                "dominated_by": o.dominated_by} for o in outcomes],
            "notes": notes}


def main(argv: list[str]) -> int:
    """`python -m harness.isolation.explore CONFIG [--budget F] [--progress]`
    prints JSON (progress lines on stderr)."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)
    cfg = load(a.config)

    def say(line: str) -> None:
        print(f"progress: {line}", file=sys.stderr, flush=True)

    print(json.dumps(to_json(*explore(cfg["requests"], cfg["value"], cfg["level"],
                                      cfg["backends"], a.budget,
                                      say if a.progress else None))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
