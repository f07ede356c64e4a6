"""`harness bench reliability [--duration S] [--json]`: faults injected and
survived, data checked and lost (which must be zero), and a soak.

  soak        lego3 with every node in a VM, for S seconds: the pnode guest
              writes a pattern through its ExCache (a quarter of the region)
              and checks every page each round; meanwhile the host writes
              files on the snode's DBOS and reads them all back, and submits
              tasks the pnode guest runs. The growth of resident memory from
              warm-up (a third of the way) to the end is reported for every
              QEMU, every agent (inside its guest; pnode0's, busy running the
              workload, from boot) and this process.
  failover    lego3r as processes: mnode0 is killed in the middle of a run;
              every page must come back from mnode1.
  snode       a row committed through Cluster.sql, then the snode is killed
              and restarted: the row must be there.
  pause       a node is paused: a call to it must fail within its timeout
              naming the node; resumed, it answers again.

Rows are counts (and MiB for memory growth); `data_lost` must be 0."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time

import numpy as np

from harness._native.excache import PAGE
from harness._native.transport import Op
from harness.bench.report import Report, Row
from harness.errors import HarnessError, TransportError
from harness.guest_run import guest_json
from harness.nodes.cluster import Cluster, open_cluster
from harness.nodes.role import rss_kb
from harness.progress import Progress, silent

PAGING_SOAK = """
import json, sys, time
import numpy as np
from harness._native.excache import PAGE
from harness.nodes.guest import open_excache
from harness.nodes.role import rss_kb
def guest_used_kb():
    m = dict(l.split(":") for l in open("/proc/meminfo"))
    return int(m["MemTotal"].split()[0]) - int(m["MemAvailable"].split()[0])
