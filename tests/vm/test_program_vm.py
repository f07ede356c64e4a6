"""Unmodified programs on remote memory with every node a TCG guest: the
program runs in the pnode guest, its memory on the mnode guest over ivshmem,
and gives the same results as on local memory (Python, a fork, xz)."""

import sys

import pytest

from harness.nodes.program import run_program

pytestmark = pytest.mark.vm

CACHE = 2 << 20  # 512 lines, below each program's memory: pages leave and come back

PY = """
import hashlib, os
b = bytearray(4 << 20)
for i in range(0, len(b), 4096):
    b[i:i + 8] = i.to_bytes(8, "little")
h = hashlib.sha256(b).hexdigest()
pid = os.fork()
if pid == 0:
    b[:5] = b"child"
    print("child", hashlib.sha256(b).hexdigest() != h, flush=True)
    raise SystemExit(0)
os.waitpid(pid, 0)
print("parent", h)
"""

XZ = ("python3 -c \"import hashlib; open('/tmp/in', 'w').write(' '.join(hashlib.sha1(str(i)"
      ".encode()).hexdigest()[:6] for i in range(60000)))\" && xz -1 -T1 -c /tmp/in > "
      "/tmp/in.xz && xz -dc /tmp/in.xz | cmp - /tmp/in && sha256sum < /tmp/in.xz")


def test_programs_in_the_pnode_guest_match_local_memory(cluster):
    c = cluster("lego3", placement="vm", memory_channels=3, timeout=120)
    for argv in ([sys.executable, "-c", PY], ["sh", "-c", XZ]):
        local = run_program(c, argv, memory="local", timeout=300)
        remote = run_program(c, argv, memory="remote", cache=CACHE, timeout=300)
        assert local.returncode == remote.returncode == 0, remote.stderr
        assert remote.stdout == local.stdout
        assert remote.stats["excache"]["evictions"] > 0
        assert remote.stats["excache"]["dirty_flushes"] > 0
