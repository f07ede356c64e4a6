"""The processor node: it runs the tasks the DBOS scheduler gives it. A
worker thread registers with the snode, claims a task (asking again, less
often while none comes), runs its command and reports how it ended."""

from __future__ import annotations

import json
import os
import threading

from harness._native.transport import Op
from harness.errors import HarnessError, TransportError
from harness.nodes.role import Role

POLICY = "fifo"
OUTPUT_LIMIT = 4096  # of a task's output kept as its result
# Seconds between claims while no task comes: doubling from the first to the
# last, so an idle node asks ~5 times a second and a busy one at once.
IDLE_FIRST, IDLE_MAX = 0.005, 0.2


class PNode(Role):
    def __init__(self, agent) -> None:
        super().__init__(agent)
        self.snode = next((e.peer for e in agent.spec.links
                           if e.peer_role == "snode" and not e.serve), None)
        self.tasks_run = 0
        self._worker: threading.Thread | None = None

    def start(self) -> None:
        if self.snode is None:
            return
        self._worker = threading.Thread(target=self._work, name="tasks", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        # Imported here, after READY: DBOS's modules cost seconds in a TCG guest.
        from harness.dbos.remote import RemoteDBOS

        name = self.agent.spec.name
        db = RemoteDBOS(lambda p: self.agent.call(self.snode, Op.SQL, p, timeout=10.0))
        lost = False
        while not self.agent.stop.is_set():
            try:
                db.sched.add_worker(name, name, 1)  # again after the snode restarts
                if lost:
                    print(f"dh-agent: {name}: the snode is back; claiming tasks", flush=True)
                    lost = False
                idle = IDLE_FIRST
                while not self.agent.stop.is_set():
                    # No waiting on the snode: a claim held open there would
                    # hold this node's link to it, and every other call (a
                    # ping, the DBOS mount's) would queue behind it.
                    task = db.sched.claim(name, POLICY)
                    if task is None:
                        self.agent.stop.wait(idle)
                        idle = min(2 * idle, IDLE_MAX)
                        continue
                    idle = IDLE_FIRST
                    ok, result = self._run(task["argv"])
                    db.sched.complete(task["task_id"], ok, result)
                    self.tasks_run += 1
            except TransportError as exc:  # the snode died or restarts: wait for it
                if not lost and not self.agent.stop.is_set():
                    print(f"dh-agent: {name}: lost the snode ({exc}); retrying", flush=True)
                lost = True
                self.agent.stop.wait(0.2)
            except HarnessError as exc:
                if not self.agent.stop.is_set():
                    print(f"dh-agent: {name}: task worker stopped: {exc}", flush=True)
                return

    def files_mount(self, files: dict):
        """The snode's DBOS file system at files["path"] for one EXEC, each
        operation an RPC over this node's snode link."""
        import sys

        # A guest's agent starts with -S: no site.py, so neither the venv
        # (where pyfuse3 lives) nor its packages are on the path.
        venv = os.path.dirname(os.path.dirname(sys.executable))
        site = os.path.join(venv, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}",
                            "site-packages")
        if os.path.exists(os.path.join(venv, "pyvenv.cfg")) and site not in sys.path:
            sys.path.append(site)
        from harness.dbos.mount import mounted
        from harness.dbos.remote import RemoteDBOS

        if self.snode is None:
            return super().files_mount(files)
        path = self.agent.host_root() + files["path"]  # where the program will see it
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise HarnessError(f"{self.agent.spec.name}: cannot make the mount point {path} "
                               f"({exc.strerror}); a guest's root is the host's, read-only: "
                               "give a path under /tmp or /run, or one the host has") from exc
        db = RemoteDBOS(lambda p: self.agent.call(self.snode, Op.SQL, p, timeout=60.0))
        return mounted(db.vfs, path, files.get("task"), files.get("source", self.snode))

    def _run(self, argv: list[str]) -> tuple[bool, str]:
        import subprocess

        try:
            p = subprocess.run(argv, capture_output=True, timeout=600, check=False,
                               **self.in_host_root())
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, json.dumps({"error": str(exc)})
        return p.returncode == 0, json.dumps({
            "returncode": p.returncode,
            "stdout": p.stdout[:OUTPUT_LIMIT].decode(errors="replace"),
            "stderr": p.stderr[:OUTPUT_LIMIT].decode(errors="replace")})

    def stats(self) -> dict:
        out = super().stats()
        out["tasks_run"] = self.tasks_run
        return out
