"""`harness demo`: the main job. Boots lego3 with every node in a VM, then

  1. runs a numpy workload on the pnode whose memory lives on the mnode
     (ExCache at 25 % of the working set, over ivshmem), beside the same
     workload on the guest's local memory;
  2. runs the gate benchmark in the pnode guest (real protection keys there);
  3. runs DBOS on the snode: the scheduler (the pnode claims and runs tasks),
     the file system, and an analytics query;

shows progress throughout, prints a results table, writes a Markdown report
with PNG plots into the run directory and prints the report's path last."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from harness.guest_run import guest_json
from harness.nodes.cluster import open_cluster
from harness.paths import run_root
from harness.progress import indented, to_stderr
from harness.text import table

WORKLOAD = """
import json, time
import numpy as np
from harness.nodes.guest import open_excache
N = 1 << 19                      # 4 MiB of float64: the working set
def work(buf):
    a = np.frombuffer(buf, dtype=np.float64, count=N)
    a[:] = np.arange(N, dtype=np.float64)[::-1]
    t = time.perf_counter()
    a.sort()
    s = float(a[::4096].sum())
    return time.perf_counter() - t, s
local_t, local_s = work(bytearray(N * 8))
cache = open_excache(N * 8 // 4)  # 25 % of the working set
region = cache.alloc(N * 8)
disagg_t, disagg_s = work(region)
assert disagg_s == local_s, "wrong answer on disaggregated memory"
print(json.dumps({"local_s": local_t, "disagg_s": disagg_t, "stats": cache.stats()}))
"""


def _dbos(c) -> dict:
    db = c.dbos
    t0 = time.perf_counter()
    ids = [db.sched.submit(["sh", "-c", f"echo task {i}"]) for i in range(10)]
    done = c.wait_tasks(ids)
    sched_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    db.fs.mkdir("/demo/logs", True)
    for i in range(20):
        db.fs.create(f"/demo/logs/f{i}")
        db.fs.write(f"/demo/logs/f{i}", 0, bytes([i]) * (1024 * (i + 1)))
    fs_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    top = db.fs.largest("/demo", 3)
    query_s = time.perf_counter() - t0
    return {"tasks_done": done, "tasks": len(ids), "sched_s": sched_s, "fs_ops": 40,
            "fs_s": fs_s, "query_s": query_s, "largest": top["largest"], "total": top["total"]}


def _plots(out: Path, gates: dict, paging: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    rows = {r["metric"]: r for r in gates["rows"] if r["unit"] == "cycles"}
    if rows:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(list(rows), [r["p50"] for r in rows.values()], label="gate (p50)")
        ax.bar(list(rows), [r["floor_p50"] for r in rows.values()], alpha=0.5,
               label="its floor (p50)")
        ax.set_yscale("log")
        ax.set_ylabel("cycles (TCG)")
        ax.set_title("Gate round trips in the pnode guest")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "gates.png", dpi=110)
        plt.close(fig)
        names.append("gates.png")
    hist = paging["stats"]["latency_hist_log2ns"]
    used = [i for i, v in enumerate(hist) if v]
    if used:
        lo, hi = used[0], used[-1] + 1
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([f"{2 ** i / 1000:.0f}" for i in range(lo, hi)], hist[lo:hi])
        ax.set_xlabel("fault service time, from (us)")
        ax.set_ylabel("faults")
        ax.set_title("ExCache fault latency in the pnode guest (TCG)")
        fig.tight_layout()
        fig.savefig(out / "excache-latency.png", dpi=110)
        plt.close(fig)
        names.append("excache-latency.png")
    return names


def _report(out: Path, boot: list[dict], paging: dict, gates: dict, dbos: dict,
            plots: list[str], total_s: float) -> Path:
    s = paging["stats"]
    lines = [
        "# disagg-harness demo", "",
        f"lego3 with every node in a VM ({boot[0]['accel']}); {total_s:.0f} s in all.", "",
        "| node | role | boot |", "| --- | --- | --- |",
        *[f"| {n['name']} | {n['role']} | {n['boot_s']:.2f} s |" for n in boot], "",
        "## ExCache: a numpy sort on memory that lives on the mnode", "",
        "| | seconds |", "| --- | --- |",
        f"| local memory (in the guest) | {paging['local_s']:.3f} |",
        f"| disaggregated, cache = 25 % of the working set | {paging['disagg_s']:.3f} |",
        f"| slowdown | {paging['disagg_s'] / paging['local_s']:.2f} |", "",
        f"misses {s['misses']}, remote fetches {s['remote_fetches']}, zero fills "
        f"{s['zero_fills']}, evictions {s['evictions']}, dirty flushes {s['dirty_flushes']} "
        f"({s['piggybacked']} piggybacked)", "",
        "## Gates in the pnode guest", "",
        "| gate | p50 | floor | floor p50 | ratio |", "| --- | --- | --- | --- | --- |",
        *[f"| {r['metric']} ({r['unit']}) | {r['p50']:.1f} | {r['floor']} | "
          f"{r['floor_p50']:.1f} | {r['ratio']:.2f} |" for r in gates["rows"]], "",
        "## DBOS on the snode", "",
        f"- scheduler: {dbos['tasks_done']}/{dbos['tasks']} tasks claimed and run by the pnode "
        f"in {dbos['sched_s']:.2f} s",
        f"- file system: {dbos['fs_ops']} creates and writes in {dbos['fs_s']:.2f} s",
        f"- analytics: the three largest files under /demo in {dbos['query_s'] * 1000:.1f} ms: "
        + ", ".join(f"{p} ({n} B)" for p, n in dbos["largest"]) + f"; total {dbos['total']} B",
        "", *[f"![{p}]({p})" for p in plots], "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def run(placement: str = "vm") -> int:
    t0 = time.monotonic()
    out = run_root() / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    to_stderr(f"[demo] booting lego3 ({placement} placement)")
    with open_cluster("lego3", placement=placement, timeout=300,
                      progress=indented) as c:
        boot = c.status()
        to_stderr("[demo] 1/3 numpy on disaggregated memory (pnode guest, memory on mnode0)")
        paging = guest_json([sys.executable, "-c", WORKLOAD], "the ExCache workload",
                            cluster=c, timeout=600)
        to_stderr(f"  slowdown {paging['disagg_s'] / paging['local_s']:.2f} at a 25 % cache")
        to_stderr("[demo] 2/3 gate benchmark in the pnode guest")
        gates = guest_json([sys.executable, "-m", "harness.bench.gates", "-n", "200"],
                           "the gate benchmark", cluster=c, timeout=600)
        to_stderr("[demo] 3/3 DBOS on snode0: scheduler, files, analytics")
        dbos = _dbos(c)
    total = time.monotonic() - t0
    plots = _plots(out, gates, paging)
    report = _report(out, boot, paging, gates, dbos, plots, total)
    print(table(["phase", "result"], [
        ["boot (3 VMs)", f"{max(n['boot_s'] for n in boot):.2f} s"],
        ["numpy sort, 25 % cache", f"slowdown {paging['disagg_s'] / paging['local_s']:.2f} "
                                   f"({paging['stats']['misses']} misses)"],
        *[[r["metric"], f"{r['p50']:.0f} cycles, {r['ratio']:.2f}x its floor"]
          for r in gates["rows"] if r["unit"] == "cycles"],
        ["DBOS tasks run by the pnode", f"{dbos['tasks_done']}/{dbos['tasks']} "
                                        f"in {dbos['sched_s']:.2f} s"],
        ["DBOS analytics query", f"{dbos['query_s'] * 1000:.1f} ms"],
        ["total", f"{total:.0f} s"]]))
    print(report)
    return 0
