"""The DBOS file system by inode, for a POSIX mount (harness.dbos.mount):
the kernel resolves paths and asks by (parent inode, name), so every
operation here is one transaction over the `dirs`, `files` and `blocks`
tables that harness.dbos.fs reads by path.

Inodes: directory d is 2d-1 (so the root, dir 1, is FUSE's inode 1) and
file f is 2f. A file unlinked or renamed over while the kernel still knows
it moves to the `.orphans` directory (not under the root) and is deleted
when the kernel forgets it, or when the next mount starts. Hard links are
not supported (EPERM); symlinks are files with a target. Errors are
FSErrors with POSIX errnos. Every method takes and returns plain values
(attributes are dicts), so the same calls can cross the transport."""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from harness.dbos.fs import BLOCK, MAX_READ, read_blocks, truncate_blocks, write_blocks
from harness.errors import FSError

if TYPE_CHECKING:
    from harness.dbos.store import Store

NAME_MAX = 255
FILE_COLS = "file_id, mode, uid, gid, size, accessed, modified, changed, created, dir_id"
DIR_COLS = "dir_id, mode, uid, gid, accessed, modified, changed, created"


def dir_ino(d: int) -> int:
    return 2 * d - 1


def file_ino(f: int) -> int:
    return 2 * f


def _name(name: bytes | str) -> str:
    if isinstance(name, bytes):
        try:
            name = name.decode()
        except UnicodeDecodeError:
            raise FSError(errno.EINVAL, "a name that is not UTF-8") from None
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise FSError(errno.EINVAL, name)
    if len(name.encode()) > NAME_MAX:
        raise FSError(errno.ENAMETOOLONG, name)
    return name


