"""ExCache: real page faults filled over a real link from a memory store
served by C, checked byte for byte against a plain bytearray."""

import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness._native import transport as t
from harness._native.excache import PAGE, ExCache, MStore, floor_fault

CACHE_PAGES = 16


@pytest.fixture
def mnode(tmp_path):
    """A memory store serving one shm channel from another thread."""
    path = str(tmp_path / "excache.shm")
    t.create_shm_file(path, 1 << 20)
    client, server = t.Link.shm_open(path, 0), t.Link.shm_open(path, 1)
    store = MStore()
    th = threading.Thread(target=store.serve, args=(server,), daemon=True)
    th.start()
    yield client, store
    client.close()
    th.join(5)


def make(link, policy="fifo", fault_mode="sigbus", ways=4, prefetch=1):
    return ExCache(link, CACHE_PAGES * PAGE, ways=ways, policy=policy, fault_mode=fault_mode,
                   prefetch=prefetch)


ops = st.lists(st.tuples(st.booleans(), st.integers(0, 4 * CACHE_PAGES * PAGE - 1),
                         st.binary(min_size=1, max_size=300)), min_size=1, max_size=60)


@pytest.mark.parametrize("prefetch", [1, 4])
@pytest.mark.parametrize("fault_mode", ["sigbus", "thread"])
@pytest.mark.parametrize("policy", ["fifo", "lru", "random"])
def test_random_reads_and_writes_match_a_bytearray(mnode, policy, fault_mode, prefetch):
    link, _ = mnode
    cache = make(link, policy, fault_mode, prefetch=prefetch)
    size = 4 * CACHE_PAGES * PAGE  # four times the cache

    @settings(max_examples=25, deadline=None)
    @given(ops)
    def check(seq):
        region = cache.alloc(size)
        model = bytearray(size)
        mv = memoryview(region)
        for write, off, data in seq:
            data = data[:size - off]
            if write:
                mv[off:off + len(data)] = data
                model[off:off + len(data)] = data
            else:
                assert mv[off:off + len(data)] == model[off:off + len(data)]
        assert mv.tobytes() == bytes(model)  # every page, through the cache
        mv.release()
        region.free()

    check()
    s = cache.stats()
    assert s["misses"] > 0 and s["evictions"] > 0 and s["dirty_flushes"] > 0


def test_data_through_a_cache_a_quarter_its_size_comes_back(mnode):
    link, store = mnode
    cache = make(link, ways=CACHE_PAGES)
    region = cache.alloc(4 * CACHE_PAGES * PAGE)
    mv = memoryview(region)
    for p in range(4 * CACHE_PAGES):
        mv[p * PAGE:(p + 1) * PAGE] = bytes([p % 256]) * PAGE
    for p in range(4 * CACHE_PAGES):
        assert mv[p * PAGE:(p + 1) * PAGE] == bytes([p % 256]) * PAGE
    s = cache.stats()
    assert s["zero_fills"] == 4 * CACHE_PAGES       # first touches: no round trip
    assert s["dirty_flushes"] >= 3 * CACHE_PAGES    # written pages went to the mnode
    assert s["remote_fetches"] >= 3 * CACHE_PAGES
    assert s["piggybacked"] > 0                     # flushes rode on misses
    assert store.stats()["pages_stored"] == s["dirty_flushes"]


def test_clean_lines_are_dropped_not_written_back(mnode):
    link, store = mnode
    cache = make(link, ways=CACHE_PAGES)
    region = cache.alloc(8 * CACHE_PAGES * PAGE)
    mv = memoryview(region)
    for p in range(8 * CACHE_PAGES):  # reads only
        assert mv[p * PAGE] == 0
    s = cache.stats()
    assert s["dirty_flushes"] == 0 and s["clean_drops"] == 7 * CACHE_PAGES
    assert s["wp_faults"] == 0 and store.stats()["flushes"] == 0


def test_first_write_to_a_clean_line_marks_it_dirty_once(mnode):
    link, _ = mnode
    cache = make(link)
    region = cache.alloc(PAGE)
    mv = memoryview(region)
    assert mv[0] == 0          # a miss: installed clean, write-protected
    mv[0] = 1                  # a write-protect fault: now dirty
    mv[1] = 2                  # no fault
    assert cache.stats()["wp_faults"] == 1
    assert region.stats() == {"resident": 1, "dirty": 1}
    cache.flush()
    assert region.stats() == {"resident": 1, "dirty": 0}


def test_prefetch_brings_the_following_lines_in_one_round_trip(mnode):
    link, store = mnode
    cache = make(link, ways=4, prefetch=4)
    n = 4 * CACHE_PAGES
    region = cache.alloc(n * PAGE)
    mv = memoryview(region)
    for p in range(n):
        mv[p * PAGE:(p + 1) * PAGE] = bytes([p % 251]) * PAGE
    cache.flush()
    cache.reset_stats()
    served = store.stats()["misses_served"]
    for p in range(n):  # a sequential read: one miss in four
        assert mv[p * PAGE:(p + 1) * PAGE] == bytes([p % 251]) * PAGE
    s = cache.stats()
    assert s["misses"] == n // 4 and s["prefetched"] == n - n // 4
    assert store.stats()["misses_served"] - served == n // 4
    assert s["dirty_flushes"] == 0 and s["evictions"] == n


