"""The DBOS schema, versioned: each migration runs once, in order, inside a
transaction, and PRAGMA user_version records how far a database has come."""

from __future__ import annotations

import sqlite3

MIGRATIONS: list[str] = [
    # 1: the tables DBOS describes, plus cluster state and the provenance log.
    """
    CREATE TABLE nodes (
        name TEXT PRIMARY KEY, role TEXT NOT NULL, nid INTEGER, placement TEXT,
        state TEXT NOT NULL DEFAULT 'ready', updated REAL NOT NULL);
    CREATE TABLE workers (
        worker_id TEXT PRIMARY KEY, node TEXT NOT NULL,
        capacity INTEGER NOT NULL DEFAULT 1 CHECK (capacity > 0),
        running INTEGER NOT NULL DEFAULT 0 CHECK (running >= 0));
    CREATE TABLE tasks (
        task_id INTEGER PRIMARY KEY, state TEXT NOT NULL DEFAULT 'pending'
            CHECK (state IN ('pending', 'running', 'done', 'failed')),
        worker_id TEXT REFERENCES workers(worker_id), command TEXT NOT NULL,
        locality TEXT, priority INTEGER NOT NULL DEFAULT 0, result TEXT,
        created REAL NOT NULL, started REAL, finished REAL);
    CREATE INDEX tasks_pending ON tasks(state, priority DESC, task_id);
    CREATE INDEX tasks_worker ON tasks(worker_id, state);
    CREATE TRIGGER task_started AFTER UPDATE OF state ON tasks
        WHEN NEW.state = 'running' AND OLD.state != 'running'
        BEGIN UPDATE workers SET running = running + 1 WHERE worker_id = NEW.worker_id; END;
    CREATE TRIGGER task_ended AFTER UPDATE OF state ON tasks
        WHEN OLD.state = 'running' AND NEW.state != 'running'
        BEGIN UPDATE workers SET running = running - 1 WHERE worker_id = OLD.worker_id; END;
    CREATE TABLE messages (
        message_id INTEGER PRIMARY KEY, receiver_id TEXT NOT NULL, sender_id TEXT NOT NULL,
        data BLOB NOT NULL, sent REAL NOT NULL);
    CREATE INDEX messages_receiver ON messages(receiver_id, message_id);
    CREATE TABLE dirs (
        dir_id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES dirs(dir_id),
        name TEXT NOT NULL, created REAL NOT NULL, UNIQUE (parent_id, name));
    INSERT INTO dirs (dir_id, parent_id, name, created) VALUES (1, NULL, '', 0);
    CREATE TABLE files (
        file_id INTEGER PRIMARY KEY, dir_id INTEGER NOT NULL REFERENCES dirs(dir_id),
        name TEXT NOT NULL, size INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL, modified REAL NOT NULL, UNIQUE (dir_id, name));
    CREATE INDEX files_size ON files(size);
    CREATE TABLE blocks (
        file_id INTEGER NOT NULL REFERENCES files(file_id) ON DELETE CASCADE,
        block_number INTEGER NOT NULL, bytes BLOB NOT NULL,
        PRIMARY KEY (file_id, block_number)) WITHOUT ROWID;
    CREATE TABLE regions (
        region_id INTEGER PRIMARY KEY, node TEXT NOT NULL, owner TEXT,
        size INTEGER NOT NULL, created REAL NOT NULL);
    CREATE TABLE pages (
        region_id INTEGER NOT NULL REFERENCES regions(region_id) ON DELETE CASCADE,
        node TEXT NOT NULL, resident INTEGER NOT NULL DEFAULT 0,
        dirty INTEGER NOT NULL DEFAULT 0, updated REAL NOT NULL,
        PRIMARY KEY (region_id, node));
    CREATE TABLE events (
        event_id INTEGER PRIMARY KEY, time REAL NOT NULL, node TEXT, task_id INTEGER,
        kind TEXT NOT NULL, detail TEXT);
    CREATE INDEX events_task ON events(task_id, kind);
    CREATE INDEX events_detail ON events(detail, kind);
    """,
    # 2: what a POSIX mount needs (harness mount): modes, owners, the three
    # times, symlink targets; who did what in events; a directory, not
    # reachable from the root, for files unlinked while a program has them
    # open; indexes for reading a large directory in inode order.
    """
    ALTER TABLE files ADD COLUMN mode INTEGER NOT NULL DEFAULT 33188;
    ALTER TABLE files ADD COLUMN uid INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE files ADD COLUMN gid INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE files ADD COLUMN accessed REAL;
    ALTER TABLE files ADD COLUMN changed REAL;
    ALTER TABLE files ADD COLUMN target BLOB;
    ALTER TABLE dirs ADD COLUMN mode INTEGER NOT NULL DEFAULT 16877;
    ALTER TABLE dirs ADD COLUMN uid INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE dirs ADD COLUMN gid INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE dirs ADD COLUMN modified REAL;
    ALTER TABLE dirs ADD COLUMN accessed REAL;
    ALTER TABLE dirs ADD COLUMN changed REAL;
    ALTER TABLE events ADD COLUMN pid INTEGER;
    ALTER TABLE events ADD COLUMN program TEXT;
    CREATE INDEX events_program ON events(program, kind);
    CREATE INDEX files_dir ON files(dir_id, file_id);
    CREATE INDEX dirs_parent ON dirs(parent_id, dir_id);
    INSERT INTO dirs (parent_id, name, created) VALUES (NULL, '.orphans', 0);
    """,
    # 3: files_dir covers the size too, so a query over a tree's sizes (the
    # analytics benchmark) reads the index alone; readdir keeps its order.
    """
    DROP INDEX files_dir;
    CREATE INDEX files_dir ON files(dir_id, file_id, size);
    """,
]

TABLES = ("nodes", "workers", "tasks", "messages", "dirs", "files", "blocks", "regions",
          "pages", "events")


def migrate(con: sqlite3.Connection) -> int:
    """Brings a database up to the newest schema; returns its version."""
    version = con.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise sqlite3.DatabaseError(
            f"database schema version {version} is newer than this harness knows "
            f"({len(MIGRATIONS)}); upgrade the harness")
    for v in range(version, len(MIGRATIONS)):
        try:
            con.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[v]}; "
                              f"PRAGMA user_version = {v + 1}; COMMIT;")
        except sqlite3.Error:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)
