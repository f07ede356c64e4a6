/* The memory node's side of ExCache: vRegions (LegoOS's allocation unit)
 * kept as anonymous mappings, so a page costs memory only once it is written
 * back, and the protocol (excache_wire.h) served on a link, with ECHO (any
 * payload -> the same payload) for the channel's own round trip.
 * Every field is checked against the region's bounds before use.
 *
 * Region ids grow for the store's life and are never reused, so a FREE sent
 * twice (a retry after a failover) cannot free a region made in between; the
 * second is answered as done. An ALLOC or CLONE that carries a token is
 * answered with the region its token already made, if any.
 *
 * Replication: the primary forwards each write to its replica and waits for
 * it before it answers; every reply says whether the replica holds all that
 * this store acknowledged (DH_F_REPLICATED). A replica that fails is dropped
 * for good: the store goes on alone, its replies no longer say REPLICATED,
 * and its caches will not fail over to a replica that missed writes. The
 * first request a cache sends straight to a replica makes it take over: its
 * epoch is bumped, so forwards the old primary sent under the old one are
 * refused (DH_F_FENCED), and that primary, told so, refuses every later
 * request with DH_F_FENCED (its caches fail over too). */
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "excache_wire.h"

#define MAX_VREGIONS 1024
#define REPLY_MAX (DH_PAGE * DH_PREFETCH_MAX) /* a prefetching miss's pages */

struct vregion {
    uint8_t *base;
    uint64_t size;
    uint32_t id;    /* its slot is (id - 1) % MAX_VREGIONS */
    uint64_t token; /* of the ALLOC or CLONE that made it; 0: none */
};

struct dh_mstore {
    pthread_mutex_t mu;
    struct vregion regions[MAX_VREGIONS];
    uint32_t next_id; /* ids below it were given out */
    dh_mstore_stats st;
    dh_link *replica; /* under mu; NULL once it failed or took over */
    int replica_timeout_ms;
    uint32_t replica_epoch; /* the replica's epoch, on every forward */
    int made;               /* the last make_region made one (not a token's repeat) */
    struct m2m_forward_msg fwd; /* the forward being sent */
    int pending;              /* a forward was sent and its answer is awaited */
    uint64_t pending_req;     /* its request id */
    uint32_t pending_id;      /* the region it made, for an ALLOC or CLONE */
    union { /* the replica's answer to it */
        struct p2m_region made;
        struct m2m_joined joined;
        uint8_t bytes[64];
    } rbuf;
};

