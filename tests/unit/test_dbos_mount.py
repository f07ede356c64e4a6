"""`harness mount`: the DBOS file system under real programs, through a
real FUSE mount of a real SQLite file, compared with tmpfs. Both servers of
the tables run each test: the C one of `harness mount` and the pyfuse3 one
that serves a remote snode's files (here on the same local database)."""

import errno
import hashlib
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"),
                                reason="needs /dev/fuse and fusermount3 (apt-get install fuse3)")


def mounted(mnt: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(mnt.resolve()) for line in f)


ROOT = Path(__file__).resolve().parents[2]
ASAN_SO = Path("/tmp") / f"dh-dbosfs-asan-{os.getpid()}.so"  # built by the asan_build fixture
LIBASAN = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                         text=True).stdout.strip()
SERVERS = {
    "native": [sys.executable, "-m", "harness.cli", "mount", "--db"],
    # The same C under AddressSanitizer and UBSan, in a Python preloaded with
    # ASan's runtime (it must come first); Python's own leaks are not ours.
    "native-asan": ["env", f"LD_PRELOAD={LIBASAN}", "ASAN_OPTIONS=detect_leaks=0",
                    sys.executable, "-c", "import sys\n"
                    "from harness.dbos.mount import serve_native\n"
                    f"serve_native(sys.argv[1], sys.argv[2], lib='{ASAN_SO}')"],
    "pyfuse3": [sys.executable, "-c", "import sys\n"
                "from harness.dbos import DBOS\n"
                "from harness.dbos.mount import serve\n"
                "db = DBOS.open(sys.argv[1], synchronous='normal', node='local')\n"
                "serve(db.vfs, sys.argv[2], source=sys.argv[1])"],
}


@pytest.fixture(scope="session")
def asan_build():
    """native/dbosfs built with the sanitizers, for the native-asan server."""
    build = subprocess.run(
        ["gcc", "-std=c11", "-D_GNU_SOURCE", "-O1", "-g", "-Wall", "-Wextra", "-Werror",
         "-Wshadow", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-fno-omit-frame-pointer", "-fPIC", "-shared", "-I/usr/include/fuse3",
         str(ROOT / "native/dbosfs/dbosfs.c"), "-lfuse3", "-lsqlite3", "-o", str(ASAN_SO)],
        capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    yield
    ASAN_SO.unlink(missing_ok=True)


@pytest.fixture(params=SERVERS)
def server(request):
    if request.param == "native-asan":
        request.getfixturevalue("asan_build")
    return request.param


class Mount:
    def __init__(self, db: Path, mnt: Path, server: str = "native") -> None:
        self.db, self.path = db, mnt
        mnt.mkdir(exist_ok=True)
        # A file, not a pipe nobody reads while it runs: a full pipe would stall it.
        self.log = db.with_name(db.name + ".mount.log")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([*SERVERS[server], str(db), str(mnt)],
                                         stdout=out, stderr=out)
        deadline = time.monotonic() + 30
        while not mounted(mnt):
            if self.proc.poll() is not None:
                raise AssertionError(f"harness mount exited {self.proc.returncode}: "
                                     f"{self.said()}")
            assert time.monotonic() < deadline, "harness mount was not mounted in 30 s"
            time.sleep(0.05)

    def stop(self) -> None:
        """Unmounts; a mount still busy (a test failed with a file open) is
        ended by SIGTERM, and fusermount3 detaches it when the daemon exits."""
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", str(self.path)], check=False, timeout=30,
                           capture_output=True)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)

    def said(self) -> str:
        return self.log.read_text(errors="replace")

    def sql(self, query: str, *params) -> list:
        con = sqlite3.connect(self.db, timeout=10)
        try:
            return con.execute(query, params).fetchall()
        finally:
            con.close()


@pytest.fixture
def mnt(tmp_path, server):
    m = Mount(tmp_path / "fs.sqlite", tmp_path / "mnt", server)
    yield m
    m.stop()
    assert not mounted(m.path)


def run(*cmd, cwd):
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True,
                          timeout=120).stdout


# ---- POSIX semantics ---------------------------------------------------------


def test_files_appends_exclusive_create_truncate_and_sparse(mnt):
    p = mnt.path / "f"
    p.write_bytes(b"hello")
    with open(p, "ab") as f:
        f.write(b" world")
    assert p.read_bytes() == b"hello world"
    with pytest.raises(FileExistsError):
        os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.truncate(p, 4)
    assert p.read_bytes() == b"hell"
    fd = os.open(p, os.O_RDWR)
    os.pwrite(fd, b"Z", 10 << 20)
    assert os.pread(fd, 8, 4) == bytes(8)  # the hole reads as zeros
    assert os.fstat(fd).st_size == (10 << 20) + 1
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)
    assert mnt.sql("SELECT size FROM files WHERE name = 'f'") == [((10 << 20) + 1,)]
    assert mnt.sql("SELECT count(*) FROM blocks")[0][0] == 2  # not one per block of the hole


