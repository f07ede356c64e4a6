"""The DBOS store: one SQLite file in WAL mode.

Durability: `PRAGMA synchronous=FULL` with WAL makes every COMMIT fsync the
log before it returns, so a committed transaction survives a crash of the
process, the VM or the machine; an uncommitted one is never visible. A
benchmark may ask for "normal" or "off" and says so. A transaction that a
crash may undo without losing anything (`tx(durable=False)`: IPC's receive)
commits without the fsync; the next durable commit syncs it with its own."""

from __future__ import annotations

import mmap
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from harness.dbos.schema import migrate
from harness.errors import DBOSError

SYNC_MODES = ("full", "normal", "off")


@dataclass
class Result:
    columns: list[str] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)
    changes: int = 0

    def to_dict(self) -> dict:
        return {"columns": self.columns, "rows": self.rows, "changes": self.changes}


class Store:
    """The SQLite file under DBOS: transactions, the provenance log, SQL.
    The services take a Store, so they never import the DBOS that holds them."""

    def __init__(self, con: sqlite3.Connection, path: str, node: str = "",
                 synchronous: str = "full") -> None:
        self.con = con
        self.synchronous = synchronous
        self.path = path
        self.node = node
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # new tasks or messages
        self._shm_fd: int | None = None
        self._shm_map: mmap.mmap | None = None

    @classmethod
    def open(cls, path: str | Path, synchronous: str = "full", node: str = "") -> Self:
        """Opens (creating and migrating as needed) a DBOS database file."""
        if synchronous not in SYNC_MODES:
            raise DBOSError(f"synchronous must be one of {SYNC_MODES}, got {synchronous!r}")
        path = str(path)
        try:
            con = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                  timeout=10.0)
            mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal" and path != ":memory:":
                raise DBOSError(f"{path}: SQLite would not use WAL mode (got {mode})")
            con.execute(f"PRAGMA synchronous={synchronous.upper()}")
            con.execute("PRAGMA foreign_keys=ON")
            migrate(con)
        except sqlite3.Error as exc:
            raise DBOSError(f"{path}: cannot open as a DBOS database: {exc}") from exc
        return cls(con, path, node, synchronous)

    def checkpoint(self, mode: str = "PASSIVE") -> None:
        """Copies the WAL into the database file (RESTART: and starts the WAL
        over, keeping its size)."""
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise DBOSError(f"no checkpoint mode {mode!r}")
        with self.lock:
            self.con.execute(f"PRAGMA wal_checkpoint({mode})")

    def wal_index(self, length: int) -> mmap.mmap | None:
        """A read-only mapping of the first length bytes of the WAL index
        (the `-shm` file), or None while there is none that long. The file
        stays open until close(), after the connection: closing any
        descriptor of a file drops every POSIX lock this process holds on
        it, SQLite's own too. Without its lock on the WAL index, another
        process's connection rebuilds that file under this one's mapping
        (SIGBUS; seen in the mount tests) and no longer sees this one's
        readers."""
        with self.lock:
            if self._shm_map is None:
                if self._shm_fd is None:
                    try:
                        self._shm_fd = os.open(self.path + "-shm", os.O_RDONLY | os.O_CLOEXEC)
                    except OSError:
                        return None  # no WAL index yet, or none at all (":memory:")
                try:
                    self._shm_map = mmap.mmap(self._shm_fd, length, mmap.MAP_SHARED,
                                              mmap.PROT_READ)
                except (OSError, ValueError):  # not yet that long
                    return None
            return self._shm_map

    def close(self) -> None:
        with self.lock:
            self.con.close()
            if self._shm_map is not None:
                self._shm_map.close()
            if self._shm_fd is not None:
                os.close(self._shm_fd)
            self._shm_map = self._shm_fd = None

    @contextmanager
    def tx(self, write: bool = True, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; rolled back whole on any error. durable=False
        commits without waiting for the disk (synchronous=NORMAL for this
        one commit) where the store would otherwise wait."""
        with self.lock:
            lax = not durable and self.synchronous == "full"
            if lax:
                self.con.execute("PRAGMA synchronous=NORMAL")
            try:
                self.con.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield self.con
                except BaseException:
                    self.con.execute("ROLLBACK")
                    raise
                self.con.execute("COMMIT")
            finally:
                if lax:
                    self.con.execute("PRAGMA synchronous=FULL")

    def log(self, con: sqlite3.Connection, kind: str, detail: str,
            task: int | None = None) -> None:
        """A provenance event, in the caller's transaction."""
        con.execute("INSERT INTO events (time, node, task_id, kind, detail) VALUES (?,?,?,?,?)",
                    (time.time(), self.node or None, task, kind, detail))

    def sql(self, query: str, params: Sequence = (), write: bool = False) -> Result:
        """Runs one SQL statement in its own transaction. Without write=True
        a statement that would change anything is refused; an error of any
        kind changes nothing."""
        with self.lock:
            try:
                if not write:
                    self.con.execute("PRAGMA query_only=ON")
                try:
                    with self.tx(write=write) as con:
                        cur = con.execute(query, tuple(params))
                        rows = [list(r) for r in cur.fetchall()]
                        cols = [d[0] for d in cur.description or ()]
                        changes = max(cur.rowcount, 0)
                finally:
                    if not write:
                        self.con.execute("PRAGMA query_only=OFF")
            except sqlite3.Error as exc:
                msg = str(exc)
                if not write and "readonly" in msg:
                    msg += " (this statement writes: pass write=True, or `harness sql --write`)"
                raise DBOSError(f"SQL error: {msg}") from exc
            except (ValueError, OverflowError) as exc:  # e.g. more than one statement
                raise DBOSError(f"SQL error: {exc}") from exc
        return Result(cols, rows, changes if write else 0)
