"""`harness smoke`: the CI smoke boot. Boots lego3 with every node in a VM,
makes one remote page round trip (ExCache on the pnode, memory on the mnode,
over ivshmem), takes one protection-key fault in the pnode guest, runs one
SQL query on the snode, and shuts down; prints each phase's time and exits
non-zero on any failure."""

from __future__ import annotations

import sys
import time

from harness.errors import HarnessError
from harness.guest_run import run_in_guest
from harness.nodes.cluster import open_cluster
from harness.progress import to_stderr
from harness.text import table

PAGE_ROUND_TRIP = """
from harness.nodes.guest import open_excache
cache = open_excache(4 * 4096)
region = cache.alloc(16 * 4096)
mv = memoryview(region)
for p in range(16):
    mv[p * 4096] = p + 1          # more pages than lines: the first ones go to the mnode
assert [mv[p * 4096] for p in range(16)] == list(range(1, 17))
s = cache.stats()
assert s["remote_fetches"] >= 1 and s["dirty_flushes"] >= 1, s
print("pages back from the mnode:", s["remote_fetches"])
"""

MPK_FAULT = """
from harness.errors import IsolationFault
from harness.isolation.compartments import Domain, parse
d = Domain(parse({"compartments": [{"name": "a", "backend": "mpk", "heap": "16KiB"},
                                   {"name": "b", "backend": "mpk", "heap": "16KiB"}]}, "smoke"))
try:
    d.probe("a", "b")
except IsolationFault as exc:
    assert "SEGV_PKUERR" in str(exc), exc
    print("fault:", exc)
else:
    raise SystemExit("no protection-key fault")
"""


def run(timeout: float = 180.0, cold: bool = False) -> int:
    t0 = time.monotonic()
    phases: list[tuple[str, float]] = []

    def phase(name: str, start: float) -> None:
        phases.append((name, time.monotonic() - start))
        to_stderr(f"[smoke] {name}: {phases[-1][1]:.2f} s")

    try:
        start = time.monotonic()
        with open_cluster("lego3", placement="vm", timeout=timeout, cold=cold) as c:
            phase("boot (3 VMs, links answering)", start)
            for name, code in (("remote page round trip", PAGE_ROUND_TRIP),
                               ("MPK fault in the pnode guest", MPK_FAULT)):
                start = time.monotonic()
                run_in_guest([sys.executable, "-c", code], name, cluster=c, timeout=timeout)
                phase(name, start)
            start = time.monotonic()
            rows = c.sql("SELECT count(*) FROM nodes WHERE state = 'ready'")
            if rows != [[3]]:
                raise HarnessError(f"the snode's nodes table says {rows}, expected [[3]]")
            phase("SQL query on the snode", start)
            start = time.monotonic()
        phase("shutdown", start)
    except HarnessError as exc:
        to_stderr(f"[smoke] FAILED after {time.monotonic() - t0:.1f} s: {exc}")
        return 1
    phases.append(("total", time.monotonic() - t0))
    print(table(None, [[name, f"{sec:.2f} s"] for name, sec in phases], align="lr"))
    return 0
