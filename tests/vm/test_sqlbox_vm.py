"""SQLite and zlib in mpk compartments, in a TCG guest with protection keys:
the same answers as plain SQLite and zlib, SEGV_PKUERR from the
application, the private-stack gate, and `bench sqlite --placement vm`'s
rows."""

import json
import subprocess
import textwrap
import zlib

from .guest_python import HARNESS, run_script, tagged_json

IN_GUEST = textwrap.dedent("""
    import json
    from harness._native import pkey
    from harness.errors import IsolationFault
    from harness.isolation.compartments import Domain, parse
    out = {}
    for stack in (False, True):
        d = Domain(parse({"compartments": [
            {"name": "app", "backend": "mpk"},
            {"name": "sqlite", "backend": "mpk", "heap": "16MiB", "private_stack": stack},
            {"name": "zlib", "backend": "mpk", "heap": "2MiB", "private_stack": stack}]},
            "<guest>"))
        d.enter("app")
        box = pkey.SQLiteBox(d["sqlite"], private_stack=stack)
        box.execute("CREATE TABLE t(a INTEGER, b TEXT)")
        for i in range(200):
            box.execute(f"INSERT INTO t VALUES ({i}, 'v{i}')")
        rows = box.execute("SELECT count(*), sum(a), group_concat(b) FROM t")
        z = pkey.ZBox(d["zlib"], private_stack=stack)
        packed = z.compress(b"record 7: page fault node " * 100).hex()
        faults = {}
        for lib in ("sqlite", "zlib"):
            try:
                d.probe("app", lib)
                faults[lib] = None
            except IsolationFault as e:
                faults[lib] = str(e)
        out[str(stack)] = {"rows": rows, "packed": packed, "faults": faults}
        z.close()
        box.close()
        d.close()
    print("RESULT", json.dumps(out))
""")


def test_sqlite_and_zlib_in_mpk_compartments(tmp_path):
    import sqlite3

    out = tagged_json(run_script(tmp_path, IN_GUEST), "RESULT")
    con = sqlite3.connect(":memory:")
    con.execute("CREATE TABLE t(a INTEGER, b TEXT)")
    con.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"v{i}") for i in range(200)])
    want = [[str(v) for v in con.execute("SELECT count(*), sum(a), group_concat(b) FROM t")
             .fetchone()]]
    packed = zlib.compress(b"record 7: page fault node " * 100, 6).hex()
    for stack in ("False", "True"):
        assert out[stack]["rows"] == want, stack
        assert out[stack]["packed"] == packed, stack
        for lib in ("sqlite", "zlib"):
            fault = out[stack]["faults"][lib]
            assert f"compartment 'app' (mpk) touched the memory of '{lib}' (mpk)" in fault \
                and "SEGV_PKUERR" in fault


def test_bench_sqlite_in_a_guest_has_the_mpk_rows():
    r = subprocess.run([*HARNESS, "bench", "sqlite", "--placement", "vm", "--rounds", "1",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["placement"] == "vm"
    assert [row["metric"] for row in rep["rows"]] == [
        f"sqlite_insert_5000_{b}" for b in ("none", "mprotect", "mpk_light", "mpk_stack", "rpc")]
