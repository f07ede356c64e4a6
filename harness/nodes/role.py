"""A node's role: what it answers on its links.

Every role answers the control protocol (HELLO, PING, STATS, EXEC,
SHUTDOWN); the pnode, mnode and snode add their own opcodes as the
ExCache, memory and DBOS layers land."""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import nullcontext

from harness._native.transport import Op
from harness.errors import HarnessError

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~60 ms in a guest
if TYPE_CHECKING:
    from collections.abc import Callable

    Handler = Callable[[bytes], bytes]

EXEC_OUTPUT_LIMIT = 256 << 10  # per stream; the rest is cut and flagged


def _clip(data: bytes) -> tuple[str, bool]:
    import base64

    return base64.b64encode(data[:EXEC_OUTPUT_LIMIT]).decode(), len(data) > EXEC_OUTPUT_LIMIT


def _enter(root: str, cwd: str) -> None:
    os.chroot(root)
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir("/")


def rss_kb(pid: int | str = "self") -> int:
    """A process's resident memory (VmRSS), in KiB; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


class Role:
    """The base role; `handlers` maps opcodes to functions of the payload.
    `agent` is the harness.nodes.agent.Agent serving it (not imported here:
    the agent picks the role, so it imports the roles)."""

    def __init__(self, agent) -> None:
        self.agent = agent
        self.started = time.time()
        self.handled = 0
        self._lock = threading.Lock()
        self.handlers: dict[int, Handler] = {
            Op.HELLO: self.hello,
            Op.PING: self.ping,
            Op.STATS: self.stats_json,
            Op.EXEC: self.exec,
            Op.SHUTDOWN: self.shutdown,
        }

    def handle(self, opcode: int, payload: bytes) -> bytes:
        fn = self.handlers.get(opcode)
        if fn is None:
            raise HarnessError(
                f"{self.agent.spec.name} ({self.agent.spec.role}) does not serve "
                f"opcode {Op(opcode).name}")
        with self._lock:
            self.handled += 1
        return fn(payload)

    def hello(self, _payload: bytes) -> bytes:
        s = self.agent.spec
        return json.dumps({
            "name": s.name, "role": s.role, "nid": s.nid, "pid": os.getpid(),
            "placement": s.placement, "cluster": s.cluster,
            "links": [{"peer": e.peer, "attach": e.attach, "serve": e.serve} for e in s.links],
        }).encode()

    def ping(self, payload: bytes) -> bytes:
        """Empty payload: a plain ping. b"peers": ping every link this node
        calls, and report each round trip in microseconds."""
        if payload != b"peers":
            return b""
        rtts = {}
        for peer in self.agent.clients:
            t0 = time.perf_counter()
            self.agent.call(peer, Op.PING, b"", timeout=2.0)
            rtts[peer] = round((time.perf_counter() - t0) * 1e6, 1)
        return json.dumps(rtts).encode()

    def stats(self) -> dict:
        return {
            "name": self.agent.spec.name, "role": self.agent.spec.role,
            "uptime_s": round(time.time() - self.started, 3), "handled": self.handled,
            "rss_kb": rss_kb(), "links": {peer: link.stats() for peer, link in
                                          self.agent.all_links()},
        }

    def stats_json(self, _payload: bytes) -> bytes:
        return json.dumps(self.stats()).encode()

    def exec(self, payload: bytes) -> bytes:
        import base64  # here, not at the top: the agent starts faster in a guest
        import subprocess

        req = json.loads(payload)
        argv, timeout = req["argv"], float(req.get("timeout", 60))
        try:
            # A workload finds this node's links (its ExCache channel) from here.
            env = {**os.environ, "HARNESS_NODE_SPEC": self.agent.spec_path}
            with self.files_mount(req["files"]) if req.get("files") else nullcontext():
                p = subprocess.run(argv, capture_output=True, timeout=timeout,
                                   input=base64.b64decode(req.get("stdin", "")),
                                   check=False, env=env, **self.in_host_root(req.get("cwd")))
        except FileNotFoundError as exc:
            raise HarnessError(f"{self.agent.spec.name}: no such program: {argv[0]}") from exc
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(
                f"{self.agent.spec.name}: {argv!r} did not finish within {timeout:g} s "
                "and was killed") from exc
        out, out_cut = _clip(p.stdout)
        err, err_cut = _clip(p.stderr)
        return json.dumps({"returncode": p.returncode, "stdout": out, "stderr": err,
                           "truncated": out_cut or err_cut}).encode()

    def in_host_root(self, cwd: str | None = None) -> dict:
        """subprocess arguments that run a program in the host's root: the
        agent's own, or in a guest restored from a snapshot (whose agent
        runs from the root image) the host root its init mounted."""
        root = self.agent.host_root()
        if not root:
            return {"cwd": cwd}
        return {"preexec_fn": lambda: _enter(root, cwd or "/")}

    def files_mount(self, files: dict):
        """A context manager: the DBOS file system mounted for one EXEC
        (files: path, task, source). Only a node with an snode link has one."""
        raise HarnessError(f"{self.agent.spec.name} ({self.agent.spec.role}) has no snode "
                           "link to mount DBOS files from")

    def shutdown(self, _payload: bytes) -> bytes:
        return b""  # the agent stops once this reply is sent

    def start(self) -> None:
        """Called once the agent serves its links (after READY)."""

    def close(self) -> None:
        """Called when the agent stops."""

