/* Benchmark loops and their floors, in C so that Python's overhead is in
 * neither. Each floor is the least the hardware or OS needs for the same
 * work: the payload bounced between cores through shared memory, the copies
 * a ring makes, a raw socket echo of the same size. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "link.h"

int dh_bench_rpc(dh_link *l, uint16_t op, uint32_t size, uint64_t *samples, size_t n)
{
    if (size > l->max_payload)
        return DH_ETOOBIG;
    uint8_t *req = calloc(1, size ? size : 1), *resp = malloc(size ? size : 1);
    int rc = req && resp ? 0 : DH_ENOMEM;
    uint32_t want = op == DH_OP_ECHO ? size : 0;
    for (size_t i = 0; i < n && !rc; i++) {
        uint32_t got = 0;
        uint64_t t0 = dh_now_ns();
        rc = dh_rpc_call(l, op, req, size, resp, size, &got, NULL, 5000);
        samples[i] = dh_now_ns() - t0;
        if (!rc && got != want)
            rc = DH_EPROTO;
    }
    free(req);
    free(resp);
    return rc;
}

int dh_bench_rpc_rtt(dh_link *l, uint32_t size, uint64_t *samples, size_t n)
{
    return dh_bench_rpc(l, DH_OP_ECHO, size, samples, n);
}

int dh_bench_stream(dh_link *l, uint32_t size, uint64_t count, uint64_t *ns)
{
    if (size > l->max_payload)
        return DH_ETOOBIG;
    uint8_t *msg = calloc(1, size ? size : 1);
    if (!msg)
        return DH_ENOMEM;
    int rc = 0;
    uint64_t t0 = dh_now_ns();
    dh_frame_hdr h = {.opcode = DH_OP_ECHO, .flags = DH_F_NOREPLY};
    for (uint64_t i = 0; i < count && !rc; i++)
        rc = dh_link_send(l, &h, msg, size, 5000);
    if (!rc) /* the round trip proves every frame arrived */
        rc = dh_rpc_call(l, DH_OP_PING, NULL, 0, msg, size, NULL, NULL, 5000);
    *ns = dh_now_ns() - t0;
    free(msg);
    return rc;
}

struct pingpong {
    _Alignas(64) atomic_ulong seq; /* odd: ping written; even: pong written */
    uint32_t size;
    size_t n;
    uint8_t *ping, *pong; /* the shared buffers, one each way */
};

static void *pong(void *arg)
{
    struct pingpong *p = arg;
    uint8_t *local = malloc(p->size);
    for (unsigned long i = 1; local && i <= p->n; i++) {
        while (atomic_load_explicit(&p->seq, memory_order_acquire) != 2 * i - 1)
            dh_cpu_relax();
        memcpy(local, p->ping, p->size);
        memcpy(p->pong, local, p->size);
        atomic_store_explicit(&p->seq, 2 * i, memory_order_release);
    }
    free(local);
    return NULL;
}

int dh_floor_pingpong(uint32_t size, uint64_t *samples, size_t n)
{
    if (!size)
        return DH_EINVAL;
    struct pingpong *p = aligned_alloc(64, sizeof *p);
    uint8_t *ping = aligned_alloc(64, (size + 63) & ~63u);
    uint8_t *pong_buf = aligned_alloc(64, (size + 63) & ~63u);
    uint8_t *local = calloc(1, size);
    int rc = p && ping && pong_buf && local ? 0 : DH_ENOMEM;
    pthread_t t;
    if (!rc) {
        atomic_init(&p->seq, 0);
        p->size = size;
        p->n = n;
        p->ping = ping;
        p->pong = pong_buf;
        if (pthread_create(&t, NULL, pong, p))
            rc = DH_EIO;
    }
    if (!rc) {
        for (unsigned long i = 1; i <= n; i++) {
            uint64_t t0 = dh_now_ns();
            memcpy(ping, local, size);
            atomic_store_explicit(&p->seq, 2 * i - 1, memory_order_release);
            while (atomic_load_explicit(&p->seq, memory_order_acquire) != 2 * i)
                dh_cpu_relax();
            memcpy(local, pong_buf, size);
            samples[i - 1] = dh_now_ns() - t0;
        }
        pthread_join(t, NULL);
    }
    free(p);
    free(ping);
    free(pong_buf);
    free(local);
    return rc;
}

int dh_floor_copy(uint32_t size, uint64_t count, uint64_t *ns)
{
    /* Source, ring-sized middle, destination: the ring copies in and out. */
    uint32_t ring = 1u << 20;
    uint8_t *src = calloc(1, size), *mid = calloc(1, ring), *dst = malloc(size);
    int rc = src && mid && dst && size && size <= ring ? 0 : DH_EINVAL;
    if (!rc) {
        uint64_t t0 = dh_now_ns();
        uint32_t off = 0;
        for (uint64_t i = 0; i < count; i++) {
            memcpy(mid + off, src, size);
            memcpy(dst, mid + off, size);
            off += size; /* on through the ring; no modulo: size may be the ring's */
            if (off > ring - size)
                off = 0;
            __asm__ volatile("" : : "r"(dst) : "memory");
        }
        *ns = dh_now_ns() - t0;
    }
    free(src);
    free(mid);
    free(dst);
    return rc;
}

static int xfer(int fd, uint8_t *buf, uint32_t size, int writing)
{
    uint32_t done = 0;
    while (done < size) {
        ssize_t n = writing ? write(fd, buf + done, size - done)
                            : read(fd, buf + done, size - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n == 0 ? DH_ECLOSED : DH_EIO;
        done += (uint32_t)n;
    }
    return 0;
}

int dh_floor_sock_serve(int fd, uint32_t size, int echo)
{
    /* A sink reads in large chunks, as the framed reader does. */
    uint32_t cap = echo ? (size ? size : 1) : 65536;
    uint8_t *buf = malloc(cap);
    if (!buf)
        return DH_ENOMEM;
    int rc = 0;
    if (echo) {
        while ((rc = xfer(fd, buf, size, 0)) == 0)
            if ((rc = xfer(fd, buf, size, 1)))
                break;
    } else {
        ssize_t n;
        while ((n = read(fd, buf, cap)) > 0 || (n < 0 && errno == EINTR))
            ;
        rc = n < 0 ? DH_EIO : xfer(fd, buf, 1, 1); /* ack the whole stream */
    }
    free(buf);
    return rc == DH_ECLOSED ? 0 : rc;
}

int dh_floor_sock_rtt(int fd, uint32_t size, uint64_t *samples, size_t n)
{
    uint8_t *buf = calloc(1, size ? size : 1);
    int rc = buf ? 0 : DH_ENOMEM;
    for (size_t i = 0; i < n && !rc; i++) {
        uint64_t t0 = dh_now_ns();
        rc = xfer(fd, buf, size, 1);
        if (!rc)
            rc = xfer(fd, buf, size, 0);
        samples[i] = dh_now_ns() - t0;
    }
    free(buf);
    return rc;
}

int dh_floor_sock_stream(int fd, uint32_t size, uint64_t count, uint64_t *ns)
{
    uint8_t *buf = calloc(1, size ? size : 1);
    int rc = buf ? 0 : DH_ENOMEM;
    uint64_t t0 = dh_now_ns();
    for (uint64_t i = 0; i < count && !rc; i++)
        rc = xfer(fd, buf, size, 1);
    if (!rc && shutdown(fd, SHUT_WR) < 0)
        rc = DH_EIO;
    if (!rc) /* the sink's one-byte ack: everything arrived */
        rc = xfer(fd, buf, 1, 0);
    *ns = dh_now_ns() - t0;
    free(buf);
    return rc;
}