class VFS:
    def __init__(self, db: Store) -> None:
        from harness.dbos.cache import ReadCache

        self.db = db
        self.cache = ReadCache(db)
        self.unsynced = False  # a commit since the last sync()
        with db.tx(write=False) as con:
            self.orphans = con.execute("SELECT dir_id FROM dirs WHERE parent_id IS NULL AND "
                                       "name = '.orphans'").fetchone()[0]

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self.db.tx() as con:
            yield con
        self.unsynced = True

    # ---- attributes ---------------------------------------------------------

    def _file_attr(self, con: sqlite3.Connection, row: tuple) -> dict:
        fid, mode, uid, gid, size, at, mt, ct, created, d = row
        mt = mt if mt is not None else created
        return {"ino": file_ino(fid), "mode": mode, "nlink": 0 if d == self.orphans else 1,
                "uid": uid, "gid": gid, "size": size, "blocks": -(-size // BLOCK) * 8,
                "atime": at if at is not None else mt, "mtime": mt,
                "ctime": ct if ct is not None else mt}

    def _dir_attr(self, con: sqlite3.Connection, row: tuple) -> dict:
        d, mode, uid, gid, at, mt, ct, created = row
        subdirs = con.execute("SELECT count(*) FROM dirs WHERE parent_id = ?", (d,)).fetchone()[0]
        mt = mt if mt is not None else created
        return {"ino": dir_ino(d), "mode": mode, "nlink": 2 + subdirs, "uid": uid, "gid": gid,
                "size": BLOCK, "blocks": 8, "atime": at if at is not None else mt, "mtime": mt,
                "ctime": ct if ct is not None else mt}

    def _attr(self, con: sqlite3.Connection, ino: int) -> dict:
        if ino % 2:
            row = con.execute(f"SELECT {DIR_COLS} FROM dirs WHERE dir_id = ?",
                              ((ino + 1) // 2,)).fetchone()
            if row is None or row[0] == self.orphans:
                raise FSError(errno.ENOENT, f"inode {ino}")
            return self._dir_attr(con, row)
        row = con.execute(f"SELECT {FILE_COLS} FROM files WHERE file_id = ?",
                          (ino // 2,)).fetchone()
        if row is None:
            raise FSError(errno.ENOENT, f"inode {ino}")
        return self._file_attr(con, row)

    def _dir_of(self, con: sqlite3.Connection, ino: int) -> int:
        if not ino % 2:
            raise FSError(errno.ENOTDIR, f"inode {ino}")
        d = (ino + 1) // 2
        if d == self.orphans or con.execute("SELECT 1 FROM dirs WHERE dir_id = ?",
                                            (d,)).fetchone() is None:
            raise FSError(errno.ENOENT, f"inode {ino}")
        return d

    def _file_of(self, con: sqlite3.Connection, ino: int) -> tuple[int, int, int]:
        """(file id, size, mode) of a file inode."""
        if ino % 2:
            raise FSError(errno.EISDIR, f"inode {ino}")
        row = con.execute("SELECT size, mode FROM files WHERE file_id = ?", (ino // 2,)
                          ).fetchone()
        if row is None:
            raise FSError(errno.ENOENT, f"inode {ino}")
        return ino // 2, row[0], row[1]

    def _entry(self, con: sqlite3.Connection, d: int, name: str) -> int | None:
        """The inode of a name in directory d, or None."""
        row = con.execute("SELECT file_id FROM files WHERE dir_id = ? AND name = ?",
                          (d, name)).fetchone()
        if row:
            return file_ino(row[0])
        row = con.execute("SELECT dir_id FROM dirs WHERE parent_id = ? AND name = ?",
                          (d, name)).fetchone()
        return dir_ino(row[0]) if row else None

    def _touch_dir(self, con: sqlite3.Connection, d: int, now: float) -> None:
        con.execute("UPDATE dirs SET modified = ?, changed = ? WHERE dir_id = ?", (now, now, d))

    # ---- lookups ------------------------------------------------------------

    def lookup(self, parent: int, name: bytes | str) -> dict:
        with self.db.tx(write=False) as con:
            d = self._dir_of(con, parent)
            ino = self._entry(con, d, _name(name))
            if ino is None:
                raise FSError(errno.ENOENT, _name(name))
            return self._attr(con, ino)

    def getattr(self, ino: int) -> dict:
        with self.db.tx(write=False) as con:
            return self._attr(con, ino)

    def readlink(self, ino: int) -> bytes:
        with self.db.tx(write=False) as con:
            row = con.execute("SELECT mode, target FROM files WHERE file_id = ?",
                              (ino // 2,)).fetchone() if not ino % 2 else None
            if row is None or not stat.S_ISLNK(row[0]):
                raise FSError(errno.EINVAL, f"inode {ino} is not a symlink")
            return bytes(row[1])

    def readdir(self, ino: int, after: int = 0, limit: int = 256) -> list[tuple[str, dict]]:
        """Up to limit entries with inodes above after, in inode order, so a
        directory of any size is read in parts and an offset stays valid
        while entries come and go."""
        with self.db.tx(write=False) as con:
            d = self._dir_of(con, ino)
            dirs = con.execute(f"SELECT name, {DIR_COLS} FROM dirs WHERE parent_id = ? AND "
                               "dir_id > ? ORDER BY dir_id LIMIT ?",
                               (d, (after + 1) // 2, limit)).fetchall()
            files = con.execute(f"SELECT name, {FILE_COLS} FROM files WHERE dir_id = ? AND "
                                "file_id > ? ORDER BY file_id LIMIT ?",
                                (d, after // 2, limit)).fetchall()
            out = [(r[0], self._dir_attr(con, r[1:])) for r in dirs]
            out += [(r[0], self._file_attr(con, r[1:])) for r in files]
        out.sort(key=lambda e: e[1]["ino"])
        return out[:limit]

    def statfs(self) -> dict:
        st = os.statvfs(os.path.dirname(os.path.abspath(self.db.path)) or ".")
        with self.db.tx(write=False) as con:
            nfiles = con.execute("SELECT (SELECT count(*) FROM files) + "
                                 "(SELECT count(*) FROM dirs)").fetchone()[0]
        scale = st.f_frsize / BLOCK
        return {"bsize": BLOCK, "frsize": BLOCK, "blocks": int(st.f_blocks * scale),
                "bfree": int(st.f_bfree * scale), "bavail": int(st.f_bavail * scale),
                "files": nfiles + st.f_ffree, "ffree": st.f_ffree, "namemax": NAME_MAX}

    # ---- making and removing names ------------------------------------------

    def _free_name(self, con: sqlite3.Connection, parent: int, name: bytes | str
                   ) -> tuple[int, str]:
        """(directory, name) for a new entry; EEXIST if the name is taken."""
        d, name = self._dir_of(con, parent), _name(name)
        if self._entry(con, d, name) is not None:
            raise FSError(errno.EEXIST, name)
        return d, name

    def _new_file(self, parent: int, name: bytes | str, mode: int, uid: int, gid: int,
                  target: bytes | None = None) -> dict:
        with self._tx() as con:
            d, name = self._free_name(con, parent, name)
            now = time.time()
            fid = con.execute("INSERT INTO files (dir_id, name, size, created, modified, mode, "
                              "uid, gid, target) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                              "RETURNING file_id",
                              (d, name, len(target or b""), now, now, mode, uid, gid, target)
                              ).fetchone()[0]
            self._touch_dir(con, d, now)
            return self._attr(con, file_ino(fid))

    def create(self, parent: int, name: bytes | str, mode: int, uid: int = 0,
               gid: int = 0) -> dict:
        """A new regular file (mknod of S_IFREG too); other node types are EPERM."""
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise FSError(errno.EPERM, "only regular files, directories and symlinks")
        return self._new_file(parent, name, stat.S_IFREG | stat.S_IMODE(mode), uid, gid)

    def symlink(self, parent: int, name: bytes | str, target: bytes, uid: int = 0,
                gid: int = 0) -> dict:
        return self._new_file(parent, name, stat.S_IFLNK | 0o777, uid, gid, bytes(target))

    def mkdir(self, parent: int, name: bytes | str, mode: int, uid: int = 0,
              gid: int = 0) -> dict:
        with self._tx() as con:
            d, name = self._free_name(con, parent, name)
            now = time.time()
            nd = con.execute("INSERT INTO dirs (parent_id, name, created, modified, mode, uid, "
                             "gid) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING dir_id",
                             (d, name, now, now, stat.S_IFDIR | stat.S_IMODE(mode), uid, gid)
                             ).fetchone()[0]
            self._touch_dir(con, d, now)
            return self._attr(con, dir_ino(nd))

    def _drop_file(self, con: sqlite3.Connection, fid: int, keep: bool, now: float) -> None:
        """Removes a file's name: the file goes to the orphans while the
        kernel still knows it (keep), else at once with its blocks."""
        if keep:
            con.execute("UPDATE files SET dir_id = ?, name = ?, changed = ? WHERE file_id = ?",
                        (self.orphans, str(fid), now, fid))
        else:
            con.execute("DELETE FROM files WHERE file_id = ?", (fid,))

    def unlink(self, parent: int, name: bytes | str, keep: bool = True) -> int:
        """Removes a file's name; returns its inode."""
        with self._tx() as con:
            d, name = self._dir_of(con, parent), _name(name)
            ino = self._entry(con, d, name)
            if ino is None:
                raise FSError(errno.ENOENT, name)
            if ino % 2:
                raise FSError(errno.EISDIR, name)
            now = time.time()
            self._drop_file(con, ino // 2, keep, now)
            self._touch_dir(con, d, now)
            return ino

    def rmdir(self, parent: int, name: bytes | str) -> None:
        with self._tx() as con:
            d, name = self._dir_of(con, parent), _name(name)
            ino = self._entry(con, d, name)
            if ino is None:
                raise FSError(errno.ENOENT, name)
            if not ino % 2:
                raise FSError(errno.ENOTDIR, name)
            self._rmdir(con, (ino + 1) // 2, name)
            self._touch_dir(con, d, time.time())

    def _rmdir(self, con: sqlite3.Connection, d: int, name: str) -> None:
        if con.execute("SELECT 1 FROM dirs WHERE parent_id = ? UNION ALL "
                       "SELECT 1 FROM files WHERE dir_id = ? LIMIT 1", (d, d)).fetchone():
            raise FSError(errno.ENOTEMPTY, name)
        con.execute("DELETE FROM dirs WHERE dir_id = ?", (d,))

    def rename(self, old_parent: int, old: bytes | str, new_parent: int, new: bytes | str,
               noreplace: bool = False, keep: bool = True) -> int | None:
        """POSIX rename: replaces a file, or an empty directory by a
        directory; never moves a directory below itself. Returns the inode
        of the file it replaced, if any."""
        with self._tx() as con:
            od, old = self._dir_of(con, old_parent), _name(old)
            nd, new = self._dir_of(con, new_parent), _name(new)
            src = self._entry(con, od, old)
            if src is None:
                raise FSError(errno.ENOENT, old)
            dst = self._entry(con, nd, new)
            if dst == src:
                return None
            if dst is not None and noreplace:
                raise FSError(errno.EEXIST, new)
            now = time.time()
            replaced = None
            if src % 2:  # a directory
                anc = nd
                while anc is not None:  # not into itself or below
                    if anc == (src + 1) // 2:
                        raise FSError(errno.EINVAL, new)
                    anc = con.execute("SELECT parent_id FROM dirs WHERE dir_id = ?",
                                      (anc,)).fetchone()[0]
                if dst is not None:
                    if not dst % 2:
                        raise FSError(errno.ENOTDIR, new)
                    self._rmdir(con, (dst + 1) // 2, new)
                con.execute("UPDATE dirs SET parent_id = ?, name = ?, changed = ? "
                            "WHERE dir_id = ?", (nd, new, now, (src + 1) // 2))
            else:
                if dst is not None:
                    if dst % 2:
                        raise FSError(errno.EISDIR, new)
                    self._drop_file(con, dst // 2, keep, now)
                    replaced = dst
                con.execute("UPDATE files SET dir_id = ?, name = ?, changed = ? "
                            "WHERE file_id = ?", (nd, new, now, src // 2))
            self._touch_dir(con, od, now)
            self._touch_dir(con, nd, now)
            return replaced

    def forget(self, ino: int) -> None:
        """The kernel no longer knows this inode: an orphan goes for good."""
        if not ino % 2:
            with self._tx() as con:
                con.execute("DELETE FROM files WHERE file_id = ? AND dir_id = ?",
                            (ino // 2, self.orphans))

    def purge_orphans(self) -> int:
        """Deletes every orphan (no kernel knows them after a mount ends)."""
        with self._tx() as con:
            return con.execute("DELETE FROM files WHERE dir_id = ?", (self.orphans,)).rowcount

    # ---- attributes and data ------------------------------------------------

    def setattr(self, ino: int, mode: int | None = None, uid: int | None = None,
                gid: int | None = None, size: int | None = None, atime: float | None = None,
                mtime: float | None = None) -> dict:
        with self._tx() as con:
            now = time.time()
            if ino % 2:
                if size is not None:
                    raise FSError(errno.EISDIR, f"inode {ino}")
                table, key = "dirs", "dir_id"
                rid = self._dir_of(con, ino)
                old = con.execute("SELECT mode FROM dirs WHERE dir_id = ?", (rid,)).fetchone()[0]
            else:
                table, key = "files", "file_id"
                rid, _, old = self._file_of(con, ino)
                if size is not None:
                    if size < 0:
                        raise FSError(errno.EINVAL, f"inode {ino}")
                    truncate_blocks(con, rid, size)
                    con.execute("UPDATE files SET size = ?, modified = ? WHERE file_id = ?",
                                (size, now, rid))
            sets = {"changed": now}
            if mode is not None:
                sets["mode"] = stat.S_IFMT(old) | stat.S_IMODE(mode)
            if uid is not None:
                sets["uid"] = uid
            if gid is not None:
                sets["gid"] = gid
            if atime is not None:
                sets["accessed"] = atime
            if mtime is not None:
                sets["modified"] = mtime
            con.execute(f"UPDATE {table} SET {', '.join(f'{k} = ?' for k in sets)} "
                        f"WHERE {key} = ?", (*sets.values(), rid))
            return self._attr(con, ino)

    def read(self, ino: int, offset: int, size: int) -> bytes:
        """From the read cache (harness.dbos.cache) where it can."""
        if offset < 0 or size < 0:
            raise FSError(errno.EINVAL, f"inode {ino}")
        size = min(size, MAX_READ)
        out = self.cache.read_through(ino, self._file_of, offset, size)
        if out is not None:
            return out
        with self.db.tx(write=False) as con:
            fid, fsize, _ = self._file_of(con, ino)
            return read_blocks(con, fid, offset, min(fsize, offset + size))

    def write(self, ino: int, offset: int, data: bytes) -> int:
        if offset < 0:
            raise FSError(errno.EINVAL, f"inode {ino}")
        data = bytes(memoryview(data))
        with self._tx() as con:
            fid, size, _ = self._file_of(con, ino)
            end = write_blocks(con, fid, offset, data)
            now = time.time()
            if end > size:
                con.execute("UPDATE files SET size = ?, modified = ?, changed = ? "
                            "WHERE file_id = ?", (end, now, now, fid))
            else:  # size not SET: SQLite then leaves the files_size index alone
                con.execute("UPDATE files SET modified = ?, changed = ? WHERE file_id = ?",
                            (now, now, fid))
        return len(data)

    # ---- provenance and durability ------------------------------------------

    def log(self, events: list[tuple]) -> None:
        """Provenance events, one transaction for the batch: each is (time,
        kind, inode, pid, program, task)."""
        if events:
            with self._tx() as con:
                con.executemany(
                    "INSERT INTO events (time, node, task_id, kind, detail, pid, program) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(t, self.db.node or None, task, kind, f"file:{ino // 2}", pid, prog)
                     for t, kind, ino, pid, prog, task in events])

    def sync(self) -> None:
        """Makes every committed transaction durable: the store commits
        without waiting for the disk (synchronous=NORMAL), and fsync of the
        WAL here is what a program's fsync waits for. The database file
        needs none: with synchronous=NORMAL SQLite syncs it at every
        checkpoint, before the WAL starts over. Nothing committed since the
        last sync: nothing to do."""
        with self.db.lock:
            if not self.unsynced:
                return
            wal = self.db.path + "-wal"
            fd = os.open(wal if os.path.exists(wal) else self.db.path, os.O_RDONLY)
            try:
                os.fdatasync(fd)  # as SQLite syncs its WAL: the data and the size
            finally:
                os.close(fd)
            self.unsynced = False
