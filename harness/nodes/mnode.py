"""The memory node: a store of vRegions, served by C on channels that
processor-side caches attach to (Op.ATTACH), one thread per channel: shm
rings on one machine, TCP connections from another host. Told
to replicate (ATTACH of service "replica"), it forwards every write to
another mnode's store and waits for it before answering. A replica that does
not answer within REPLICA_TIMEOUT is dropped for good: this store goes on
alone and its answers tell caches the backup fell behind, so they never fail
over to it. A store a cache switched to takes over: forwards from its old
primary are refused, and that primary then refuses every request."""

from __future__ import annotations

import json
import socket
import threading

from harness._native.excache import MStore
from harness._native.transport import Link, Op
from harness.errors import HarnessError
from harness.nodes.auth import prove
from harness.nodes.role import Role

# Well under the caches' 2 s timeout: a primary whose replica went silent
# answers its caches (and goes on alone) before they give up on it and fail
# over to that same silent replica.
REPLICA_TIMEOUT = 1.0
ACCEPT_TIMEOUT = 10.0  # for the cache that asked for a TCP channel to connect


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
        if req.get("listen") == "tcp":
            # From another host: the channel is a TCP connection to a port of
            # ours, and its peer proves it knows the cluster's secret first.
            srv = socket.create_server(("0.0.0.0", 0))
            threading.Thread(target=self._accept_tcp, args=(srv, req), name="excache-accept",
                             daemon=True).start()
            return json.dumps({"port": srv.getsockname()[1]}).encode()
        link = Link.shm_open(req["path"], int(req.get("side", 1)), name="excache")
        self._model(link, req)
        self._start(link)
        return b""

    @staticmethod
    def _model(link: Link, req: dict) -> None:
        if req.get("latency_ns") or req.get("bytes_per_sec"):
            link.set_model(int(req.get("latency_ns", 0)), int(req.get("bytes_per_sec", 0)))

    def _accept_tcp(self, srv: socket.socket, req: dict) -> None:
        name = self.agent.spec.name
        with srv:
            srv.settimeout(ACCEPT_TIMEOUT)
            try:
                conn, peer = srv.accept()
            except OSError as exc:
                print(f"dh-agent: {name}: nobody came to the TCP ExCache channel: {exc}",
                      flush=True)
                return
        link = Link.from_fd(conn.detach(), name="excache")  # sets TCP_NODELAY
        try:
            prove(link, bytes.fromhex(self.agent.spec.secret), f"{peer[0]}:{peer[1]}")
        except HarnessError as exc:
            print(f"dh-agent: {name}: TCP ExCache channel refused: {exc}", flush=True)
            return
        self._model(link, req)
        self._start(link)

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
