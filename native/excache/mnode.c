/* The memory node's side of ExCache: vRegions (LegoOS's allocation unit)
 * kept as anonymous mappings, so a page costs memory only once it is written
 * back, and the protocol served on a link:
 *   P2M_ALLOC       u64 size                         -> u32 region id
 *   P2M_FREE        u32 region                       -> (empty)
 *   P2M_CLONE       u32 region                       -> u32 id of a copy of it
 *   P2M_PCACHE_MISS u32 region, u32 n, u64 page      -> n pages from there (0: one)
 *   P2M_PCACHE_FLUSH u32 region, u32 0, u64 page, data -> (empty)
 *   P2M_PCACHE_MISS_FLUSH u32 miss region, u32 flush region, u64 miss page,
 *                   u64 flush page, data [, u32 n]   -> n pages (default one)
 *   ECHO      any payload                            -> the same payload
 * Every field is checked against the region's bounds before use. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "dh_excache.h"

#define MAX_VREGIONS 1024
#define REPLY_MAX (DH_PAGE * DH_PREFETCH_MAX) /* a prefetching miss's pages */

struct vregion {
    uint8_t *base;
    uint64_t size;
};

struct dh_mstore {
    pthread_mutex_t mu;
    struct vregion regions[MAX_VREGIONS]; /* id = index + 1 */
    dh_mstore_stats st;
    dh_link *replica; /* under mu */
    int replica_timeout_ms;
    uint8_t fwd[16 + DH_PAGE]; /* a MISS_FLUSH's flush, as a FLUSH */
    uint8_t rbuf[64];
};

int dh_mstore_create(dh_mstore **out)
{
    dh_mstore *m = calloc(1, sizeof *m);
    if (!m)
        return DH_ENOMEM;
    pthread_mutex_init(&m->mu, NULL);
    *out = m;
    return 0;
}

void dh_mstore_destroy(dh_mstore *m)
{
    if (!m)
        return;
    for (int i = 0; i < MAX_VREGIONS; i++)
        if (m->regions[i].base)
            munmap(m->regions[i].base, m->regions[i].size);
    pthread_mutex_destroy(&m->mu);
    free(m);
}

void dh_mstore_get_stats(dh_mstore *m, dh_mstore_stats *s)
{
    pthread_mutex_lock(&m->mu);
    *s = m->st;
    pthread_mutex_unlock(&m->mu);
}

static uint8_t *page_at(dh_mstore *m, uint32_t id, uint64_t page)
{
    if (id == 0 || id > MAX_VREGIONS)
        return NULL;
    struct vregion *r = &m->regions[id - 1];
    if (!r->base || page >= r->size / DH_PAGE)
        return NULL;
    return r->base + page * DH_PAGE;
}

/* A new vRegion holding the pages of r that were ever written (mincore
 * finds them: the rest were never touched and read as zero). */
static int clone_region(dh_mstore *m, const struct vregion *r, uint8_t *out)
{
    uint32_t i = 0;
    while (i < MAX_VREGIONS && m->regions[i].base)
        i++;
    if (i == MAX_VREGIONS)
        return -1;
    uint8_t *base = mmap(NULL, r->size, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED)
        return -1;
    enum { CHUNK = 1u << 30 };
    static unsigned char vec[CHUNK / DH_PAGE]; /* under mu */
    for (uint64_t off = 0; off < r->size; off += CHUNK) {
        uint64_t n = r->size - off < CHUNK ? r->size - off : CHUNK;
        if (mincore(r->base + off, n, vec)) {
            munmap(base, r->size);
            return -1;
        }
        for (uint64_t p = 0; p < n / DH_PAGE; p++)
            if (vec[p] & 1)
                memcpy(base + off + p * DH_PAGE, r->base + off + p * DH_PAGE, DH_PAGE);
    }
    m->regions[i] = (struct vregion){base, r->size};
    m->st.regions++;
    m->st.bytes_reserved += r->size;
    uint32_t id = i + 1;
    memcpy(out, &id, 4);
    return 4;
}

struct serve_ctx {
    dh_mstore *m;
    uint8_t out[REPLY_MAX];
};

