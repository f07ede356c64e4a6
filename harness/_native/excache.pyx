# cython: language_level=3
"""Bindings to native/excache: the processor node's cache and the memory
node's store."""

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_FillInfo
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset
from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, PROT_READ, PROT_WRITE, mmap, munmap

from harness._native.errors cimport DH_EINVAL, check
from harness._native.transport cimport Link, Samples, dh_link, dh_link_is_closed
from harness.errors import LinkClosed

PAGE = DH_PAGE
POLICIES = {"fifo": DH_POLICY_FIFO, "lru": DH_POLICY_LRU, "random": DH_POLICY_RANDOM}
FAULT_MODES = {"sigbus": DH_FAULT_SIGBUS, "thread": DH_FAULT_THREAD}
PREFETCH_MAX = DH_PREFETCH_MAX
DEFAULT_PREFETCH = 8  # the harness's default (LegoOS's config prefetches; Linux swap reads 8)


cdef dh_link *_usable(Link link, str what) except NULL:
    """The C link of a Link that was opened and is not closed: C keeps using
    it, so a closed or never-opened one is refused here."""
    cdef dh_link *l = link._live()
    if dh_link_is_closed(l):
        raise LinkClosed(f"{what}: link {link.name} is closed")
    return l


cdef size_t _pages_bytes(size_t npages) except? 0:
    """npages * PAGE, refused when it would wrap."""
    if npages > (<size_t>-1) // DH_PAGE:
        raise MemoryError(f"{npages} pages do not fit in memory")
    return max(npages, 1) * DH_PAGE


