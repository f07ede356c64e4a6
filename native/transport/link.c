/* What all links share: framing on send, the link model, stats. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "link.h"

uint64_t dh_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t dh_timeout_at(dh_timeout *t)
{
    if (!t->at)
        t->at = t->ms < 0 ? DH_NO_DEADLINE
                          : dh_now_ns() + (uint64_t)t->ms * 1000000ull;
    return t->at;
}

int dh_timeout_left_ms(dh_timeout *t)
{
    uint64_t at = dh_timeout_at(t);
    if (at == DH_NO_DEADLINE)
        return -1;
    uint64_t now = dh_now_ns();
    return now >= at ? 0 : (int)((at - now + 999999) / 1000000);
}

void dh_link_base_init(dh_link *l, const struct dh_link_ops *ops)
{
    l->ops = ops;
    l->max_payload = DH_FRAME_MAX_PAYLOAD;
    l->spin_ns = 50000; /* long enough to ride out a peer's turnaround */
    atomic_init(&l->closed, 0);
}

/* Sleeps most of the way, then spins: nanosleep overshoots by ~50 us. */
static void wait_until(uint64_t t)
{
    for (;;) {
        uint64_t now = dh_now_ns();
        if (now >= t)
            return;
        if (t - now > 200000) {
            uint64_t d = t - now - 100000;
            struct timespec ts = {(time_t)(d / 1000000000ull),
                                  (long)(d % 1000000000ull)};
            nanosleep(&ts, NULL);
        } else {
            dh_cpu_relax();
        }
    }
}

/* The link model: the frame occupies the wire for len/bandwidth after the
 * previous one, then travels for the latency. The sender waits for both. */
static void apply_model(dh_link *l, uint32_t bytes)
{
    if (!l->model.latency_ns && !l->model.bytes_per_sec)
        return;
    uint64_t now = dh_now_ns();
    uint64_t start = l->wire_free_ns > now ? l->wire_free_ns : now;
    uint64_t ser = l->model.bytes_per_sec
                       ? (uint64_t)bytes * 1000000000ull / l->model.bytes_per_sec
                       : 0;
    l->wire_free_ns = start + ser;
    wait_until(l->wire_free_ns + l->model.latency_ns);
}

void dh_link_destroy(dh_link *l)
{
    if (l)
        l->ops->destroy(l);
}

void dh_link_close(dh_link *l)
{
    if (!atomic_exchange(&l->closed, 1))
        l->ops->close(l);
}

int dh_link_is_closed(const dh_link *l) { return atomic_load(&l->closed); }
void dh_link_set_src(dh_link *l, uint32_t nid) { l->src = nid; }
void dh_link_set_model(dh_link *l, const dh_link_model *m) { l->model = *m; }
void dh_link_get_stats(const dh_link *l, dh_link_stats *s) { *s = l->st; }
uint32_t dh_link_max_payload(const dh_link *l) { return l->max_payload; }

/* Whatever the peer does after a protocol violation cannot be trusted: the
 * link is dropped, on the sending path (a bad ring index) as on receipt. */
static int proto_fail(dh_link *l, int rc)
{
    if (rc == DH_EPROTO) {
        l->st.proto_errors++;
        dh_link_close(l);
    }
    return rc;
}

static int link_send(dh_link *l, const dh_frame_hdr *h, const void *payload,
                     uint32_t len, dh_timeout *t)
{
    if (atomic_load(&l->closed))
        return DH_ECLOSED;
    if (len > l->max_payload)
        return DH_ETOOBIG;
    if (!dh_op_known(h->opcode))
        return DH_EINVAL;
    dh_frame_hdr w = *h;
    w.magic = DH_FRAME_MAGIC;
    w.version = DH_FRAME_VERSION;
    w.src = l->src;
    w.length = len;
    w.checksum = l->ops->crc_on_copy ? 0 : dh_frame_crc(&w, payload);
    apply_model(l, DH_FRAME_HDR_SIZE + len);
    int rc = l->ops->send(l, &w, payload, t);
    if (rc == 0) {
        l->st.frames_sent++;
        l->st.bytes_sent += DH_FRAME_HDR_SIZE + len;
    }
    return proto_fail(l, rc);
}

int dh_link_send(dh_link *l, const dh_frame_hdr *h, const void *payload,
                 uint32_t len, int timeout_ms)
{
    dh_timeout t = dh_timeout_ms(timeout_ms);
    return link_send(l, h, payload, len, &t);
}

int dh_link_send_raw(dh_link *l, const void *bytes, uint32_t n, int timeout_ms)
{
    if (atomic_load(&l->closed))
        return DH_ECLOSED;
    dh_timeout t = dh_timeout_ms(timeout_ms);
    return proto_fail(l, l->ops->send_raw(l, bytes, n, &t));
}

