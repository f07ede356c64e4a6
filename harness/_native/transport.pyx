# cython: language_level=3
"""Bindings to native/transport: frames, links, RPC, benchmark loops."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc

import enum
import os
from collections import namedtuple

from harness._native.errors cimport DH_EAGAIN, DH_ETOOBIG, check
from harness.errors import ProtocolError, RemoteError

HDR_SIZE = DH_FRAME_HDR_SIZE
MAX_PAYLOAD = DH_FRAME_MAX_PAYLOAD
F_REPLY = DH_F_REPLY
F_ERROR = DH_F_ERROR
F_NOREPLY = DH_F_NOREPLY
WAIT_FUTEX = DH_WAIT_FUTEX
WAIT_POLL = DH_WAIT_POLL


class Op(enum.IntEnum):
    """Frame opcodes; the names follow LegoOS where it has one."""
    HELLO = DH_OP_HELLO
    PING = DH_OP_PING
    STATS = DH_OP_STATS
    SHUTDOWN = DH_OP_SHUTDOWN
    EXEC = DH_OP_EXEC
    ECHO = DH_OP_ECHO
    CTL = DH_OP_CTL
    ATTACH = DH_OP_ATTACH
    P2M_PCACHE_MISS = DH_OP_P2M_PCACHE_MISS
    P2M_PCACHE_FLUSH = DH_OP_P2M_PCACHE_FLUSH
    P2M_PCACHE_MISS_FLUSH = DH_OP_P2M_PCACHE_MISS_FLUSH
    P2M_ALLOC = DH_OP_P2M_ALLOC
    P2M_FREE = DH_OP_P2M_FREE
    M2M_REPLICA = DH_OP_M2M_REPLICA
    SQL = DH_OP_SQL
    GATE_CALL = DH_OP_GATE_CALL


# A namedtuple, not typing.NamedTuple: typing costs ~60 ms to import in a guest.
Header = namedtuple("Header", "opcode src flags req_id length")


cdef object _header(const dh_frame_hdr *h):
    return Header(h.opcode, h.src, h.flags, h.req_id, h.length)


cdef int _ms(timeout) except? -2:
    """Seconds (float) to the C layer's milliseconds; None means no limit."""
    if timeout is None:
        return -1
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout}")
    return <int>min(timeout * 1000.0 + 0.999, 2**31 - 1)


cdef uint32_t _length(Py_ssize_t n, uint64_t limit, str name, str what) except? 0:
    """A buffer's length as the u32 C takes: one over limit is refused here,
    before the conversion could cut 4 GiB + 8 bytes to 8."""
    if <uint64_t>n > limit:
        check(DH_ETOOBIG, f"{name}: {what} {n}-byte payload (limit {limit})")
    return <uint32_t>n


def crc32c(const uint8_t[::1] data, uint32_t crc=0) -> int:
    return dh_crc32c(crc, &data[0] if data.shape[0] else NULL, data.shape[0])


def encode_frame(int opcode, bytes payload=b"", *, uint32_t src=0, uint32_t flags=0,
                 uint64_t req_id=0) -> bytes:
    cdef dh_frame_hdr h
    h.opcode = opcode
    h.src = src
    h.flags = flags
    h.req_id = req_id
    cdef Py_ssize_t n = len(payload)
    if n > DH_FRAME_MAX_PAYLOAD:
        check(DH_ETOOBIG, f"encode {n}-byte payload (limit {DH_FRAME_MAX_PAYLOAD})")
    out = PyBytes_FromStringAndSize(NULL, DH_FRAME_HDR_SIZE + n)
    check(dh_frame_encode(<uint8_t *>PyBytes_AS_STRING(out), DH_FRAME_HDR_SIZE + n,
                          &h, PyBytes_AS_STRING(payload), <uint32_t>n),
          f"encode opcode {opcode:#x}")
    return out


def decode_frame(const uint8_t[::1] data):
    """Decodes one frame from the start of data -> (Header, payload, consumed).

    Raises ProtocolError for a malformed frame; returns None when data holds
    only the beginning of one."""
    cdef dh_frame_hdr h
    cdef const uint8_t *payload = NULL
    cdef int rc = dh_frame_decode(&data[0] if data.shape[0] else NULL,
                                  data.shape[0], &h, &payload)
    if rc == DH_EAGAIN:
        return None
    check(rc, "decode frame")
    return _header(&h), (<const char *>payload)[:h.length], rc


