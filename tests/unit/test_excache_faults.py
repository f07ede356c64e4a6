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
    link, server, _ = _served(tmp_path, "m")
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