def test_modes_owners_times_and_statfs(mnt):
    p = mnt.path / "f"
    p.write_bytes(b"x")
    os.chmod(p, 0o600)
    os.chown(p, 1234, 5678)
    os.utime(p, (1_000_000_000, 1_500_000_000))
    s = os.stat(p)
    assert stat.S_ISREG(s.st_mode) and stat.S_IMODE(s.st_mode) == 0o600
    assert (s.st_uid, s.st_gid) == (1234, 5678)
    assert (s.st_atime, s.st_mtime) == (1_000_000_000, 1_500_000_000)
    assert s.st_ctime > 1_500_000_000
    old = os.umask(0o022)
    try:
        (mnt.path / "d").mkdir(0o777)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(mnt.path / "d").st_mode) == 0o755
    v = os.statvfs(mnt.path)
    assert v.f_bsize == 4096 and v.f_blocks > 0 and v.f_namemax == 255


def test_directories_renames_and_links(mnt):
    r = mnt.path
    (r / "a/b").mkdir(parents=True)
    (r / "a/b/f").write_text("1")
    with pytest.raises(OSError) as e:
        os.rmdir(r / "a/b")
    assert e.value.errno == errno.ENOTEMPTY
    (r / "g").write_text("2")
    os.rename(r / "g", r / "a/b/f")  # replaces, across directories
    assert (r / "a/b/f").read_text() == "2"
    (r / "empty").mkdir()
    os.rename(r / "a", r / "empty")  # a directory onto an empty one
    assert sorted(os.listdir(r)) == ["empty"] and (r / "empty/b/f").read_text() == "2"
    with pytest.raises(OSError) as e:
        os.rename(r / "empty", r / "empty/b/inside")
    assert e.value.errno == errno.EINVAL
    os.symlink("empty/b/f", r / "s")
    assert os.readlink(r / "s") == "empty/b/f" and (r / "s").read_text() == "2"
    assert stat.S_ISLNK(os.lstat(r / "s").st_mode)
    with pytest.raises(OSError) as e:
        os.link(r / "empty/b/f", r / "hard")
    assert e.value.errno == errno.EPERM


def test_reopening_with_o_trunc_empties_the_file(mnt):
    p = mnt.path / "f"
    p.write_text("hello world\n")
    p.write_text("a\n")  # open(O_WRONLY | O_CREAT | O_TRUNC) of a file that exists
    assert p.read_text() == "a\n" and p.stat().st_size == 2
    fd = os.open(p, os.O_RDWR | os.O_TRUNC)
    os.close(fd)
    assert p.read_bytes() == b""


def test_names_that_are_not_utf8_are_einval(mnt):
    for name in (b"\xc0\xaf", b"\xed\xa0\x80", b"\xf5\x80\x80\x80", b"\xff"):
        with pytest.raises(OSError) as e:
            os.close(os.open(os.fsencode(mnt.path) + b"/" + name, os.O_CREAT | os.O_WRONLY))
        assert e.value.errno == errno.EINVAL, name
    (mnt.path / "caf\u00e9 \U0001f600").write_text("ok")  # well-formed, two to four bytes
    assert os.listdir(mnt.path) == ["caf\u00e9 \U0001f600"]


def test_an_unlinked_open_file_stays_readable_until_closed(mnt):
    p = mnt.path / "tmp"
    p.write_bytes(b"still here")
    fd = os.open(p, os.O_RDWR)
    os.unlink(p)
    assert not p.exists()
    assert os.pread(fd, 100, 0) == b"still here"
    os.pwrite(fd, b"S", 0)
    assert os.pread(fd, 5, 0) == b"Still"
    assert os.fstat(fd).st_nlink == 0
    os.close(fd)
    deadline = time.monotonic() + 10  # the kernel sends RELEASE after close returns
    while mnt.sql("SELECT count(*) FROM files")[0][0]:
        assert time.monotonic() < deadline, "the unlinked file's row was never deleted"
        time.sleep(0.05)


