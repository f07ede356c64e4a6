"""Replication's hard cases, with stores served in this process and a relay
between two of them that a test can make hold a request (deliver it late)
or lose a reply: a late forward from a replaced primary must not overwrite
newer data on the backup, a request retried after a failover must not be
applied twice, and a cache must not fail over to a backup that missed an
acknowledged write."""

import struct
import threading

import pytest

from harness._native import transport as t
from harness._native.excache import PAGE, ExCache, MStore
from harness.errors import HarnessError, RemoteError, TransportError

P2M_CLONE = 0x0106  # DH_OP_P2M_CLONE: a copy of a region, for a forked child


def _served(tmp_path, name, store):
    """A new shm channel served by store from another thread -> client end."""
    path = str(tmp_path / f"{name}.shm")
    t.create_shm_file(path, 1 << 20)
    client, server = t.Link.shm_open(path, 0, name=name), t.Link.shm_open(path, 1, name=name)
    threading.Thread(target=store.serve, args=(server,), daemon=True).start()
    return client, server


class Relay:
    """Carries requests from a channel (its client end is returned by
    `client`) to a store and the store's replies back. hold() makes it keep
    the next request until release(); lose_reply() drops the next reply."""

    def __init__(self, tmp_path, name, store):
        path = str(tmp_path / f"{name}-in.shm")
        t.create_shm_file(path, 1 << 20)
        self.client = t.Link.shm_open(path, 0, name=f"{name}-client")
        self._in = t.Link.shm_open(path, 1, name=f"{name}-in")
        self._out, _ = _served(tmp_path, f"{name}-out", store)
        self._hold = self._lose = False
        self.held, self.release, self.delivered = (threading.Event() for _ in range(3))
        self.answers: list = []  # (request opcode, reply flags) the store gave
        threading.Thread(target=self._run, daemon=True).start()

    def hold(self) -> None:
        self._hold = True

    def lose_reply(self) -> None:
        self._lose = True

    def _run(self) -> None:
        while True:
            try:
                h, body = self._in.recv(timeout=None)
            except HarnessError:
                return
            late = self._hold
            if late:
                self._hold = False
                self.held.set()
                self.release.wait()
            self._out.send(h.opcode, body, req_id=h.req_id)
            r, answer = self._out.recv()
            self.answers.append((h.opcode, r.flags))
            if late:
                self.delivered.set()
            if self._lose:
                self._lose = False
                continue
            try:
                self._in.send(r.opcode, answer, flags=r.flags, req_id=r.req_id)
            except HarnessError:
                return


def _page(link, region_id, page=0) -> bytes:
    return link.call(t.Op.P2M_PCACHE_MISS, struct.pack("<IIQ", region_id, 1, page))


def test_a_late_forward_from_the_old_primary_does_not_overwrite_the_backup(tmp_path):
    pstore, bstore = MStore(), MStore()
    primary, _ = _served(tmp_path, "primary", pstore)
    relay = Relay(tmp_path, "replica", bstore)
    pstore.set_replica(relay.client, timeout=10.0)  # the primary waits longer than its cache
    cache = ExCache(primary, 16 * PAGE, ways=4, timeout=0.5)
    cache.set_backup(_served(tmp_path, "backup", bstore)[0])
    region = cache.alloc(4 * PAGE)
    mv = memoryview(region)
    mv[:PAGE] = b"1" * PAGE
    cache.flush()  # on both stores
    relay.hold()
    mv[:PAGE] = b"2" * PAGE
    cache.flush()  # the forward is held: the cache times out and fails over to the backup
    assert relay.held.is_set() and cache.stats()["failovers"] == 1
    mv[:PAGE] = b"3" * PAGE
    cache.flush()  # newer data, on the backup only
    relay.release.set()  # the old primary's forward of "2" arrives now
    assert relay.delivered.wait(10)
    probe = _served(tmp_path, "probe", bstore)[0]
    assert _page(probe, region.id) == b"3" * PAGE, "a late forward overwrote newer data"
    assert mv[:PAGE] == b"3" * PAGE
    # The old primary learnt it was replaced: it refuses every request now,
    # so a cache still on it fails over too instead of writing where no one reads.
    assert bstore.stats()["refused_forwards"] == 1
    assert pstore.stats()["fenced"]
    with pytest.raises(RemoteError, match="replaced"):
        _page(primary, region.id)
    del mv
    region.free()


