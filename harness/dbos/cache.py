"""A read cache of file blocks and sizes in front of the DBOS store, valid
until anything commits to the database, from this connection or any other.

SQLite's WAL index (the database's `-shm` file, which every connection in
WAL mode maps) begins with a header that each commit rewrites (its change
counter, last frame and salts), kept twice so a reader can tell a header
being written from a settled one (https://www.sqlite.org/walformat.html,
"the WAL-index header"). Reading those 96 bytes from a mapping costs a
memory compare, where asking SQLite (`PRAGMA data_version`) is a statement
(~2.5 µs from Python here, three times a page-cache read). A header that
differs from the one seen last, or whose two copies differ, clears the
cache; a read that fills it runs in a transaction begun after the header
was read, so what is cached is never older than the header it is valid
for. Without a `-shm` file (an in-memory database) nothing is cached."""

from __future__ import annotations

import errno
import mmap
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from harness.dbos.fs import BLOCK, MAX_READ, read_blocks
from harness.errors import FSError

if TYPE_CHECKING:
    from harness.dbos.store import Store

HEADER = 48  # one copy of the WAL-index header
MAX_BLOCKS = 16384  # 64 MiB of blocks; the oldest go first
MAX_SPAN = 32  # blocks: a larger read goes to SQLite alone (FUSE reads 128 KiB at most)


def _end(fsize: int, offset: int, size: int, key: Any) -> int:
    end = fsize if size < 0 else min(fsize, offset + size)
    if end - offset > MAX_READ:
        raise FSError(errno.EFBIG, str(key))
    return end


class ReadCache:
    def __init__(self, db: Store, max_blocks: int = MAX_BLOCKS) -> None:
        self.db, self.max_blocks = db, max(max_blocks, MAX_SPAN)
        self.files: dict[Any, tuple] = {}  # a caller's key (path, inode) -> its row
        self.blocks: dict[tuple[int, int], bytes] = {}  # (file, block) -> bytes (b"": a hole)
        self._map: mmap.mmap | None = None
        self._seen = b""

    def fresh(self) -> bool:
        """Under the store's lock: True if the cache may be used, after
        clearing it if anything committed since the last call."""
        if self._map is None and not self._open():
            return False
        head = self._map[:2 * HEADER]
        if head[:HEADER] != head[HEADER:] or head[:HEADER] != self._seen:
            self.files.clear()
            self.blocks.clear()
            self._seen = head[:HEADER] if head[:HEADER] == head[HEADER:] else b""
        return True

    def _open(self) -> bool:
        self._map = self.db.wal_index(2 * HEADER)
        return self._map is not None

    def read_through(self, key: Any, resolve: Callable[[sqlite3.Connection, Any], tuple],
                     offset: int, size: int) -> bytes | None:
        """A read of size bytes (-1: to the end) at offset of the file `key`
        names; resolve(con, key) gives its row (file id, size, ...). From
        the cache where it holds the blocks, else in one read transaction
        that fills it; None if no cache can be used here (the caller reads
        the tables itself). A read of more than MAX_READ is EFBIG."""
        with self.db.lock:
            if not self.fresh():
                return None
            hit = self.files.get(key)
            if hit is not None:
                out = self.cached(hit[0], offset, _end(hit[1], offset, size, key))
                if out is not None:
                    return out
            with self.db.tx(write=False) as con:
                row = self.files[key] = resolve(con, key)
                return self.read(con, row[0], offset, _end(row[1], offset, size, key))

    def cached(self, fid: int, offset: int, end: int) -> bytes | None:
        """The bytes [offset, end) of a file at least end long if the cache
        has every block of them, else None. Holes read as zeros."""
        if offset >= end:
            return b""
        lo, hi = offset // BLOCK, (end - 1) // BLOCK
        if lo == hi:  # the common case: one block, often whole
            b = self.blocks.get((fid, lo))
            if b is None:
                return None
            start, stop = offset - lo * BLOCK, end - lo * BLOCK
            if stop <= len(b):
                return b[start:stop] if start or stop < len(b) else b
        elif hi - lo >= MAX_SPAN or any((fid, bn) not in self.blocks
                                        for bn in range(lo, hi + 1)):
            return None
        out = bytearray(end - offset)
        for bn in range(lo, hi + 1):
            b = self.blocks[(fid, bn)]
            s, e = max(bn * BLOCK, offset), min(bn * BLOCK + len(b), end)
            if s < e:
                out[s - offset:e - offset] = b[s - bn * BLOCK:e - bn * BLOCK]
        return bytes(out)

    def read(self, con: sqlite3.Connection, fid: int, offset: int, end: int) -> bytes:
        """As cached(), in the caller's transaction: what the cache lacks is
        read from the blocks table and kept (a span of more than MAX_SPAN
        blocks is read and not kept)."""
        out = self.cached(fid, offset, end)
        if out is not None:
            return out
        lo, hi = offset // BLOCK, (end - 1) // BLOCK
        if hi - lo >= MAX_SPAN:
            return read_blocks(con, fid, offset, end)
        got = dict(con.execute("SELECT block_number, bytes FROM blocks WHERE file_id = ? AND "
                               "block_number BETWEEN ? AND ?", (fid, lo, hi)))
        for bn in range(lo, hi + 1):
            self.blocks[(fid, bn)] = bytes(got.get(bn, b""))
        while len(self.blocks) > self.max_blocks:
            del self.blocks[next(iter(self.blocks))]
        return self.cached(fid, offset, end)  # type: ignore[return-value]
