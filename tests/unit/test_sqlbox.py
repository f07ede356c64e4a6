"""SQLite (Debian's libsqlite3) in a compartment, on the host: the none and
mprotect backends, what crosses the gate, the faults and the errors. Each
case runs in a process of its own: SQLite's allocator is process-wide and
this test process has started SQLite already (Python's sqlite3). The mpk
backend is tested in a guest (tests/vm/test_sqlbox_vm.py)."""

import json
import subprocess
import sys
import textwrap

import pytest

from harness.bench import sqlite as bench


def in_process(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


WORKLOAD = """
    import json, sys
    from harness._native import pkey
    from harness.errors import IsolationFault
    from harness.isolation.compartments import Domain, parse
    backend = sys.argv[1] if len(sys.argv) > 1 else "{backend}"
    d = Domain(parse({{"compartments": [
        {{"name": "app", "backend": backend}},
        {{"name": "sqlite", "backend": backend, "heap": "16MiB"}}]}}, "<test>"))
    d.enter("app")
    box = pkey.SQLiteBox(d["sqlite"])
    box.execute("CREATE TABLE t(a INTEGER, b TEXT, c BLOB)")
    for i in range(300):
        box.execute(f"INSERT INTO t VALUES ({{i}}, 'v{{i}}', NULL)")
    rows = box.execute("SELECT a, b, c FROM t WHERE a % 50 = 0; SELECT count(*) FROM t")
    fault = None
    try:
        d.probe("app", "sqlite")
    except IsolationFault as e:
        fault = str(e)
    print(json.dumps({{"rows": rows, "used": box.heap_used, "fault": fault}}))
    box.close()
    d.close()
"""


@pytest.mark.parametrize("backend", ["none", "mprotect"])
def test_sqlite_in_a_compartment_answers_as_plain_sqlite(backend):
    import sqlite3

    p = in_process(WORKLOAD.format(backend=backend))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    con = sqlite3.connect(":memory:")
    con.execute("CREATE TABLE t(a INTEGER, b TEXT, c BLOB)")
    con.executemany("INSERT INTO t VALUES (?, ?, NULL)", [(i, f"v{i}") for i in range(300)])
    want = [[str(a), b, None] for a, b in con.execute("SELECT a, b FROM t WHERE a % 50 = 0")]
    assert out["rows"] == [*want, ["300"]]
    assert out["used"] > 0  # SQLite's memory is in the compartment's heap
    if backend == "mprotect":  # outside a gate the application cannot touch it
        assert "compartment 'app' (mprotect) touched the memory of 'sqlite'" in out["fault"]
        assert "SEGV_ACCERR" in out["fault"]
    else:
        assert out["fault"] is None


def test_the_errors_a_user_can_cause_say_what_to_do():
    p = in_process("""
        import sqlite3
        sqlite3.connect(":memory:").execute("SELECT 1")  # SQLite has started here
        from harness._native import pkey
        try:
            pkey.SQLiteBox(pkey.Compartment("sqlite", "none", 1 << 20))
        except Exception as e:
            print("STARTED", type(e).__name__, e)
    """)
    assert "STARTED HarnessError" in p.stdout and "needs a process of its own" in p.stdout
    p = in_process("""
        from harness._native import pkey
        lib = pkey.Compartment("sqlite", "none", 1 << 20)
        box = pkey.SQLiteBox(lib, shared=64 << 10)
        try:
            pkey.SQLiteBox(pkey.Compartment("other", "none", 1 << 20))
        except Exception as e:
            print("TWO", type(e).__name__, e)
        try:
            box.execute("SELEC 1")
        except pkey.SQLError as e:
            print("SQL", e)
        try:
            box.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
                        "WHERE i < 100000) SELECT i FROM n")
        except Exception as e:
            print("BIG", type(e).__name__, e)
        print("STILL", box.execute("SELECT 2"))
        box.close()
        try:
            box.execute("SELECT 1")
        except Exception as e:
            print("CLOSED", e)
        box = pkey.SQLiteBox(lib)  # a closed box's process may open another
        print("AGAIN", box.execute("SELECT 3"))
    """)
    assert p.returncode == 0, p.stderr
    assert "TWO HarnessError" in p.stdout and "one box per process" in p.stdout
    assert 'SQL SQLite in sqlite: near "SELEC": syntax error' in p.stdout
    assert "BIG HarnessError" in p.stdout and "larger than the shared buffer (65536 bytes)" \
        in p.stdout
    assert "STILL [('2',)]" in p.stdout and "CLOSED this SQLite box is closed" in p.stdout
    assert "AGAIN [('3',)]" in p.stdout


def test_bench_sqlite_reports_every_host_backend_beside_none():
    rep = bench.run(rounds=1, n=200)
    rows = {r.metric: r for r in rep.rows}
    assert set(rows) == {"sqlite_insert_200_none", "sqlite_insert_200_mprotect",
                         "sqlite_insert_200_rpc"}
    assert all(r.ratio and r.floor == "sqlite_insert_200_none"
               for m, r in rows.items() if not m.endswith("_none"))
    assert any("equal plain SQLite's" in n for n in rep.notes)
