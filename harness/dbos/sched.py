"""The scheduler as SQL: a worker claims a task in one UPDATE; the policy is
which UPDATE. Switching policy is switching a query, as in DBOS.

  fifo          the oldest pending task (highest priority first)
  least_loaded  as fifo, but only the least-loaded worker with room gets one
  locality      a pending task whose locality is the worker's node first,
                then the oldest

workers.running is kept by triggers on tasks.state."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from harness.errors import DBOSError

if TYPE_CHECKING:
    from harness.dbos.store import Store

_PENDING = ("SELECT task_id FROM tasks WHERE state = 'pending' "
            "ORDER BY priority DESC, task_id LIMIT 1")
_ROOM = "(SELECT running < capacity FROM workers WHERE worker_id = :w)"
_CLAIM = ("UPDATE tasks SET state = 'running', worker_id = :w, started = :now "
          "WHERE task_id = ({pick}) AND {guard} RETURNING task_id, command")

POLICIES: dict[str, str] = {
    "fifo": _CLAIM.format(pick=_PENDING, guard=_ROOM),
    "least_loaded": _CLAIM.format(pick=_PENDING, guard=(
        f"{_ROOM} AND :w = (SELECT worker_id FROM workers WHERE running < capacity "
        "ORDER BY CAST(running AS REAL) / capacity, worker_id LIMIT 1)")),
    "locality": _CLAIM.format(pick=(
        "SELECT task_id FROM tasks WHERE state = 'pending' ORDER BY "
        "(locality IS (SELECT node FROM workers WHERE worker_id = :w)) DESC, "
        "priority DESC, task_id LIMIT 1"), guard=_ROOM),
}


class Scheduler:
    def __init__(self, db: Store) -> None:
        self.db = db

    def add_worker(self, worker_id: str, node: str, capacity: int = 1) -> None:
        with self.db.tx() as con:
            con.execute("INSERT INTO workers (worker_id, node, capacity) VALUES (?, ?, ?) "
                        "ON CONFLICT (worker_id) DO UPDATE SET node = excluded.node, "
                        "capacity = excluded.capacity", (worker_id, node, capacity))

    def submit(self, argv: list[str], locality: str | None = None, priority: int = 0) -> int:
        if not argv or not all(isinstance(a, str) for a in argv):
            raise DBOSError("a task's command is a non-empty list of strings")
        with self.db.tx() as con:
            tid = con.execute("INSERT INTO tasks (command, locality, priority, created) "
                              "VALUES (?, ?, ?, ?) RETURNING task_id",
                              (json.dumps(argv), locality, priority, time.time())).fetchone()[0]
            self.db.changed.notify_all()
        return tid

    def claim_many(self, worker_id: str, policy: str = "fifo", n: int = 1) -> list[dict]:
        """Up to n claims by one worker, in one transaction."""
        if policy not in POLICIES:
            raise DBOSError(f"no scheduling policy {policy!r}; there are {sorted(POLICIES)}")
        out = []
        with self.db.tx() as con:
            if con.execute("SELECT 1 FROM workers WHERE worker_id = ?",
                           (worker_id,)).fetchone() is None:
                raise DBOSError(f"no worker {worker_id!r}: add_worker first")
            q, now = POLICIES[policy], time.time()
            for _ in range(n):
                row = con.execute(q, {"w": worker_id, "now": now}).fetchone()
                if row is None:
                    break
                out.append({"task_id": row[0], "argv": json.loads(row[1])})
        return out

    def claim(self, worker_id: str, policy: str = "fifo", wait: float = 0.0) -> dict | None:
        """The next task for this worker, waiting up to `wait` seconds for one."""
        deadline = time.monotonic() + wait
        with self.db.lock:
            while True:
                got = self.claim_many(worker_id, policy, 1)
                left = deadline - time.monotonic()
                if got or left <= 0:
                    return got[0] if got else None
                self.db.changed.wait(min(left, 0.5))

    def complete(self, task_id: int, ok: bool, result: str = "") -> None:
        with self.db.tx() as con:
            n = con.execute("UPDATE tasks SET state = ?, result = ?, finished = ? "
                            "WHERE task_id = ? AND state = 'running'",
                            ("done" if ok else "failed", result, time.time(), task_id)).rowcount
        if n != 1:
            raise DBOSError(f"task {task_id} is not running")
