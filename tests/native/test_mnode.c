/* Native tests of the memory node (native/excache/mnode.c), built with
 * AddressSanitizer and UBSan by tests/native/test_native.py: a store served
 * on one end of a socket pair, driven from the other with requests built
 * from excache_wire.h, as a cache sends them. Prints "N passed, N failed". */
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "excache_wire.h"

#include "check.h"

/* A MISS_FLUSH carrying n write-backs: its length on the wire. */
#define MISS_FLUSH_LEN(n) ((uint32_t)(offsetof(struct p2m_miss_flush, data) + (n) * DH_PAGE))

struct served {
    dh_mstore *m;
    dh_link *server, *client;
    pthread_t thread;
    volatile int stop;
    int rc;
};

static void *serve(void *arg)
{
    struct served *s = arg;
    s->rc = dh_mstore_serve(s->m, s->server, &s->stop);
    return NULL;
}

/* A store m served on a new link; returns its client end. */
static int start(struct served *s, dh_mstore *m)
{
    int sv[2];
    memset(s, 0, sizeof *s);
    s->m = m;
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) || dh_link_fd(sv[0], &s->server) ||
        dh_link_fd(sv[1], &s->client))
        return -1;
    return pthread_create(&s->thread, NULL, serve, s) ? -1 : 0;
}

/* SHUTDOWN ends the serve loop cleanly. */
static int stop(struct served *s)
{
    int rc = dh_rpc_call(s->client, DH_OP_SHUTDOWN, NULL, 0, NULL, 0, NULL, NULL, 5000);
    pthread_join(s->thread, NULL);
    dh_link_destroy(s->client);
    dh_link_destroy(s->server);
    return rc || s->rc;
}

static uint8_t reply[DH_PAGE * DH_PREFETCH_MAX];

/* One request: the reply's length, or -1 for an error reply (or no reply). */
static int ask(dh_link *l, uint16_t op, const void *req, uint32_t len, uint32_t *flags)
{
    uint32_t got = 0, f = 0;
    int rc = dh_rpc_call(l, op, req, len, reply, sizeof reply, &got, &f, 5000);
    if (flags)
        *flags = f;
    return rc || (f & DH_F_ERROR) ? -1 : (int)got;
}

static uint32_t alloc(dh_link *l, uint64_t size, uint64_t token)
{
    struct p2m_alloc q = {.size = size, .token = token};
    if (ask(l, DH_OP_P2M_ALLOC, &q, sizeof q, NULL) != sizeof(struct p2m_region))
        return 0;
    return ((struct p2m_region *)(void *)reply)->id;
}

static int flush(dh_link *l, uint32_t region, uint64_t page, uint8_t fill)
{
    static struct p2m_flush q;
    q.region = region;
    q.zero = 0;
    q.page = page;
    memset(q.data, fill, DH_PAGE);
    return ask(l, DH_OP_P2M_PCACHE_FLUSH, &q, sizeof q, NULL);
}

/* Whether reply holds n pages filled with fill[0..n). */
static int pages_are(uint32_t n, const uint8_t *fill)
{
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t b = 0; b < DH_PAGE; b++)
            if (reply[i * DH_PAGE + b] != fill[i])
                return 0;
    return 1;
}