def test_an_alloc_retried_after_a_failover_makes_one_region(tmp_path):
    pstore, bstore = MStore(), MStore()
    pstore.set_replica(_served(tmp_path, "replica", bstore)[0])
    to_primary = Relay(tmp_path, "primary", pstore)
    cache = ExCache(to_primary.client, 16 * PAGE, ways=4, timeout=0.5)
    cache.set_backup(_served(tmp_path, "backup", bstore)[0])
    to_primary.lose_reply()  # the primary makes the region (and its replica), the answer is lost
    region = cache.alloc(4 * PAGE)  # so the cache asks the backup again
    assert cache.stats()["failovers"] == 1
    assert bstore.stats()["regions"] == 1, "the retried ALLOC made a second region"
    assert pstore.stats()["regions"] == 1
    mv = memoryview(region)
    mv[:PAGE] = b"x" * PAGE
    cache.flush()
    probe = _served(tmp_path, "probe", bstore)[0]
    assert _page(probe, region.id) == b"x" * PAGE
    del mv
    region.free()
    assert bstore.stats()["regions"] == 0


def test_a_retried_free_never_frees_another_region(tmp_path):
    store = MStore()
    link, _ = _served(tmp_path, "store", store)

    def alloc() -> int:
        return struct.unpack("<I", link.call(t.Op.P2M_ALLOC, struct.pack("<Q", PAGE)))[0]

    a = alloc()
    link.call(t.Op.P2M_FREE, struct.pack("<I", a))
    b = alloc()  # another cache's region
    assert b != a, "a region id was reused"
    link.call(t.Op.P2M_FREE, struct.pack("<I", a))  # the first FREE again: answered, a no-op
    assert store.stats()["regions"] == 1
    assert len(_page(link, b)) == PAGE
    with pytest.raises(RemoteError):  # an id never given out is still an error
        link.call(t.Op.P2M_FREE, struct.pack("<I", b + 100))


def test_alloc_and_clone_with_a_token_are_idempotent(tmp_path):
    store = MStore()
    link, _ = _served(tmp_path, "store", store)
    req = struct.pack("<QQ", 2 * PAGE, 0xFEED0001)
    a = link.call(t.Op.P2M_ALLOC, req)
    assert link.call(t.Op.P2M_ALLOC, req) == a
    rid = struct.unpack("<I", a)[0]
    clone = struct.pack("<IQ", rid, 0xFEED0002)
    c1 = link.call(P2M_CLONE, clone)
    assert link.call(P2M_CLONE, clone) == c1 != a
    assert store.stats()["regions"] == 2
    with pytest.raises(RemoteError):  # the same token for another size: refused
        link.call(t.Op.P2M_ALLOC, struct.pack("<QQ", 4 * PAGE, 0xFEED0001))


def test_no_failover_to_a_backup_that_missed_a_write(tmp_path):
    pstore, bstore = MStore(), MStore()
    primary, primary_server = _served(tmp_path, "primary", pstore)
    relay = Relay(tmp_path, "replica", bstore)
    pstore.set_replica(relay.client, timeout=0.3)  # gives up on the replica before the cache
    cache = ExCache(primary, 16 * PAGE, ways=4, timeout=2.0)
    cache.set_backup(_served(tmp_path, "backup", bstore)[0])
    region = cache.alloc(4 * PAGE)
    mv = memoryview(region)
    mv[:PAGE] = b"1" * PAGE
    cache.flush()
    assert cache.stats()["backup_in_sync"]
    relay.hold()  # the replica stops answering: the primary goes on alone
    mv[:PAGE] = b"2" * PAGE
    cache.flush()  # acknowledged by the primary only
    assert pstore.stats()["replica_errors"] == 1 and not pstore.stats()["replicating"]
    s = cache.stats()
    assert s["failovers"] == 0 and not s["backup_in_sync"]
    relay.release.set()
    primary_server.close()  # now the primary is gone too
    mv[:PAGE] = b"3" * PAGE
    with pytest.raises(TransportError, match="missed"):
        cache.flush()  # refused: the backup holds "1", an acknowledged "2" is lost with the primary
    s = cache.stats()
    assert s["failovers"] == 0 and s["failovers_refused"] == 1
    probe = _served(tmp_path, "probe", bstore)[0]
    assert _page(probe, region.id) != b"3" * PAGE


def test_a_replica_must_start_empty_beside_an_empty_store(tmp_path):
    pstore, bstore = MStore(), MStore()
    link, _ = _served(tmp_path, "p", pstore)
    link.call(t.Op.P2M_ALLOC, struct.pack("<Q", PAGE))
    with pytest.raises(ValueError, match="empty"):
        pstore.set_replica(_served(tmp_path, "r", bstore)[0])
    fresh = MStore()
    blink, _ = _served(tmp_path, "b", bstore)
    blink.call(t.Op.P2M_ALLOC, struct.pack("<Q", PAGE))
    with pytest.raises(ValueError, match="empty"):
        fresh.set_replica(_served(tmp_path, "r2", bstore)[0])
