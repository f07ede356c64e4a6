/* ExCache: the processor node's cache of memory that lives on a memory node
 * (LegoOS), filled by real page faults through userfaultfd.
 *
 * A region is anonymous memory registered with userfaultfd (MISSING|WP).
 * A miss fetches the page from the memory node and installs it write-
 * protected (UFFDIO_COPY_MODE_WP), so the first write to it faults again and
 * marks the line dirty. The cache is set-associative over 4 KiB lines, the
 * set chosen from the virtual page number. Evicting a clean line drops it;
 * a dirty one is written back, piggybacked on the miss that evicts it. A page
 * never written back is zero-filled locally, with no round trip (p-local).
 *
 * Fault paths: SIGBUS (UFFD_FEATURE_SIGBUS: the faulting thread serves its
 * own miss in a signal handler, so everything on that path is async-signal-
 * safe) or a handler thread reading the userfaultfd. */
#ifndef DH_EXCACHE_H
#define DH_EXCACHE_H

#include <stddef.h>
#include <stdint.h>

#include "dh_error.h"
#include "dh_transport.h"

#define DH_PAGE 4096u
#define DH_EXCACHE_MAX_REGIONS 64
#define DH_HIST_BUCKETS 32 /* log2(ns) buckets of fault service time */
#define DH_PREFETCH_MAX 16 /* lines one miss may bring in (LegoOS: CONFIG_PCACHE_PREFETCH) */

/* Reply flags of the memory protocol (beside the transport's DH_F_*). */
#define DH_F_REPLICATED 0x100u /* the store's replica holds every write it acknowledged */
#define DH_F_FENCED 0x200u     /* refused: the store's replica took over from it */

enum dh_policy { DH_POLICY_FIFO = 0, DH_POLICY_LRU = 1, DH_POLICY_RANDOM = 2 };
enum dh_fault_mode { DH_FAULT_SIGBUS = 0, DH_FAULT_THREAD = 1 };

typedef struct dh_excache dh_excache;

typedef struct dh_excache_stats {
    uint64_t misses;       /* faults on a page not in the cache */
    uint64_t remote_fetches;
    uint64_t zero_fills;   /* misses served locally: the page was never written back */
    uint64_t wp_faults;    /* first writes to clean lines */
    uint64_t evictions;
    uint64_t clean_drops;
    uint64_t dirty_flushes;
    uint64_t piggybacked;  /* dirty flushes carried by a miss request */
    uint64_t prefetched;   /* lines brought in behind a miss, in the same round trip */
    uint64_t failovers;    /* switches from a failed memory node to its backup */
    uint64_t failover_ns;  /* the last one: from the failed request's start to its answer */
    uint64_t resident;     /* lines in use now */
    uint64_t failovers_refused; /* the backup had missed writes: an error, not old pages */
    uint64_t backup_in_sync;    /* 1: a backup is set and holds every acknowledged write */
    uint64_t hist[DH_HIST_BUCKETS];
} dh_excache_stats;

/* link: to the memory node (the cache takes no ownership), or NULL for the
 * local page store that the benchmark uses as its floor. capacity is in
 * bytes (a multiple of ways pages). */
int dh_excache_create(dh_link *link, uint64_t capacity, uint32_t ways, int policy,
                      int fault_mode, int timeout_ms, dh_excache **out);
void dh_excache_destroy(dh_excache *c);
/* Lines a remote miss fetches: the missing page and up to n-1 that follow it
 * in the region, on the memory node, not resident, and whose victims are
 * clean (a prefetch never costs a write-back). 1 (the default): none. */
int dh_excache_set_prefetch(dh_excache *c, uint32_t n);
/* on: a page never written back (fresh memory, written at once) and a page
 * that was dirty when it was last evicted are installed writable and counted
 * dirty, saving the write-protect fault their first write would take; the
 * rest come in clean as usual. off (the default): every page comes in clean. */
void dh_excache_set_predict_writes(dh_excache *c, int on);
/* The memory node's name, for the message a process dies with when that
 * node stops answering. */
void dh_excache_set_label(dh_excache *c, const char *label);
/* A backup memory node (the primary replicates every write to it): when a
 * request to the primary fails (it closed, died, timed out, or says its
 * backup took over), the cache switches to the backup for good and sends the
 * request again: every request may be sent twice (an ALLOC or CLONE carries
 * a token the store knows it by). It does so only while the primary's last
 * answer said the backup holds every write it acknowledged
 * (DH_F_REPLICATED); otherwise the request fails with DH_ESTALE, and a fault
 * ends the process with that message: never old pages. */