static void test_alloc_write_read_clone_free(void)
{
    dh_mstore *m;
    struct served s;
    CHECK(dh_mstore_create(&m) == 0);
    CHECK(start(&s, m) == 0);
    uint32_t a = alloc(s.client, 8 * DH_PAGE, 0);
    CHECK(a != 0);
    CHECK(alloc(s.client, 4 * DH_PAGE, 99) > a);
    CHECK(alloc(s.client, 4 * DH_PAGE, 99) == a + 1); /* a token's retry: the same region */

    /* Written back, then read back one page and a prefetch window. */
    CHECK(flush(s.client, a, 2, 0xa2) == 0);
    CHECK(flush(s.client, a, 3, 0xa3) == 0);
    struct p2m_miss miss = {.region = a, .n = 0, .page = 2}; /* n 0: one page */
    CHECK(ask(s.client, DH_OP_P2M_PCACHE_MISS, &miss, sizeof miss, NULL) == DH_PAGE);
    CHECK(pages_are(1, (const uint8_t[]){0xa2}));
    miss = (struct p2m_miss){.region = a, .n = 3, .page = 1};
    CHECK(ask(s.client, DH_OP_P2M_PCACHE_MISS, &miss, sizeof miss, NULL) == 3 * DH_PAGE);
    CHECK(pages_are(3, (const uint8_t[]){0, 0xa2, 0xa3}));

    /* A miss that carries its victims' write-backs, which land first. */
    static struct p2m_miss_flush mf;
    mf = (struct p2m_miss_flush){.region = a, .page = 4, .n = 2, .nflush = 2,
                                 .ref = {{.region = a, .page = 4}, {.region = a, .page = 6}}};
    memset(mf.data[0], 0xa4, DH_PAGE);
    memset(mf.data[1], 0xa6, DH_PAGE);
    CHECK(ask(s.client, DH_OP_P2M_PCACHE_MISS_FLUSH, &mf, MISS_FLUSH_LEN(2), NULL) ==
          2 * DH_PAGE);
    CHECK(pages_are(2, (const uint8_t[]){0xa4, 0}));
    miss = (struct p2m_miss){.region = a, .n = 1, .page = 6};
    CHECK(ask(s.client, DH_OP_P2M_PCACHE_MISS, &miss, sizeof miss, NULL) == DH_PAGE);
    CHECK(pages_are(1, (const uint8_t[]){0xa6}));
    mf.nflush = 1; /* one write-back: its length says so too */
    mf.ref[0].page = 5;
    CHECK(ask(s.client, DH_OP_P2M_PCACHE_MISS_FLUSH, &mf, MISS_FLUSH_LEN(1), NULL) ==
          2 * DH_PAGE);

    /* A clone holds the pages written so far, and is a region of its own. */
    struct p2m_clone cl = {.region = a};
    CHECK(ask(s.client, DH_OP_P2M_CLONE, &cl, offsetof(struct p2m_clone, token), NULL) == 4);
    uint32_t b = ((struct p2m_region *)(void *)reply)->id;
    CHECK(b != a && b != 0);
    CHECK(flush(s.client, a, 2, 0xee) == 0);
    miss = (struct p2m_miss){.region = b, .n = 4, .page = 2};
    CHECK(ask(s.client, DH_OP_P2M_PCACHE_MISS, &miss, sizeof miss, NULL) == 4 * DH_PAGE);
    CHECK(pages_are(4, (const uint8_t[]){0xa2, 0xa3, 0xa4, 0xa4}));

    dh_mstore_stats st;
    dh_mstore_get_stats(m, &st);
    CHECK(st.regions == 3 && st.bytes_reserved == 20 * DH_PAGE && st.pages_stored == 6);

    /* FREE twice (a retry) is done; a FREE of an id never given out is not. */
    struct p2m_free fr = {.region = a};
    CHECK(ask(s.client, DH_OP_P2M_FREE, &fr, sizeof fr, NULL) == 0);
    CHECK(ask(s.client, DH_OP_P2M_FREE, &fr, sizeof fr, NULL) == 0);
    fr.region = b + 100;
    CHECK(ask(s.client, DH_OP_P2M_FREE, &fr, sizeof fr, NULL) == -1);
    miss = (struct p2m_miss){.region = a, .n = 1, .page = 0};
    CHECK(ask(s.client, DH_OP_P2M_PCACHE_MISS, &miss, sizeof miss, NULL) == -1);
    dh_mstore_get_stats(m, &st);
    CHECK(st.regions == 2);
    CHECK(stop(&s) == 0);
    dh_mstore_destroy(m);
    passed++;
}

/* Every bad request gets an error reply and changes nothing; the store
 * goes on serving. */