def test_a_directory_of_ten_thousand_entries_and_a_file_of_four_gib(mnt):
    d = mnt.path / "big"
    d.mkdir()
    names = {f"entry-{i:05d}" for i in range(10_000)}
    for n in names:
        os.close(os.open(d / n, os.O_CREAT | os.O_WRONLY))
    assert set(os.listdir(d)) == names
    with os.scandir(d) as it:  # read back in parts, without repeats
        seen = [e.name for e in it]
    assert len(seen) == len(set(seen)) == 10_000
    with open(mnt.path / "huge", "wb") as f:
        f.truncate(4 << 30)
        f.seek((4 << 30) - 3)
        f.write(b"end")
    with open(mnt.path / "huge", "rb") as f:
        f.seek(2 << 30)
        assert f.read(1 << 20) == bytes(1 << 20)
        f.seek((4 << 30) - 3)
        assert f.read() == b"end"
    assert os.stat(mnt.path / "huge").st_size == 4 << 30


# ---- a random sequence of operations against tmpfs -----------------------------

NAMES = st.sampled_from(["a", "b", "c", "d/a", "d/b", "d/e", "d/e/x"])
OPS = st.one_of(
    st.tuples(st.just("write"), NAMES, st.integers(0, 9000), st.binary(max_size=5000)),
    st.tuples(st.just("append"), NAMES, st.binary(max_size=300)),
    st.tuples(st.just("read"), NAMES, st.integers(0, 9000), st.integers(0, 6000)),
    st.tuples(st.just("truncate"), NAMES, st.integers(0, 12000)),
    st.tuples(st.just("excl"), NAMES),
    st.tuples(st.just("mkdir"), NAMES),
    st.tuples(st.just("rmdir"), NAMES),
    st.tuples(st.just("unlink"), NAMES),
    st.tuples(st.just("rename"), NAMES, NAMES),
    st.tuples(st.just("chmod"), NAMES, st.sampled_from([0o600, 0o644, 0o755])),
    st.tuples(st.just("listdir"), NAMES),
    st.tuples(st.just("stat"), NAMES),
)


def apply(root: str, op: tuple):
    """One operation; its result, or the errno it failed with."""
    kind, path = op[0], os.path.join(root, op[1])
    try:
        if kind == "write":
            fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                return os.pwrite(fd, op[3], op[2])
            finally:
                os.close(fd)
        if kind == "append":
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
            try:
                return os.write(fd, op[2])
            finally:
                os.close(fd)
        if kind == "read":
            fd = os.open(path, os.O_RDONLY)
            try:
                return os.pread(fd, op[3], op[2])
            finally:
                os.close(fd)
        if kind == "truncate":
            return os.truncate(path, op[2])
        if kind == "excl":
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return None
        if kind == "mkdir":
            return os.mkdir(path)
        if kind == "rmdir":
            return os.rmdir(path)
        if kind == "unlink":
            return os.unlink(path)
        if kind == "rename":
            return os.rename(path, os.path.join(root, op[2]))
        if kind == "chmod":
            return os.chmod(path, op[2])
        if kind == "listdir":
            return sorted(os.listdir(path))
        s = os.stat(path)
        return (stat.S_IFMT(s.st_mode), stat.S_IMODE(s.st_mode), s.st_size if
                stat.S_ISREG(s.st_mode) else None, s.st_nlink if stat.S_ISREG(s.st_mode) else None)
    except OSError as exc:
        return ("errno", errno.errorcode[exc.errno])


@pytest.fixture(scope="module", params=SERVERS)
def shared_mount(tmp_path_factory, request):
    if request.param == "native-asan":
        request.getfixturevalue("asan_build")
    d = tmp_path_factory.mktemp("posix")
    m = Mount(d / "fs.sqlite", d / "mnt", request.param)
    yield m
    m.stop()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, max_size=25))
def test_random_operations_give_what_tmpfs_gives(shared_mount, ops):
    roots = [shared_mount.path / "t", Path("/dev/shm") / f"dh-posix-{os.getpid()}"]
    for r in roots:
        shutil.rmtree(r, ignore_errors=True)
        r.mkdir()
    try:
        for op in ops:
            ours, ref = (apply(str(r), op) for r in roots)
            assert ours == ref, f"{op}: mount gave {ours!r}, tmpfs {ref!r}"
    finally:
        for r in roots:
            shutil.rmtree(r, ignore_errors=True)


