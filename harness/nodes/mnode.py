"""The memory node: a store of vRegions, served by C on channels that
processor-side caches attach to (Op.ATTACH), one thread per channel. Told
to replicate (ATTACH of service "replica"), it forwards every write to
another mnode's store and waits for it before answering. A replica that does
not answer within REPLICA_TIMEOUT is dropped for good: this store goes on
alone and its answers tell caches the backup fell behind, so they never fail
over to it. A store a cache switched to takes over: forwards from its old
primary are refused, and that primary then refuses every request."""

from __future__ import annotations

import json
import threading

from harness._native.excache import MStore
from harness._native.transport import Link, Op
from harness.errors import HarnessError
from harness.nodes.role import Role

# Well under the caches' 2 s timeout: a primary whose replica went silent
# answers its caches (and goes on alone) before they give up on it and fail
# over to that same silent replica.
REPLICA_TIMEOUT = 1.0


class MNode(Role):
    def __init__(self, agent) -> None:
        super().__init__(agent)
        self.store = MStore()
        self.channels: list[Link] = []
        self.handlers[Op.ATTACH] = self.attach
        for link in agent.memory_channels:  # set up by the cluster (ivshmem in VMs)
            self._start(link)

    def attach(self, payload: bytes) -> bytes:
        req = json.loads(payload)
        if req.get("service") == "replica":
            link = Link.shm_open(req["path"], int(req.get("side", 0)), name="replica")
            self.channels.append(link)
            self.store.set_replica(link, timeout=REPLICA_TIMEOUT)
            return b""
        if req.get("service") != "excache":
            raise HarnessError(f"{self.agent.spec.name} serves 'excache' and 'replica' "
                               f"channels, not {req.get('service')!r}")
        link = Link.shm_open(req["path"], int(req.get("side", 1)), name="excache")
        if req.get("latency_ns") or req.get("bytes_per_sec"):
            link.set_model(int(req.get("latency_ns", 0)), int(req.get("bytes_per_sec", 0)))
        self._start(link)
        return b""

    def _start(self, link: Link) -> None:
        self.channels.append(link)
        threading.Thread(target=self._serve, args=(link,), name="excache", daemon=True).start()

    def _serve(self, link: Link) -> None:
        try:
            self.store.serve(link)
        except HarnessError as exc:
            print(f"dh-agent: {self.agent.spec.name}: ExCache channel ended: {exc}", flush=True)

    def stats(self) -> dict:
        out = super().stats()
        out["memory"] = self.store.stats()
        return out

    def close(self) -> None:
        for link in self.channels:
            link.close()