static void test_bad_requests(void)
{
    dh_mstore *m;
    struct served s;
    CHECK(dh_mstore_create(&m) == 0);
    CHECK(start(&s, m) == 0);
    uint32_t a = alloc(s.client, 4 * DH_PAGE, 0);
    CHECK(a != 0);
    static union p2m_request q;
    static const struct {
        uint16_t op;
        uint32_t len;
    } truncated[] = {
        {DH_OP_P2M_ALLOC, 0}, {DH_OP_P2M_ALLOC, 7}, {DH_OP_P2M_ALLOC, 12},
        {DH_OP_P2M_CLONE, 3}, {DH_OP_P2M_CLONE, 8}, {DH_OP_P2M_FREE, 0},
        {DH_OP_P2M_FREE, 8}, {DH_OP_P2M_PCACHE_MISS, 15}, {DH_OP_P2M_PCACHE_MISS, 17},
        {DH_OP_P2M_PCACHE_FLUSH, 16}, {DH_OP_P2M_PCACHE_FLUSH, 16 + DH_PAGE - 1},
        {DH_OP_P2M_PCACHE_MISS_FLUSH, 24}, {DH_OP_P2M_PCACHE_MISS_FLUSH, MISS_FLUSH_LEN(0)},
        {DH_OP_P2M_PCACHE_MISS_FLUSH, MISS_FLUSH_LEN(1) - 1},
        {DH_OP_M2M_REPLICA, 0}, {DH_OP_M2M_REPLICA, 15},
    };
    for (size_t i = 0; i < sizeof truncated / sizeof truncated[0]; i++) {
        memset(&q, 0, sizeof q);
        q.miss.region = a; /* the first field of each: a region that exists */
        CHECK(ask(s.client, truncated[i].op, &q, truncated[i].len, NULL) == -1);
    }
    /* Whole requests whose fields are out of bounds. */
    q.alloc = (struct p2m_alloc){.size = DH_PAGE + 1};
    CHECK(ask(s.client, DH_OP_P2M_ALLOC, &q, sizeof q.alloc, NULL) == -1);
    q.alloc = (struct p2m_alloc){.size = 0};
    CHECK(ask(s.client, DH_OP_P2M_ALLOC, &q, sizeof q.alloc, NULL) == -1);
    q.miss = (struct p2m_miss){.region = a, .n = 1, .page = 4};
    CHECK(ask(s.client, DH_OP_P2M_PCACHE_MISS, &q, sizeof q.miss, NULL) == -1);
    q.miss = (struct p2m_miss){.region = a, .n = 2, .page = 3}; /* the window runs off */
    CHECK(ask(s.client, DH_OP_P2M_PCACHE_MISS, &q, sizeof q.miss, NULL) == -1);
    q.miss = (struct p2m_miss){.region = a, .n = DH_PREFETCH_MAX + 1, .page = 0};
    CHECK(ask(s.client, DH_OP_P2M_PCACHE_MISS, &q, sizeof q.miss, NULL) == -1);
    q.miss = (struct p2m_miss){.region = a + 1, .n = 1, .page = 0};
    CHECK(ask(s.client, DH_OP_P2M_PCACHE_MISS, &q, sizeof q.miss, NULL) == -1);
    CHECK(flush(s.client, a, 4, 1) == -1);
    CHECK(flush(s.client, 0, 0, 1) == -1);
    q.miss_flush = (struct p2m_miss_flush){.region = a, .n = 1, .nflush = 2,
                                           .ref = {{.region = a}, {.region = a, .page = 9}}};
    CHECK(ask(s.client, DH_OP_P2M_PCACHE_MISS_FLUSH, &q, MISS_FLUSH_LEN(2), NULL) == -1);
    q.miss_flush.ref[1].page = 1;
    q.miss_flush.n = 0;
    CHECK(ask(s.client, DH_OP_P2M_PCACHE_MISS_FLUSH, &q, MISS_FLUSH_LEN(2), NULL) == -1);
    q.miss_flush.n = 1;
    q.miss_flush.nflush = DH_PREFETCH_MAX + 1;
    CHECK(ask(s.client, DH_OP_P2M_PCACHE_MISS_FLUSH, &q, sizeof q.miss_flush, NULL) == -1);
    q.clone = (struct p2m_clone){.region = a + 7};
    CHECK(ask(s.client, DH_OP_P2M_CLONE, &q, sizeof q.clone, NULL) == -1);
    /* A forward to a store that is no replica is refused as fenced. */
    struct m2m_forward fwd = {.op = DH_OP_P2M_FREE, .epoch = 1};
    uint32_t flags = 0;
    CHECK(ask(s.client, DH_OP_M2M_REPLICA, &fwd, sizeof fwd, &flags) == -1);
    CHECK(flags & DH_F_FENCED);

    dh_mstore_stats st;
    dh_mstore_get_stats(m, &st);
    CHECK(st.regions == 1 && st.pages_stored == 0 && st.misses_served == 0);
    CHECK(st.refused_forwards == 1);
    static const char hello[] = "hello";
    CHECK(ask(s.client, DH_OP_ECHO, hello, 5, NULL) == 5 && !memcmp(reply, hello, 5));
    CHECK(stop(&s) == 0);
    dh_mstore_destroy(m);
    passed++;
}

