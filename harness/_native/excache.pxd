from libc.stdint cimport uint8_t, uint32_t, uint64_t

from harness._native.transport cimport dh_link

cdef extern from "dh_excache.h" nogil:
    enum:
        DH_PAGE
        DH_HIST_BUCKETS
        DH_PREFETCH_MAX
        DH_POLICY_FIFO
        DH_POLICY_LRU
        DH_POLICY_RANDOM
        DH_FAULT_SIGBUS
        DH_FAULT_THREAD

    ctypedef struct dh_excache:
        pass
    ctypedef struct dh_mstore:
        pass

    ctypedef struct dh_excache_stats:
        uint64_t misses
        uint64_t remote_fetches
        uint64_t zero_fills
        uint64_t wp_faults
        uint64_t evictions
        uint64_t clean_drops
        uint64_t dirty_flushes
        uint64_t piggybacked
        uint64_t prefetched
        uint64_t failovers
        uint64_t failover_ns
        uint64_t resident
        uint64_t failovers_refused
        uint64_t backup_in_sync
        uint64_t hist[32]

    ctypedef struct dh_mstore_stats:
        uint64_t regions
        uint64_t bytes_reserved
        uint64_t pages_stored
        uint64_t misses_served
        uint64_t flushes
        uint64_t replicated
        uint64_t replica_errors
        uint64_t replicating
        uint64_t fenced
        uint64_t backup
        uint64_t epoch
        uint64_t refused_forwards

    int dh_excache_create(dh_link *link, uint64_t capacity, uint32_t ways, int policy,
                          int fault_mode, int timeout_ms, dh_excache **out)
    void dh_excache_destroy(dh_excache *c)
    int dh_excache_set_prefetch(dh_excache *c, uint32_t n)
    void dh_excache_set_backup(dh_excache *c, dh_link *backup)
    int dh_excache_alloc(dh_excache *c, uint64_t size, void **addr, uint32_t *region_id)
    int dh_excache_free(dh_excache *c, void *addr)
    int dh_excache_flush(dh_excache *c)
    void dh_excache_get_stats(dh_excache *c, dh_excache_stats *s)
    int dh_excache_region_stats(dh_excache *c, void *addr, uint64_t *resident, uint64_t *dirty)
    void dh_excache_reset_stats(dh_excache *c)
    void dh_excache_time_touch(void *addr, size_t npages, int write, uint64_t *samples)
    int dh_excache_floor_fault(int fault_mode, uint64_t *samples, size_t n)

    int dh_mstore_create(dh_mstore **out)
    void dh_mstore_destroy(dh_mstore *m)
    int dh_mstore_serve(dh_mstore *m, dh_link *l, volatile int *stop)
    void dh_mstore_get_stats(dh_mstore *m, dh_mstore_stats *s)
    int dh_mstore_set_replica(dh_mstore *m, dh_link *replica, int timeout_ms)
