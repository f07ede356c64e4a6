"""ExCache with the pnode and the mnode in VMs: a workload run on the pnode
guest (`harness run`) writes through a cache a quarter of its data over
ivshmem, reads it back intact, and the benchmark's matmul gets the right
answer there, with misses, evictions, dirty flushes and prefetches counted."""

import json
import os
import subprocess
import sys

WORKLOAD = """
import json
from harness._native.excache import PAGE
from harness.bench.paging import Matmul
from harness.nodes.guest import excache_link, open_excache
link = excache_link()
cache = open_excache(64 * PAGE, ways=8, prefetch=4, link=link)
r = cache.alloc(256 * PAGE)
mv = memoryview(r)
for p in range(256):
    mv[p * PAGE:(p + 1) * PAGE] = bytes([p % 251]) * PAGE
intact = all(mv[p * PAGE:(p + 1) * PAGE] == bytes([p % 251]) * PAGE for p in range(256))
mv.release()
r.free()
shape = Matmul(256, 64)
m = cache.alloc(shape.working_set)
shape.run(m, 64 * PAGE)  # raises on a wrong answer
m.free()
print(json.dumps({"intact": intact, **cache.stats()}))
"""


def test_a_workload_on_the_pnode_guest_pages_over_ivshmem(tmp_path):
    env = {**os.environ, "HARNESS_RUN_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--placement", "vm", "--",
                        sys.executable, "-c", WORKLOAD], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["intact"] is True
    assert s["misses"] > 0 and s["evictions"] > 0 and s["dirty_flushes"] > 0
    assert s["prefetched"] > 0 and s["zero_fills"] >= 256