cdef class Link:
    """One end of a link between two nodes: shm ring pair or byte stream.

    One thread sends and one receives at a time; close() may come from any
    thread and wakes a blocked receive."""

    def __cinit__(self):
        self._l = NULL
        self.name = "link"

    def __dealloc__(self):
        if self._l is not NULL:
            dh_link_destroy(self._l)

    cdef _own(self, dh_link *l, str name):
        self._l = l
        self.name = name
        self._buf = bytearray(dh_link_max_payload(l))

    @staticmethod
    def shm_open(path: str, int side = 1, name: str = "") -> Link:
        """Opens one side (0 or 1) of a channel file made by create_shm_file."""
        cdef dh_link *l = NULL
        b = os.fsencode(path)
        check(dh_link_shm_open(b, side, &l), f"open side {side} of shm link {path}")
        cdef Link k = Link()
        k._own(l, name or path)
        return k

    @staticmethod
    def shm_attach(unsigned char[::1] memory, int side, int wait_mode=DH_WAIT_POLL,
                   name: str = "") -> Link:
        """One side of a channel in memory the caller mapped (a guest's ivshmem
        BAR); the link keeps the mapping alive."""
        cdef dh_link *l = NULL
        check(dh_link_shm_attach(&memory[0], memory.shape[0], side, wait_mode, &l),
              f"attach side {side} of shared memory {name}")
        cdef Link k = Link()
        k._own(l, name or "ivshmem")
        k._keep = memory
        return k

    @staticmethod
    def from_fd(int fd, name: str = "") -> Link:
        """A stream link over a duplicate of fd (the caller keeps its own)."""
        cdef dh_link *l = NULL
        cdef int d = os.dup(fd)
        rc = dh_link_fd(d, &l)
        if rc < 0:
            os.close(d)
        check(rc, f"stream link on fd {fd}")
        cdef Link k = Link()
        k._own(l, name or f"fd{fd}")
        return k

    cdef dh_link *_live(self) except NULL:
        if self._l is NULL:
            raise ValueError("link is not initialised")
        return self._l

    @property
    def closed(self) -> bool:
        return bool(dh_link_is_closed(self._live()))

    @property
    def stale(self) -> bool:
        """An shm link whose channel was reset (its peer restarted) since it
        was opened: open the channel file again."""
        return bool(dh_link_shm_stale(self._live()))

    @property
    def max_payload(self) -> int:
        return dh_link_max_payload(self._live())

    def set_src(self, uint32_t nid) -> None:
        dh_link_set_src(self._live(), nid)

    def set_model(self, latency_ns: int = 0, bytes_per_sec: int = 0) -> None:
        cdef dh_link_model m
        m.latency_ns = latency_ns
        m.bytes_per_sec = bytes_per_sec
        dh_link_set_model(self._live(), &m)

    def close(self) -> None:
        if self._l is not NULL:
            dh_link_close(self._l)

    def stats(self) -> dict:
        cdef dh_link_stats s
        dh_link_get_stats(self._live(), &s)
        return dict(frames_sent=s.frames_sent, frames_recv=s.frames_recv,
                    bytes_sent=s.bytes_sent, bytes_recv=s.bytes_recv,
                    proto_errors=s.proto_errors, stale_replies=s.stale_replies,
                    sleeps=s.sleeps)

    def send(self, int opcode, const uint8_t[::1] payload=b"", *, uint32_t flags=0,
             uint64_t req_id=0, timeout=5.0) -> None:
        cdef dh_link *l = self._live()
        cdef dh_frame_hdr h
        h.opcode = opcode
        h.flags = flags
        h.req_id = req_id
        cdef const void *p = &payload[0] if payload.shape[0] else NULL
        cdef uint32_t n = _length(payload.shape[0], DH_FRAME_MAX_PAYLOAD, self.name, "send")
        cdef int ms = _ms(timeout)
        cdef int rc
        with nogil:
            rc = dh_link_send(l, &h, p, n, ms)
        check(rc, f"{self.name}: send opcode {opcode:#x}")

    def send_raw(self, const uint8_t[::1] data, timeout=5.0) -> None:
        """Puts bytes on the link unchecked (to test a peer's decoder)."""
        if data.shape[0] == 0:
            raise ValueError("send_raw needs at least one byte")
        cdef uint32_t n = _length(data.shape[0], 0xFFFFFFFF, self.name, "send raw")
        cdef int rc = dh_link_send_raw(self._live(), &data[0], n, _ms(timeout))
        check(rc, f"{self.name}: send raw")

    def recv(self, timeout=5.0):
        """Waits for one frame -> (Header, bytes)."""
        cdef dh_link *l = self._live()
        cdef dh_frame_hdr h
        cdef unsigned char[::1] buf = self._buf
        cdef int ms = _ms(timeout)
        cdef int rc
        with nogil:
            rc = dh_link_recv(l, &h, &buf[0], buf.shape[0], ms)
        check(rc, f"{self.name}: receive")
        return _header(&h), bytes(buf[:h.length])

    def call(self, int opcode, const uint8_t[::1] payload=b"", timeout=5.0) -> bytes:
        """Request/response; raises RemoteError when the peer answers an error."""
        cdef dh_link *l = self._live()
        cdef unsigned char[::1] buf = self._buf
        cdef const void *p = &payload[0] if payload.shape[0] else NULL
        cdef uint32_t n = _length(payload.shape[0], DH_FRAME_MAX_PAYLOAD, self.name, "call")
        cdef uint32_t got = 0, flags = 0
        cdef int ms = _ms(timeout)
        cdef int rc
        with nogil:
            rc = dh_rpc_call(l, opcode, p, n, &buf[0], buf.shape[0], &got, &flags, ms)
        check(rc, f"{self.name}: call {Op(opcode).name if opcode in Op._value2member_map_ else hex(opcode)}")
        data = bytes(buf[:got])
        if flags & DH_F_ERROR:
            raise RemoteError(f"{self.name}: {data.decode(errors='replace')}")
        return data

    def reply(self, req, const uint8_t[::1] payload=b"", *, bint error=False,
              timeout=5.0) -> None:
        cdef dh_frame_hdr h
        h.opcode = req.opcode
        h.req_id = req.req_id
        cdef const void *p = &payload[0] if payload.shape[0] else NULL
        cdef uint32_t n = _length(payload.shape[0], DH_FRAME_MAX_PAYLOAD, self.name, "reply")
        cdef dh_link *l = self._live()
        cdef int ms = _ms(timeout)
        cdef int rc
        with nogil:
            rc = dh_rpc_reply(l, &h, DH_F_ERROR if error else 0, p, n, ms)
        check(rc, f"{self.name}: reply")

    def echo_serve(self) -> None:
        """Serves ECHO in C until the peer closes or sends SHUTDOWN."""
        cdef dh_link *l = self._live()
        cdef volatile int stop = 0
        cdef int rc
        with nogil:
            rc = dh_rpc_echo_serve(l, &stop)
        check(rc, f"{self.name}: echo server")

    def bench_rpc_rtt(self, uint32_t size, size_t n) -> list:
        """n ECHO round trips of size bytes, timed in C -> ns each."""
        return self._bench(DH_OP_ECHO, size, n)

    def bench_gate_call(self, size_t n) -> list:
        """n GATE_CALL round trips (a 64 B argument, an empty reply) -> ns each."""
        return self._bench(DH_OP_GATE_CALL, 64, n)

    def _bench(self, int op, uint32_t size, size_t n) -> list:
        cdef Samples s = Samples(n)
        cdef uint64_t *v = s.v
        cdef dh_link *l = self._live()
        cdef int rc
        with nogil:
            rc = dh_bench_rpc(l, op, size, v, n)
        check(rc, f"{self.name}: round-trip benchmark")
        return s.values()

    def bench_stream(self, uint32_t size, uint64_t count) -> int:
        """count one-way frames then a round trip -> total ns."""
        cdef uint64_t ns = 0
        cdef dh_link *l = self._live()
        cdef int rc
        with nogil:
            rc = dh_bench_stream(l, size, count, &ns)
        check(rc, f"{self.name}: stream benchmark")
        return ns


