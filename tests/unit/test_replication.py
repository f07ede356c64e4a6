"""lego3r: mnode0 replicates every write to mnode1 before it answers; when
mnode0 is killed in the middle of a run, the pnode's cache fails over to
mnode1 and no acknowledged page is lost. The failover is in DBOS's events."""

import threading

import numpy as np

from harness._native.excache import PAGE
from harness.nodes.cluster import open_cluster

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
