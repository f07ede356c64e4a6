"""Unmodified programs on remote memory, nodes as host processes: the same
answers as on local memory (a computation, threads, fork, exec, real tools),
the counters in --stats-json and DBOS, and clear refusals and failures."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from harness.errors import HarnessError, NotSupported
from harness.nodes.program import check_program, run_program

CACHE = 4 << 20  # far below every workload here: pages really leave and come back

BIG = """
import hashlib
a = bytearray(64 << 20)
for i in range(0, len(a), 4096):
    a[i:i + 8] = i.to_bytes(8, "little")
print(hashlib.sha256(a).hexdigest(), sum(a[::4096]))
"""

THREADS = """
import hashlib, threading
out = {}
def work(i):
    x = [bytes([i]) * 1000 for _ in range(10000)]
    out[i] = hashlib.sha256(b"".join(x)).hexdigest()
ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
print(sorted(out.items()))
"""

FORK = """
import hashlib, os
b = bytearray(os.urandom(1 << 20)) * 24
h = hashlib.sha256(b).hexdigest()
pid = os.fork()
if pid == 0:
    before = hashlib.sha256(b).hexdigest() == h
    b[:5] = b"child"
    print("child", before, hashlib.sha256(b).hexdigest() != h, flush=True)
    raise SystemExit(0)
os.waitpid(pid, 0)
print("parent", hashlib.sha256(b).hexdigest() == h)
"""


def both(c, argv, **kw):
    local = run_program(c, argv, memory="local", **kw)
    remote = run_program(c, argv, memory="remote", cache=CACHE, **kw)
    return local, remote


@pytest.mark.parametrize("code", [BIG, THREADS, FORK], ids=["64MiB", "threads", "fork"])
def test_python_gives_the_same_answer_on_remote_memory(lego3, code):
    local, remote = both(lego3, [sys.executable, "-c", code])
    assert local.returncode == remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout
    e = remote.stats["excache"]
    assert e["misses"] and e["evictions"] and e["dirty_flushes"]
    assert remote.stats["peak_remote_bytes"] > CACHE


def test_numpy_on_remote_memory(lego3):
    """numpy advises MADV_HUGEPAGE on its big arrays, which splits the arena's
    mappings: prefetch windows that cross the splits must still install."""
    code = ("import numpy as np, zlib\n"
            "a = np.arange(1024 * 1024, dtype=np.float64).reshape(1024, 1024) % 7\n"
            "c = a @ (a.T % 5)\nprint(int(c.sum()), zlib.crc32(c.tobytes()))")
    local, remote = both(lego3, [sys.executable, "-c", code],
                         env={"OPENBLAS_NUM_THREADS": "1"})
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout
    assert remote.stats["excache"]["prefetched"] > 0


def test_threads_get_their_stacks_from_remote_memory(lego3):
    r = run_program(lego3, [sys.executable, "-c", THREADS], memory="remote", cache=CACHE)
    [proc] = r.stats["processes"]
    assert proc["thread_stacks"] == 4


def test_a_forked_child_has_its_own_cache_and_copy(lego3):
    r = run_program(lego3, [sys.executable, "-c", FORK], memory="remote", cache=CACHE)
    assert r.stdout == b"child True True\nparent True\n", r.stderr
    parent = r.stats["processes"][0]
    [child] = [p for p in r.stats["processes"] if p["ppid"] == parent["pid"]]
    assert parent["forks"] == 1 and child["reported"]
    assert parent["region"] != child["region"]  # the copy made on the mnode at fork


FORK_AFTER_NSS = """
import hashlib, os, pwd, threading
pwd.getpwuid(0)                              # NSS state in the heap, written by fork itself
b = bytearray(os.urandom(1 << 20)) * 16
h = hashlib.sha256(b).hexdigest()
def fork_and_check(out):
    pid = os.fork()
    if pid == 0:
        os._exit(0 if hashlib.sha256(b).hexdigest() == h else 3)
    out.append(os.waitpid(pid, 0)[1])