def create_shm_file(path: str, size: int = 4 << 20) -> None:
    """Makes a channel file (it must not exist) for two sides to open."""
    check(dh_shm_file_create(os.fsencode(path), size), f"create shm file {path}")


def reset_shm_file(path: str) -> None:
    """Starts a channel afresh (a restarted node): ends opened before see
    their peer gone and must open the file again."""
    check(dh_shm_file_reset(os.fsencode(path)), f"reset shm file {path}")


cdef class Samples:
    """An array a C loop fills with one number per sample (the benchmark
    bindings of every module use it)."""

    def __cinit__(self, size_t n):
        if n > (<size_t>-1) // sizeof(uint64_t):  # n * 8 would wrap to a small block
            raise MemoryError(f"{n} samples do not fit in memory")
        self.n = n
        self.v = <uint64_t *>malloc(max(n, 1) * sizeof(uint64_t))
        if self.v is NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.v)

    cdef list values(self):
        return [self.v[i] for i in range(self.n)]


def floor_pingpong(uint32_t size, size_t n) -> list:
    """size bytes bounced between two threads n times -> ns per round trip."""
    cdef Samples s = Samples(n)
    cdef uint64_t *v = s.v
    cdef int rc
    with nogil:
        rc = dh_floor_pingpong(size, v, n)
    check(rc, "ping-pong floor")
    return s.values()


def floor_copy(uint32_t size, uint64_t count) -> int:
    cdef uint64_t ns = 0
    cdef int rc
    with nogil:
        rc = dh_floor_copy(size, count, &ns)
    check(rc, "copy floor")
    return ns


def floor_sock_serve(int fd, uint32_t size, bint echo) -> None:
    cdef int rc
    with nogil:
        rc = dh_floor_sock_serve(fd, size, echo)
    check(rc, "raw socket server")


def floor_sock_rtt(int fd, uint32_t size, size_t n) -> list:
    cdef Samples s = Samples(n)
    cdef uint64_t *v = s.v
    cdef int rc
    with nogil:
        rc = dh_floor_sock_rtt(fd, size, v, n)
    check(rc, "raw socket round trip")
    return s.values()


def floor_sock_stream(int fd, uint32_t size, uint64_t count) -> int:
    cdef uint64_t ns = 0
    cdef int rc
    with nogil:
        rc = dh_floor_sock_stream(fd, size, count, &ns)
    check(rc, "raw socket stream")
    return ns

