"""`harness bench dbosfs`: programs nobody here wrote on the DBOS mount
(harness mount: FUSE over the DBOS tables), beside the same job on the ext4
that holds the database, in the same run and at the same durability.

  fs_create          create + fsync(file) + fsync(dir), per file   vs the same on ext4
  fs_create_fuse_null  the same on a FUSE file system in C that stores nothing
                     (native/fusenull): what FUSE's round trips alone cost here
  fs_create_pyfuse3  the same on the same tables through the pyfuse3 mount (what
                     serves a remote snode's files), here on the local database
  randread_4k        fio, psync, 4 KiB random reads of a 64 MiB file (clat)
  randwrite_4k_fsync fio, psync, 4 KiB random writes, fsync after each (clat + fsync)
  seqwrite_1m        fio, 1 MiB sequential writes of 128 MiB, fsync at the end (MB/s;
                     a ratio below 1 is slower than ext4)
  analytics_query    the ten largest files and the total size of a tree written
                     through the mount by `cp -r` (the Python standard library):
                     one SQL query                                 vs `find -printf` on ext4
  git_commit_tree    git init, add and commit of that tree          vs the same on ext4

The mount's database commits with synchronous=NORMAL and a program's fsync
makes every commit durable (harness.dbos.vfs); ext4 does what fsync asks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.bench.dbos import fs_of
from harness.bench.report import Report, Row
from harness.errors import HarnessError
from harness.progress import Progress, silent

STDLIB_SKIP = {"test", "site-packages", "idlelib", "lib2to3", "tkinter", "ensurepip",
               "__pycache__", "turtledemo", "pydoc_data"}


CREATE_PARTS = 10
CREATE_LOOP = """
import json, os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
os.mkdir(d)
dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
out = []
for i in range(n):
    t0 = time.perf_counter_ns()
    fd = os.open(f"{d}/f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.fsync(fd)
    os.close(fd)
    os.fsync(dfd)
    out.append((time.perf_counter_ns() - t0) / 1000)
print(json.dumps(out))
"""


def _create_samples(d: Path, n: int) -> list[float]:
    """µs per create + fsync + close + fsync(dir), timed by a process of its
    own, as a program on the mount would be (not a thread beside the mount's
    own, which would share its interpreter)."""
    p = subprocess.run([sys.executable, "-c", CREATE_LOOP, str(d), str(n)],
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise HarnessError(f"creating files in {d} failed: {p.stderr.strip()[-500:]}")
    return json.loads(p.stdout)


def _fio(d: Path, name: str, *opts: str) -> dict:
    if not shutil.which("fio"):
        raise HarnessError("fio not found: `apt-get install fio` (scripts/setup.sh does)")
    p = subprocess.run(["fio", f"--name={name}", f"--directory={d}", "--filename=fio.dat",
                        "--ioengine=psync", "--output-format=json", *opts],
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise HarnessError(f"fio {name} in {d} failed: {p.stderr.strip()[-500:]}")
    return json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]


def _lat_row(metric: str, floor: str, ours: dict, ext4: dict, rw: str) -> Row:
    """fio's completion latency of each I/O, plus its fsync's latency when
    the job fsyncs after each: the percentiles of the two, added."""
    def us(job: dict, q: str) -> float:
        sync = job.get("sync", {}).get("lat_ns", {}).get("percentile", {}).get(q, 0)
        return (job[rw]["clat_ns"]["percentile"][q] + sync) / 1000
    p50, fp50 = us(ours, "50.000000"), us(ext4, "50.000000")
    return Row(metric, "us", p50, us(ours, "99.000000"), ours[rw]["total_ios"], floor, fp50,
               p50 / fp50 if fp50 else None)


def _copy_tree(src: Path, dest: Path) -> int:
    """A copy of src (by default the Python standard library) without its
    tests and caches; returns its file count."""
    shutil.copytree(src, dest, ignore=lambda d, names: [
        n for n in names if n in STDLIB_SKIP or n.startswith("config-")], symlinks=True)
    return sum(1 for p in dest.rglob("*") if p.is_file())


def _walk(root: Path) -> tuple[list[int], int]:
    out = subprocess.run(["find", str(root), "-type", "f", "-printf", "%s\\n"],
                         capture_output=True, text=True, check=True).stdout.split()
    sizes = sorted((int(s) for s in out), reverse=True)
    return sizes[:10], sum(sizes)


def _git_seconds(repo: Path) -> float:
    env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@example.org",
           "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@example.org"}
    shutil.rmtree(repo / ".git", ignore_errors=True)
    t0 = time.perf_counter()
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "tree"]):
        subprocess.run(["git", *cmd], cwd=repo, env=env, check=True, capture_output=True,
                       timeout=600)
    return time.perf_counter() - t0


def run_here(workdir: Path, n: int = 300, rounds: int = 3, seconds: float = 4.0,
             file_mib: int = 64, seq_mib: int = 128, tree: Path | None = None,
             progress: Progress | None = None) -> Report:
    """The benchmark on the file system holding workdir; file_mib is fio's
    random-I/O file, seq_mib what seqwrite_1m writes per round, tree the
    directory copied for the last two rows (default: the standard library)."""
    from harness._native import shared_object
    from harness.dbos import DBOS
    from harness.dbos.mount import mounted, process_mount

    say = progress or silent
    workdir.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="dh-bench-dbosfs-", dir=workdir))
    try:
        ext4, mnt = d / "ext4", d / "mnt"
        ext4.mkdir()
        mnt.mkdir()
        path = d / "fs.sqlite"
        db = DBOS.open(path, synchronous="normal", node="bench")
        rep = Report("dbosfs", placement="process")
        null = [sys.executable, "-c", "import ctypes, sys; sys.exit(ctypes.CDLL(sys.argv[1])."
                "dh_fuse_null(sys.argv[2].encode()))", str(shared_object("dh_fuse_null"))]
        (d / "null").mkdir()
        (d / "py").mkdir()
        with process_mount([sys.executable, "-m", "harness.cli", "mount", "--db", str(path),
                            str(mnt)], mnt, "the DBOS mount (harness mount)"):
            say(f"fs_create: {n} files on ext4, on the mount, on a FUSE file system that "
                f"stores nothing and through the pyfuse3 mount, in {CREATE_PARTS} alternating "
                "parts")
            sides = {"ext4": ext4, "dbos": mnt, "null": d / "null", "py": d / "py"}
            creates: dict[str, list[float]] = {k: [] for k in sides}
            with process_mount([*null, str(d / "null")], d / "null", "the null FUSE mount"), \
                    mounted(db.vfs, str(d / "py"), source=str(path)):
                for part in range(CREATE_PARTS):  # the machine's drift falls on all alike
                    for k, x in sides.items():
                        creates[k] += _create_samples(x / f"c{k}{part}",
                                                      max(1, n // CREATE_PARTS))
            for metric, k in (("fs_create", "dbos"), ("fs_create_fuse_null", "null"),
                              ("fs_create_pyfuse3", "py")):
                rep.rows.append(Row.of(metric, "us", creates[k], "ext4_create_fsync",
                                       creates["ext4"]))
            rt = ["--time_based", f"--runtime={int(seconds * 1000)}ms", f"--size={file_mib}M",
                  "--bs=4k"]
            say(f"fio randread_4k, randwrite_4k_fsync: {seconds:g} s each side")
            ours, base = (_fio(x, "randread", "--rw=randread", *rt) for x in (mnt, ext4))
            rep.rows.append(_lat_row("randread_4k", "ext4_randread_4k", ours, base, "read"))
            ours, base = (_fio(x, "randwrite", "--rw=randwrite", "--fsync=1", *rt)
                          for x in (mnt, ext4))
            rep.rows.append(_lat_row("randwrite_4k_fsync", "ext4_randwrite_4k_fsync", ours,
                                      base, "write"))
            say(f"fio seqwrite_1m: {rounds} rounds of {seq_mib} MiB each side")
            bw = {x: [] for x in (mnt, ext4)}
            for _ in range(rounds):
                for x in (mnt, ext4):
                    (x / "fio.dat").unlink(missing_ok=True)
                    job = _fio(x, "seqwrite", "--rw=write", "--bs=1M", f"--size={seq_mib}M",
                               "--end_fsync=1")
                    bw[x].append(job["write"]["bw_bytes"] / 1e6)
            rep.rows.append(Row.of("seqwrite_1m", "MB/s", bw[mnt], "ext4_seqwrite_1m", bw[ext4]))
            for x in (mnt, ext4):
                (x / "fio.dat").unlink(missing_ok=True)
            say("a tree (the standard library): cp -r onto each side")
            nfiles = _copy_tree(tree or Path(os.__file__).parent, d / "src")
            for x in (mnt, ext4):
                subprocess.run(["cp", "-r", str(d / "src"), str(x / "tree")], check=True,
                               timeout=600)
            top, total = _walk(ext4 / "tree")
            got = db.fs.largest("/tree", 10)
            if got["total"] != total or [s for _, s in got["largest"]] != top:
                raise HarnessError("the SQL query and find on ext4 disagree on the tree")
            samples = max(5, n // 20)
            a = []
            for _ in range(samples):
                t0 = time.perf_counter_ns()
                db.fs.largest("/tree", 10)
                a.append((time.perf_counter_ns() - t0) / 1000)
            b = []
            for _ in range(samples):
                t0 = time.perf_counter_ns()
                _walk(ext4 / "tree")
                b.append((time.perf_counter_ns() - t0) / 1000)
            rep.rows.append(Row.of("analytics_query", "us", a, "find_walk_ext4", b))
            say(f"git init, add, commit of {nfiles} files: {rounds} rounds each side")
            g = {x: [_git_seconds(x / "tree") * 1000 for _ in range(rounds)] for x in (mnt, ext4)}
            rep.rows.append(Row.of("git_commit_tree", "ms", g[mnt], "ext4_git_commit_tree",
                                   g[ext4]))
        db.close()
        rep.notes.append(f"the mount's database and the ext4 side on {fs_of(d)} at {workdir}; "
                         f"the tree is {nfiles} files of {tree or 'the standard library'}; fio "
                         "--ioengine=psync, buffered, one job")
        return rep
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run(n: int = 300, rounds: int = 3, progress: Progress | None = None) -> Report:
    from harness.paths import run_root

    return run_here(run_root() / "bench-dbosfs", n, rounds, progress=progress)