# ---- real programs -------------------------------------------------------------


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_cp_diff_tar_and_git_work_as_on_ext4(mnt, tmp_path):
    src = Path(shutil.__file__).parent / "json"  # a real tree: the stdlib's json package
    run("cp", "-r", str(src), "json", cwd=mnt.path)
    run("diff", "-r", str(src), str(mnt.path / "json"), cwd=tmp_path)
    run("tar", "cf", "t.tar", "json", cwd=mnt.path)
    (mnt.path / "x").mkdir()
    run("tar", "xf", "../t.tar", cwd=mnt.path / "x")
    assert tree_digest(mnt.path / "x/json") == tree_digest(src)

    repo = mnt.path / "repo"
    shutil.copytree(src, repo)
    env = ["-c", "user.name=t", "-c", "user.email=t@example.org"]
    run("git", "init", "-q", cwd=repo)
    run("git", "add", ".", cwd=repo)
    run("git", *env, "commit", "-q", "-m", "first", cwd=repo)
    assert "first" in run("git", "log", "--oneline", cwd=repo)
    run("git", "clone", "-q", str(repo), str(mnt.path / "clone"), cwd=mnt.path)
    def work_tree(root: Path) -> dict:
        return {k: v for k, v in tree_digest(root).items() if not k.startswith(".git")}
    assert work_tree(mnt.path / "clone") == work_tree(repo) == tree_digest(src)
    assert run("git", "fsck", cwd=mnt.path / "clone") == ""