void dh_excache_set_backup(dh_excache *c, dh_link *backup);
/* A new region of size bytes, backed by a vRegion on the memory node. */
int dh_excache_alloc(dh_excache *c, uint64_t size, void **addr, uint32_t *region_id);
int dh_excache_free(dh_excache *c, void *addr);
/* Drops the lines of [addr, addr+len) inside a region without writing them
 * back, and forgets that the range was ever written: its next touch is
 * zero-filled, as after munmap or MADV_DONTNEED. zap: also unmap the pages
 * here (0 when the caller replaces the mapping itself). */
int dh_excache_discard(dh_excache *c, void *addr, uint64_t len, int zap);
/* Writes back the dirty lines of the range and drops all its lines, so its
 * pages live only on the memory node (before mprotect takes access away). */
int dh_excache_evict_range(dh_excache *c, void *addr, uint64_t len);
/* fork(): prepare (in the parent, before) copies each region on the memory
 * node and mirrors every later write-back to the copies; parent (after, in
 * the parent) stops the mirroring; child (in the child) gives the cache its
 * own userfaultfd and link, registers the regions again, keeps the lines it
 * inherited as dirty and switches to the copies. */
int dh_excache_fork_prepare(dh_excache *c);
void dh_excache_fork_parent(dh_excache *c);
int dh_excache_fork_child(dh_excache *c, dh_link *link);
/* Pages of [addr, addr+len) present in memory but not in the cache: in a
 * forked child, pages touched before its cache was ready (they read as
 * zero, not as the parent's). */
uint64_t dh_excache_untracked(dh_excache *c, void *addr, uint64_t len);
/* Writes every dirty line back (and keeps it, now clean). */
int dh_excache_flush(dh_excache *c);
void dh_excache_get_stats(dh_excache *c, dh_excache_stats *s);
/* Lines of one region in the cache now, and how many of them are dirty. */
int dh_excache_region_stats(dh_excache *c, void *addr, uint64_t *resident, uint64_t *dirty);
void dh_excache_reset_stats(dh_excache *c);
/* The memory node's id of the region holding addr (0: none); a forked
 * child's regions are copies with ids of their own. */
uint32_t dh_excache_region_id(dh_excache *c, void *addr);

/* The memory node's side: a store of vRegions, served on links. */
typedef struct dh_mstore dh_mstore;

typedef struct dh_mstore_stats {
    uint64_t regions;
    uint64_t bytes_reserved; /* sum of vRegion sizes */
    uint64_t pages_stored;   /* pages ever written back */
    uint64_t misses_served;
    uint64_t flushes;
    uint64_t replicated;     /* writes the replica acknowledged before this store answered */
    uint64_t replica_errors; /* the replica failed: from then on this store runs alone */
    uint64_t replicating;    /* 1 while a replica is attached and answering */
    uint64_t fenced;         /* 1 once its replica took over: it refuses every request */
    uint64_t backup;         /* 1 while a primary forwards to it and no cache switched to it */
    uint64_t epoch;          /* bumped when it takes over: older forwards are refused */
    uint64_t refused_forwards; /* forwards from a primary it took over from */
} dh_mstore_stats;

int dh_mstore_create(dh_mstore **out);
void dh_mstore_destroy(dh_mstore *m);
/* Serves the ExCache protocol on l until *stop, the link closes or SHUTDOWN.
 * Several links may share one store. */
int dh_mstore_serve(dh_mstore *m, dh_link *l, volatile int *stop);
/* Every write (ALLOC, FREE, CLONE, FLUSH, and a MISS_FLUSH's write-backs) is sent
 * to the replica, another store, and acknowledged by it before this store
 * answers; each answer then carries DH_F_REPLICATED. If the replica fails,
 * this store goes on alone (counted in replica_errors; its answers no longer
 * say REPLICATED, so caches do not fail over to a replica that missed
 * writes). Both stores must be empty (DH_EINVAL otherwise): the replica is
 * asked, over the link, to serve as one. */
int dh_mstore_set_replica(dh_mstore *m, dh_link *replica, int timeout_ms);
void dh_mstore_get_stats(dh_mstore *m, dh_mstore_stats *s);

/* Moves fd to a number at or above DH_FD_HIGH (close-on-exec) and returns
 * it, or fd when the limit on open files does not allow: a program whose
 * memory the cache serves keeps its usual descriptors (a script's
 * `exec 3<file`, a daemon's closefrom) away from the cache's own. */
#define DH_FD_HIGH 600
int dh_fd_high(int fd);

/* Reads (or writes) one byte of each of npages pages from addr, timing each
 * access: a benchmark's view of miss and hit latency; samples in ns. */
void dh_excache_time_touch(void *addr, size_t npages, int write, uint64_t *samples);

/* The floor of a miss: one userfaultfd fault on fresh memory, filled from a
 * local buffer by the given fault path; samples in ns. */
int dh_excache_floor_fault(int fault_mode, uint64_t *samples, size_t n);

#endif
