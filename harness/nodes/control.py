"""The control socket of a cluster started with `harness up`.

`harness up` serves a Unix socket in the cluster's run directory; `harness
status` and `harness down` from another shell talk to it with the same
framing the nodes use (CTL frames carrying JSON). state.json beside it
records what was started, so a cluster whose `up` process died is still
reported, as down."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from harness import remote_errors
from harness._native.transport import Link, Op
from harness.errors import ClusterError, HarnessError, TransportError
from harness.nodes.cluster import Cluster
from harness.paths import run_root

log = logging.getLogger("harness.control")


def cluster_dir(name: str) -> Path:
    return run_root() / name


def _state(cluster: Cluster, up_pid: int) -> dict:
    return {"cluster": cluster.name, "pid": up_pid, "run_dir": str(cluster.run_dir),
            "started": cluster.started_at, "nodes": cluster.status()}


def serve(cluster: Cluster, stop: threading.Event) -> None:
    """Answers status and down requests until stop is set."""
    sock_path = cluster.run_dir / "control.sock"
    sock_path.unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(sock_path))
    srv.listen(8)
    srv.settimeout(0.2)
    (cluster.run_dir / "state.json").write_text(json.dumps(_state(cluster, os.getpid())))
    try:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                _answer(cluster, conn, stop)
    finally:
        srv.close()
        sock_path.unlink(missing_ok=True)


def _answer(cluster: Cluster, conn: socket.socket, stop: threading.Event) -> None:
    link = Link.from_fd(conn.fileno(), name="control client")
    try:
        hdr, payload = link.recv(timeout=2.0)
        req = json.loads(payload)
        cmd = req.get("cmd")
        if cmd == "status":
            link.reply(hdr, json.dumps(_state(cluster, os.getpid())).encode())
        elif cmd == "sql":
            try:
                res = cluster.dbos.sql(req["query"], req.get("params", []),
                                       write=bool(req.get("write")))
                link.reply(hdr, json.dumps(res.to_dict()).encode())
            except HarnessError as exc:
                link.reply(hdr, remote_errors.encode(exc, link.max_payload), error=True)
        elif cmd == "fault":
            try:
                cluster.fault(req["node"], req["action"])
                link.reply(hdr, json.dumps({"node": req["node"],
                                            "action": req["action"]}).encode())
            except (HarnessError, ValueError) as exc:
                link.reply(hdr, remote_errors.encode(exc, link.max_payload), error=True)
        elif cmd == "down":
            link.reply(hdr, json.dumps({"stopping": cluster.name}).encode())
            stop.set()
        else:
            link.reply(hdr, remote_errors.encode(HarnessError(f"unknown command {cmd!r}")),
                       error=True)
    except (HarnessError, ValueError) as exc:
        log.warning("control request failed: %s", exc)
    finally:
        link.close()


def request(name: str, cmd: str, timeout: float = 10.0, **args: object) -> dict:
    """Sends one command to a running cluster's `harness up` process; an
    error it answers is raised as its own class (harness.remote_errors)."""
    sock_path = cluster_dir(name) / "control.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(str(sock_path))
    except OSError as exc:
        s.close()
        raise ClusterError(f"no cluster named {name!r} is running (nothing answers at "
                           f"{sock_path}); start one with `harness up`") from exc
    with s:
        link = Link.from_fd(s.fileno(), name=f"cluster {name}")
        try:
            return json.loads(remote_errors.call(
                link, Op.CTL, json.dumps({"cmd": cmd, **args}).encode(), timeout))
        except TransportError as exc:
            raise ClusterError(f"cluster {name!r} did not answer {cmd!r}: {exc}") from exc
        finally:
            link.close()


def last_state(name: str) -> dict | None:
    """What state.json says, with every node marked down (nothing answered)."""
    try:
        state = json.loads((cluster_dir(name) / "state.json").read_text())
    except (OSError, ValueError):
        return None
    for n in state.get("nodes", []):
        n["state"] = "down"
    return state


def wait_gone(name: str, timeout: float) -> bool:
    """Waits for a cluster's control socket to disappear."""
    sock_path = cluster_dir(name) / "control.sock"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sock_path.exists():
            return True
        time.sleep(0.05)
    return False