def test_sqlite3_database_on_the_mount_with_a_reader_beside_the_writer(mnt):
    db = mnt.path / "app.db"
    run("sqlite3", str(db), "CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1);",
        cwd=mnt.path)
    writer = subprocess.Popen(
        ["sqlite3", "-cmd", ".timeout 10000", str(db)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    script = "".join(f"BEGIN; INSERT INTO t VALUES ({i}); COMMIT;\n" for i in range(2, 202))
    writer.stdin.write(script)
    writer.stdin.flush()
    counts = [int(run("sqlite3", "-cmd", ".timeout 10000", str(db), "SELECT count(*) FROM t;",
                      cwd=mnt.path))
              for _ in range(5)]
    writer.stdin.close()
    assert writer.wait(timeout=60) == 0
    writer.stdout.close()
    assert all(1 <= c <= 201 for c in counts)
    assert run("sqlite3", str(db), "PRAGMA integrity_check; SELECT count(*), sum(x) FROM t;",
               cwd=mnt.path).split() == ["ok", f"201|{sum(range(1, 202))}"]


# ---- provenance and durability -------------------------------------------------


def test_events_name_the_programs_and_answer_who_read_what_a_program_wrote(mnt):
    from harness.dbos import DBOS

    run("sh", "-c", "echo data > out.txt", cwd=mnt.path)
    run("cat", "out.txt", cwd=mnt.path)
    run("wc", "-l", "out.txt", cwd=mnt.path)  # -c would only stat it
    os.rename(mnt.path / "out.txt", mnt.path / "moved.txt")
    os.unlink(mnt.path / "moved.txt")
    deadline = time.monotonic() + 10  # flushed in batches, about once a second
    want = {("file_create", "sh"), ("file_write", "sh"), ("file_read", "cat"),
            ("file_read", "wc"), ("file_unlink", "python")}
    while not want <= set(rows := mnt.sql("SELECT kind, substr(program, 1, 6) FROM events")):
        assert time.monotonic() < deadline, f"events: {rows}; the mount said: {mnt.said()}"
        time.sleep(0.1)
    assert all(pid > 0 for (pid,) in mnt.sql("SELECT pid FROM events"))
    db = DBOS.open(mnt.db)
    try:
        assert db.prov.programs_reading_writes_of("sh") == ["cat", "wc"]
    finally:
        db.close()


def test_what_a_program_fsynced_survives_a_sigkill_of_the_mount(tmp_path, server):
    m = Mount(tmp_path / "fs.sqlite", tmp_path / "mnt", server)
    try:
        run(sys.executable, "-c", "import os\n"
            "fd = os.open('kept', os.O_CREAT | os.O_WRONLY)\n"
            "os.write(fd, b'x' * 100000); os.fsync(fd)", cwd=m.path)
        os.kill(m.proc.pid, signal.SIGKILL)
        m.proc.wait(timeout=10)
        deadline = time.monotonic() + 10  # fusermount3's auto_unmount follows the daemon
        while mounted(m.path):
            assert time.monotonic() < deadline, "the killed mount stayed mounted"
            time.sleep(0.05)
    finally:
        m.stop()
    m = Mount(tmp_path / "fs.sqlite", tmp_path / "mnt", server)
    try:
        assert (m.path / "kept").read_bytes() == b"x" * 100000
    finally:
        m.stop()


def test_sigint_unmounts(tmp_path, server):
    m = Mount(tmp_path / "fs.sqlite", tmp_path / "mnt", server)
    try:
        m.proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert m.proc.wait(timeout=30) == 0
        assert not mounted(m.path)
    finally:
        m.stop()


def test_sigterm_unmounts_even_with_a_file_open(tmp_path, server):
    m = Mount(tmp_path / "fs.sqlite", tmp_path / "mnt", server)
    fd = os.open(m.path / "open-file", os.O_CREAT | os.O_WRONLY)
    try:
        m.proc.terminate()
        assert m.proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 10
        while mounted(m.path):
            assert time.monotonic() < deadline, "SIGTERM left the mount behind"
            time.sleep(0.05)
    finally:
        with pytest.raises(OSError) as e:  # the file system it was on is gone
            os.close(fd)
        assert e.value.errno == errno.ENOTCONN
        m.stop()


def test_a_mount_point_in_use_or_missing_is_a_clear_error(mnt, tmp_path):
    p = subprocess.run([sys.executable, "-m", "harness.cli", "mount", "--db",
                        str(tmp_path / "other.sqlite"), str(mnt.path)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "already a mount point" in p.stderr
    p = subprocess.run([sys.executable, "-m", "harness.cli", "mount", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "mkdir it first" in p.stderr


# ---- on a cluster: the pnode's files on the snode -------------------------------


def test_a_cluster_mount_keeps_files_and_events_on_the_snode_through_its_kill(lego3, tmp_path):
    from harness.dbos.mount import mounted

    path = tmp_path / "dbos"
    path.mkdir()
    with mounted(lego3.dbos.vfs, str(path), task=None, source="lego3/snode0"):
        run(sys.executable, "-c", "import os\n"
            "fd = os.open('notes', os.O_CREAT | os.O_WRONLY)\n"
            "os.write(fd, b'synced'); os.fsync(fd)", cwd=path)
        assert run("cat", "notes", cwd=path) == "synced"
        lego3.fault("snode0", "kill")
        with pytest.raises(OSError) as e:  # said on stderr; never a hang
            (path / "notes").read_bytes()
        assert e.value.errno in (errno.EIO, errno.ENOENT)
        lego3.fault("snode0", "restart")
        assert (path / "notes").read_bytes() == b"synced"
        time.sleep(1.5)  # one provenance flush
    assert lego3.sql("SELECT name, size FROM files WHERE name = 'notes'") == [["notes", 6]]
    kinds = lego3.sql("SELECT DISTINCT kind, program, node FROM events WHERE program = 'cat'")
    assert kinds == [["file_read", "cat", "snode0"]]


def test_harness_run_files_dbos_gives_the_program_the_mount_and_takes_it_away(tmp_path):
    path = tmp_path / "files"
    p = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--placement", "process",
                        "--files", f"dbos:{path}", "--", "sh", "-c",
                        f"echo kept > {path}/f && cat {path}/f && "
                        f"grep -c ' {path} fuse.dbos' /proc/mounts"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["kept", "1"]
    assert not path.exists()  # made for the run, removed after it
    p = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--placement", "process",
                        "--files", "nfs:/x", "--", "true"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0 and "give dbos, or dbos:/ABSOLUTE/PATH" in p.stderr


def test_bench_dbosfs_reports_every_row_beside_ext4(tmp_path):
    from harness.bench import dbosfs

    rep = dbosfs.run_here(tmp_path, n=10, rounds=1, seconds=0.2, file_mib=4, seq_mib=4,
                          tree=Path(shutil.__file__).parent / "json")
    assert [r.metric for r in rep.rows] == [
        "fs_create", "fs_create_fuse_null", "fs_create_pyfuse3", "randread_4k",
        "randwrite_4k_fsync", "seqwrite_1m", "analytics_query", "git_commit_tree"]
    assert all(r.floor and r.floor_p50 and r.ratio for r in rep.rows)


def test_a_failing_request_is_eio_and_the_mount_goes_on(tmp_path, capfd):
    from harness.dbos import DBOS
    from harness.dbos.mount import mounted
    from harness.dbos.vfs import VFS

    class Broken(VFS):  # a real VFS whose read path has a bug
        def read(self, ino, offset, size):
            raise RuntimeError("a bug in read")

    db = DBOS.open(tmp_path / "fs.sqlite", synchronous="normal")
    (tmp_path / "mnt").mkdir()
    try:
        with mounted(Broken(db), str(tmp_path / "mnt"), source="broken"):
            (tmp_path / "mnt/f").write_bytes(b"data")
            with pytest.raises(OSError) as e:
                (tmp_path / "mnt/f").read_bytes()
            assert e.value.errno == errno.EIO
            assert os.stat(tmp_path / "mnt/f").st_size == 4  # still served
    finally:
        db.close()
    assert "a bug in read" in capfd.readouterr().err
