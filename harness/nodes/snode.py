"""The storage node: the DBOS database on the node's own disk, served to
the other nodes and the controller over the transport (Op.SQL)."""

from __future__ import annotations

import os
import tempfile

from harness._native.transport import Op
from harness.dbos import DBOS
from harness.dbos.remote import serve
from harness.nodes.role import Role

DB_NAME = "dbos.sqlite"


class SNode(Role):
    def __init__(self, agent) -> None:
        super().__init__(agent)
        data = agent.spec.data_dir or tempfile.mkdtemp(prefix=f"{agent.spec.name}-")
        os.makedirs(data, exist_ok=True)
        self.db = DBOS.open(os.path.join(data, DB_NAME), node=agent.spec.name)
        self.handlers[Op.SQL] = lambda payload: serve(self.db, payload)

    def stats(self) -> dict:
        out = super().stats()
        counts = self.db.sql("SELECT (SELECT count(*) FROM tasks), (SELECT count(*) FROM files), "
                             "(SELECT count(*) FROM messages)").rows[0]
        out["dbos"] = {"path": self.db.path, "tasks": counts[0], "files": counts[1],
                       "messages": counts[2]}
        return out

    def close(self) -> None:
        self.db.close()
