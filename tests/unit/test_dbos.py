"""The DBOS layer on a local file: schema, SQL, scheduler, IPC, file
system, provenance, cluster state, crash safety."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.dbos import DBOS, DBOSError, FSError
from harness.dbos.sched import POLICIES
from harness.dbos.schema import MIGRATIONS, TABLES


@pytest.fixture
def db(tmp_path):
    d = DBOS.open(tmp_path / "dbos.sqlite", node="snode0")
    yield d
    d.close()


def test_new_database_has_the_tables_in_wal_with_full_sync(db):
    names = {r[0] for r in db.sql("SELECT name FROM sqlite_master WHERE type = 'table'").rows}
    assert set(TABLES) <= names
    assert db.sql("PRAGMA journal_mode").rows == [["wal"]]
    assert db.sql("PRAGMA synchronous").rows == [[2]]  # FULL
    assert db.sql("PRAGMA user_version").rows == [[len(MIGRATIONS)]]


def test_reopening_keeps_data_and_does_not_migrate_twice(tmp_path):
    a = DBOS.open(tmp_path / "x.sqlite")
    a.sql("INSERT INTO nodes (name, role, updated) VALUES ('n', 'pnode', 0)", write=True)
    a.close()
    b = DBOS.open(tmp_path / "x.sqlite")
    assert b.sql("SELECT name FROM nodes").rows == [["n"]]


def test_a_version_1_database_is_migrated_with_its_files_kept(tmp_path):
    import sqlite3
    p = tmp_path / "v1.sqlite"
    con = sqlite3.connect(p)
    con.executescript(f"{MIGRATIONS[0]}; PRAGMA user_version = 1;")
    con.execute("INSERT INTO files (dir_id, name, size, created, modified) "
                "VALUES (1, 'old', 0, 5, 6)")
    con.commit()
    con.close()
    db = DBOS.open(p)
    assert db.sql("SELECT name, mode, uid FROM files").rows == [["old", 0o100644, 0]]
    assert db.fs.listdir("/") == ["old"]  # the orphans' directory is not under the root


def test_not_a_database_is_a_clear_error(tmp_path):
    p = tmp_path / "junk.sqlite"
    p.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DBOSError, match="cannot open as a DBOS database"):
        DBOS.open(p)


def test_bad_sql_changes_nothing(db):
    db.sql("INSERT INTO nodes (name, role, updated) VALUES ('a', 'pnode', 0)", write=True)
    with pytest.raises(DBOSError, match="syntax error"):
        db.sql("SELEC * FROM nodes")
    with pytest.raises(DBOSError, match="UNIQUE"):
        db.sql("INSERT INTO nodes (name, role, updated) VALUES ('a', 'x', 0)", write=True)
    with pytest.raises(DBOSError, match="one statement"):
        db.sql("DELETE FROM nodes; DELETE FROM tasks", write=True)
    assert db.sql("SELECT count(*) FROM nodes").rows == [[1]]


def test_writes_need_write_true(db):
    with pytest.raises(DBOSError, match="pass write=True"):
        db.sql("DELETE FROM nodes")
    assert db.sql("DELETE FROM nodes", write=True).changes == 0


# ---- scheduler ----------------------------------------------------------------

def test_fifo_claims_in_order_with_priority_first(db):
    db.sched.add_worker("w", "pnode0", capacity=10)
    ids = [db.sched.submit(["t", str(i)]) for i in range(3)]
    urgent = db.sched.submit(["urgent"], priority=5)
    got = [db.sched.claim("w")["task_id"] for _ in range(4)]
    assert got == [urgent, *ids]
    assert db.sched.claim("w") is None


def test_capacity_is_respected_and_complete_frees_it(db):
    db.sched.add_worker("w", "pnode0", capacity=1)
    a, b = db.sched.submit(["a"]), db.sched.submit(["b"])
    assert db.sched.claim("w")["task_id"] == a
    assert db.sched.claim("w") is None  # full
    db.sched.complete(a, ok=True, result="fine")
    assert db.sched.claim("w")["task_id"] == b
    assert db.sql("SELECT state, result FROM tasks WHERE task_id = ?", (a,)).rows == [
        ["done", "fine"]]
    with pytest.raises(DBOSError, match="not running"):
        db.sched.complete(a, ok=True)


def test_least_loaded_only_feeds_the_least_loaded_worker(db):
    db.sched.add_worker("busy", "pnode0", capacity=4)
    db.sched.add_worker("idle", "pnode1", capacity=4)
    for i in range(3):
        db.sched.submit([str(i)])
    assert db.sched.claim("busy", "least_loaded") is not None  # both idle: busy sorts first
    assert db.sched.claim("busy", "least_loaded") is None       # now idle is less loaded
    assert db.sched.claim("idle", "least_loaded") is not None


def test_locality_prefers_tasks_for_the_workers_node(db):
    db.sched.add_worker("w0", "pnode0", capacity=4)
    db.sched.add_worker("w1", "pnode1", capacity=4)
    far = db.sched.submit(["far"], locality="pnode1")
    near = db.sched.submit(["near"], locality="pnode0")
    assert db.sched.claim("w0", "locality")["task_id"] == near
    assert db.sched.claim("w0", "fifo")["task_id"] == far  # fifo ignores locality


def test_every_policy_is_one_statement():
    for q in POLICIES.values():
        assert q.count(";") == 0 and q.lstrip().startswith("UPDATE")


def test_unknown_policy_and_worker(db):
    with pytest.raises(DBOSError, match="no scheduling policy"):
        db.sched.claim_many("w", "random")
    with pytest.raises(DBOSError, match="add_worker first"):
        db.sched.claim("nobody")


def test_claim_waits_for_a_submit(db):
    db.sched.add_worker("w", "pnode0")
    threading.Timer(0.2, lambda: db.sched.submit(["late"])).start()
    t0 = time.monotonic()
    task = db.sched.claim("w", wait=5)
    assert task["argv"] == ["late"] and time.monotonic() - t0 < 4


# ---- IPC --------------------------------------------------------------------------

def test_messages_arrive_once_in_order(db):
    for i in range(3):
        db.ipc.send("a", "b", bytes([i]))
    db.ipc.send("a", "c", b"other")
    got = [db.ipc.recv("b")["data"] for _ in range(3)]
    assert got == [b"\x00", b"\x01", b"\x02"] and db.ipc.recv("b") is None
    assert db.ipc.recv("c")["sender"] == "a"


def test_a_receive_commits_without_the_fsync_and_a_send_with_it(db):
    modes = []
    with db.tx(durable=False) as con:
        modes.append(con.execute("PRAGMA synchronous").fetchone()[0])
    with pytest.raises(RuntimeError):
        with db.tx(durable=False):
            raise RuntimeError("rolled back")
    with db.tx() as con:
        modes.append(con.execute("PRAGMA synchronous").fetchone()[0])
    assert modes == [1, 2]  # NORMAL for that one commit, FULL again after (an error too)
    db.ipc.send("a", "b", b"m")
    assert db.ipc.recv("b")["data"] == b"m"
    assert db.sql("PRAGMA synchronous").rows == [[2]]


def test_blocking_receive_times_out_or_wakes(db):
    t0 = time.monotonic()
    assert db.ipc.recv("x", timeout=0.2) is None
    assert time.monotonic() - t0 >= 0.2
    threading.Timer(0.1, lambda: db.ipc.send("y", "x", b"hi")).start()
    assert db.ipc.recv("x", timeout=5)["data"] == b"hi"


# ---- file system ------------------------------------------------------------------

def test_file_operations(db):
    fs = db.fs
    fs.mkdir("/a/b", parents=True)
    fs.create("/a/b/f")
    assert fs.write("/a/b/f", 0, b"hello") == 5
    fs.write("/a/b/f", 10_000, b"far")
    assert fs.stat("/a/b/f")["size"] == 10_003
    assert fs.read("/a/b/f", 0, 5) == b"hello"
    assert fs.read("/a/b/f", 5, 10) == bytes(10)  # a hole reads as zeros
    assert fs.read("/a/b/f", 10_000) == b"far"
    fs.truncate("/a/b/f", 3)
    assert fs.read("/a/b/f") == b"hel"
    fs.rename("/a/b/f", "/a/g")
    assert fs.listdir("/a") == ["b", "g"] and fs.listdir("/a/b") == []
    fs.rename("/a/b", "/c")
    assert fs.listdir("/") == ["a", "c"]
    fs.unlink("/a/g")
    fs.rmdir("/c")
    assert fs.listdir("/a") == [] and fs.stat("/a")["type"] == "dir"


def test_cached_reads_see_every_commit_from_this_connection_and_others(db, tmp_path):
    fs = db.fs
    fs.create("/f")
    fs.write("/f", 0, b"a" * 4096 + b"b" * 100)
    for _ in range(2):  # the second time from the cache
        assert fs.read("/f", 0, 4096) == b"a" * 4096 and fs.read("/f", 4090, 20) == \
            b"a" * 6 + b"b" * 14
    assert db.vfs.read(db.vfs.lookup(1, "f")["ino"], 4096, 4096) == b"b" * 100
    assert fs.cache.blocks and db.vfs.cache.blocks  # they were cached
    fs.write("/f", 4096, b"c")  # this connection commits
    assert fs.read("/f", 4096, 2) == b"cb"
    fs.truncate("/f", 2)
    assert fs.read("/f") == b"aa"
    # Another process changes a block and the size behind the store's back.
    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sqlite3
        con = sqlite3.connect({str(db.path)!r}, isolation_level=None)
        con.execute("UPDATE blocks SET bytes = x'7a7a7a' WHERE block_number = 0")
        con.execute("UPDATE files SET size = 3 WHERE name = 'f'")
        """)], check=True, timeout=60)
    assert fs.read("/f") == b"zzz"
    assert db.vfs.read(db.vfs.lookup(1, "f")["ino"], 0, 10) == b"zzz"