def prefetch_for(uint64_t capacity, uint32_t ways, uint32_t want=DEFAULT_PREFETCH) -> int:
    """`want` lines per miss, capped at one per set (a window never visits a
    set twice) and at PREFETCH_MAX."""
    return max(1, min(want, DH_PREFETCH_MAX, capacity // DH_PAGE // ways))


cdef class ExCache:
    """A set-associative cache of 4 KiB lines over userfaultfd regions whose
    pages live on a memory node (link=None: a local store, the benchmark's floor).

    fault_mode "sigbus": the faulting thread serves its own miss in a signal
    handler. The kernel's own accesses to pages not in the cache then fail
    with EFAULT (os.write(fd, region), socket.send(region), readinto): use
    fault_mode="thread" (a handler thread serves faults) for memory the
    kernel reads or writes."""

    cdef dh_excache *_c
    cdef list _links  # every link handed to C: it may use any of them until destroy
    cdef readonly uint64_t capacity
    cdef readonly uint32_t ways
    cdef readonly str policy
    cdef readonly str fault_mode
    cdef readonly uint32_t prefetch

    def __cinit__(self, Link link, uint64_t capacity, uint32_t ways=64, str policy="fifo",
                  str fault_mode="sigbus", double timeout=2.0, uint32_t prefetch=1):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
        if fault_mode not in FAULT_MODES:
            raise ValueError(f"fault_mode must be one of {sorted(FAULT_MODES)}, "
                             f"got {fault_mode!r}")
        self._links = [link]
        self.capacity, self.ways, self.policy, self.fault_mode = capacity, ways, policy, fault_mode
        cdef dh_link *l = _usable(link, "ExCache") if link is not None else NULL
        check(dh_excache_create(l, capacity, ways,
                                POLICIES[policy], FAULT_MODES[fault_mode],
                                <int>(timeout * 1000), &self._c),
              f"ExCache of {capacity} bytes, {ways}-way ({policy}, {fault_mode})")
        if not 1 <= prefetch <= min(DH_PREFETCH_MAX, capacity // DH_PAGE // ways):
            raise ValueError(f"prefetch must be 1 to {DH_PREFETCH_MAX} lines (and at most the "
                             f"number of sets), got {prefetch}")
        check(dh_excache_set_prefetch(self._c, prefetch), f"prefetch {prefetch} lines per miss")
        self.prefetch = prefetch

    def __dealloc__(self):
        if self._c is not NULL:
            dh_excache_destroy(self._c)

    def alloc(self, uint64_t size) -> Region:
        """A region of size bytes (a multiple of 4 KiB) of disaggregated memory."""
        cdef void *addr = NULL
        cdef uint32_t rid = 0
        cdef int rc
        with nogil:
            rc = dh_excache_alloc(self._c, size, &addr, &rid)
        check(rc, f"allocate a {size}-byte region")
        cdef Region r = Region.__new__(Region)
        r._cache, r._addr, r.size, r.id = self, addr, size, rid
        return r

    def set_backup(self, Link link not None) -> None:
        """A backup memory node that the primary replicates to: when a request
        to the primary fails, the cache switches to it and retries, provided
        the primary's last answer said the backup holds every write it
        acknowledged; otherwise the request fails with BackupBehind (a fault
        ends the process with that message) rather than read old pages. The
        link is kept as long as the cache: after a failover C sends on it,
        even once another backup was set."""
        cdef dh_link *l = _usable(link, "backup")
        self._links.append(link)
        dh_excache_set_backup(self._c, l)

    def flush(self) -> None:
        """Writes every dirty line back to the memory node."""
        cdef int rc
        with nogil:
            rc = dh_excache_flush(self._c)
        check(rc, "flush the cache")

    def stats(self) -> dict:
        cdef dh_excache_stats s
        dh_excache_get_stats(self._c, &s)
        return dict(misses=s.misses, remote_fetches=s.remote_fetches, zero_fills=s.zero_fills,
                    wp_faults=s.wp_faults, evictions=s.evictions, clean_drops=s.clean_drops,
                    dirty_flushes=s.dirty_flushes, piggybacked=s.piggybacked,
                    prefetched=s.prefetched, failovers=s.failovers,
                    failover_ns=s.failover_ns, failovers_refused=s.failovers_refused,
                    backup_in_sync=bool(s.backup_in_sync), resident=s.resident,
                    capacity=self.capacity,
                    ways=self.ways, policy=self.policy, fault_mode=self.fault_mode,
                    prefetch=self.prefetch,
                    latency_hist_log2ns=[s.hist[i] for i in range(DH_HIST_BUCKETS)])

    def reset_stats(self) -> None:
        dh_excache_reset_stats(self._c)


cdef class Region:
    """Disaggregated memory with the writable buffer protocol: memoryview and
    numpy work on it unchanged; each first touch of a page is a real fault."""

    cdef ExCache _cache
    cdef void *_addr
    cdef readonly uint64_t size
    cdef readonly uint32_t id
    cdef int _exports

    def __getbuffer__(self, Py_buffer *buf, int flags):
        if self._addr is NULL:
            raise ValueError("region was freed")
        PyBuffer_FillInfo(buf, self, self._addr, <Py_ssize_t>self.size, 0, flags)
        self._exports += 1

    def __releasebuffer__(self, Py_buffer *buf):
        self._exports -= 1

    def __len__(self):
        return self.size

    @property
    def address(self) -> int:
        return <size_t>self._addr

    def time_touch(self, size_t first_page, size_t npages, bint write=False) -> list:
        """Touches npages pages from first_page, timing each access in C -> ns."""
        cdef uint64_t pages = self.size // DH_PAGE
        if self._addr is NULL or first_page > pages or npages > pages - first_page:
            raise ValueError(f"pages {first_page}..+{npages} are outside the region "
                             f"({pages} pages)")
        cdef Samples s = Samples(npages)
        dh_excache_time_touch(<uint8_t *>self._addr + first_page * DH_PAGE, npages, write, s.v)
        return s.values()

    def stats(self) -> dict:
        """This region's lines in the cache now, and how many are dirty."""
        cdef uint64_t resident = 0, dirty = 0
        if self._addr is NULL:
            raise ValueError("region was freed")
        check(dh_excache_region_stats(self._cache._c, self._addr, &resident, &dirty),
              f"region {self.id} stats")
        return {"resident": resident, "dirty": dirty}

    def free(self) -> None:
        if self._addr is NULL:
            return
        if self._exports:
            raise BufferError("region still has memoryviews or arrays over it")
        cdef void *a = self._addr
        self._addr = NULL
        check(dh_excache_free(self._cache._c, a), f"free region {self.id}")


cdef class MStore:
    """A memory node's store of vRegions; serve() answers the ExCache protocol."""

    cdef dh_mstore *_m
    cdef list _replicas  # as ExCache._links: C may still be sending on an earlier one

    def __cinit__(self):
        self._replicas = []
        check(dh_mstore_create(&self._m), "memory store")

    def __dealloc__(self):
        if self._m is not NULL:
            dh_mstore_destroy(self._m)

    def serve(self, Link link not None) -> None:
        """Serves link until it closes or says SHUTDOWN (blocks; releases the GIL)."""
        cdef volatile int stop = 0
        cdef dh_link *l = link._live()
        cdef int rc
        with nogil:
            rc = dh_mstore_serve(self._m, l, &stop)
        check(rc, "memory node serving ExCache")

    def set_replica(self, Link link not None, double timeout=2.0) -> None:
        """Every write goes to the store behind link, and is acknowledged by
        it, before this store answers. Both stores must be empty (the one
        behind link is asked over it to serve as a replica). A replica that
        does not answer within timeout is dropped: this store goes on alone
        and its caches no longer fail over to it."""
        cdef dh_link *l = _usable(link, "replica")
        cdef int ms = <int>(timeout * 1000)
        cdef int rc
        self._replicas.append(link)
        with nogil:
            rc = dh_mstore_set_replica(self._m, l, ms)
        if rc == DH_EINVAL:
            raise ValueError(f"replica over {link.name}: a replica must start empty, beside an "
                             "empty store, and not have taken over from a primary")
        check(rc, f"replica over {link.name}")

    def stats(self) -> dict:
        cdef dh_mstore_stats s
        dh_mstore_get_stats(self._m, &s)
        return dict(regions=s.regions, bytes_reserved=s.bytes_reserved,
                    pages_stored=s.pages_stored, bytes_stored=s.pages_stored * DH_PAGE,
                    misses_served=s.misses_served, flushes=s.flushes,
                    replicated=s.replicated, replica_errors=s.replica_errors,
                    replicating=bool(s.replicating), fenced=bool(s.fenced),
                    backup=bool(s.backup), epoch=s.epoch, refused_forwards=s.refused_forwards)


def floor_minor_fault(size_t n) -> list:
    """First touches of n pages of plain anonymous memory -> ns each."""
    cdef size_t size = _pages_bytes(n)
    cdef void *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if m == MAP_FAILED:
        raise MemoryError()
    cdef Samples s = Samples(n)
    try:
        dh_excache_time_touch(m, n, 0, s.v)
        return s.values()
    finally:
        munmap(m, size)


def time_touch_native(size_t npages) -> list:
    """Touches of npages already-present pages of ordinary memory -> ns each
    (the floor of a cache hit)."""
    cdef size_t size = _pages_bytes(npages)
    cdef Samples s = Samples(npages)
    cdef uint8_t *m = <uint8_t *>malloc(size)
    if m is NULL:
        raise MemoryError()
    try:
        memset(m, 1, size)
        dh_excache_time_touch(m, npages, 0, s.v)
        return s.values()
    finally:
        free(m)


def floor_fault(str fault_mode, size_t n) -> list:
    """n userfaultfd faults filled from a local buffer by the given path -> ns."""
    cdef Samples s = Samples(n)
    cdef uint64_t *v = s.v
    cdef int mode = FAULT_MODES[fault_mode]
    cdef int rc
    with nogil:
        rc = dh_excache_floor_fault(mode, v, n)
    check(rc, "fault floor")
    return s.values()
