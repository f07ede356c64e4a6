/* The ExCache protocol: the payload of every request and reply between a
 * processor node's cache (excache, region, ranges, failover) and a memory
 * node (mnode), and between a primary memory node and its replica. One
 * packed struct per message, little-endian like the frame header (x86-64's
 * own order). Internal to native/excache; the Python tests pack the same
 * layouts with struct. */
#ifndef DH_EXCACHE_WIRE_H
#define DH_EXCACHE_WIRE_H

#include <assert.h>
#include <stdint.h>

#include "dh_excache.h"

#define WIRE __attribute__((packed))

/* P2M_ALLOC -> struct p2m_region: a new vRegion of size bytes. */
struct WIRE p2m_alloc {
    uint64_t size;
    uint64_t token; /* optional: a retry with the same token gets the same region */
};

/* P2M_CLONE -> struct p2m_region: a copy of a region (the pages ever
 * written), for a forked child. */
struct WIRE p2m_clone {
    uint32_t region;
    uint64_t token; /* optional, as ALLOC's */
};

/* P2M_FREE -> (empty). A region freed already is answered as done. */
struct WIRE p2m_free {
    uint32_t region;
};

/* P2M_PCACHE_MISS -> n pages from page on (n 0: one). */
struct WIRE p2m_miss {
    uint32_t region;
    uint32_t n;
    uint64_t page;
};

/* P2M_PCACHE_FLUSH -> (empty): a page written back. */
struct WIRE p2m_flush {
    uint32_t region;
    uint32_t zero;
    uint64_t page;
    uint8_t data[DH_PAGE];
};

/* Where a write-back carried by a miss goes. */
struct WIRE p2m_flush_ref {
    uint32_t region;
    uint32_t zero;
    uint64_t page;
};

/* P2M_PCACHE_MISS_FLUSH -> n pages (1..DH_PREFETCH_MAX) from page on: a miss
 * carrying the write-backs of the dirty victims of its window (nflush,
 * 1..DH_PREFETCH_MAX: ref[i] for data[i]), applied first (the miss may be
 * one of those pages). Its length: offsetof(data) + nflush pages. */
struct WIRE p2m_miss_flush {
    uint32_t region;
    uint32_t n;
    uint64_t page;
    uint32_t nflush;
    uint32_t zero;
    struct p2m_flush_ref ref[DH_PREFETCH_MAX];
    uint8_t data[DH_PREFETCH_MAX][DH_PAGE];
};

/* The answer to ALLOC and CLONE. */
struct WIRE p2m_region {
    uint32_t id;
};

/* Every request a cache sends; the buffer it builds them in. */
union p2m_request {
    struct p2m_alloc alloc;
    struct p2m_clone clone;
    struct p2m_free free;
    struct p2m_miss miss;
    struct p2m_flush flush;
    struct p2m_miss_flush miss_flush;
};

/* M2M_REPLICA -> the forwarded request's answer: a write the primary
 * forwards, applied by the replica only under its current epoch. */
#define M2M_JOIN 0 /* op when a primary attaches: no request -> struct m2m_joined */
struct WIRE m2m_forward {
    uint16_t op;
    uint16_t zero;
    uint32_t epoch;
    uint32_t id; /* the region an ALLOC or CLONE made on the primary; 0 otherwise */
    uint32_t zero2;
};

/* The writes a forward carries (a MISS_FLUSH goes whole; the replica
 * applies its write-backs and answers with no pages). */
struct WIRE m2m_forward_msg {
    struct m2m_forward hdr;
    union {
        struct p2m_alloc alloc;
        struct p2m_clone clone;
        struct p2m_free free;
        struct p2m_flush flush;
        struct p2m_miss_flush miss_flush;
    } body;
};

struct WIRE m2m_joined {
    uint32_t epoch;
};

static_assert(sizeof(struct p2m_alloc) == 16, "P2M_ALLOC: u64 size, u64 token");
static_assert(sizeof(struct p2m_clone) == 12, "P2M_CLONE: u32 region, u64 token");
static_assert(sizeof(struct p2m_free) == 4, "P2M_FREE: u32 region");
static_assert(sizeof(struct p2m_miss) == 16, "P2M_PCACHE_MISS: u32 region, u32 n, u64 page");
static_assert(sizeof(struct p2m_flush) == 16 + DH_PAGE, "P2M_PCACHE_FLUSH: 16 bytes, a page");
static_assert(sizeof(struct p2m_flush_ref) == 16, "u32 region, u32 zero, u64 page");
static_assert(sizeof(struct p2m_miss_flush) == 24 + DH_PREFETCH_MAX * (16 + DH_PAGE),
              "P2M_PCACHE_MISS_FLUSH");
static_assert(sizeof(union p2m_request) == sizeof(struct p2m_miss_flush), "the largest");
static_assert(sizeof(struct p2m_region) == 4, "a region id");
static_assert(sizeof(struct m2m_forward) == 16, "M2M_REPLICA's own fields");
static_assert(sizeof(struct m2m_forward_msg) == 16 + sizeof(struct p2m_miss_flush),
              "a forwarded MISS_FLUSH");
static_assert(sizeof(struct m2m_joined) == 4, "an epoch");

#endif