/* Handles one request; returns the reply length or -1 for a bad request. */
static int handle(dh_mstore *m, uint16_t op, const uint8_t *in, uint32_t len, uint8_t *out)
{
    uint32_t a = 0, b = 0;
    uint64_t x = 0, y = 0;
    if (len >= 4)
        memcpy(&a, in, 4);
    if (len >= 8)
        memcpy(&b, in + 4, 4);
    if (len >= 16)
        memcpy(&x, in + 8, 8);
    if (len >= 24)
        memcpy(&y, in + 16, 8);
    uint8_t *p, *q;
    switch (op) {
    case DH_OP_ECHO: /* the channel's own round trip: the paging benchmark's floor */
        if (len > REPLY_MAX)
            return -1;
        memcpy(out, in, len);
        return (int)len;
    case DH_OP_P2M_ALLOC: {
        uint64_t size;
        if (len != 8)
            return -1;
        memcpy(&size, in, 8);
        if (!size || size % DH_PAGE)
            return -1;
        for (uint32_t i = 0; i < MAX_VREGIONS; i++) {
            if (m->regions[i].base)
                continue;
            void *base = mmap(NULL, size, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (base == MAP_FAILED)
                return -1;
            m->regions[i] = (struct vregion){base, size};
            m->st.regions++;
            m->st.bytes_reserved += size;
            uint32_t id = i + 1;
            memcpy(out, &id, 4);
            return 4;
        }
        return -1;
    }
    case DH_OP_P2M_CLONE:
        if (len != 4 || a == 0 || a > MAX_VREGIONS || !m->regions[a - 1].base)
            return -1;
        return clone_region(m, &m->regions[a - 1], out);
    case DH_OP_P2M_FREE:
        if (len != 4 || a == 0 || a > MAX_VREGIONS || !m->regions[a - 1].base)
            return -1;
        munmap(m->regions[a - 1].base, m->regions[a - 1].size);
        m->st.regions--;
        m->st.bytes_reserved -= m->regions[a - 1].size;
        m->regions[a - 1] = (struct vregion){0};
        return 0;
    case DH_OP_P2M_PCACHE_MISS:
        b += !b;
        if (len != 16 || b > DH_PREFETCH_MAX || !(p = page_at(m, a, x)) ||
            !page_at(m, a, x + b - 1))
            return -1;
        memcpy(out, p, (size_t)b * DH_PAGE);
        m->st.misses_served++;
        return (int)(b * DH_PAGE);
    case DH_OP_P2M_PCACHE_FLUSH:
        if (len != 16 + DH_PAGE || !(p = page_at(m, a, x)))
            return -1;
        memcpy(p, in + 16, DH_PAGE);
        m->st.flushes++;
        m->st.pages_stored++;
        return 0;
    case DH_OP_P2M_PCACHE_MISS_FLUSH: {
        uint32_t n = 1;
        if (len == 28 + DH_PAGE)
            memcpy(&n, in + 24 + DH_PAGE, 4);
        else if (len != 24 + DH_PAGE)
            return -1;
        if (n < 1 || n > DH_PREFETCH_MAX || !(p = page_at(m, a, x)) ||
            !page_at(m, a, x + n - 1) || !(q = page_at(m, b, y)))
            return -1;
        memcpy(q, in + 24, DH_PAGE); /* the flush first: the miss may be that page */
        memcpy(out, p, (size_t)n * DH_PAGE);
        m->st.flushes++;
        m->st.pages_stored++;
        m->st.misses_served++;
        return (int)(n * DH_PAGE);
    }
    default:
        return -1;
    }
}

/* Sends a write to the replica and waits for its answer (under mu). 0 when
 * it is on the replica or there is none; -1 when the replica refused it
 * (the stores disagree, so this one refuses it too). A replica that fails
 * is dropped: this store goes on alone. */
static int replicate(dh_mstore *m, uint16_t op, const uint8_t *in, uint32_t len,
                     uint32_t *replica_id)
{
    if (!m->replica || (op != DH_OP_P2M_ALLOC && op != DH_OP_P2M_FREE && op != DH_OP_P2M_CLONE &&
                        op != DH_OP_P2M_PCACHE_FLUSH && op != DH_OP_P2M_PCACHE_MISS_FLUSH))
        return 0;
    if (op == DH_OP_P2M_PCACHE_MISS_FLUSH) {
        if (len < 24 + DH_PAGE)
            return -1;
        memcpy(m->fwd, in + 4, 4);       /* flush region */
        memset(m->fwd + 4, 0, 4);
        memcpy(m->fwd + 8, in + 16, 8);  /* flush page */
        memcpy(m->fwd + 16, in + 24, DH_PAGE);
        op = DH_OP_P2M_PCACHE_FLUSH;
        in = m->fwd;
        len = 16 + DH_PAGE;
    }
    uint32_t got = 0, flags = 0;
    int rc = dh_rpc_call(m->replica, op, in, len, m->rbuf, sizeof m->rbuf, &got, &flags,
                         m->replica_timeout_ms);
    if (rc) {
        m->replica = NULL;
        m->st.replica_errors++;
        m->st.replicating = 0;
        return 0;
    }
    if (flags & DH_F_ERROR)
        return -1;
    if ((op == DH_OP_P2M_ALLOC || op == DH_OP_P2M_CLONE) && got == 4)
        memcpy(replica_id, m->rbuf, 4);
    m->st.replicated++;
    return 0;
}

static int serve_one(void *ctx, const dh_frame_hdr *h, uint8_t *in, const uint8_t **reply)
{
    struct serve_ctx *sc = ctx;
    dh_mstore *m = sc->m;
    pthread_mutex_lock(&m->mu);
    uint32_t replica_id = 0;
    int replicated = m->replica != NULL;
    int n = replicate(m, h->opcode, in, h->length, &replica_id);
    if (n == 0)
        n = handle(m, h->opcode, in, h->length, sc->out);
    if (n == 4 && (h->opcode == DH_OP_P2M_ALLOC || h->opcode == DH_OP_P2M_CLONE) &&
        replicated && m->replica &&
        memcmp(sc->out, &replica_id, 4) != 0)
        n = -1; /* the two stores disagree on the region's id: refuse it */
    pthread_mutex_unlock(&m->mu);
    *reply = sc->out;
    return n < 0 ? DH_EINVAL : n;
}

void dh_mstore_set_replica(dh_mstore *m, dh_link *replica, int timeout_ms)
{
    pthread_mutex_lock(&m->mu);
    m->replica = replica;
    m->replica_timeout_ms = timeout_ms;
    m->st.replicating = replica != NULL;
    pthread_mutex_unlock(&m->mu);
}

int dh_mstore_serve(dh_mstore *m, dh_link *l, volatile int *stop)
{
    struct serve_ctx *sc = malloc(sizeof *sc);
    if (!sc)
        return DH_ENOMEM;
    sc->m = m;
    int rc = dh_rpc_serve(l, stop, serve_one, sc);
    free(sc);
    return rc;
}
