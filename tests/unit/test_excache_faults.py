"""The fault path's hard cases: a write after a failed write-back, memory-
error signals, errno across the SIGBUS handler, the kernel's own accesses to
region pages, and the cache's life cycle (allocations from several threads,
a failed allocation, a free while a fault is being served). Cases that hung
or crashed before their fix run in a child process, so a regression shows
as a failed test with the child's status, not a lost run."""

import errno
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from harness._native import transport as t
from harness._native.excache import PAGE, ExCache, MStore

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = """
    import ctypes, os, signal, sys, tempfile, threading, time
    from harness._native import transport as t
    from harness._native.excache import PAGE, ExCache, MStore

    d = tempfile.mkdtemp()

    def served(name):
        store = MStore()
        path = f"{d}/{name}.shm"
        t.create_shm_file(path, 1 << 20)
        client, server = t.Link.shm_open(path, 0), t.Link.shm_open(path, 1)
        threading.Thread(target=store.serve, args=(server,), daemon=True).start()
        return client, server, store
"""


def run(code: str, timeout: float = 60, prelude: str = "") -> subprocess.CompletedProcess:
    """Runs PRELUDE, prelude and code in a fresh interpreter."""
    src = "".join(textwrap.dedent(part) for part in (PRELUDE, prelude, code))
    try:
        return subprocess.run([sys.executable, "-c", src], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the child hung for {timeout} s; its output: {exc.stdout!r} {exc.stderr!r}")


def ok(code: str, timeout: float = 60, prelude: str = "") -> str:
    p = run(code, timeout, prelude)
    assert p.returncode == 0, f"child exited with status {p.returncode}: {p.stdout} {p.stderr}"
    return p.stdout.strip()


def _served(tmp_path, name):
    path = str(tmp_path / f"{name}.shm")
    t.create_shm_file(path, 1 << 20)
    client, server = t.Link.shm_open(path, 0), t.Link.shm_open(path, 1)
    store = MStore()
    threading.Thread(target=store.serve, args=(server,), daemon=True).start()
    return client, server, store


# ---- item 5: no livelock ----------------------------------------------------------


def test_a_write_after_a_failed_write_back_goes_through():
    """A failed flush leaves the line dirty and write-protected: the next
    write used to fault, find a dirty resident line, do nothing, and fault
    again forever (with the GIL held)."""
    out = ok("""
        link, server, store = served("m")
        cache = ExCache(link, 16 * PAGE, ways=4)
        r = cache.alloc(4 * PAGE)
        mv = memoryview(r)
        mv[0] = 1
        server.close()  # the memory node is gone: the write-back fails
        try:
            cache.flush()
        except Exception as exc:
            print("flush:", type(exc).__name__)
        mv[0] = 2
        mv[1] = 3
        print("wrote", mv[0], mv[1], "dirty", r.stats()["dirty"])
    """, timeout=20)
    assert out.splitlines() == ["flush: LinkClosed", "wrote 2 3 dirty 1"]


# siginfo_t for SIGBUS: signo, errno, code, (pad), si_addr, si_addr_lsb, ... 128 bytes.
SEND_SIGBUS = """
    class SigInfo(ctypes.Structure):
        _fields_ = [("signo", ctypes.c_int), ("errno", ctypes.c_int), ("code", ctypes.c_int),
                    ("pad", ctypes.c_int), ("addr", ctypes.c_void_p), ("lsb", ctypes.c_short),
                    ("rest", ctypes.c_char * 102)]

    def sigbus(code, addr):
        # rt_tgsigqueueinfo to this thread: a process may send itself any si_code.
        info = SigInfo(signo=signal.SIGBUS, code=code, addr=addr)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(297, os.getpid(), threading.get_native_id(), signal.SIGBUS,
                        ctypes.byref(info)):
            raise OSError(ctypes.get_errno(), "rt_tgsigqueueinfo")
"""

BUS_MCEERR_AR, BUS_MCEERR_AO = 4, 5


@pytest.mark.parametrize("code", [BUS_MCEERR_AR, BUS_MCEERR_AO])
def test_a_memory_error_on_a_region_page_goes_to_the_previous_handler(code):
    """A hardware memory error (BUS_MCEERR_*) is not a userfaultfd fault:
    served as one, a real one would loop forever on the poisoned page."""
    out = ok(prelude=SEND_SIGBUS, code=f"""
        seen = []
        signal.signal(signal.SIGBUS, lambda sig, frame: seen.append(sig))
        link, server, store = served("m")
        cache = ExCache(link, 16 * PAGE, ways=4)  # its hook comes after Python's handler
        r = cache.alloc(4 * PAGE)
        sigbus({code}, r.address)
        time.sleep(0.05)  # Python runs its handler
        print("previous handler:", seen == [signal.SIGBUS], "misses:", cache.stats()["misses"])
    """, timeout=20)
    assert out == "previous handler: True misses: 0"


SI_QUEUE = -1  # sent by a process (sigqueue), not by the kernel for an access


@pytest.mark.parametrize("code", [BUS_MCEERR_AR, BUS_MCEERR_AO, SI_QUEUE])
def test_a_memory_error_with_no_previous_handler_takes_the_default_action(code):
    """With no handler before ours, the default action: a signal that will
    not come again (AO, or one a process sent) is raised anew and ends the
    process; for AR the handler only restores the default, since a real
    one comes again when the access is retried (this one is synthetic)."""
    p = run(prelude=SEND_SIGBUS, code=f"""
        link, server, store = served("m")
        cache = ExCache(link, 16 * PAGE, ways=4)
        r = cache.alloc(4 * PAGE)
        sigbus({code}, r.address)
        time.sleep(0.05)
        print("survived, misses:", cache.stats()["misses"])
    """, timeout=20)
    if code == BUS_MCEERR_AR:
        assert (p.returncode, p.stdout.strip()) == (0, "survived, misses: 0"), p.stderr
    else:
        assert p.returncode == -signal.SIGBUS, p.stdout + p.stderr


# ---- item 7: async-signal safety, and the kernel's accesses -----------------------------


def test_the_sigbus_handler_keeps_errno():
    """The handler's waits and system calls set errno (a futex wait that times
    out: ETIMEDOUT); the interrupted code must find its own value again."""
    out = ok("""
        libc = ctypes.CDLL(None)
        libc.__errno_location.restype = ctypes.POINTER(ctypes.c_int)
        err = libc.__errno_location()
        link, server, store = served("m")
        cache = ExCache(link, 16 * PAGE, ways=4)
        r = cache.alloc(64 * PAGE)
        mv = memoryview(r)
        for p in range(64):  # through a 16-line cache: page 0 ends on the store only
            mv[p * PAGE] = 1
        cache.flush()
        server.set_model(150_000_000, 0)  # answers take 150 ms: the fault's wait sleeps, times out
        err[0] = 1234
        r.time_touch(0, 1)  # a miss, served in the SIGBUS handler
        after_miss = err[0]
        err[0] = 1234
        r.time_touch(0, 1)  # a hit: no fault (the control)
        print(after_miss, err[0])
    """, timeout=30)
    assert out == "1234 1234"


def test_a_cache_made_after_another_handler_replaced_the_hook_still_faults():
    """faulthandler.enable() (an in-process pytest run does it too) puts its
    own SIGBUS handler over the cache's; the next cache puts the hook back,
    passing on to faulthandler, instead of dying of its first fault."""
    out = ok("""
        import faulthandler
        link, server, store = served("m1")
        first = ExCache(link, 16 * PAGE, ways=4)
        memoryview(first.alloc(4 * PAGE))[0] = 1
        faulthandler.enable()
        link2, server2, store2 = served("m2")
        second = ExCache(link2, 16 * PAGE, ways=4)
        mv = memoryview(second.alloc(64 * PAGE))
        for p in range(64):
            mv[p * PAGE] = p
        print(sum(mv[p * PAGE] for p in range(64)))
    """, timeout=30)
    assert out == str(sum(range(64)))


def _body(src: str, name: str) -> str:
    """The text of C function name's body in src."""
    m = re.search(rf"^\w[\w \*]*\b{name}\(.*?\)\n\{{", src, re.M | re.S)
    assert m, f"no function {name}"
    depth, i = 1, m.end()
    while depth:
        depth += {"{": 1, "}": -1}.get(src[i], 0)
        i += 1
    return src[m.end():i]


# Calls that are not async-signal-safe (snprintf: stdio may lock and malloc).
NOT_SIGNAL_SAFE = ("snprintf", "sprintf", "printf", "fprintf", "malloc", "calloc", "free",
                   "strerror", "fopen", "syslog", "pthread_mutex_lock")


def test_the_fault_path_through_the_transport_is_async_signal_safe():
    """A fault served in the SIGBUS handler waits on the link; when the peer
    is slow the wait checks whether it died. None of that may call stdio or
    malloc (snprintf once built /proc/<pid>/stat there)."""
    shm = (ROOT / "native/transport/shm.c").read_text()
    excache = (ROOT / "native/excache/excache.c").read_text()
    failover = (ROOT / "native/excache/failover.c").read_text()
    bodies = {f: _body(shm, f) for f in ("peer_dead", "peer_gone", "shm_wait")}
    bodies["on_sigbus"] = _body(excache, "on_sigbus")
    bodies["ex_call"] = _body(failover, "ex_call")
    for name, body in bodies.items():
        for bad in NOT_SIGNAL_SAFE:
            assert not re.search(rf"(?<![\w.>]){bad}\s*\(", body), \
                f"{name} calls {bad}, which is not async-signal-safe"


@pytest.mark.parametrize("fault_mode", ["thread", "sigbus"])
def test_the_kernel_reads_evicted_pages_in_thread_mode_only(tmp_path, fault_mode):
    """write(fd, region): the kernel's copy faults on pages that are not in
    the cache. A handler thread serves those like any other; SIGBUS mode
    cannot (the kernel gets EFAULT), as the docs say."""
    link, _, _ = _served(tmp_path, "m")
    cache = ExCache(link, 16 * PAGE, ways=4, fault_mode=fault_mode)
    r = cache.alloc(64 * PAGE)
    mv = memoryview(r)
    want = b"".join(bytes([p + 1]) * PAGE for p in range(64))
    mv[:] = want
    cache.flush()  # 48 of the 64 pages are on the store only now
    out = tmp_path / "copy"
    with open(out, "wb") as f:
        if fault_mode == "thread":
            done = 0
            while done < len(want):
                done += f.write(mv[done:])
        else:
            with pytest.raises(OSError) as e:
                f.write(mv)  # page 0 was evicted: EFAULT before any byte is written
            assert e.value.errno == errno.EFAULT
    if fault_mode == "thread":
        assert out.read_bytes() == want
    del mv
    r.free()
    link.close()


def test_open_cluster_takes_the_advice(tmp_path):
    """open_cluster(fault_mode="thread"): the kernel reads c.alloc's evicted pages."""
    from harness.nodes.cluster import open_cluster

    with open_cluster("lego3", cache=16 * PAGE, fault_mode="thread") as c:
        r = c.alloc(64 * PAGE)
        mv = memoryview(r)
        want = bytes(range(256)) * (64 * PAGE // 256)
        mv[:] = want
        c.excache.flush()
        assert c.stats()["excache"]["fault_mode"] == "thread"
        with open(tmp_path / "copy", "wb") as f:
            f.write(mv)
        assert (tmp_path / "copy").read_bytes() == want
        del mv
        c.free(r)


# ---- item 8: the cache's life cycle -------------------------------------------------


def test_regions_allocated_from_several_threads_at_once_stay_apart():
    """alloc releases the GIL; its slot used to be picked without the lock,
    so two threads could take the same one."""
    out = ok("""
        link, server, store = served("m")
        cache = ExCache(link, 64 * PAGE, ways=4)
        errors = []

        def worker(k):
            try:
                for i in range(40):
                    r = cache.alloc(2 * PAGE)
                    mv = memoryview(r)
                    mv[0], mv[PAGE] = k, i
                    assert (mv[0], mv[PAGE]) == (k, i), "another thread's region"
                    del mv
                    r.free()
            except Exception as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        print(errors[:1] or "ok", store.stats()["regions"])
    """)
    assert out == "ok 0"


def test_a_failed_alloc_gives_its_vregion_back():
    """The vRegion is made on the memory node first; when the local mapping
    then fails, it must be freed there too, not leak."""
    out = ok("""
        import resource
        link, server, store = served("m")
        cache = ExCache(link, 16 * PAGE, ways=4)
        size = 4 << 30
        with open("/proc/self/status") as f:
            vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        # Room for the store's mapping (this process serves it) but not the cache's.
        resource.setrlimit(resource.RLIMIT_AS, (vm + size + size // 2, hard))
        try:
            cache.alloc(size)
            print("allocated")
        except MemoryError:
            print("refused")
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        print("regions on the store:", store.stats()["regions"])
    """)
    assert out.splitlines() == ["refused", "regions on the store: 0"]


def test_a_free_while_a_fault_on_the_region_waits_is_safe():
    """The handler thread finds the region, then waits for the lock (a flush
    holds it); free takes the lock first and unmaps the region. The fault
    must see that it is gone, not fill a page of a freed region (which
    ended the process). The kernel's access (write(2)) then gets a plain
    page or EFAULT."""
    out = ok("""
        link, server, store = served("m")
        cache = ExCache(link, 16 * PAGE, ways=4, fault_mode="thread")
        q = cache.alloc(16 * PAGE)
        mvq = memoryview(q)
        fd = os.open(f"{d}/sink", os.O_WRONLY | os.O_CREAT)
        results = []

        def write(addr):
            try:
                results.append(os.write(fd, (ctypes.c_char * PAGE).from_address(addr)))
            except OSError as exc:
                results.append(exc.errno)

        for rnd in range(8):
            r = cache.alloc(4 * PAGE)  # never touched: its pages are missing
            mvq[0], mvq[PAGE] = rnd + 1, rnd + 1  # two dirty lines
            server.set_model(100_000_000, 0)  # each answer takes 100 ms
            flusher = threading.Thread(target=cache.flush)
            flusher.start()  # holds the lock for 200 ms
            time.sleep(0.03)
            writer = threading.Thread(target=write, args=(r.address,))
            writer.start()  # the handler thread finds r, then waits for the lock
            time.sleep(0.03)
            r.free()  # waits for the lock too
            flusher.join()
            writer.join()
            server.set_model(0, 0)
        print("ok", sorted(set(results)))
    """)
    assert out.startswith("ok"), out