int dh_mstore_create(dh_mstore **out)
{
    dh_mstore *m = calloc(1, sizeof *m);
    if (!m)
        return DH_ENOMEM;
    pthread_mutex_init(&m->mu, NULL);
    m->next_id = 1;
    m->st.epoch = 1;
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

static struct vregion *region_of(dh_mstore *m, uint32_t id)
{
    if (id == 0)
        return NULL;
    struct vregion *r = &m->regions[(id - 1) % MAX_VREGIONS];
    return r->base && r->id == id ? r : NULL;
}

static uint8_t *page_at(dh_mstore *m, uint32_t id, uint64_t page)
{
    struct vregion *r = region_of(m, id);
    if (!r || page >= r->size / DH_PAGE)
        return NULL;
    return r->base + page * DH_PAGE;
}

/* The id a new region gets: the lowest unused one whose slot is free. */
static uint32_t new_id(dh_mstore *m)
{
    for (uint32_t k = 0; k < MAX_VREGIONS; k++) {
        uint32_t id = m->next_id + k;
        if (id < m->next_id) /* 2^32 regions in one store's life */
            return 0;
        if (!m->regions[(id - 1) % MAX_VREGIONS].base)
            return id;
    }
    return 0;
}

/* A new vRegion of size bytes (a copy of the pages of src that were ever
 * written, when given: mincore finds them, the rest read as zero), at id
 * (a forward names the primary's) or the next free one. A token that made a
 * region already gets that region again. */
static int make_region(dh_mstore *m, const struct vregion *src, uint64_t size, uint64_t token,
                       uint32_t id, struct p2m_region *out)
{
    m->made = 0;
    for (int i = 0; token && i < MAX_VREGIONS; i++) {
        struct vregion *r = &m->regions[i];
        if (r->base && r->token == token) {
            if (r->size != size)
                return -1;
            out->id = r->id;
            return sizeof *out;
        }
    }
    if (!id)
        id = new_id(m);
    if (!id || id < m->next_id || m->regions[(id - 1) % MAX_VREGIONS].base)
        return -1;
    uint8_t *base = mmap(NULL, size, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED)
        return -1;
    enum { CHUNK = 1u << 30 };
    static unsigned char vec[CHUNK / DH_PAGE]; /* under mu */
    for (uint64_t off = 0; src && off < size; off += CHUNK) {
        uint64_t n = size - off < CHUNK ? size - off : CHUNK;
        if (mincore(src->base + off, n, vec)) {
            munmap(base, size);
            return -1;
        }
        for (uint64_t p = 0; p < n / DH_PAGE; p++)
            if (vec[p] & 1)
                memcpy(base + off + p * DH_PAGE, src->base + off + p * DH_PAGE, DH_PAGE);
    }
    m->regions[(id - 1) % MAX_VREGIONS] = (struct vregion){base, size, id, token};
    m->next_id = id + 1;
    m->st.regions++;
    m->st.bytes_reserved += size;
    m->made = 1;
    out->id = id;
    return sizeof *out;
}

static void drop_region(dh_mstore *m, struct vregion *r)
{
    munmap(r->base, r->size);
    m->st.regions--;
    m->st.bytes_reserved -= r->size;
    *r = (struct vregion){0};
}

/* A MISS_FLUSH's write-backs, checked whole before any is applied: 0 and
 * where each goes in dst, or -1 for a bad request. */
static int check_flushes(dh_mstore *m, const struct p2m_miss_flush *mf, uint32_t len,
                         uint8_t **dst)
{
    if (len < offsetof(struct p2m_miss_flush, data) || mf->nflush < 1 ||
        mf->nflush > DH_PREFETCH_MAX ||
        len != offsetof(struct p2m_miss_flush, data) + (size_t)mf->nflush * DH_PAGE)
        return -1;
    for (uint32_t i = 0; i < mf->nflush; i++)
        if (!(dst[i] = page_at(m, mf->ref[i].region, mf->ref[i].page)))
            return -1;
    return 0;
}

static void apply_flushes(dh_mstore *m, const struct p2m_miss_flush *mf, uint8_t **dst)
{
    for (uint32_t i = 0; i < mf->nflush; i++)
        memcpy(dst[i], mf->data[i], DH_PAGE);
    m->st.flushes += mf->nflush;
    m->st.pages_stored += mf->nflush;
}

/* Handles one request; returns the reply length or -1 for a bad request.
 * id: where an ALLOC or CLONE puts its region (a forward's), 0: anywhere. */
static int handle(dh_mstore *m, uint16_t op, const uint8_t *in, uint32_t len, uint8_t *out,
                  uint32_t id)
{
    const union p2m_request *q = (const void *)in; /* read only once len says it is there */
    uint8_t *p;
    struct vregion *r;
    uint32_t n;
    switch (op) {
    case DH_OP_ECHO: /* the channel's own round trip: the paging benchmark's floor */
        if (len > REPLY_MAX)
            return -1;
        memcpy(out, in, len);
        return (int)len;
    case DH_OP_P2M_ALLOC:
        if (len != sizeof q->alloc && len != offsetof(struct p2m_alloc, token))
            return -1;
        if (!q->alloc.size || q->alloc.size % DH_PAGE)
            return -1;
        return make_region(m, NULL, q->alloc.size, len == sizeof q->alloc ? q->alloc.token : 0,
                           id, (void *)out);
    case DH_OP_P2M_CLONE:
        if ((len != sizeof q->clone && len != offsetof(struct p2m_clone, token)) ||
            !(r = region_of(m, q->clone.region)))
            return -1;
        return make_region(m, r, r->size, len == sizeof q->clone ? q->clone.token : 0, id,
                           (void *)out);
    case DH_OP_P2M_FREE:
        if (len != sizeof q->free)
            return -1;
        if (!(r = region_of(m, q->free.region))) /* freed already (a retry), or never given out */
            return q->free.region && q->free.region < m->next_id ? 0 : -1;
        drop_region(m, r);
        return 0;
    case DH_OP_P2M_PCACHE_MISS:
        if (len != sizeof q->miss)
            return -1;
        n = q->miss.n + !q->miss.n;
        if (n > DH_PREFETCH_MAX || !(p = page_at(m, q->miss.region, q->miss.page)) ||
            !page_at(m, q->miss.region, q->miss.page + n - 1))
            return -1;
        memcpy(out, p, (size_t)n * DH_PAGE);
        m->st.misses_served++;
        return (int)(n * DH_PAGE);
    case DH_OP_P2M_PCACHE_FLUSH:
        if (len != sizeof q->flush || !(p = page_at(m, q->flush.region, q->flush.page)))
            return -1;
        memcpy(p, q->flush.data, DH_PAGE);
        m->st.flushes++;
        m->st.pages_stored++;
        return 0;
    case DH_OP_P2M_PCACHE_MISS_FLUSH: {
        const struct p2m_miss_flush *mf = &q->miss_flush;
        uint8_t *dst[DH_PREFETCH_MAX];
        if (check_flushes(m, mf, len, dst) || mf->n < 1 || mf->n > DH_PREFETCH_MAX ||
            !(p = page_at(m, mf->region, mf->page)) ||
            !page_at(m, mf->region, mf->page + mf->n - 1))
            return -1;
        apply_flushes(m, mf, dst); /* first: the miss may be one of those pages */
        memcpy(out, p, (size_t)mf->n * DH_PAGE);
        m->st.misses_served++;
        return (int)(mf->n * DH_PAGE);
    }
    default:
        return -1;
    }
}

static int is_write(uint16_t op)
{
    return op == DH_OP_P2M_ALLOC || op == DH_OP_P2M_FREE || op == DH_OP_P2M_CLONE ||
           op == DH_OP_P2M_PCACHE_FLUSH || op == DH_OP_P2M_PCACHE_MISS_FLUSH;
}

/* A cache's request about its memory (not ECHO). */
static int is_p2m(uint16_t op) { return is_write(op) || op == DH_OP_P2M_PCACHE_MISS; }

static void say(const char *what)
{
    fprintf(stderr, "disagg-harness memory store: %s\n", what);
}

/* The replica stopped answering: this store goes on alone, and says so. */
static void lose_replica(dh_mstore *m)
{
    m->replica = NULL;
    m->st.replica_errors++;
    m->st.replicating = 0;
    say("its replica stopped answering: it goes on alone, and its caches will not fail over "
        "to that replica");
}

/* Sends a write to the replica (under mu), without waiting: 0 when it went,
 * or the replica failed (this store goes on alone, m->pending stays 0), -1
 * for a request too large to be one. */
static int forward_start(dh_mstore *m, uint16_t op, const uint8_t *in, uint32_t len,
                         uint32_t id)
{
    struct m2m_forward_msg *f = &m->fwd;
    if (len > sizeof f->body)
        return -1;
    memcpy(&f->body, in, len);
    f->hdr = (struct m2m_forward){.op = op, .epoch = m->replica_epoch, .id = id};
    m->pending_id = id;
    if (dh_rpc_start(m->replica, DH_OP_M2M_REPLICA, f, sizeof f->hdr + len, &m->pending_req,
                     m->replica_timeout_ms))
        lose_replica(m);
    else
        m->pending = 1;
    return 0;
}

/* Waits for the replica's answer to the forward under way: 0 when it holds
 * the write or failed (this store goes on alone), -1 when it refused it
 * (this store refuses it too; m->st.fenced if the replica took over). */
static int forward_finish(dh_mstore *m)
{
    if (!m->pending)
        return 0;
    m->pending = 0;
    uint32_t got = 0, flags = 0;
    if (dh_rpc_finish(m->replica, m->pending_req, &m->rbuf, sizeof m->rbuf, &got, &flags,
                      m->replica_timeout_ms)) {
        lose_replica(m);
        return 0;
    }
    if (flags & DH_F_FENCED) {
        m->replica = NULL;
        m->st.replicating = 0;
        m->st.fenced = 1;
        say("its replica took over (a cache switched to it): it refuses every request now");
        return -1;
    }
    uint32_t id = m->pending_id;
    if ((flags & DH_F_ERROR) || (id && (got != sizeof m->rbuf.made || m->rbuf.made.id != id)))
        return -1; /* the stores disagree: refuse it */
    m->st.replicated++;
    return 0;
}

/* A write to the replica, waited for. id: an ALLOC's or CLONE's region,
 * made here already. */
static int forward(dh_mstore *m, uint16_t op, const uint8_t *in, uint32_t len, uint32_t id)
{
    return forward_start(m, op, in, len, id) ? -1 : forward_finish(m);
}

/* A cache's request, on a primary or a lone store. */
static int serve_request(dh_mstore *m, uint16_t op, const uint8_t *in, uint32_t len,
                         uint8_t *out)
{
    if (!m->replica || !is_write(op))
        return handle(m, op, in, len, out, 0);
    if (op == DH_OP_P2M_ALLOC || op == DH_OP_P2M_CLONE) {
        /* Made here first, so the replica puts it at the same id. */
        int n = handle(m, op, in, len, out, 0);
        if (n != sizeof(struct p2m_region))
            return n;
        uint32_t id = ((const struct p2m_region *)(const void *)out)->id;
        int made = m->made;
        if (forward(m, op, in, len, id) == 0)
            return n;
        struct vregion *r = region_of(m, id);
        if (made && r)
            drop_region(m, r);
        return -1;
    }
    if (op == DH_OP_P2M_PCACHE_FLUSH || op == DH_OP_P2M_PCACHE_MISS_FLUSH) {
        /* Page writes: applied here (and the miss's pages read) while the
         * replica applies them, answered only once it holds them too. */
        if (forward_start(m, op, in, len, 0))
            return -1;
        int n = handle(m, op, in, len, out, 0);
        return forward_finish(m) ? -1 : n;
    }
    return forward(m, op, in, len, 0) ? -1 : handle(m, op, in, len, out, 0);
}

/* A primary's forward: applied while this store is its replica and the
 * epoch it was sent under is ours; refused once a cache switched here. */
static int serve_forward(dh_mstore *m, const uint8_t *in, uint32_t len, uint8_t *out,
                         uint32_t *flags)
{
    const struct m2m_forward *f = (const void *)in;
    if (len < sizeof *f)
        return -1;
    if (f->op == M2M_JOIN) { /* a replica starts empty, beside an empty primary */
        if (m->next_id != 1 || m->st.fenced || m->st.epoch != 1 || m->replica)
            return -1;
        m->st.backup = 1;
        ((struct m2m_joined *)(void *)out)->epoch = (uint32_t)m->st.epoch;
        return sizeof(struct m2m_joined);
    }
    if (!m->st.backup || f->epoch != m->st.epoch) {
        m->st.refused_forwards++;
        *flags |= DH_F_FENCED;
        return -1;
    }
    if (!is_write(f->op) ||
        ((f->op == DH_OP_P2M_ALLOC || f->op == DH_OP_P2M_CLONE) != (f->id != 0)))
        return -1;
    if (f->op == DH_OP_P2M_PCACHE_MISS_FLUSH) { /* only its write-backs: no pages back */
        const struct p2m_miss_flush *mf = (const void *)(in + sizeof *f);
        uint8_t *dst[DH_PREFETCH_MAX];
        if (check_flushes(m, mf, len - sizeof *f, dst))
            return -1;
        apply_flushes(m, mf, dst);
        return 0;
    }
    return handle(m, f->op, in + sizeof *f, len - sizeof *f, out, f->id);
}

static int serve_one(dh_mstore *m, const dh_frame_hdr *h, const uint8_t *in, uint8_t *out,
                     uint32_t *flags)
{
    pthread_mutex_lock(&m->mu);
    int n;
    if (h->opcode == DH_OP_M2M_REPLICA) {
        n = serve_forward(m, in, h->length, out, flags);
    } else if (m->st.fenced && h->opcode != DH_OP_ECHO) {
        n = -1;
    } else {
        if (m->st.backup && is_p2m(h->opcode)) {
            /* A cache switched to this replica: it takes over, and forwards
             * sent under the old epoch (a late one from the old primary)
             * are refused from now on. */
            m->st.backup = 0;
            m->st.epoch++;
            say("a cache switched to this replica: it takes over from its primary");
        }
        n = serve_request(m, h->opcode, in, h->length, out);
    }
    if (m->st.fenced && h->opcode != DH_OP_M2M_REPLICA)
        *flags |= DH_F_FENCED;
    else if (m->replica)
        *flags |= DH_F_REPLICATED;
    pthread_mutex_unlock(&m->mu);
    return n;
}

int dh_mstore_set_replica(dh_mstore *m, dh_link *replica, int timeout_ms)
{
    pthread_mutex_lock(&m->mu);
    int rc = 0;
    if (m->next_id != 1 || m->st.backup || m->st.fenced || m->st.epoch != 1) {
        rc = DH_EINVAL; /* the replica would lack what this store holds */
    } else if (replica) {
        uint32_t got = 0, flags = 0;
        m->fwd.hdr = (struct m2m_forward){.op = M2M_JOIN};
        rc = dh_rpc_call(replica, DH_OP_M2M_REPLICA, &m->fwd.hdr, sizeof m->fwd.hdr, &m->rbuf,
                         sizeof m->rbuf, &got, &flags, timeout_ms);
        if (!rc && ((flags & DH_F_ERROR) || got != sizeof m->rbuf.joined))
            rc = DH_EINVAL; /* not empty, or taken over already */
        if (!rc)
            m->replica_epoch = m->rbuf.joined.epoch;
    }
    if (!rc) {
        m->replica = replica;
        m->replica_timeout_ms = timeout_ms;
        m->st.replicating = replica != NULL;
    }
    pthread_mutex_unlock(&m->mu);
    return rc;
}

struct serve_ctx {
    dh_mstore *m;
    uint8_t out[REPLY_MAX];
};

static int serve_frame(void *ctx, const dh_frame_hdr *h, uint8_t *in, const uint8_t **reply,
                       uint32_t *flags)
{
    struct serve_ctx *sc = ctx;
    int n = serve_one(sc->m, h, in, sc->out, flags);
    *reply = sc->out;
    return n >= 0 ? n : *flags & DH_F_FENCED ? DH_EFENCED : DH_EINVAL;
}

int dh_mstore_serve(dh_mstore *m, dh_link *l, volatile int *stop)
{
    struct serve_ctx *sc = malloc(sizeof *sc);
    if (!sc)
        return DH_ENOMEM;
    sc->m = m;
    int rc = dh_rpc_serve(l, stop, serve_frame, sc);
    free(sc);
    return rc;
}