def test_the_read_cache_leaves_sqlite_its_locks_on_the_wal_index(db):
    """Closing a descriptor of the -shm file would drop SQLite's POSIX locks
    on it: then another process's connection rebuilt the file under this
    one's mapping (a SIGBUS killed the mount in its tests)."""
    db.fs.create("/f")
    db.fs.write("/f", 0, b"x")
    assert db.fs.read("/f") == db.vfs.read(db.vfs.lookup(1, "f")["ino"], 0, 1) == b"x"
    assert db.fs.cache.blocks  # the cache mapped the WAL index
    # SQLite's DMS lock (unix VFS: byte 128 of the -shm file): held by us, so
    # no other connection may take it and rebuild the file.
    held = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, struct
        fd = os.open({str(db.path) + "-shm"!r}, os.O_RDWR)
        lk = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 128, 1, 0)
        print(struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, lk))[4])
        """)], check=True, timeout=60, capture_output=True, text=True).stdout
    assert int(held) == os.getpid()


def test_an_in_memory_store_reads_without_a_cache():
    mem = DBOS.open(":memory:")
    mem.fs.create("/f")
    mem.fs.write("/f", 0, b"x" * 5000)
    assert mem.fs.read("/f", 4000, 2000) == b"x" * 1000 and not mem.fs.cache.blocks
    mem.close()


@pytest.mark.parametrize("op,err", [
    (lambda fs: fs.open("/nope"), errno.ENOENT),
    (lambda fs: fs.create("/d"), errno.EEXIST),
    (lambda fs: fs.create("/f"), errno.EEXIST),
    (lambda fs: fs.mkdir("/f"), errno.EEXIST),
    (lambda fs: fs.create("/f/x"), errno.ENOTDIR),
    (lambda fs: fs.listdir("/f"), errno.ENOTDIR),
    (lambda fs: fs.read("/d"), errno.EISDIR),
    (lambda fs: fs.rmdir("/d"), errno.ENOTEMPTY),
    (lambda fs: fs.mkdir("/x/y"), errno.ENOENT),
    (lambda fs: fs.rename("/d", "/d/inner/d2"), errno.EINVAL),
    (lambda fs: fs.rename("/f", "/d"), errno.EEXIST),
    (lambda fs: fs.create("/../etc"), errno.EINVAL),
    (lambda fs: fs.create("/a\0b"), errno.EINVAL),
    (lambda fs: fs.create("relative"), errno.EINVAL),
    (lambda fs: fs.create("/" + "x" * 256), errno.EINVAL),
    (lambda fs: fs.write("/f", -1, b"x"), errno.EINVAL),
])
def test_posix_errors(db, op, err):
    db.fs.mkdir("/d/inner", parents=True)
    db.fs.create("/f")
    with pytest.raises(FSError) as e:
        op(db.fs)
    assert e.value.errno == err and isinstance(e.value, OSError)


def test_a_read_past_a_huge_hole_reads_only_what_is_asked(db):
    """A file with one byte past 10^12: reads around it build what they
    return, not the hole; the whole file at once is refused (EFBIG)."""
    fs = db.fs
    fs.create("/sparse")
    fs.write("/sparse", 10**12, b"end")
    assert fs.stat("/sparse")["size"] == 10**12 + 3
    assert fs.read("/sparse", 10**12, 10) == b"end"
    assert fs.read("/sparse", 10**12 - 5, 8) == bytes(5) + b"end"
    assert fs.read("/sparse", 5 * 10**11, 3) == bytes(3)
    for size in (-1, 10**12):
        with pytest.raises(FSError) as e:
            fs.read("/sparse", 0, size)
        assert e.value.errno == errno.EFBIG


def test_reads_up_to_the_limit_still_work(db):
    fs = db.fs
    fs.create("/f")
    fs.write("/f", 3, b"abc")
    fs.write("/f", 9000, b"z")
    assert fs.read("/f") == bytes(3) + b"abc" + bytes(9000 - 6) + b"z"
    assert fs.read("/f", 4, 4) == b"bc" + bytes(2)


@pytest.mark.parametrize("data", [5, 10**12, "text", None])
def test_write_data_must_be_bytes(db, data):
    """An int was taken as a length: bytes(10**12) would build a terabyte."""
    db.fs.create("/f")
    with pytest.raises(TypeError):
        db.fs.write("/f", 0, data)
    assert db.fs.stat("/f")["size"] == 0


def test_a_path_longer_than_path_max_is_refused(db):
    name = "d" * 200
    deep = "/" + "/".join([name] * 20)  # 4020 bytes: fine
    db.fs.mkdir(deep, parents=True)
    longest = deep + "/" + "x" * (4095 - len(deep) - 1)
    db.fs.create(longest)  # 4095 bytes: PATH_MAX with its NUL
    for op in (lambda: db.fs.create(longest + "y"), lambda: db.fs.stat(longest + "/y"),
               lambda: db.fs.mkdir(deep + "/" + "/".join([name] * 3), parents=True)):
        with pytest.raises(FSError) as e:
            op()
        assert e.value.errno == errno.ENAMETOOLONG


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20_000), st.binary(min_size=1, max_size=6000)),
                max_size=12), st.integers(0, 30_000))
def test_writes_and_reads_match_a_bytearray(tmp_path_factory, writes, cut):
    db = DBOS.open(tmp_path_factory.mktemp("fs") / "p.sqlite", synchronous="off")
    db.fs.create("/f")
    model = bytearray()
    for off, data in writes:
        db.fs.write("/f", off, data)
        if len(model) < off + len(data):
            model.extend(bytes(off + len(data) - len(model)))
        model[off:off + len(data)] = data
    assert db.fs.read("/f") == bytes(model)
    db.fs.truncate("/f", cut)
    model = model[:cut] + bytes(max(0, cut - len(model)))
    assert db.fs.read("/f") == bytes(model) and db.fs.stat("/f")["size"] == cut
    db.close()


def test_largest_files_under_a_tree(db):
    db.fs.mkdir("/t/sub", parents=True)
    db.fs.mkdir("/other")
    for path, size in [("/t/a", 10), ("/t/sub/b", 30), ("/t/sub/c", 20), ("/other/z", 99)]:
        db.fs.create(path)
        db.fs.truncate(path, size)
    out = db.fs.largest("/t", 2)
    assert out == {"largest": [("/t/sub/b", 30), ("/t/sub/c", 20)], "total": 60}


# ---- provenance and state ---------------------------------------------------------

def test_which_tasks_read_what_a_task_wrote(db):
    db.fs.create("/shared")
    db.fs.create("/private")
    db.fs.write("/shared", 0, b"x", task=1)
    db.fs.write("/private", 0, b"y", task=1)
    db.fs.read("/shared", task=2)
    db.fs.read("/shared", task=3)
    db.fs.read("/private", task=1)  # its own read does not count
    db.fs.read("/private", task=4)
    assert db.prov.readers_of_writes(1) == [2, 3, 4]
    mid = db.ipc.send("a", "b", b"m", task=5)
    db.ipc.recv("b", task=6)
    assert [e["kind"] for e in db.prov.events(5)] == ["msg_send"]
    assert db.prov.events(6)[0]["detail"] == f"msg:{mid}"


def test_nodes_report_state(db):
    db.state.report_node("pnode0", "pnode", 1, "vm")
    db.state.report_node("pnode0", "pnode", 1, "vm", state="down")
    db.state.report_region(7, "mnode0", 1 << 20, owner="pnode0")
    db.state.report_pages(7, "pnode0", resident=12, dirty=3)
    assert db.sql("SELECT name, state FROM nodes").rows == [["pnode0", "down"]]
    assert db.sql("SELECT r.size, p.resident, p.dirty FROM regions r JOIN pages p "
                  "USING (region_id)").rows == [[1 << 20, 12, 3]]


# ---- crash safety -----------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from harness.dbos import DBOS
    db = DBOS.open(sys.argv[1])
    batch = 0
    while True:
        batch += 1
        with db.tx() as con:
            for i in range(200):  # a transaction of many rows: all or none
                con.execute("INSERT INTO messages (receiver_id, sender_id, data, sent) "
                            "VALUES (?, 'w', x'00', 0)", (f"b{batch}",))
        print(batch, flush=True)  # only after COMMIT returned
""")


def test_sigkill_mid_transaction_loses_nothing_committed(tmp_path):
    path = tmp_path / "crash.sqlite"
    DBOS.open(path).close()
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE,
                         text=True)
    acked = []
    while len(acked) < 25:
        acked.append(int(p.stdout.readline()))
    os.kill(p.pid, signal.SIGKILL)  # almost surely inside a transaction
    p.wait()
    acked += [int(x) for x in p.stdout.read().split()]
    db = DBOS.open(path)
    counts = dict(db.sql("SELECT receiver_id, count(*) FROM messages GROUP BY 1").rows)
    for b in acked:
        assert counts.get(f"b{b}") == 200, f"committed batch {b} lost"
    assert set(counts.values()) == {200}, "a half-written transaction is visible"
