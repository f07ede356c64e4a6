"""`harness bench sqlite`: FlexOS's SQLite experiment (ASPLOS'22, Fig. 10) for
real. Debian's libsqlite3, unmodified, in a compartment of its own (all of
its memory from that compartment's heap, every API call a gate written in C,
what crosses in a shared buffer; native/sqlbox), the application in another;
5,000 INSERTs into a fresh in-memory table, each its own statement.

  sqlite_insert_5000_none        no isolation: the same code, no switch (the floor)
  sqlite_insert_5000_mprotect    each gate: the four mprotects of a switch
  sqlite_insert_5000_mpk_light   each gate: two checked WRPKRUs
  sqlite_insert_5000_mpk_stack   and SQLite on its compartment's own stack
  sqlite_insert_5000_rpc         SQLite in a node of its own (the `rpc` backend,
                                 FlexOS's EPT analogue), each call an RPC over a
                                 shm link; this row's loop is Python's

Seconds for the 5,000, median of the rounds; each round runs every backend
once (a fresh process's SQLite each time), in rotating order. After each
run the table's contents must equal those of the same statements run by
Python's sqlite3 (SQLite with no compartment), or the benchmark stops. mpk
rows appear where protection keys work: on this machine, a TCG guest
(`--placement vm`), whose times are TCG's, not a CPU's."""

from __future__ import annotations

import hashlib
import json
import sys

from harness.bench.report import Report, Row
from harness.errors import HarnessError
from harness.progress import Progress, silent

N = 5000
DIGEST = "SELECT count(*), sum(a), group_concat(a || ':' || b, ',') FROM t"
FLEXOS = {"none": 0.054, "mpk3": 0.106, "ept2": 0.173, "linux": 0.177}  # s, Fig. 10


def _backends() -> list[str]:
    from harness._native import pkey

    return ["none", "mprotect", *(["mpk_light", "mpk_stack"] if pkey.pkey_available() else []),
            "rpc"]


def _run_rpc(n: int) -> tuple[float, str]:
    import time

    from harness.isolation import libs
    from harness.isolation.rpc_gate import RpcCompartment

    rpc = RpcCompartment("sqlite", 1 << 20)
    try:
        rpc.call(libs.remote_open, "sqlite")
        rpc.call(libs.remote_sqlite, "CREATE TABLE t(a INTEGER, b TEXT)")
        t0 = time.perf_counter_ns()
        for i in range(n):
            rpc.call(libs.remote_sqlite, f"INSERT INTO t VALUES ({i}, 'row {i * 7}')")
        seconds = (time.perf_counter_ns() - t0) / 1e9
        digest = hashlib.sha256(repr(rpc.call(libs.remote_sqlite, DIGEST)).encode()).hexdigest()
    finally:
        rpc.close()
    return seconds, digest


def run_one(backend: str, n: int = N) -> tuple[float, str]:
    """n INSERTs into SQLite in a compartment of `backend`, called from an
    application compartment of the same backend; (seconds, digest of the
    table). In this process SQLite must not have started (one box a process)."""
    if backend == "rpc":
        return _run_rpc(n)
    from harness.isolation import libs
    from harness.isolation.compartments import Domain, parse

    kind = "mpk" if backend.startswith("mpk") else backend
    stack = backend == "mpk_stack"
    with Domain(parse({"compartments": [
            {"name": "app", "backend": kind},
            {"name": "sqlite", "backend": kind, "heap": "64MiB", "private_stack": stack}]},
            "<bench sqlite>")) as d:
        d.enter("app")
        box = libs.open_box("sqlite", d["sqlite"], private_stack=stack)
        try:
            seconds = box.bench_insert(n)
            digest = hashlib.sha256(repr(box.execute(DIGEST)).encode()).hexdigest()
        finally:
            box.close()
    return seconds, digest


def expected_digest(n: int = N) -> str:
    """The same statements through Python's sqlite3: SQLite in no compartment."""
    import sqlite3

    con = sqlite3.connect(":memory:", isolation_level=None)
    con.execute("CREATE TABLE t(a INTEGER, b TEXT)")
    for i in range(n):
        con.execute(f"INSERT INTO t VALUES ({i}, 'row {i * 7}')")
    rows = [tuple(None if v is None else str(v) for v in r) for r in con.execute(DIGEST)]
    con.close()
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def run_here(rounds: int = 5, n: int = N, progress: Progress | None = None) -> Report:
    """In a fresh process (Python's sqlite3 never imported): every backend
    this process has, `rounds` times each."""
    say = progress or silent
    names = _backends()
    times: dict[str, list[float]] = {b: [] for b in names}
    digests: dict[str, set[str]] = {b: set() for b in names}
    for r in range(rounds):
        say(f"round {r + 1} of {rounds}: {', '.join(names)}")
        for b in names[r % len(names):] + names[:r % len(names)]:
            s, d = run_one(b, n)
            times[b].append(s)
            digests[b].add(d)
    rep = Report("sqlite")
    for b in names:
        metric = f"sqlite_insert_{n}_{b}"
        if b == "none":
            rep.rows.append(Row.of(metric, "s", times[b]))
        else:
            rep.rows.append(Row.of(metric, "s", times[b], f"sqlite_insert_{n}_none",
                                   times["none"]))
    rep.notes.append("digests " + json.dumps({b: sorted(d) for b, d in digests.items()}))
    return rep


def _check(rep: Report, n: int) -> Report:
    """The tables every backend left equal what SQLite with no compartment
    makes of the same statements; the digests note goes."""
    note = next(x for x in rep.notes if x.startswith("digests "))
    rep.notes.remove(note)
    want = expected_digest(n)
    for b, got in json.loads(note.removeprefix("digests ")).items():
        if got != [want]:
            raise HarnessError(f"bench sqlite: SQLite in a {b} compartment left a table that "
                               f"differs from plain SQLite's ({got} against {want})")
    rep.notes.append(f"{n} INSERTs, each its own statement through its own gate, into an "
                     "in-memory table; the tables every backend left equal plain SQLite's; "
                     f"FlexOS (Xeon Silver 4114, s): {json.dumps(FLEXOS)}")
    return rep


def run(placement: str = "process", rounds: int = 5, n: int = N,
        progress: Progress | None = None) -> Report:
    if rounds < 1:
        raise HarnessError(f"--rounds must be at least 1, got {rounds}")
    argv = [sys.executable, "-m", "harness.bench.sqlite", "--rounds", str(rounds), "-n", str(n)]
    if placement == "process":
        import subprocess

        say = progress or silent
        say(f"SQLite in a compartment: {rounds} rounds of {n} INSERTs per backend, in a "
            "process of its own")
        p = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            raise HarnessError(f"bench sqlite failed: {p.stderr.strip()[-1500:]}")
        return _check(Report.from_json(json.loads(p.stdout)), n)
    from harness.guest_run import guest_json
    from harness.vm import accel

    rep = Report.from_json(guest_json(argv, "the SQLite compartment benchmark",
                                      progress=progress))
    rep.placement, rep.accel = "vm", accel.probe().accel
    rep = _check(rep, n)
    rep.notes.append("in a TCG guest: the times are TCG's, not a CPU's")
    return rep


def main(argv: list[str]) -> int:
    """`python -m harness.bench.sqlite [--rounds R] [-n N]` prints JSON."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("-n", type=int, default=N)
    a = p.parse_args(argv)
    from harness.bench import sqlite  # not __main__: the rpc node imports what it calls

    rep = sqlite.run_here(a.rounds, a.n)
    print(json.dumps({**json.loads(rep.to_json()), "notes": rep.notes}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
