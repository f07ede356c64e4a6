/* ExCache internals shared by its C files (not part of the public API). */
#ifndef DH_EXCACHE_INT_H
#define DH_EXCACHE_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "excache_wire.h"

struct region {
    uint8_t *base;
    uint64_t size;
    uint32_t id;
    int used;
    int busy;          /* an alloc or a free is at work on it: no other alloc may take it */
    uint8_t *on_mnode; /* bit per page: written back at least once */
    uint64_t resident, dirty; /* its lines in the cache now */
    uint8_t *local;    /* the local page store (no link: the floor) */
    uint32_t clone_id; /* its copy on the memory node, made for a forked child */
};

enum { SEEN = 0, ASSUMED_FRESH = 1, ASSUMED_PREDICTED = 2 };

struct line {
    uintptr_t page; /* 0: empty */
    struct region *r;
    uint8_t dirty;
    uint8_t assumed; /* dirty by assumption, not a seen write: ASSUMED_FRESH or _PREDICTED */
    uint64_t filled, touched; /* fifo and lru stamps */
};

struct dh_excache {
    dh_link *link;
    dh_link *backup; /* a replica of the memory node, or NULL */
    int synced;      /* the primary's last answer: the backup holds all it acknowledged */
    uint32_t nonce, seq; /* the tokens of ALLOC and CLONE requests */
    int uffd; /* -1: none */
    int mode;
    int policy;
    int timeout_ms;
    uint32_t nsets, ways;
    uint32_t prefetch; /* lines per remote miss, >= 1 */
    int predict_writes; /* install pages likely written at once writable, as dirty lines */
    uint32_t predict_tick;
    int mirroring;        /* a fork is under way: write-backs also go to the copies */
    char label[48];    /* the memory node's name, for the fatal message */
    const char *why;   /* the local call that failed (for the fatal message), or NULL */
    int why_errno;
    struct line *lines;
    struct line *pf[DH_PREFETCH_MAX]; /* a miss's victims, one per line of its window */
    struct line *dv[DH_PREFETCH_MAX]; /* those that are dirty (under the lock) */
    struct iovec zap[DH_PREFETCH_MAX]; /* their mappings, dropped in one call (cache.c) */
    uint32_t nzap;
    int pidfd;     /* this process, for process_madvise: -1 not open yet, -2 not usable */
    pid_t pidfd_of; /* the process pidfd names (a forked child must open its own) */
    struct region regions[DH_EXCACHE_MAX_REGIONS];
    atomic_flag lock;
    uint64_t clock;
    uint32_t rng;
    dh_excache_stats st;
    union p2m_request *req; /* the request being sent */
    uint8_t *page; /* reply buffer: DH_PREFETCH_MAX pages */
    pthread_t thread;
    int thread_running;
    atomic_int stop;
};

/* excache.c: the fault paths. Ends the process for a fault that cannot be
 * served (rc), naming c->why when a local call failed. */
void ex_fatal(dh_excache *c, int rc);
int ex_start_handler(dh_excache *c);
/* uffd.c: one helper per userfaultfd call; a failure sets c->why. */
int ex_open_uffd(dh_excache *c);
int ex_register(dh_excache *c, void *base, uint64_t size);
int ex_unregister(dh_excache *c, void *base, uint64_t size);
int ex_protect(dh_excache *c, uintptr_t page, int on);
int ex_wake(dh_excache *c, uintptr_t page);
/* Copies n pages from c->page in at page, writable or write-protected. */
int ex_install(dh_excache *c, uintptr_t page, uint32_t n, int writable);
/* cache.c: the cache table. */
#define EX_GONE 1 /* ex_serve_fault: the region was freed after a lockless lookup found it */
int ex_serve_fault(dh_excache *c, struct region *r, uintptr_t addr, int wp);
/* Writes a dirty line back; it stays resident, clean and write-protected. */
int ex_write_back(dh_excache *c, struct line *l);
struct region *ex_find(dh_excache *c, uintptr_t a);
void ex_lock(dh_excache *c);
void ex_unlock(dh_excache *c);
struct line *ex_set_of(dh_excache *c, uintptr_t page);
struct line *ex_resident_line(dh_excache *c, struct line *set, uintptr_t page);
uint64_t ex_page_index(struct region *r, uintptr_t page);
/* A bit per page after on_mnode's: dirty when it was last written back. */
uint8_t *ex_was_dirty(struct region *r);
/* failover.c: requests to the memory node, failing over to its backup. */
void ex_failover_init(dh_excache *c);
/* req_len: the request in c->req, whole (failover.c fills an ALLOC's or
 * CLONE's token). */
int ex_call(dh_excache *c, uint16_t op, uint32_t req_len, uint32_t *got, uint32_t *flags);
int ex_rpc(dh_excache *c, uint16_t op, uint32_t req_len, uint32_t want);

#endif
