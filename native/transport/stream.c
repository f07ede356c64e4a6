/* Stream links: frames over a byte stream (Unix or TCP socket, a
 * virtio-serial port). The fd is non-blocking; waits are poll() with the
 * caller's deadline. A frame cut short by EOF is a protocol error. Once a
 * frame's first byte is in, the frame is read to its end under a deadline of
 * its own (the caller's timeout, at least FRAME_FINISH_MS, from when it has to
 * wait): callers poll with short timeouts, and a frame that straddles one
 * must not be lost. A frame not finished even then loses the stream's
 * framing, so the link closes. */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "link.h"

#define RBUF 65536u
#define FRAME_FINISH_MS 10000

struct fd_link {
    dh_link base;
    int fd;
    int is_sock;
    uint32_t rpos, rlen;
    uint8_t rbuf[RBUF];
};

static int poll_for(int fd, short ev, dh_timeout *t)
{
    for (;;) {
        int ms = dh_timeout_left_ms(t);
        if (ms == 0)
            return DH_ETIMEDOUT;
        struct pollfd p = {.fd = fd, .events = ev};
        int n = poll(&p, 1, ms);
        if (n > 0)
            return 0; /* ready, or an error/hangup the next call reports */
        if (n < 0 && errno != EINTR)
            return DH_EIO;
    }
}

static int write_all(struct fd_link *f, struct iovec *iov, int cnt,
                     dh_timeout *t)
{
    while (cnt > 0) {
        ssize_t n;
        if (f->is_sock) {
            struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
            n = sendmsg(f->fd, &mh, MSG_NOSIGNAL);
        } else {
            n = writev(f->fd, iov, cnt);
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                int rc = poll_for(f->fd, POLLOUT, t);
                if (rc)
                    return rc;
                continue;
            }
            return errno == EPIPE || errno == ECONNRESET ? DH_ECLOSED : DH_EIO;
        }
        while (cnt > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

/* Sends whole or closes: a half-written frame would desynchronise the peer. */
static int send_iov(dh_link *l, struct iovec *iov, int cnt, dh_timeout *t)
{
    struct fd_link *f = (struct fd_link *)l;
    size_t total = 0;
    for (int i = 0; i < cnt; i++)
        total += iov[i].iov_len;
    int rc = write_all(f, iov, cnt, t);
    if (rc && total)
        dh_link_close(l);
    return rc;
}

static int fd_send(dh_link *l, const dh_frame_hdr *h, const void *payload,
                   dh_timeout *t)
{
    struct iovec iov[2] = {{(void *)h, DH_FRAME_HDR_SIZE},
                           {(void *)payload, h->length}};
    return send_iov(l, iov, h->length ? 2 : 1, t);
}

static int fd_send_raw(dh_link *l, const void *bytes, uint32_t n,
                       dh_timeout *t)
{
    struct iovec iov = {(void *)bytes, n};
    return send_iov(l, &iov, 1, t);
}

/* Reads more bytes into rbuf or straight into dst when it is large. */
static int read_some(struct fd_link *f, void *dst, size_t n, dh_timeout *t)
{
    for (;;) {
        ssize_t r = read(f->fd, dst, n);
        if (r > 0)
            return (int)r;
        if (r == 0)
            return DH_ECLOSED;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN)
            return errno == ECONNRESET ? DH_ECLOSED : DH_EIO;
        int rc = poll_for(f->fd, POLLIN, t);
        if (rc)
            return rc;
    }
}

static int read_exact(struct fd_link *f, uint8_t *dst, size_t n,
                      dh_timeout *t)
{
    while (n) {
        if (f->rlen) {
            size_t k = f->rlen < n ? f->rlen : n;
            memcpy(dst, f->rbuf + f->rpos, k);
            f->rpos += (uint32_t)k;
            f->rlen -= (uint32_t)k;
            dst += k;
            n -= k;
            continue;
        }
        int r;
        if (n >= RBUF) {
            r = read_some(f, dst, n, t);
            if (r > 0) {
                dst += r;
                n -= (size_t)r;
            }
        } else {
            r = read_some(f, f->rbuf, RBUF, t);
            if (r > 0) {
                f->rpos = 0;
                f->rlen = (uint32_t)r;
            }
        }
        if (r < 0)
            return r;
    }
    return 0;
}

static int fd_recv(dh_link *l, dh_frame_hdr *out, void *buf, uint32_t cap,
                   dh_timeout *t)
{
    struct fd_link *f = (struct fd_link *)l;
    uint8_t raw[DH_FRAME_HDR_SIZE];
    /* Nothing consumed yet: a timeout or EOF here leaves the link sound. */
    if (!f->rlen) {
        int r = read_some(f, f->rbuf, RBUF, t);
        if (r < 0)
            return r;
        f->rpos = 0;
        f->rlen = (uint32_t)r;
    }
    /* A frame has begun. Its clock starts only if it has to wait. */
    dh_timeout ft = dh_timeout_ms(t->ms < 0 || t->ms > FRAME_FINISH_MS ? t->ms
                                                                        : FRAME_FINISH_MS);
    int rc = read_exact(f, raw, sizeof raw, &ft);
    dh_frame_hdr h;
    if (rc == 0)
        rc = dh_frame_check_hdr(raw, sizeof raw, &h);
    if (rc == 0 && h.length > cap)
        rc = DH_ETOOBIG;
    if (rc == 0)
        rc = read_exact(f, buf, h.length, &ft);
    if (rc == 0)
        rc = dh_frame_verify_split(&h, buf);
    if (rc == DH_ECLOSED)
        rc = DH_EPROTO; /* EOF inside a frame: truncated */
    if (rc) {
        if (rc != DH_EPROTO)
            dh_link_close(l);
        return rc;
    }
    *out = h;
    return 0;
}

static void fd_close(dh_link *l)
{
    struct fd_link *f = (struct fd_link *)l;
    if (f->is_sock)
        shutdown(f->fd, SHUT_RDWR);
}

static void fd_destroy(dh_link *l)
{
    struct fd_link *f = (struct fd_link *)l;
    close(f->fd);
    free(f);
}

static const struct dh_link_ops fd_ops = {
    .send = fd_send,
    .send_raw = fd_send_raw,
    .recv = fd_recv,
    .close = fd_close,
    .destroy = fd_destroy,
};

int dh_link_fd(int fd, dh_link **out)
{
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        return DH_EINVAL;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return DH_EIO;
    struct fd_link *f = calloc(1, sizeof *f);
    if (!f)
        return DH_ENOMEM;
    dh_link_base_init(&f->base, &fd_ops);
    f->fd = fd;
    f->is_sock = S_ISSOCK(st.st_mode);
    if (f->is_sock) {
        int one = 1; /* fails harmlessly on Unix sockets */
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    *out = &f->base;
    return 0;
}
