/* The cache's side of a replicated memory node: the requests it sends, and
 * when it may switch to the backup. See dh_excache_set_backup.
 *
 * Reached from the SIGBUS handler, so async-signal-safe like ex_serve_fault:
 * no malloc, no stdio; getpid is a system call. Called under the cache's
 * lock. */
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "excache_int.h"

void ex_failover_init(dh_excache *c)
{
    c->synced = 1; /* nothing acknowledged yet: nothing a backup could lack */
    if (getrandom(&c->nonce, sizeof c->nonce, GRND_NONBLOCK) != sizeof c->nonce)
        c->nonce = (uint32_t)dh_now_ns() ^ (uint32_t)(uintptr_t)c;
}

/* An ALLOC or CLONE carries a token, so the store that gets it twice (the
 * retry after a failover, when the first reached the backup through the
 * primary) answers the region it made the first time. The pid keeps a
 * forked child's tokens apart from its parent's. */
static void set_token(dh_excache *c, uint16_t op)
{
    if (op != DH_OP_P2M_ALLOC && op != DH_OP_P2M_CLONE)
        return;
    if (!++c->seq)
        ++c->seq;
    uint64_t token = (uint64_t)((uint32_t)getpid() ^ c->nonce) << 32 | c->seq;
    if (op == DH_OP_P2M_ALLOC)
        c->req->alloc.token = token;
    else
        c->req->clone.token = token;
}

/* One round trip on the current link. A store whose backup took over
 * answers FENCED: that is a failed primary too. Every other answer from the
 * primary says whether the backup holds all it acknowledged. */
static int ask(dh_excache *c, uint16_t op, uint32_t req_len, uint32_t *got, uint32_t *flags)
{
    int rc = dh_rpc_call(c->link, op, c->req, req_len, c->page, DH_PAGE * DH_PREFETCH_MAX, got,
                         flags, c->timeout_ms);
    if (rc)
        return rc;
    if (*flags & DH_F_FENCED)
        return DH_ECLOSED;
    c->synced = (*flags & DH_F_REPLICATED) != 0;
    return 0;
}

/* One request (in c->req) to the memory node. When it fails and there is a
 * backup that holds every acknowledged write, the backup takes over for good
 * and gets the same request again (every request may be sent twice); a
 * backup that missed writes is refused: DH_ESTALE, never old pages. */
int ex_call(dh_excache *c, uint16_t op, uint32_t req_len, uint32_t *got, uint32_t *flags)
{
    set_token(c, op);
    uint64_t t0 = dh_now_ns();
    int rc = ask(c, op, req_len, got, flags);
    if ((rc == DH_ECLOSED || rc == DH_ETIMEDOUT) && c->backup) {
        if (!c->synced) {
            c->st.failovers_refused++;
            return DH_ESTALE;
        }
        c->link = c->backup;
        c->backup = NULL;
        c->st.failovers++;
        rc = ask(c, op, req_len, got, flags);
        c->st.failover_ns = dh_now_ns() - t0;
    }
    return rc;
}

int ex_rpc(dh_excache *c, uint16_t op, uint32_t req_len, uint32_t want)
{
    uint32_t got = 0, flags = 0;
    int rc = ex_call(c, op, req_len, &got, &flags);
    if (rc)
        return rc;
    return (flags & DH_F_ERROR) || got != want ? DH_EPROTO : 0;
}

void dh_excache_set_backup(dh_excache *c, dh_link *backup)
{
    ex_lock(c);
    c->backup = backup;
    ex_unlock(c);
}
