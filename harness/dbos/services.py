"""Provenance questions and cluster state, as SQL."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.dbos.store import Store

# "Which tasks read a file that task T wrote?" is one query over events.
READERS_OF_WRITES = (
    "SELECT DISTINCT r.task_id FROM events w JOIN events r ON r.detail = w.detail "
    "WHERE w.task_id = ? AND w.kind = 'file_write' AND r.kind = 'file_read' "
    "AND r.task_id IS NOT w.task_id ORDER BY r.task_id")

# "Which programs read a file that program P wrote?": the mount's events
# carry the program's name (harness mount, harness run --files dbos).
PROGRAMS_READING_WRITES_OF = (
    "SELECT DISTINCT r.program FROM events w JOIN events r ON r.detail = w.detail "
    "WHERE w.program = ? AND w.kind = 'file_write' AND r.kind = 'file_read' "
    "AND r.program IS NOT w.program AND r.event_id > w.event_id ORDER BY r.program")


class Provenance:
    def __init__(self, db: Store) -> None:
        self.db = db

    def readers_of_writes(self, task_id: int) -> list[int]:
        return [r[0] for r in self.db.sql(READERS_OF_WRITES, (task_id,)).rows]

    def programs_reading_writes_of(self, program: str) -> list[str]:
        return [r[0] for r in self.db.sql(PROGRAMS_READING_WRITES_OF, (program,)).rows]

    def events(self, task_id: int) -> list[dict]:
        res = self.db.sql("SELECT time, node, kind, detail FROM events WHERE task_id = ? "
                          "ORDER BY event_id", (task_id,))
        return [dict(zip(res.columns, r, strict=True)) for r in res.rows]


class State:
    """Nodes report themselves, their memory regions and page counts here."""

    def __init__(self, db: Store) -> None:
        self.db = db

    def report_node(self, name: str, role: str, nid: int, placement: str,
                    state: str = "ready") -> None:
        self.report_nodes([[name, role, nid, placement, state]])

    def report_nodes(self, nodes: list[list]) -> None:
        """Each [name, role, nid, placement, state]; one transaction (one
        commit) for all."""
        now = time.time()
        with self.db.tx() as con:
            con.executemany("INSERT INTO nodes (name, role, nid, placement, state, updated) "
                            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                            "role = excluded.role, nid = excluded.nid, placement = "
                            "excluded.placement, state = excluded.state, updated = "
                            "excluded.updated", [(*n, now) for n in nodes])

    def report_region(self, region_id: int, node: str, size: int, owner: str | None = None
                      ) -> None:
        with self.db.tx() as con:
            con.execute("INSERT OR REPLACE INTO regions (region_id, node, owner, size, created) "
                        "VALUES (?, ?, ?, ?, ?)", (region_id, node, owner, size, time.time()))

    def report_pages(self, region_id: int, node: str, resident: int, dirty: int) -> None:
        with self.db.tx() as con:
            con.execute("INSERT OR REPLACE INTO pages (region_id, node, resident, dirty, updated) "
                        "VALUES (?, ?, ?, ?, ?)", (region_id, node, resident, dirty, time.time()))