pages, until = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
warm_at = time.monotonic() + float(sys.argv[2]) / 3
cache = open_excache(pages * PAGE // 4)
region = cache.alloc(pages * PAGE)
a = np.frombuffer(region, dtype=np.uint64).reshape(pages, PAGE // 8)
index = np.arange(pages, dtype=np.uint64)[:, None]
checked = bad = rounds = 0
warm = None
while True:
    rounds += 1
    a[:] = index * 1000003 + rounds          # every word of every page
    ok = (a == index * 1000003 + rounds).all(axis=1)
    checked += pages
    bad += int((~ok).sum())
    if warm is None and time.monotonic() >= warm_at:
        warm = (rss_kb(), guest_used_kb())
    if time.monotonic() >= until:
        break
warm = warm or (rss_kb(), guest_used_kb())
print(json.dumps({"rounds": rounds, "pages_checked": checked, "pages_bad": bad,
                  "stats": cache.stats(), "rss_kb": [warm[0], rss_kb()],
                  "guest_used_kb": [warm[1], guest_used_kb()]}))
"""


def _digest(i: int, rnd: int) -> bytes:
    return hashlib.sha256(f"{i}:{rnd}".encode()).digest() * 64  # 2 KiB


def _host_rss(c: Cluster) -> dict[str, int]:
    """KiB resident, seen from the host: each QEMU and this process."""
    out = {"harness": rss_kb()}
    out.update({f"{name}:host": rss_kb(h.runner.pid) for name, h in c.nodes.items()
                if h.runner.pid})
    return out


def _agent_rss(c: Cluster, busy: str = "") -> dict[str, int]:
    """KiB resident of each agent, from inside its guest, but the busy one (a
    node's control link answers one call at a time: not during an exec)."""
    return {f"{name}:agent": json.loads(c.call(name, Op.STATS))["rss_kb"] for name in c.nodes
            if name != busy}


def soak(duration: float, say: Progress) -> dict:
    say(f"soak: lego3 in VMs for {duration:g} s: paging on pnode0, DBOS traffic on snode0")
    with open_cluster("lego3", placement="vm", timeout=300, progress=say) as c:
        result: dict = {}
        agents_before = _agent_rss(c)

        def paging() -> None:
            try:
                result["paging"] = guest_json([sys.executable, "-c", PAGING_SOAK, "4096",
                                               str(duration)], "the paging workload", cluster=c,
                                              timeout=duration + 600)
            except HarnessError as exc:
                result["paging"] = {"error": str(exc)}

        worker = threading.Thread(target=paging, name="soak-paging")
        worker.start()
        fs, sched = c.dbos.fs, c.dbos.sched
        fs.mkdir("/soak", True)
        files, rows_checked, rows_bad, tasks = 64, 0, 0, []
        rnd, warm_rss = 0, None
        t0 = time.monotonic()
        while worker.is_alive() or rnd == 0:
            rnd += 1
            for i in range(files):
                path = f"/soak/f{i}"
                if rnd == 1:
                    fs.create(path)
                fs.write(path, 0, _digest(i, rnd))
            for i in range(files):  # every file, read back and compared
                rows_checked += 1
                rows_bad += fs.read(f"/soak/f{i}") != _digest(i, rnd)
            tasks.append(sched.submit(["sh", "-c", f"echo soak {rnd}"]))
            if warm_rss is None and time.monotonic() - t0 > duration / 3:
                # After warm-up: the guests have touched their memory, TCG has
                # translated the workload's code, the mnode holds the region.
                warm_rss = {**_host_rss(c), **_agent_rss(c, busy="pnode0")}
            say(f"soak: round {rnd}, {rows_checked} file reads checked, "
                f"{time.monotonic() - t0:.0f}/{duration:g} s")
            time.sleep(0.5)
        worker.join()
        last_rss = {**_host_rss(c), **_agent_rss(c)}
        done = c.wait_tasks(tasks, timeout=120)
    paging_result = result.get("paging", {"error": "the paging workload did not report"})
    if "error" in paging_result:
        raise HarnessError(f"soak: {paging_result['error']}")
    first_rss = {**agents_before, **(warm_rss or last_rss)}  # pnode0's agent: from boot
    # The workload on pnode0 reports its own memory and its guest's, from
    # warm-up to the end: a VM's QEMU grows until the guest has touched all of
    # its RAM once (fresh pages for each new process), which is not a leak.
    first_rss["pnode0:workload"], last_rss["pnode0:workload"] = paging_result["rss_kb"]
    first_rss["pnode0:guest_used"], last_rss["pnode0:guest_used"] = \
        paging_result["guest_used_kb"]
    growth = {k: (last_rss.get(k, 0) - v) / 1024 for k, v in first_rss.items()}
    return {"pages_checked": paging_result["pages_checked"],
            "pages_bad": paging_result["pages_bad"], "paging_rounds": paging_result["rounds"],
            "misses": paging_result["stats"]["misses"], "rows_checked": rows_checked,
            "rows_bad": rows_bad, "tasks": len(tasks), "tasks_done": done,
            "rss_growth_mib": growth, "rss_mib": {k: v / 1024 for k, v in last_rss.items()}}


def failover(say: Progress) -> dict:
    say("failover: lego3r as processes, mnode0 killed in the middle of a run")
    pages = 2048
    with open_cluster("lego3r", cache=256 * PAGE) as c:
        region = c.alloc(pages * PAGE)
        a = np.frombuffer(region, dtype=np.uint64).reshape(pages, PAGE // 8)
        index = np.arange(pages, dtype=np.uint64)[:, None]
        a[:] = index
        timer = threading.Timer(0.05, c.fault, ("mnode0", "kill"))
        timer.start()
        rounds = 0
        while rounds < 8 or timer.is_alive():
            rounds += 1
            a += 1
        timer.join()
        a += 1
        bad = int((~(a == index + rounds + 1).all(axis=1)).sum())
        s = c.stats()["excache"]
        del a
        c.free(region)
        return {"pages_checked": pages, "pages_bad": bad, "failovers": s["failovers"],
                "failover_ms": s["failover_ns"] / 1e6}


def snode_restart(say: Progress) -> dict:
    say("snode: commit rows, kill snode0, restart it, read them back")
    with open_cluster("lego3") as c:
        c.dbos.fs.mkdir("/durable", True)
        rows = 50
        for i in range(rows):
            c.dbos.fs.create(f"/durable/r{i}")
            c.dbos.fs.write(f"/durable/r{i}", 0, _digest(i, 0))
        c.fault("snode0", "kill")
        c.fault("snode0", "restart")
        bad = sum(c.dbos.fs.read(f"/durable/r{i}") != _digest(i, 0) for i in range(rows))
        return {"rows_checked": rows, "rows_bad": bad}


def pause(say: Progress) -> dict:
    say("pause: a call to a paused node must fail in time, naming it")
    with open_cluster("lego3") as c:
        c.fault("mnode0", "pause")
        t0 = time.monotonic()
        try:
            c.call("mnode0", Op.PING, timeout=1.0)
            named = False
        except TransportError as exc:
            named = "mnode0" in str(exc)
        waited = time.monotonic() - t0
        c.fault("mnode0", "resume")
        c.call("mnode0", Op.PING, timeout=5.0)
        return {"timed_out_naming_node": named, "waited_s": waited}


def run(duration: float = 180.0, progress: Progress | None = None) -> Report:
    say = progress or silent
    fo, sn, pa = failover(say), snode_restart(say), pause(say)
    sk = soak(duration, say)
    injected = 4  # mnode0 kill, snode0 kill, snode0 restart, mnode0 pause
    survived = ((fo["failovers"] == 1 and fo["pages_bad"] == 0) + 2 * (sn["rows_bad"] == 0)
                + bool(pa["timed_out_naming_node"]))
    lost = fo["pages_bad"] + sn["rows_bad"] + sk["pages_bad"] + sk["rows_bad"]
    rep = Report("reliability")
    for metric, unit, value in (
            ("faults_injected", "count", injected), ("faults_survived", "count", survived),
            ("pages_checked", "count", fo["pages_checked"] + sk["pages_checked"]),
            ("rows_checked", "count", sn["rows_checked"] + sk["rows_checked"]),
            ("data_lost", "count", lost), ("failover_ms", "ms", fo["failover_ms"]),
            ("pause_call_failed_after_s", "s", pa["waited_s"]),
            ("soak_seconds", "s", duration), ("soak_paging_rounds", "count", sk["paging_rounds"]),
            ("soak_tasks_done", "count", sk["tasks_done"])):
        rep.rows.append(Row.of(metric, unit, [float(value)]))
    for proc, growth in sorted(sk["rss_growth_mib"].items()):
        rep.rows.append(Row.of(f"mem_growth:{proc}", "MiB", [growth]))
    rep.notes.append(f"soak: {sk['tasks']} tasks submitted, {sk['tasks_done']} done; "
                     f"{sk['misses']} ExCache misses on pnode0; resident MiB at the end: "
                     + ", ".join(f"{k} {v:.0f}" for k, v in sorted(sk["rss_mib"].items())))
    if lost:
        rep.notes.append(f"DATA LOST: {lost} pages or rows came back wrong")
    return rep
