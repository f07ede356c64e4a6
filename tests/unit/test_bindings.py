"""The Cython bindings refuse what would make C read or write out of bounds
or use a freed link: huge sample counts and page ranges, None or closed
links, payloads whose length does not fit the C side's 32 bits. Cases
that crashed before the fix run in a child process, so a regression shows
as a failed test with the child's status, not a lost run."""

import mmap
import subprocess
import sys
import textwrap

import pytest

from harness._native import transport as t
from harness._native.excache import PAGE, ExCache, MStore, floor_minor_fault, time_touch_native
from harness.errors import LinkClosed, TransportError, TransportTimeout


def child(code: str) -> str:
    """Runs code in a fresh interpreter; returns its stdout (it must exit 0)."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, f"child exited with status {r.returncode}: {r.stderr}"
    return r.stdout.strip()


@pytest.fixture
def pair(tmp_path):
    path = str(tmp_path / "b.shm")
    t.create_shm_file(path, 64 << 10)
    a, b = t.Link.shm_open(path, 0), t.Link.shm_open(path, 1)
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("n", [2**61, 2**62, 2**64 - 1])
def test_a_sample_count_whose_size_overflows_is_refused(n):
    with pytest.raises((MemoryError, OverflowError)):
        t.Samples(n)
    with pytest.raises((MemoryError, OverflowError)):
        t.floor_pingpong(64, n)


@pytest.mark.parametrize(("first", "n"), [
    (2**52, 1),           # first * 4096 wraps to 0: page 0 would be touched
    (1, 2**52 - 1),       # (first + n) * 4096 wraps to 0
    (2**64 - 1, 2),       # first + n wraps
    (0, 17),              # simply past the end
])
def test_time_touch_refuses_pages_outside_the_region(first, n):
    cache = ExCache(None, 16 * PAGE, ways=4)  # a local store
    r = cache.alloc(16 * PAGE)
    with pytest.raises(ValueError, match="outside the region"):
        r.time_touch(first, n)
    assert len(r.time_touch(0, 16)) == 16
    r.free()


@pytest.mark.parametrize("fn", [floor_minor_fault, time_touch_native])
def test_floors_refuse_a_page_count_whose_size_overflows(fn):
    with pytest.raises((MemoryError, OverflowError)):
        fn(2**52 + 1)  # * 4096 wraps to 4096: one page mapped, 2^52 touched


@pytest.mark.parametrize("call", [
    "MStore().serve(None)",
    "MStore().set_replica(None)",
    "ExCache(None, 16 * PAGE, ways=4).set_backup(None)",
    "MStore().serve(t.Link())",                      # never opened: a NULL link
    "ExCache(t.Link(), 16 * PAGE, ways=4)",
    "MStore().set_replica(t.Link())",
    "floor_mprotect(None, None, 1)",                 # a Compartment argument, likewise
])
def test_a_missing_link_is_refused_before_c_sees_it(call):
    out = child(f"""
        from harness._native import transport as t
        from harness._native.excache import PAGE, ExCache, MStore
        from harness._native.pkey import floor_mprotect
        try:
            {call}
            print("accepted")
        except (TypeError, ValueError) as exc:
            print(type(exc).__name__)
    """)
    assert out in ("TypeError", "ValueError"), out


def test_a_closed_link_is_refused(pair):
    a, _ = pair
    a.close()
    with pytest.raises(LinkClosed, match="closed"):
        ExCache(a, 16 * PAGE, ways=4)
    cache = ExCache(None, 16 * PAGE, ways=4)
    with pytest.raises(LinkClosed, match="closed"):
        cache.set_backup(a)
    with pytest.raises(LinkClosed, match="closed"):
        MStore().set_replica(a)


def test_set_backup_twice_keeps_the_link_the_cache_failed_over_to():
    """After a failover the cache sends on the first backup's link; a second
    set_backup must not let that link be freed under it."""
    out = child("""
        import gc, tempfile, threading
        from harness._native import transport as t
        from harness._native.excache import PAGE, ExCache, MStore

        d = tempfile.mkdtemp()
        keep = []
        def channel(name, store):
            path = f"{d}/{name}.shm"
            t.create_shm_file(path, 1 << 20)
            client, server = t.Link.shm_open(path, 0), t.Link.shm_open(path, 1)
            keep.append(server)
            threading.Thread(target=store.serve, args=(server,), daemon=True).start()
            return client, server

        pstore, bstore = MStore(), MStore()
        primary, primary_server = channel("p", pstore)
        pstore.set_replica(channel("r", bstore)[0])
        cache = ExCache(primary, 16 * PAGE, ways=4)
        b1 = channel("b1", bstore)[0]
        cache.set_backup(b1)
        region = cache.alloc(64 * PAGE)
        mv = memoryview(region)
        for p in range(64):
            mv[p * PAGE:(p + 1) * PAGE] = bytes([p]) * PAGE
        cache.flush()
        primary_server.close()
        assert mv[:PAGE] == bytes([0]) * PAGE  # now served over b1
        assert cache.stats()["failovers"] == 1
        cache.set_backup(channel("b2", bstore)[0])
        del b1
        gc.collect()
        for p in range(64):  # still over b1's link
            assert mv[p * PAGE:(p + 1) * PAGE] == bytes([p]) * PAGE
        print("ok")
    """)
    assert out == "ok"


def test_the_copy_floor_takes_a_ring_sized_payload():
    """floor_copy(1 MiB) divided by (ring - size) = 0 (SIGFPE)."""
    assert int(child("""
        from harness._native import transport as t
        print(t.floor_copy(1 << 20, 3))
    """)) > 0


@pytest.fixture
def huge():
    """A 4 GiB + 8 byte buffer, never touched (so never backed by memory)."""
    try:
        m = mmap.mmap(-1, 2**32 + 8)
    except (OSError, OverflowError) as exc:
        pytest.skip(f"cannot map 4 GiB here: {exc}")
    yield memoryview(m)


def test_a_payload_of_4_gib_and_more_is_not_cut_to_32_bits(pair, huge):
    """Its length was passed to C as a u32: 4 GiB + 8 bytes went out as 8."""
    a, b = pair
    with pytest.raises(TransportError, match="too big"):
        a.send_raw(huge)
    with pytest.raises(TransportError, match="too big"):
        a.send(t.Op.ECHO, huge)
    with pytest.raises(TransportError, match="too big"):
        a.call(t.Op.ECHO, huge)
    with pytest.raises(TransportError, match="too big"):
        b.reply(t.Header(t.Op.ECHO, 0, 0, 1, 0), huge)
    with pytest.raises(TransportTimeout):
        b.recv(timeout=0.05)  # nothing was sent
    with pytest.raises(TransportTimeout):
        a.recv(timeout=0.05)