out = []
fork_and_check(out)                          # from the main thread
t = threading.Thread(target=fork_and_check, args=(out,))   # from a thread on a remote stack
t.start(); t.join()
print(out)
"""


def test_fork_after_nss_and_from_a_thread(lego3):
    r = run_program(lego3, [sys.executable, "-c", FORK_AFTER_NSS], memory="remote",
                    cache=CACHE, timeout=120)
    assert (r.returncode, r.stdout) == (0, b"[0, 0]\n"), r.stderr


def test_a_program_that_closes_its_low_descriptors_keeps_its_memory(lego3):
    code = ("import os, hashlib\nos.closerange(3, 64)\n"
            "b = bytearray(os.urandom(1 << 20)) * 32\n"
            "print(hashlib.sha256(b).hexdigest() == hashlib.sha256(bytes(b)).hexdigest())")
    r = run_program(lego3, [sys.executable, "-c", code], memory="remote", cache=CACHE)
    assert (r.returncode, r.stdout) == (0, b"True\n"), r.stderr
    assert r.stats["excache"]["evictions"] > 0


def test_exec_keeps_the_interposer(lego3):
    r = run_program(lego3, ["sh", "-c", f"{sys.executable} -c 'print(sum(range(10**6)))'"],
                    memory="remote", cache=CACHE)
    assert r.stdout == b"499999500000\n"
    names = [p["name"] for p in r.stats["processes"]]
    assert names[0] == "sh" and any(n.startswith("python") for n in names[1:]), names


def test_xz_output_decompresses_to_the_same_bytes(lego3, tmp_path):
    data = tmp_path / "in"
    words = [hashlib.sha1(str(i).encode()).hexdigest()[: 3 + i % 9] for i in range(4000)]
    with open(data, "w") as f:
        for i in range(300_000):
            f.write(words[(i * 7919) % len(words)] + (" " if i % 13 else "\n"))
    out = tmp_path / "out.xz"
    r = run_program(lego3, ["sh", "-c", f"xz -6 -T1 -c {data} > {out}"], memory="remote",
                    cache=CACHE)
    assert r.returncode == 0, r.stderr
    back = subprocess.run(["xz", "-dc", str(out)], capture_output=True, check=True).stdout
    assert back == data.read_bytes()
    assert sum(p.get("excache", {}).get("evictions", 0) for p in r.stats["processes"]) > 0


def test_stats_json_and_dbos_record_the_run(lego3, tmp_path):
    r = run_program(lego3, [sys.executable, "-c", BIG], memory="remote", cache=CACHE)
    task = r.stats["task"]
    [[state, command]] = lego3.sql("SELECT state, command FROM tasks WHERE task_id = ?", [task])
    assert state == "done" and json.loads(command)[0] == sys.executable
    rows = lego3.sql("SELECT r.node, p.node, p.resident FROM regions r JOIN pages p "
                     "USING (region_id) WHERE r.owner LIKE ?", [f"task {task}:%"])
    assert rows and rows[0][:2] == ["mnode0", "pnode0"]
    [[n]] = lego3.sql("SELECT count(*) FROM events WHERE task_id = ? AND kind = 'program'",
                      [task])
    assert n == 1


def test_cli_run_writes_stats_json(tmp_path):
    stats = tmp_path / "s.json"
    p = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--memory", "remote",
                        "--cache", "8MiB", "--stats-json", str(stats), "--", sys.executable,
                        "-c", BIG], capture_output=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr.decode()
    local = subprocess.run([sys.executable, "-c", BIG], capture_output=True, check=True)
    assert p.stdout == local.stdout
    s = json.loads(stats.read_text())
    assert s["exit"] == 0 and s["memory"] == "remote" and s["cache_bytes"] == 8 << 20
    assert s["excache"]["misses"] and len(s["excache"]["hist"]) == 32
    assert b"memory remote: exit 0" in p.stderr


def test_a_static_or_setuid_program_is_refused_with_the_reason(tmp_path):
    busybox = shutil.which("busybox")
    if busybox and subprocess.run(["file", busybox], capture_output=True,
                                  check=False).stdout.find(b"statically") >= 0:
        with pytest.raises(NotSupported, match="statically linked"):
            check_program(busybox)
    suid = tmp_path / "true"
    shutil.copy("/bin/true", suid)
    os.chmod(suid, 0o4755)
    with pytest.raises(NotSupported, match="set-user-ID"):
        check_program(str(suid))
    with pytest.raises(HarnessError, match="no such program"):
        check_program("/no/such/program")


def test_the_mnode_dying_ends_the_program_naming_it(lego3):
    loop = ("import time\nb = bytearray(32 << 20)\nwhile True:\n"
            "    for i in range(0, len(b), 4096): b[i] = (b[i] + 1) % 256\n")
    killer = threading.Timer(2.0, lego3.fault, ("mnode0", "kill"))
    killer.start()
    t0 = time.monotonic()
    r = run_program(lego3, [sys.executable, "-c", loop], memory="remote", cache=CACHE,
                    timeout=60)
    killer.join()
    assert r.returncode != 0 and time.monotonic() - t0 < 30
    assert b"mnode0" in r.stderr and b"cannot serve a page fault" in r.stderr


def test_a_stopped_broker_leaves_no_thread_behind(tmp_path):
    from harness.nodes.broker import Broker

    def brokers() -> int:
        return sum(t.name == "broker" for t in threading.enumerate())

    before = brokers()
    b = Broker(tmp_path / "b.sock", lambda proc: None)
    assert brokers() == before + 1
    b.stop()  # its accept() must wake: close() alone does not do it on Linux
    assert brokers() == before and not (tmp_path / "b.sock").exists()