def test_a_prefetch_window_carries_its_victims_write_backs(mnode):
    link, _ = mnode
    cache = make(link, ways=4, prefetch=4)
    region = cache.alloc(8 * CACHE_PAGES * PAGE)
    mv = memoryview(region)
    for p in range(8 * CACHE_PAGES):  # every page reaches the mnode, dirty
        mv[p * PAGE] = 1
    cache.flush()
    for p in range(4 * CACHE_PAGES, 5 * CACHE_PAGES):  # fill the cache with dirty lines
        mv[p * PAGE] = 2
    cache.reset_stats()
    assert mv[0] == 1  # its victim is dirty, and so are the next three pages' victims
    s = cache.stats()
    assert (s["misses"], s["prefetched"], s["piggybacked"], s["dirty_flushes"]) == (1, 3, 4, 4)
    # The four write-backs went in that one request: each page reads back as written.
    assert [mv[p * PAGE] for p in range(4 * CACHE_PAGES, 5 * CACHE_PAGES)] == [2] * CACHE_PAGES


def test_bad_sizes_and_arguments(mnode):
    link, _ = mnode
    with pytest.raises(ValueError):
        ExCache(link, 3 * PAGE, ways=2)  # not a multiple of ways pages
    with pytest.raises(ValueError, match="policy"):
        ExCache(link, 16 * PAGE, policy="mru")
    with pytest.raises(ValueError, match="prefetch must be 1 to 16"):
        ExCache(link, 16 * PAGE, ways=4, prefetch=5)  # more than its 4 sets
    cache = make(link)
    with pytest.raises(ValueError):
        cache.alloc(1000)
    region = cache.alloc(PAGE)
    mv = memoryview(region)
    with pytest.raises(BufferError):
        region.free()
    mv.release()
    region.free()
    with pytest.raises(ValueError, match="freed"):
        memoryview(region)


def test_the_floor_is_a_real_fault():
    samples = sorted(floor_fault("sigbus", 200))
    assert samples[100] > 0


DIES = textwrap.dedent("""
    import os, signal, sys
    from harness.nodes.cluster import open_cluster
    c = open_cluster("lego3", cache="64KiB")
    r = c.alloc(1 << 20)
    mv = memoryview(r)
    for p in range(256):
        mv[p * 4096] = 1                      # most pages now live on the mnode
    os.kill(c.nodes["mnode0"].runner.pid, signal.SIGKILL)
    print("killed", flush=True)
    print(mv[0])                              # a miss the mnode can no longer serve
    print("NOT REACHED", flush=True)
""")


def test_a_dead_memory_node_gives_a_clear_error_not_a_hang():
    p = subprocess.run([sys.executable, "-c", DIES], capture_output=True, text=True, timeout=60)
    assert "killed" in p.stdout and "NOT REACHED" not in p.stdout
    assert p.returncode == -signal.SIGABRT
    assert "cannot serve a page fault" in p.stderr and "memory node" in p.stderr


def test_the_memory_node_checks_a_miss_request_s_page_count(mnode):
    import struct

    from harness.errors import RemoteError

    link, _ = mnode
    rid = struct.unpack("<I", link.call(t.Op.P2M_ALLOC, struct.pack("<Q", 4 * PAGE)))[0]
    assert len(link.call(t.Op.P2M_PCACHE_MISS, struct.pack("<IIQ", rid, 4, 0))) == 4 * PAGE
    for count, page in ((5, 0), (2, 3), (17, 0)):  # past the region, past the maximum
        with pytest.raises(RemoteError):
            link.call(t.Op.P2M_PCACHE_MISS, struct.pack("<IIQ", rid, count, page))


def test_the_benchmark_workload_is_right_on_disaggregated_memory():
    from harness.bench.paging import Matmul
    from harness.nodes.cluster import open_cluster

    shape = Matmul(512, 64)
    cache = shape.working_set // 4
    with open_cluster("lego3", cache=cache, prefetch=8) as c:
        r = c.alloc(shape.working_set)
        assert shape.run(r, cache) > 0  # raises if any checked tile is wrong
        s = c.stats()["excache"]
        assert s["evictions"] > 0 and s["prefetched"] > 0
        c.free(r)


def _channel(tmp_path, name, store):
    """A new shm channel served by store from another thread -> client end."""
    path = str(tmp_path / f"{name}.shm")
    t.create_shm_file(path, 1 << 20)
    client, server = t.Link.shm_open(path, 0, name=name), t.Link.shm_open(path, 1)
    threading.Thread(target=store.serve, args=(server,), daemon=True).start()
    return client, server


def test_writes_are_replicated_and_the_cache_fails_over_without_losing_a_page(tmp_path):
    pstore, bstore = MStore(), MStore()
    primary, primary_server = _channel(tmp_path, "primary", pstore)
    pstore.set_replica(_channel(tmp_path, "replica", bstore)[0])
    cache = make(primary, ways=4)
    cache.set_backup(_channel(tmp_path, "backup", bstore)[0])
    n = 4 * CACHE_PAGES
    region = cache.alloc(n * PAGE)
    mv = memoryview(region)
    for p in range(n):
        mv[p * PAGE:(p + 1) * PAGE] = bytes([p % 251]) * PAGE
    cache.flush()  # every page acknowledged: on the primary and on the backup
    ps, bs = pstore.stats(), bstore.stats()
    assert ps["replicating"] and ps["replicated"] == bs["flushes"] + 1  # + the ALLOC
    assert bs["pages_stored"] == ps["pages_stored"] == cache.stats()["dirty_flushes"]
    primary_server.close()  # the primary is gone
    for p in range(n):  # every page comes back, from the backup
        assert mv[p * PAGE:(p + 1) * PAGE] == bytes([p % 251]) * PAGE
    s = cache.stats()
    assert s["failovers"] == 1 and s["failover_ns"] > 0
