# cython: language_level=3
"""Bindings to native/pkey: compartments, gates, probes, gate benchmarks."""

from cpython.buffer cimport PyBuffer_FillInfo
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from harness._native.errors cimport DH_EACCES, DH_EIO, DH_ENOMEM, DH_ENOSYS, DH_ETOOBIG, check
from harness._native.transport cimport Samples

from harness.errors import HarnessError

BACKENDS = {"none": DH_BACKEND_NONE, "mprotect": DH_BACKEND_MPROTECT, "mpk": DH_BACKEND_MPK}
SI_CODES = {1: "SEGV_MAPERR", 2: "SEGV_ACCERR", 4: "SEGV_PKUERR"}


def pkey_available() -> bool:
    """Does pkey_alloc work here (a PKU CPU, or a TCG guest with -cpu max)?"""
    return bool(dh_pkey_available())


def segv_report_install() -> None:
    """On a SIGSEGV, print its si_code and address before dying of it."""
    dh_segv_report_install()


cdef class Compartment:
    """A compartment's heap (buffer protocol) and its backend."""

    cdef dh_comp *_c
    cdef readonly str name
    cdef readonly str backend

    def __cinit__(self, str name, str backend, size_t heap=1 << 20, size_t stack=0):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        self.name, self.backend = name, backend
        check(dh_comp_create(BACKENDS[backend], heap, stack, &self._c),
              f"compartment {name} ({backend})")

    def __dealloc__(self):
        if self._c is not NULL:
            dh_comp_destroy(self._c)

    def __getbuffer__(self, Py_buffer *buf, int flags):
        PyBuffer_FillInfo(buf, self, dh_comp_heap(self._c), dh_comp_heap_size(self._c), 0, flags)

    def __releasebuffer__(self, Py_buffer *buf):
        pass

    @property
    def address(self) -> int:
        return <size_t>dh_comp_heap(self._c)

    @property
    def pkey(self) -> int:
        return dh_comp_pkey(self._c)

    def enter(self) -> None:
        """Makes this the current compartment of the calling thread."""
        check(dh_gate_enter(self._c), f"enter {self.name}")

    def probe(self, size_t address, bint write=False):
        """Touches address from the current compartment: None if allowed,
        else the si_code name of the fault it caused."""
        cdef int code = 0
        cdef int rc = dh_gate_probe(<void *>address, write, &code)
        if rc == DH_EACCES:
            return SI_CODES.get(code, str(code))
        check(rc, "probe")
        return None

    def call(self, fn):
        """Calls fn() inside this compartment through a gate (on its private
        stack if it has one) and returns its result; rights switch back
        before an exception from fn propagates."""
        box = [fn, None, None]
        dh_gate_call_stack(self._c, _trampoline, <void *>box)
        if box[2] is not None:
            raise box[2]
        return box[1]

    def gate_address(self):
        """Where the light gate from this thread's rights into this (mpk)
        compartment is, or None (for tests: see jump_into_gate)."""
        cdef void *g = dh_gate_mpk_address(self._c)
        return None if g is NULL else <size_t>g

    def jump_into_gate(self, size_t offset, uint32_t pkru, fn):
        """Jumps to gate_address() + offset (one of the gate's WRPKRUs) with
        EAX = pkru, as code borrowing the gate's WRPKRU would, and lets the
        gate go on to call fn(); returns what fn returned."""
        g = self.gate_address()
        if g is None:
            raise ValueError(f"{self.name}: no light mpk gate into it from here")
        box = [fn, None, None]
        dh_gate_test_jump(<void *><size_t>(g + offset), pkru, _trampoline, <void *>box)
        if box[2] is not None:
            raise box[2]
        return box[1]

    def bench_gate(self, size_t n, bint private_stack=False) -> tuple:
        """n samples of a gate round trip into this compartment -> (cycles, ns)."""
        cdef _Samples s = _Samples(n)
        check(dh_bench_gate(self._c, private_stack, s.cycles.v, s.ns.v, n),
              f"gate into {self.name}")
        return s.lists()


cdef uint64_t _trampoline(void *arg) noexcept with gil:
    box = <list>arg
    try:
        box[1] = box[0]()
    except BaseException as exc:  # carried out of the gate, re-raised after it
        box[2] = exc
    return 0


def read_pkru() -> int:
    """This thread's PKRU now (0 where there are no protection keys)."""
    return dh_gate_pkru()


def test_signal_handler(int sig) -> None:
    """For tests: a C handler for sig that notes PKRU and where its stack is."""
    check(dh_gate_test_signal(sig), f"install a handler for signal {sig}")


def test_signal_seen() -> tuple:
    """(PKRU, stack address) the test handler saw when it last ran."""
    cdef uint32_t pkru = 0
    cdef uintptr_t sp = 0
    dh_gate_test_signal_seen(&pkru, &sp)
    return pkru, sp


def leave_all() -> None:
    """Back to the shared view: every compartment's heap accessible."""
    check(dh_gate_leave_all(), "leave compartments")


cdef class _Samples:
    """What a gate benchmark fills: cycles and ns of each batch of round trips."""

    cdef Samples cycles
    cdef Samples ns

    def __cinit__(self, size_t n):
        self.cycles, self.ns = Samples(n), Samples(n)

    def lists(self) -> tuple:
        """Per round trip: (cycles, ns), each a list of floats."""
        return ([c / DH_GATE_BATCH for c in self.cycles.values()],
                [t / DH_GATE_BATCH for t in self.ns.values()])


def floor_call(size_t n) -> tuple:
    """An indirect call of an empty function -> (cycles, ns) per sample."""
    cdef _Samples s = _Samples(n)
    check(dh_floor_call(s.cycles.v, s.ns.v, n), "call floor")
    return s.lists()


def floor_wrpkru_pair(size_t n) -> tuple:
    """Two checked WRPKRUs around a call (needs protection keys)."""
    if not dh_pkey_available():
        check(DH_ENOSYS, "WRPKRU floor (no protection keys here)")
    cdef _Samples s = _Samples(n)
    check(dh_gate_floor_wrpkru_pair(s.cycles.v, s.ns.v, n), "WRPKRU floor")
    return s.lists()


def floor_mprotect(Compartment a not None, Compartment b not None, size_t n) -> tuple:
    """The four mprotect calls of a round trip between two compartments."""
    cdef _Samples s = _Samples(n)
    check(dh_floor_mprotect(a._c, b._c, s.cycles.v, s.ns.v, n), "mprotect floor")
    return s.lists()


include "sqlbox.pxi"
include "zbox.pxi"
