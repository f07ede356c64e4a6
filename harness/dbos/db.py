"""The DBOS database: a store and the services on it."""

from __future__ import annotations

import sqlite3

from harness.dbos.store import Store


class DBOS(Store):
    """A DBOS database and its services: sched, ipc, fs (by path), vfs (by
    inode, for mounts), prov, state."""

    def __init__(self, con: sqlite3.Connection, path: str, node: str = "",
                 synchronous: str = "full") -> None:
        # Here, not at the top: a node that only reaches DBOS remotely
        # (through harness.dbos) never pays for the services in a guest.
        from harness.dbos.fs import FileSystem
        from harness.dbos.ipc import IPC
        from harness.dbos.sched import Scheduler
        from harness.dbos.services import Provenance, State
        from harness.dbos.vfs import VFS

        super().__init__(con, path, node, synchronous)
        self.sched = Scheduler(self)
        self.ipc = IPC(self)
        self.fs = FileSystem(self)
        self.prov = Provenance(self)
        self.state = State(self)
        self.vfs = VFS(self)