static int link_recv(dh_link *l, dh_frame_hdr *h, void *buf, uint32_t cap,
                     dh_timeout *t)
{
    if (atomic_load(&l->closed))
        return DH_ECLOSED;
    int rc = l->ops->recv(l, h, buf, cap, t);
    if (rc == 0) {
        l->st.frames_recv++;
        l->st.bytes_recv += DH_FRAME_HDR_SIZE + h->length;
    }
    return proto_fail(l, rc);
}

int dh_link_recv(dh_link *l, dh_frame_hdr *h, void *buf, uint32_t cap,
                 int timeout_ms)
{
    dh_timeout t = dh_timeout_ms(timeout_ms);
    return link_recv(l, h, buf, cap, &t);
}

/* ---- RPC ---------------------------------------------------------------- */

int dh_rpc_start(dh_link *l, uint16_t op, const void *req, uint32_t req_len, uint64_t *req_id,
                 int timeout_ms)
{
    dh_timeout t = dh_timeout_ms(timeout_ms);
    dh_frame_hdr h = {.opcode = op, .req_id = ++l->next_req};
    *req_id = h.req_id;
    return link_send(l, &h, req, req_len, &t);
}

int dh_rpc_finish(dh_link *l, uint64_t req_id, void *resp, uint32_t resp_cap,
                  uint32_t *resp_len, uint32_t *resp_flags, int timeout_ms)
{
    dh_timeout t = dh_timeout_ms(timeout_ms);
    for (;;) {
        dh_frame_hdr r;
        int rc = link_recv(l, &r, resp, resp_cap, &t);
        if (rc)
            return rc;
        if ((r.flags & DH_F_REPLY) && r.req_id == req_id) {
            if (resp_len)
                *resp_len = r.length;
            if (resp_flags)
                *resp_flags = r.flags;
            return 0;
        }
        if ((r.flags & DH_F_REPLY) && r.req_id < req_id) {
            l->st.stale_replies++; /* answer to a call that timed out */
            continue;
        }
        /* A request, or a reply to something never asked: not this protocol. */
        l->st.proto_errors++;
        dh_link_close(l);
        return DH_EPROTO;
    }
}

int dh_rpc_call(dh_link *l, uint16_t op, const void *req, uint32_t req_len,
                void *resp, uint32_t resp_cap, uint32_t *resp_len,
                uint32_t *resp_flags, int timeout_ms)
{
    uint64_t id;
    int rc = dh_rpc_start(l, op, req, req_len, &id, timeout_ms);
    return rc ? rc : dh_rpc_finish(l, id, resp, resp_cap, resp_len, resp_flags, timeout_ms);
}

int dh_rpc_reply(dh_link *l, const dh_frame_hdr *req, uint32_t flags,
                 const void *payload, uint32_t len, int timeout_ms)
{
    dh_frame_hdr h = {.opcode = req->opcode,
                      .req_id = req->req_id,
                      .flags = DH_F_REPLY | flags};
    return dh_link_send(l, &h, payload, len, timeout_ms);
}

int dh_rpc_serve(dh_link *l, volatile int *stop, dh_rpc_handler fn, void *ctx)
{
    uint8_t *buf = malloc(l->max_payload);
    if (!buf)
        return DH_ENOMEM;
    int rc = 0;
    while (!*stop) {
        dh_frame_hdr h;
        rc = dh_link_recv(l, &h, buf, l->max_payload, 100); /* 100 ms: notice *stop */
        if (rc == DH_ETIMEDOUT)
            continue;
        if (rc == DH_ECLOSED) {
            rc = 0;
            break;
        }
        if (rc)
            break;
        const uint8_t *reply = NULL;
        uint32_t flags = 0;
        int n = h.opcode == DH_OP_SHUTDOWN || h.opcode == DH_OP_PING
                    ? 0
                    : fn(ctx, &h, buf, &reply, &flags);
        if (h.flags & DH_F_NOREPLY)
            continue;
        if (n < 0) {
            const char *msg = dh_strerror(n);
            rc = dh_rpc_reply(l, &h, DH_F_ERROR | flags, msg, (uint32_t)strlen(msg), 1000);
        } else {
            rc = dh_rpc_reply(l, &h, flags, reply, (uint32_t)n, 1000);
        }
        if (rc || h.opcode == DH_OP_SHUTDOWN)
            break;
    }
    free(buf);
    return rc;
}

static int echo(void *ctx, const dh_frame_hdr *h, uint8_t *in, const uint8_t **reply,
                uint32_t *flags)
{
    (void)ctx;
    (void)flags;
    *reply = in;
    return h->opcode == DH_OP_ECHO ? (int)h->length : 0;
}

int dh_rpc_echo_serve(dh_link *l, volatile int *stop)
{
    return dh_rpc_serve(l, stop, echo, NULL);
}