/* A primary forwards each write to its replica: a region made and written
 * on the primary reads the same on the replica; once a cache asks the
 * replica, the replica takes over and the primary refuses as fenced. */
static void test_replication(void)
{
    dh_mstore *primary, *replica;
    struct served p, r, cache; /* cache: a cache's own link to the replica */
    CHECK(dh_mstore_create(&primary) == 0 && dh_mstore_create(&replica) == 0);
    CHECK(start(&r, replica) == 0 && start(&cache, replica) == 0);
    CHECK(dh_mstore_set_replica(primary, r.client, 5000) == 0);
    CHECK(start(&p, primary) == 0);
    uint32_t flags = 0;
    struct p2m_alloc al = {.size = 2 * DH_PAGE, .token = 7};
    CHECK(ask(p.client, DH_OP_P2M_ALLOC, &al, sizeof al, &flags) == 4);
    CHECK(flags & DH_F_REPLICATED);
    uint32_t a = ((struct p2m_region *)(void *)reply)->id;
    static struct p2m_miss_flush mf;
    mf = (struct p2m_miss_flush){.region = a, .page = 1, .n = 1, .nflush = 1,
                                 .ref = {{.region = a, .page = 0}}};
    memset(mf.data[0], 0x5a, DH_PAGE);
    CHECK(ask(p.client, DH_OP_P2M_PCACHE_MISS_FLUSH, &mf, MISS_FLUSH_LEN(1), &flags) ==
          DH_PAGE);

    dh_mstore_stats st;
    dh_mstore_get_stats(replica, &st);
    CHECK(st.backup && st.regions == 1 && st.pages_stored == 1);
    struct p2m_miss miss = {.region = a, .n = 1, .page = 0};
    CHECK(ask(cache.client, DH_OP_P2M_PCACHE_MISS, &miss, sizeof miss, NULL) == DH_PAGE);
    CHECK(pages_are(1, (const uint8_t[]){0x5a}));
    dh_mstore_get_stats(replica, &st);
    CHECK(!st.backup && st.epoch == 2);

    CHECK(flush(p.client, a, 1, 1) == -1); /* its forward is refused: it is fenced now */
    dh_mstore_get_stats(primary, &st);
    CHECK(st.fenced && !st.replicating);
    CHECK(ask(p.client, DH_OP_P2M_PCACHE_MISS, &miss, sizeof miss, &flags) == -1);
    CHECK(flags & DH_F_FENCED);
    CHECK(stop(&p) == 0);
    CHECK(stop(&r) == 0 && stop(&cache) == 0);
    dh_mstore_destroy(primary);
    dh_mstore_destroy(replica);
    passed++;
}

int main(void)
{
    test_alloc_write_read_clone_free();
    test_bad_requests();
    test_replication();
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
