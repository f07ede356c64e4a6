"""lego3r: mnode0 replicates every write to mnode1 before it answers; when
mnode0 is killed in the middle of a run, the pnode's cache fails over to
mnode1 and no acknowledged page is lost. The failover is in DBOS's events."""

import shutil
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np

from harness._native.excache import PAGE
from harness.nodes.cluster import open_cluster
from harness.paths import shm_dir_of

PAGES = 2048  # 8 MiB through a 1 MiB cache


def test_killing_the_primary_mnode_mid_run_loses_no_page():
    with open_cluster("lego3r", cache=256 * PAGE) as c:
        region = c.alloc(PAGES * PAGE)
        a = np.frombuffer(region, dtype=np.uint64)
        per_page = PAGE // 8
        a[:] = np.arange(PAGES * per_page, dtype=np.uint64)  # most pages now on the mnodes
        killed = threading.Event()

        def kill_soon() -> None:
            c.fault("mnode0", "kill")
            killed.set()

        # Sweep the region again (reads and dirty writes) while mnode0 dies.
        threading.Timer(0.05, kill_soon).start()
        for rnd in range(1, 40):
            a += 1
            if killed.is_set() and rnd > 3:
                break
        assert killed.wait(10)
        a += 1  # at least one whole pass after the kill
        rounds = rnd + 1
        want = np.arange(PAGES * per_page, dtype=np.uint64) + rounds
        assert np.array_equal(a, want), "a page was lost or is stale after the failover"
        s = c.stats()
        assert s["excache"]["failovers"] == 1
        assert s["mnode1"]["memory"]["flushes"] > 0  # the primary's forwarded writes
        assert "error" in s["mnode0"]  # it is down
        for _ in range(100):  # the watcher logs it within 50 ms
            if c.failovers:
                break
            threading.Event().wait(0.05)
        assert c.failovers and c.failovers[0]["from"] == "mnode0"
        rows = c.sql("SELECT kind, detail FROM events WHERE kind = 'failover'")
        assert rows and "mnode0 -> mnode1" in rows[0][1]
        del a
        c.free(region)


# The backup paused for 3 s while pages are written (the primary's forward
# times out: it goes on alone), resumed, more pages written, the primary
# killed, every page read back. Run in a child: the clear error is the
# fault handler ending the process.
BACKUP_FELL_BEHIND = """
    import sys, time
    from pathlib import Path

    import numpy as np
    from harness._native.excache import PAGE
    from harness.nodes.cluster import open_cluster

    pages = 256
    with open_cluster("lego3r", cache=64 * PAGE, run_dir=Path(sys.argv[1])) as c:
        region = c.alloc(pages * PAGE)
        a = np.frombuffer(region, dtype=np.uint64)
        a[:] = 1
        c.excache.flush()  # every page on both mnodes
        c.fault("mnode1", "pause")
        t0 = time.monotonic()
        a[:] = 2  # through a quarter-size cache: write-backs while the backup is paused
        c.excache.flush()
        time.sleep(max(0.0, 3.0 - (time.monotonic() - t0)))
        c.fault("mnode1", "resume")
        a[:] = 3
        c.excache.flush()
        c.fault("mnode0", "kill")
        print("killed", flush=True)
        bad = int((a != 3).sum())  # read back: misses go to mnode1 now
        print("stale words:", bad, flush=True)
        sys.exit(3 if bad else 0)
"""


def test_a_backup_that_fell_behind_gives_a_clear_error_never_old_pages(tmp_path):
    run_dir = tmp_path / f"behind.{id(tmp_path)}"
    try:
        p = subprocess.run([sys.executable, "-c", textwrap.dedent(BACKUP_FELL_BEHIND),
                            str(run_dir)], capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(shm_dir_of(run_dir), ignore_errors=True)
    assert "killed" in p.stdout, p.stdout + p.stderr
    assert "stale words" not in p.stdout, "old pages were returned after the failover"
    assert p.returncode == -signal.SIGABRT, p.stdout + p.stderr
    assert "cannot serve a page fault" in p.stderr and "missed" in p.stderr, p.stderr


def test_a_backup_that_falls_behind_is_logged_and_the_cache_stays_on_the_primary():
    with open_cluster("lego3r", cache=64 * PAGE) as c:
        region = c.alloc(256 * PAGE)
        a = np.frombuffer(region, dtype=np.uint64)
        a[:] = 1
        c.excache.flush()
        assert c.excache.stats()["backup_in_sync"]
        c.fault("mnode1", "pause")
        try:
            a[:] = 2  # the primary's forward times out (1 s): it goes on alone
            c.excache.flush()
        finally:
            c.fault("mnode1", "resume")
        s = c.stats()
        assert s["mnode0"]["memory"]["replica_errors"] == 1
        assert not s["mnode0"]["memory"]["replicating"]
        assert s["excache"]["failovers"] == 0 and not s["excache"]["backup_in_sync"]
        assert (a == 2).all()  # served by the primary, as last written
        for _ in range(100):  # the watcher logs it within 50 ms
            rows = c.sql("SELECT detail FROM events WHERE kind = 'replica_behind'")
            if rows:
                break
            threading.Event().wait(0.05)
        assert rows and "mnode1 missed writes mnode0 acknowledged" in rows[0][0]
        del a
        c.free(region)
