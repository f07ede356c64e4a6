"""`harness demo`: the main job. Boots the default cluster, shows that
every node and link answers, runs a command on the processor node, and
measures the transport beside its floor."""

from __future__ import annotations

import sys
import time

from harness.bench import transport
from harness.nodes.cluster import open_cluster


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(placement: str = "process") -> int:
    t0 = time.monotonic()
    _say(f"[demo] booting lego3 ({placement} placement)")
    with open_cluster("lego3", placement=placement, progress=lambda m: _say(f"  {m}")) as c:
        for row in c.status():
            _say(f"  {row['name']:7} {row['role']:6} {row['state']}")
        r = c.exec("pnode0", ["uname", "-sr"])
        _say(f"[demo] pnode0 ran `uname -sr`: {r.stdout.decode().strip()} "
             f"(status {r.returncode})")
    _say("[demo] transport benchmark (shm link between two processes)")
    rep = transport.run("shm", n=20000, progress=lambda m: _say(f"  {m}"))
    print(rep.table())
    _say(f"[demo] done in {time.monotonic() - t0:.1f} s")
    return 0
