"""A file system as SQL (DBOS's File table): directories and files are rows,
file data lives in 4 KiB blocks, every operation is one transaction, and
errors are POSIX errnos. Paths are absolute; a name may not be empty, "." or
"..", contain "/" or NUL, or be longer than 255 bytes, and a path may not be
longer than 4095 (PATH_MAX with its NUL). One read returns at most 64 MiB:
a larger range (a whole sparse file of 10^12 bytes) is EFBIG, read it in parts."""

from __future__ import annotations

import errno
import sqlite3
import time
from typing import TYPE_CHECKING

from harness.errors import FSError

if TYPE_CHECKING:
    from harness.dbos.store import Store

BLOCK = 4096
ROOT = 1
MAX_PATH = 4095
MAX_READ = 64 << 20


def split(path: str) -> list[str]:
    """Checks a path and returns its components."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise FSError(errno.EINVAL, str(path))
    if len(path.encode()) > MAX_PATH:
        raise FSError(errno.ENAMETOOLONG, path)
    parts = [p for p in path.split("/") if p]
    for p in parts:
        if p in (".", "..") or "\0" in p or len(p.encode()) > 255:
            raise FSError(errno.EINVAL, path)
    return parts


def write_blocks(con: sqlite3.Connection, fid: int, offset: int, data: bytes) -> int:
    """Writes data at offset into a file's blocks (merging partial blocks with
    what is there); returns the end offset. The caller updates the size."""
    pos, end = offset, offset + len(data)
    while pos < end:
        bn, boff = divmod(pos, BLOCK)
        take = min(BLOCK - boff, end - pos)
        chunk = data[pos - offset:pos - offset + take]
        if boff or take < BLOCK:  # a partial block: merge with what is there
            row = con.execute("SELECT bytes FROM blocks WHERE file_id = ? AND "
                              "block_number = ?", (fid, bn)).fetchone()
            old = bytearray(row[0] if row else b"")
            if len(old) < boff + take:
                old.extend(bytes(boff + take - len(old)))
            old[boff:boff + take] = chunk
            chunk = bytes(old)
        con.execute("INSERT OR REPLACE INTO blocks (file_id, block_number, bytes) "
                    "VALUES (?, ?, ?)", (fid, bn, chunk))
        pos += take
    return end


def read_blocks(con: sqlite3.Connection, fid: int, offset: int, end: int) -> bytes:
    """The bytes [offset, end) of a file whose size is at least end; holes
    read as zeros, and only the blocks there are are read (not one query per
    block of a hole)."""
    out = bytearray(max(end - offset, 0))
    if offset < end:
        for bn, b in con.execute(
                "SELECT block_number, bytes FROM blocks WHERE file_id = ? AND "
                "block_number BETWEEN ? AND ?", (fid, offset // BLOCK, (end - 1) // BLOCK)):
            lo, hi = max(bn * BLOCK, offset), min(bn * BLOCK + len(b), end)
            if lo < hi:
                out[lo - offset:hi - offset] = b[lo - bn * BLOCK:hi - bn * BLOCK]
    return bytes(out)


def truncate_blocks(con: sqlite3.Connection, fid: int, size: int) -> None:
    """Drops a file's blocks past size and cuts the last one; the caller
    updates the size."""
    nblocks = -(-size // BLOCK)
    con.execute("DELETE FROM blocks WHERE file_id = ? AND block_number >= ?", (fid, nblocks))
    tail = size % BLOCK
    if tail:
        con.execute("UPDATE blocks SET bytes = substr(bytes, 1, ?) WHERE file_id = ? "
                    "AND block_number = ?", (tail, fid, nblocks - 1))


class FileSystem:
    def __init__(self, db: Store) -> None:
        from harness.dbos.cache import ReadCache

        self.db = db
        self.cache = ReadCache(db)

    # ---- lookups (inside the caller's transaction) --------------------------

    def _dir(self, con: sqlite3.Connection, parts: list[str], path: str) -> int:
        d = ROOT
        for i, name in enumerate(parts):
            row = con.execute("SELECT dir_id FROM dirs WHERE parent_id = ? AND name = ?",
                              (d, name)).fetchone()
            if row is None:
                is_file = con.execute("SELECT 1 FROM files WHERE dir_id = ? AND name = ?",
                                      (d, name)).fetchone()
                raise FSError(errno.ENOTDIR if is_file and i < len(parts) else errno.ENOENT,
                              path)
            d = row[0]
        return d

    def _parent(self, con: sqlite3.Connection, path: str) -> tuple[int, str]:
        parts = split(path)
        if not parts:
            raise FSError(errno.EEXIST, path)  # the root itself
        return self._dir(con, parts[:-1], path), parts[-1]

    def _file(self, con: sqlite3.Connection, path: str) -> tuple[int, int]:
        d, name = self._parent(con, path)
        row = con.execute("SELECT file_id, size FROM files WHERE dir_id = ? AND name = ?",
                          (d, name)).fetchone()
        if row is None:
            isdir = con.execute("SELECT 1 FROM dirs WHERE parent_id = ? AND name = ?",
                                (d, name)).fetchone()
            raise FSError(errno.EISDIR if isdir else errno.ENOENT, path)
        return row[0], row[1]

    def _exists(self, con: sqlite3.Connection, d: int, name: str) -> bool:
        return con.execute("SELECT 1 FROM files WHERE dir_id = ? AND name = ? UNION ALL "
                           "SELECT 1 FROM dirs WHERE parent_id = ? AND name = ?",
                           (d, name, d, name)).fetchone() is not None

    # ---- operations ---------------------------------------------------------

    def mkdir(self, path: str, parents: bool = False) -> None:
        with self.db.tx() as con:
            parts = split(path)
            d = ROOT
            for i, name in enumerate(parts):
                row = con.execute("SELECT dir_id FROM dirs WHERE parent_id = ? AND name = ?",
                                  (d, name)).fetchone()
                last = i == len(parts) - 1
                if row is not None:
                    if last and not parents:
                        raise FSError(errno.EEXIST, path)
                    d = row[0]
                    continue
                if con.execute("SELECT 1 FROM files WHERE dir_id = ? AND name = ?",
                               (d, name)).fetchone():
                    raise FSError(errno.EEXIST if last else errno.ENOTDIR, path)
                if not last and not parents:
                    raise FSError(errno.ENOENT, path)
                d = con.execute("INSERT INTO dirs (parent_id, name, created) VALUES (?, ?, ?) "
                                "RETURNING dir_id", (d, name, time.time())).fetchone()[0]

    def create(self, path: str, task: int | None = None) -> int:
        """A new empty file; EEXIST if the name is taken (by a file: the
        UNIQUE constraint says so; by a directory: the INSERT's guard)."""
        with self.db.tx() as con:
            d, name = self._parent(con, path)
            now = time.time()
            try:
                row = con.execute("INSERT INTO files (dir_id, name, created, modified) "
                                  "SELECT ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM dirs "
                                  "WHERE parent_id = ? AND name = ?) RETURNING file_id",
                                  (d, name, now, now, d, name)).fetchone()
            except sqlite3.IntegrityError:
                row = None
            if row is None:
                raise FSError(errno.EEXIST, path)
            fid = row[0]
            if task is not None:
                self.db.log(con, "file_create", f"file:{fid}", task)
        return fid

    def open(self, path: str) -> int:
        """The file's id; ENOENT if there is none."""
        with self.db.tx(write=False) as con:
            return self._file(con, path)[0]

    def write(self, path: str, offset: int, data: bytes, task: int | None = None) -> int:
        if offset < 0:
            raise FSError(errno.EINVAL, path)
        data = bytes(memoryview(data))  # bytes-like only: bytes(n) would make n zeros
        with self.db.tx() as con:
            fid, _ = self._file(con, path)
            end = write_blocks(con, fid, offset, data)
            con.execute("UPDATE files SET size = max(size, ?), modified = ? WHERE file_id = ?",
                        (end, time.time(), fid))
            if task is not None:
                self.db.log(con, "file_write", f"file:{fid}", task)
        return len(data)

    def read(self, path: str, offset: int = 0, size: int = -1, task: int | None = None) -> bytes:
        if offset < 0:
            raise FSError(errno.EINVAL, path)
        if task is None:  # a read that logs nothing may come from the cache
            out = self.cache.read_through(path, self._file, offset, size)
            if out is not None:
                return out
        with self.db.tx(write=task is not None) as con:
            fid, fsize = self._file(con, path)
            end = fsize if size < 0 else min(fsize, offset + size)
            if end - offset > MAX_READ:
                raise FSError(errno.EFBIG, path)
            out = read_blocks(con, fid, offset, end)
            if task is not None:
                self.db.log(con, "file_read", f"file:{fid}", task)
        return out

    def truncate(self, path: str, size: int) -> None:
        if size < 0:
            raise FSError(errno.EINVAL, path)
        with self.db.tx() as con:
            fid, _ = self._file(con, path)
            truncate_blocks(con, fid, size)
            con.execute("UPDATE files SET size = ?, modified = ? WHERE file_id = ?",
                        (size, time.time(), fid))

    def stat(self, path: str) -> dict:
        with self.db.tx(write=False) as con:
            parts = split(path)
            if not parts:
                return {"type": "dir", "size": 0, "created": 0.0, "modified": 0.0}
            d = self._dir(con, parts[:-1], path)
            row = con.execute("SELECT size, created, modified FROM files WHERE dir_id = ? AND "
                              "name = ?", (d, parts[-1])).fetchone()
            if row:
                return {"type": "file", "size": row[0], "created": row[1], "modified": row[2]}
            row = con.execute("SELECT created FROM dirs WHERE parent_id = ? AND name = ?",
                              (d, parts[-1])).fetchone()
            if row is None:
                raise FSError(errno.ENOENT, path)
            return {"type": "dir", "size": 0, "created": row[0], "modified": row[0]}

    def listdir(self, path: str) -> list[str]:
        with self.db.tx(write=False) as con:
            parts = split(path)
            if parts and con.execute(
                    "SELECT 1 FROM files WHERE dir_id = ? AND name = ?",
                    (self._dir(con, parts[:-1], path), parts[-1])).fetchone():
                raise FSError(errno.ENOTDIR, path)
            d = self._dir(con, parts, path)
            return [r[0] for r in con.execute(
                "SELECT name FROM dirs WHERE parent_id = ? UNION ALL "
                "SELECT name FROM files WHERE dir_id = ? ORDER BY 1", (d, d))]

    def unlink(self, path: str, task: int | None = None) -> None:
        with self.db.tx() as con:
            fid, _ = self._file(con, path)
            con.execute("DELETE FROM files WHERE file_id = ?", (fid,))
            if task is not None:
                self.db.log(con, "file_unlink", f"file:{fid}", task)

    def rmdir(self, path: str) -> None:
        with self.db.tx() as con:
            parts = split(path)
            if not parts:
                raise FSError(errno.EBUSY, path)
            d = self._dir(con, parts, path)
            if self._children(con, d):
                raise FSError(errno.ENOTEMPTY, path)
            con.execute("DELETE FROM dirs WHERE dir_id = ?", (d,))

    def _children(self, con: sqlite3.Connection, d: int) -> bool:
        return con.execute("SELECT 1 FROM dirs WHERE parent_id = ? UNION ALL "
                           "SELECT 1 FROM files WHERE dir_id = ? LIMIT 1", (d, d)).fetchone() \
            is not None

    def rename(self, old: str, new: str) -> None:
        """Moves a file or directory; replaces an existing file at new,
        never a directory (EEXIST) and never into itself (EINVAL)."""
        with self.db.tx() as con:
            od, oname = self._parent(con, old)
            nd, nname = self._parent(con, new)
            frow = con.execute("SELECT file_id FROM files WHERE dir_id = ? AND name = ?",
                               (od, oname)).fetchone()
            drow = con.execute("SELECT dir_id FROM dirs WHERE parent_id = ? AND name = ?",
                               (od, oname)).fetchone()
            if frow is None and drow is None:
                raise FSError(errno.ENOENT, old)
            if (od, oname) == (nd, nname):
                return
            if con.execute("SELECT 1 FROM dirs WHERE parent_id = ? AND name = ?",
                           (nd, nname)).fetchone():
                raise FSError(errno.EEXIST, new)
            if frow is not None:
                con.execute("DELETE FROM files WHERE dir_id = ? AND name = ?", (nd, nname))
                con.execute("UPDATE files SET dir_id = ?, name = ? WHERE file_id = ?",
                            (nd, nname, frow[0]))
                return
            if con.execute("SELECT 1 FROM files WHERE dir_id = ? AND name = ?",
                           (nd, nname)).fetchone():
                raise FSError(errno.ENOTDIR, new)
            anc = nd  # a directory may not move below itself
            while anc is not None:
                if anc == drow[0]:
                    raise FSError(errno.EINVAL, new)
                anc = con.execute("SELECT parent_id FROM dirs WHERE dir_id = ?",
                                  (anc,)).fetchone()[0]
            con.execute("UPDATE dirs SET parent_id = ?, name = ? WHERE dir_id = ?",
                        (nd, nname, drow[0]))

    def largest(self, path: str, n: int = 10) -> dict:
        """The n largest files under a directory tree, and the tree's total
        size: one recursive query (the analytics benchmark)."""
        with self.db.tx(write=False) as con:
            d = self._dir(con, split(path), path)
            rows = con.execute(
                "WITH RECURSIVE tree(dir_id) AS (SELECT ? UNION ALL "
                "SELECT dirs.dir_id FROM dirs JOIN tree ON dirs.parent_id = tree.dir_id) "
                "SELECT f.file_id, f.size, (SELECT sum(size) FROM files WHERE dir_id IN tree) "
                "FROM files f WHERE f.dir_id IN tree ORDER BY f.size DESC LIMIT ?",
                (d, n)).fetchall()
            top = [(self._path(con, fid), size) for fid, size, _ in rows]
        return {"largest": top, "total": rows[0][2] if rows else 0}

    def _path(self, con: sqlite3.Connection, fid: int) -> str:
        d, name = con.execute("SELECT dir_id, name FROM files WHERE file_id = ?",
                              (fid,)).fetchone()
        parts = [name]
        while d != ROOT:
            d, name = con.execute("SELECT parent_id, name FROM dirs WHERE dir_id = ?",
                                  (d,)).fetchone()
            parts.append(name)
        return "/" + "/".join(reversed(parts))
