/* Shared-memory links: two single-producer/single-consumer rings in one
 * file, one each way. Only offsets live in the file, so the same file can
 * back an ivshmem device seen by two guests.
 *
 * File layout (S = file size, a power of two):
 *   0        file header
 *   4096     ring 0 control (side 0 -> side 1), 4096+256 ring 1 control
 *   S/2      ring 0 data, S/4 bytes; 3S/4 ring 1 data, S/4 bytes
 * A ring record is u32 length, then the frame, padded to 8 bytes; a length
 * of WRAP means "continue at the start of the ring", and 0 means "nothing
 * yet": the consumer zeroes each length word it consumes and the producer
 * zeroes the word after each record it writes. Positions are u32 and
 * free-running, so head - tail is the bytes in use. Everything read from the
 * file is checked before use: the peer may be buggy or hostile (another VM
 * can write the whole file). So each end keeps its own index in private
 * memory and only publishes it; the peer's index is checked (aligned, and
 * between ours and a ring's capacity away) and a bad one is DH_EPROTO, which
 * closes the link. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "link.h"

#define SHM_MAGIC 0x4d534844u /* "DHSM" */
#define SHM_VERSION 2u
#define SHM_MIN_BYTES (64u << 10)
#define CTL_OFF 4096u
#define CTL_SIZE 256u
#define WRAP 0xffffffffu
#define REC_HDR 4u
#define REWIND_AT 1024u /* see reserve() */
/* ring_ctl.idle: the consumer sets WAITING while it waits in recv with the
 * ring empty; a producer that rewinds first CASes it to CLAIMED, so the
 * WRAP it leaves is always read at once: a consumer leaving recv that finds
 * CLAIMED waits for that WRAP and takes it. */
#define IDLE_WAITING 1u
#define IDLE_CLAIMED 2u

struct shm_file_hdr {
    uint32_t magic;
    uint32_t version;
    uint32_t file_bytes;
    uint32_t ring_bytes;
    int32_t pid[2];       /* each side's pid, 0 when unknown (another kernel) */
    atomic_uint closed[2]; /* side i closed its end */
    atomic_uint generation; /* bumped by a reset: links bound before it are closed */
};

struct ring_ctl {
    _Alignas(64) atomic_uint head; /* written by the producer */
    atomic_uint head_waiters;     /* consumers asleep on head */
    _Alignas(64) atomic_uint tail; /* written by the consumer */
    atomic_uint tail_waiters;     /* producers asleep on tail */
    atomic_uint idle;             /* IDLE_WAITING: the consumer waits at tail */
};
_Static_assert(sizeof(struct ring_ctl) <= CTL_SIZE, "ring control fits");

struct shm_link {
    dh_link base;
    uint8_t *map;
    size_t map_len;
    int owns_map;
    int side;
    int wait_mode;
    uint32_t mask;
    uint32_t tx_head;    /* ours: the file's copy is only published, never read */
    uint32_t rx_tail;    /* ours, likewise */
    uint32_t tail_cache; /* the peer's tx tail as last read and checked */
    uint32_t generation; /* the channel's generation when this end was bound */
    struct shm_file_hdr *fh;
    struct ring_ctl *tx, *rx;
    uint8_t *tx_data, *rx_data;
};

static uint32_t align8(uint32_t n) { return (n + 7u) & ~7u; }

/* One read of a word the peer can rewrite at any time: the compiler may not
 * load it again after it was checked. */
static uint32_t load_once(const void *p) { return *(const volatile uint32_t *)p; }

/* A peer's ring position: aligned like every record, and at most `span`
 * bytes past `from` (positions are free-running, so this is mod 2^32). */
static int pos_ok(uint32_t pos, uint32_t from, uint32_t span)
{
    return !(pos & 7u) && pos - from <= span;
}

static void futex_wake(atomic_uint *w)
{
    syscall(SYS_futex, w, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* "/proc/<pid>/stat" into path (32 bytes), without stdio: this runs in the
 * ExCache's SIGBUS handler, where only async-signal-safe calls may be made. */
static void stat_path(char *path, pid_t pid)
{
    char digits[12];
    int n = 0, k = 6;
    for (unsigned v = (unsigned)pid; v || !n; v /= 10)
        digits[n++] = (char)('0' + v % 10);
    memcpy(path, "/proc/", 6);
    while (n)
        path[k++] = digits[--n];
    memcpy(path + k, "/stat", 6);
}

/* Is the process on the other side gone? A zombie counts as gone. Only
 * async-signal-safe calls (kill, open, read, close, strrchr): a fault
 * served in a signal handler waits here. */
static int peer_dead(struct shm_link *s)
{
    pid_t pid = s->fh->pid[!s->side];
    if (s->wait_mode != DH_WAIT_FUTEX || pid <= 0)
        return 0;
    if (kill(pid, 0) < 0)
        return errno == ESRCH;
    char path[32], buf[256];
    stat_path(path, pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 1;
    buf[n] = 0;
    char *rp = strrchr(buf, ')');
    return rp && rp[1] == ' ' && rp[2] == 'Z';
}

static int peer_gone(struct shm_link *s)
{
    return atomic_load(&s->fh->closed[!s->side]) != 0 ||
           atomic_load_explicit(&s->fh->generation, memory_order_acquire) != s->generation;
}

#define SPIN_ALONE_NS 5000 /* a peer's usual turnaround: spin without yielding */

/* Waits until *word != seen: spin first (the peer usually answers within a
 * few microseconds) on *poll if given, else on *word; then block on a futex
 * on *word, or poll with backoff when the peer is in another kernel.
 * Returns 0 (re-check), DH_ETIMEDOUT or DH_ECLOSED. */
static int shm_wait(struct shm_link *s, atomic_uint *word, uint32_t seen,
                    atomic_uint *waiters, dh_timeout *t, atomic_uint *poll)
{
    uint64_t now, spin_end = 0, yield_after = 0, deadline;
    for (unsigned i = 0;; i++) {
        if (poll ? atomic_load_explicit(poll, memory_order_acquire) != 0
                 : atomic_load_explicit(word, memory_order_acquire) != seen)
            return 0;
        dh_cpu_relax();
        if ((i & 63) == 63) { /* the clock only once spinning took a while */
            now = dh_now_ns();
            deadline = dh_timeout_at(t);
            if (!spin_end) {
                spin_end = now + s->base.spin_ns;
                yield_after = now + SPIN_ALONE_NS;
            }
            if (now >= spin_end || now >= deadline)
                break;
            /* Past the usual turnaround, let a peer that shares this CPU run:
             * with more spinning threads than cores (a replicating mnode on
             * two cores) a pure spin burns the time slice its peer needs. */
            if (now >= yield_after)
                sched_yield();
        }
    }
    s->base.st.sleeps++;
    uint64_t backoff = 1000;
    for (;;) {
        if (atomic_load(&s->base.closed) || peer_gone(s) || peer_dead(s))
            return DH_ECLOSED;
        now = dh_now_ns();
        if (now >= deadline)
            return DH_ETIMEDOUT;
        uint64_t slice = deadline - now;
        if (s->wait_mode == DH_WAIT_FUTEX) {
            if (slice > 100000000ull) /* wake up to check the peer's pulse */
                slice = 100000000ull;
            struct timespec ts = {(time_t)(slice / 1000000000ull),
                                  (long)(slice % 1000000000ull)};
            atomic_fetch_add(waiters, 1);
            if (atomic_load(word) == seen)
                syscall(SYS_futex, word, FUTEX_WAIT, seen, &ts, NULL, 0);
            atomic_fetch_sub(waiters, 1);
        } else {
            if (slice > backoff)
                slice = backoff;
            struct timespec ts = {0, (long)slice};
            nanosleep(&ts, NULL);
            /* Doubling keeps the wait at most twice the time already idle;
             * the 20 ms cap keeps an idle guest's wake-ups at ~50 a second. */
            if (backoff < 20000000)
                backoff *= 2;
        }
        if (atomic_load_explicit(word, memory_order_acquire) != seen)
            return 0;
    }
}

static void publish(atomic_uint *word, atomic_uint *waiters, uint32_t v,
                    int futex)
{
    atomic_store_explicit(word, v, memory_order_release);
    atomic_thread_fence(memory_order_seq_cst);
    if (futex && atomic_load_explicit(waiters, memory_order_relaxed))
        futex_wake(word);
}

static atomic_uint *len_word(uint8_t *data, uint32_t off)
{
    return (atomic_uint *)(void *)(data + off);
}

/* Reserves `need` contiguous bytes in the tx ring, plus the length word
 * after them, which is zeroed so the consumer stops there. Returns the
 * position, after any wrap. The tail is re-read only when the cached one
 * says the ring is full: it lives on the consumer's cache line. */
static int reserve(struct shm_link *s, uint32_t need, dh_timeout *t,
                   uint32_t *pos_out, uint32_t *wrap_off)
{
    uint32_t cap = s->mask + 1;
    uint32_t head = s->tx_head;
    uint32_t off = head & s->mask;
    uint32_t to_end = cap - off;
    uint32_t total = need + REC_HDR + (to_end < need ? to_end : 0);
    int rewind = 0;
    /* A ring its consumer has emptied starts over at its beginning: lines
     * both ends touched a moment ago move between cores faster than lines
     * a lap away (a 4 KiB ping-pong between two threads here: ~0.8 us on
     * one pair of buffers, ~1.2 us walking through 1 MiB; prefetching the
     * next slot did not help). Only while the consumer waits in recv (the
     * skipped bytes count as used until it passes the WRAP, and a busy
     * consumer would leave the ring that much smaller), and only once the
     * head is REWIND_AT in (the tail and idle word are on the consumer's
     * line). need <= off: the length word after the record is then in the
     * emptied part, or the WRAP's own word, zeroed before the WRAP is
     * stored there. A tail that fails its check is left for the full-ring
     * path to refuse. */
    if (off >= REWIND_AT && off >= need && to_end >= need &&
        atomic_load_explicit(&s->tx->idle, memory_order_relaxed) == IDLE_WAITING &&
        atomic_load_explicit(&s->tx->tail, memory_order_acquire) == head) {
        uint32_t w = IDLE_WAITING;
        if (atomic_compare_exchange_strong(&s->tx->idle, &w, IDLE_CLAIMED)) {
            rewind = 1;
            total = to_end + need;
            s->tail_cache = head;
        }
    }
    while (cap - (head - s->tail_cache) < total) {
        if (peer_gone(s))
            return DH_ECLOSED;
        uint32_t tail = atomic_load_explicit(&s->tx->tail, memory_order_acquire);
        /* The consumer only moves forward, and never past what we wrote. */
        if (!pos_ok(tail, s->tail_cache, head - s->tail_cache))
            return DH_EPROTO;
        if (tail != s->tail_cache) {
            s->tail_cache = tail;
            continue;
        }
        int rc = shm_wait(s, &s->tx->tail, tail, &s->tx->tail_waiters, t,
                          NULL);
        if (rc)
            return rc;
    }
    *wrap_off = WRAP;
    if (rewind || to_end < need) {
        *wrap_off = off;
        head += to_end;
    }
    *pos_out = head;
    return 0;
}

/* Makes a record visible: the next length word is zeroed first, then this
 * record's length is stored with release (a spinning consumer polls it),
 * then the WRAP marker that leads to it, then head for sleepers. */
static void commit(struct shm_link *s, uint32_t head, uint32_t rec_len,
                   uint32_t wrap_off)
{
    uint32_t span = align8(REC_HDR + rec_len);
    atomic_store_explicit(len_word(s->tx_data, (head + span) & s->mask), 0,
                          memory_order_relaxed);
    atomic_store_explicit(len_word(s->tx_data, head & s->mask), rec_len,
                          memory_order_release);
    if (wrap_off != WRAP)
        atomic_store_explicit(len_word(s->tx_data, wrap_off), WRAP,
                              memory_order_release);
    s->tx_head = head + span;
    publish(&s->tx->head, &s->tx->head_waiters, s->tx_head,
            s->wait_mode == DH_WAIT_FUTEX);
}

static int shm_send(dh_link *l, const dh_frame_hdr *h, const void *payload,
                    dh_timeout *t)
{
    struct shm_link *s = (struct shm_link *)l;
    if (peer_gone(s)) /* nobody would read it */
        return DH_ECLOSED;
    uint32_t rec = DH_FRAME_HDR_SIZE + h->length;
    uint32_t head, wrap_off;
    int rc = reserve(s, align8(REC_HDR + rec), t, &head, &wrap_off);
    if (rc)
        return rc;
    uint8_t *p = s->tx_data + (head & s->mask);
    uint8_t *dst = p + REC_HDR + DH_FRAME_HDR_SIZE;
    dh_frame_hdr w = *h;
    /* A small frame is checksummed from the caller's buffer (only we write
     * it) and copied in one burst: the consumer polls this record's first
     * line, and each separate write to it after the consumer's read costs
     * a cache-line transfer. A large one is copied and checksummed in one
     * pass. */
    if (h->length < DH_CRC_COPY_FUSED) {
        w.checksum = dh_frame_crc(&w, payload);
        memcpy(dst, payload, h->length);
    } else {
        w.checksum = dh_frame_copy_crc(&w, dst, payload);
    }
    memcpy(p + REC_HDR, &w, DH_FRAME_HDR_SIZE);
    commit(s, head, rec, wrap_off);
    return 0;
}

static int shm_send_raw(dh_link *l, const void *bytes, uint32_t n,
                        dh_timeout *t)
{
    struct shm_link *s = (struct shm_link *)l;
    /* n first: REC_HDR + n wraps for n near 4 GiB. */
    if (n == 0 || n > (s->mask + 1) / 2 || align8(REC_HDR + n) > (s->mask + 1) / 2)
        return DH_ETOOBIG;
    if (peer_gone(s))
        return DH_ECLOSED;
    uint32_t head, wrap_off;
    int rc = reserve(s, align8(REC_HDR + n), t, &head, &wrap_off);
    if (rc)
        return rc;
    memcpy(s->tx_data + (head & s->mask) + REC_HDR, bytes, n);
    commit(s, head, n, wrap_off);
    return 0;
}

/* Waits for a nonzero length word at the consumer's position: spinning on
 * the record itself costs one cache-line transfer, where polling head and
 * then reading the record would cost two. Sleepers block on head. */
static int wait_record(struct shm_link *s, atomic_uint *lw, dh_timeout *t)
{
    for (;;) {
        /* The record first: head is on the producer's line, and reading it
         * when the record is already there would wait for that line. */
        if (atomic_load_explicit(lw, memory_order_acquire))
            return 0;
        uint32_t head = atomic_load_explicit(&s->rx->head, memory_order_relaxed);
        /* Within a ring of us either way: a record's length word is stored
         * before head is published, so we may be a record ahead of it. */
        if (!pos_ok(head, s->rx_tail - (s->mask + 1), 2 * (s->mask + 1)))
            return DH_EPROTO;
        if (peer_gone(s))
            return atomic_load_explicit(lw, memory_order_acquire) ? 0 : DH_ECLOSED;
        int rc = shm_wait(s, &s->rx->head, head, &s->rx->head_waiters, t,
                          lw);
        if (rc)
            return rc;
    }
}

/* A producer claimed a rewind as our wait timed out: its WRAP is being
 * written (or it died), so wait for it without a deadline of our own. */
static int wait_claimed(struct shm_link *s, atomic_uint *lw)
{
    while (!atomic_load_explicit(lw, memory_order_acquire)) {
        if (peer_gone(s) || peer_dead(s))
            return DH_ECLOSED;
        sched_yield();
    }
    return 0;
}

static int shm_recv(dh_link *l, dh_frame_hdr *out, void *buf, uint32_t cap_buf,
                    dh_timeout *t)
{
    struct shm_link *s = (struct shm_link *)l;
    uint32_t cap = s->mask + 1;
    uint32_t tail = s->rx_tail;
    for (;;) {
        uint32_t off = tail & s->mask;
        uint32_t to_end = cap - off;
        atomic_uint *lw = len_word(s->rx_data, off);
        int rc = 0;
        if (!atomic_load_explicit(lw, memory_order_acquire)) {
            atomic_store_explicit(&s->rx->idle, IDLE_WAITING, memory_order_seq_cst);
            rc = wait_record(s, lw, t);
            if (atomic_exchange(&s->rx->idle, 0) == IDLE_CLAIMED && rc == DH_ETIMEDOUT)
                rc = wait_claimed(s, lw); /* its WRAP is on the way: take it */
        }
        if (rc)
            return rc;
        uint32_t rec = atomic_load_explicit(lw, memory_order_acquire);
        if (rec == WRAP) {
            atomic_store_explicit(lw, 0, memory_order_relaxed);
            tail += to_end;
            s->rx_tail = tail;
            publish(&s->rx->tail, &s->rx->tail_waiters, tail,
                    s->wait_mode == DH_WAIT_FUTEX);
            continue;
        }
        /* Bounds first: the length came from the peer. */
        if (rec < DH_FRAME_HDR_SIZE || rec > cap / 2 ||
            align8(REC_HDR + rec) > to_end)
            return DH_EPROTO;
        const uint8_t *p = s->rx_data + off + REC_HDR;
        dh_frame_hdr h;
        rc = dh_frame_check_hdr(p, rec, &h); /* copies the header out */
        if (rc || h.length != rec - DH_FRAME_HDR_SIZE)
            return DH_EPROTO;
        if (h.length > cap_buf)
            return DH_ETOOBIG; /* left in the ring for a bigger buffer */
        /* Checked on our copy: the peer cannot change it after the check. */
        if (dh_frame_copy_crc(&h, buf, p + DH_FRAME_HDR_SIZE) != h.checksum)
            return DH_EPROTO;
        atomic_store_explicit(lw, 0, memory_order_relaxed);
        s->rx_tail = tail + align8(REC_HDR + rec);
        publish(&s->rx->tail, &s->rx->tail_waiters, s->rx_tail,
                s->wait_mode == DH_WAIT_FUTEX);
        *out = h;
        return 0;
    }
}

static void shm_close(dh_link *l)
{
    struct shm_link *s = (struct shm_link *)l;
    /* After a reset the flag belongs to the channel's new ends: leave it. */
    if (atomic_load(&s->fh->generation) == s->generation)
        atomic_store(&s->fh->closed[s->side], 1);
    if (s->wait_mode == DH_WAIT_FUTEX) {
        futex_wake(&s->tx->head);
        futex_wake(&s->tx->tail);
        futex_wake(&s->rx->head);
        futex_wake(&s->rx->tail);
    }
}

static void shm_destroy(dh_link *l)
{
    struct shm_link *s = (struct shm_link *)l;
    if (s->owns_map)
        munmap(s->map, s->map_len);
    free(s);
}

static const struct dh_link_ops shm_ops = {
    .send = shm_send,
    .send_raw = shm_send_raw,
    .recv = shm_recv,
    .close = shm_close,
    .destroy = shm_destroy,
    .crc_on_copy = 1,
};

static int is_pow2(uint64_t v) { return v && !(v & (v - 1)); }

/* Reads the header once and checks that it describes a channel of at most
 * len bytes; *fb_out is the channel's size. */
static int hdr_check(const struct shm_file_hdr *fh, size_t len, uint32_t *fb_out)
{
    uint32_t magic = load_once(&fh->magic), version = load_once(&fh->version);
    uint32_t fb = load_once(&fh->file_bytes), rb = load_once(&fh->ring_bytes);
    if (magic != SHM_MAGIC || version != SHM_VERSION || fb > len || !is_pow2(fb) ||
        fb < SHM_MIN_BYTES || rb != fb / 4)
        return DH_EPROTO;
    *fb_out = fb;
    return 0;
}

/* Validates a mapped channel and builds the link over it. */
static int shm_bind(uint8_t *map, size_t len, int side, int wait_mode,
                    int owns_map, dh_link **out)
{
    struct shm_file_hdr *fh = (struct shm_file_hdr *)map;
    if (len < SHM_MIN_BYTES || side < 0 || side > 1)
        return DH_EINVAL;
    uint32_t fb;
    if (hdr_check(fh, len, &fb))
        return DH_EPROTO;
    uint32_t rb = fb / 4;
    struct shm_link *s = calloc(1, sizeof *s);
    if (!s)
        return DH_ENOMEM;
    dh_link_base_init(&s->base, &shm_ops);
    /* Both ends in one kernel with one CPU: the peer cannot run while we spin. */
    if (wait_mode == DH_WAIT_FUTEX && sysconf(_SC_NPROCESSORS_ONLN) == 1)
        s->base.spin_ns = 0;
    s->map = map;
    s->map_len = len;
    s->owns_map = owns_map;
    s->side = side;
    s->wait_mode = wait_mode;
    s->mask = rb - 1;
    s->fh = fh;
    s->generation = atomic_load_explicit(&fh->generation, memory_order_acquire);
    atomic_store(&fh->closed[side], 0); /* this side is open (again) */
    struct ring_ctl *ctl0 = (struct ring_ctl *)(map + CTL_OFF);
    struct ring_ctl *ctl1 = (struct ring_ctl *)(map + CTL_OFF + CTL_SIZE);
    uint8_t *d0 = map + fb / 2, *d1 = map + fb / 2 + rb;
    s->tx = side ? ctl1 : ctl0;
    s->rx = side ? ctl0 : ctl1;
    s->tx_data = side ? d1 : d0;
    s->rx_data = side ? d0 : d1;
    /* Where this end takes over: read once, then kept privately. */
    s->tx_head = atomic_load_explicit(&s->tx->head, memory_order_acquire);
    s->tail_cache = atomic_load_explicit(&s->tx->tail, memory_order_acquire);
    s->rx_tail = atomic_load_explicit(&s->rx->tail, memory_order_acquire);
    if (!pos_ok(s->tx_head, s->tail_cache, rb) || (s->tail_cache & 7u) || (s->rx_tail & 7u)) {
        free(s);
        return DH_EPROTO;
    }
    /* Largest frame whose record fits in half a ring, so a wrap always fits. */
    uint32_t max = rb / 2 - REC_HDR - DH_FRAME_HDR_SIZE - 8;
    if (max < s->base.max_payload)
        s->base.max_payload = max;
    *out = &s->base;
    return 0;
}

static int map_file(int fd, size_t len, uint8_t **out)
{
    void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED)
        return DH_EIO;
    *out = m;
    return 0;
}

int dh_shm_file_create(const char *path, uint32_t file_bytes)
{
    if (!is_pow2(file_bytes) || file_bytes < SHM_MIN_BYTES || file_bytes > (1u << 30))
        return DH_EINVAL;
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        return DH_EIO;
    uint8_t *map;
    int rc = DH_EIO;
    if (ftruncate(fd, file_bytes) == 0)
        rc = map_file(fd, file_bytes, &map);
    int saved = errno;
    close(fd);
    if (rc) {
        unlink(path);
        errno = saved;
        return rc;
    }
    struct shm_file_hdr *fh = (struct shm_file_hdr *)map;
    fh->version = SHM_VERSION;
    fh->file_bytes = file_bytes;
    fh->ring_bytes = file_bytes / 4;
    atomic_thread_fence(memory_order_release);
    fh->magic = SHM_MAGIC; /* last: an opener sees a whole header or none */
    munmap(map, file_bytes);
    return 0;
}

int dh_link_shm_stale(const dh_link *l)
{
    const struct shm_link *s = (const struct shm_link *)l;
    return l->ops == &shm_ops &&
           atomic_load_explicit(&s->fh->generation, memory_order_acquire) != s->generation;
}

/* Channel files are opened by path, never through a symbolic link: in a
 * directory others could write, one could point a node at their file. */
int dh_shm_file_reset(const char *path)
{
    int fd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return DH_EIO;
    struct stat st;
    uint8_t *map = NULL;
    int rc = fstat(fd, &st) == 0 && st.st_size >= (off_t)SHM_MIN_BYTES &&
                     st.st_size <= (1l << 30)
                 ? map_file(fd, (size_t)st.st_size, &map)
                 : DH_EPROTO;
    close(fd);
    if (rc)
        return rc;
    /* The layout follows from the file's size; the header, which the peer
     * can rewrite, must agree with it (read once, like the bind path). */
    struct shm_file_hdr *fh = (struct shm_file_hdr *)map;
    uint32_t fb;
    if (hdr_check(fh, (size_t)st.st_size, &fb) || fb != (uint64_t)st.st_size) {
        munmap(map, (size_t)st.st_size);
        return DH_EPROTO;
    }
    uint32_t rb = fb / 4;
    /* Old ends see the new generation and close; new ones start at zero. */
    atomic_fetch_add_explicit(&fh->generation, 1, memory_order_acq_rel);
    memset(map + CTL_OFF, 0, 2 * CTL_SIZE);
    memset(map + fb / 2, 0, REC_HDR);      /* ring 0's first length word */
    memset(map + fb / 2 + rb, 0, REC_HDR); /* ring 1's */
    fh->pid[0] = fh->pid[1] = 0;
    atomic_store(&fh->closed[0], 0);
    atomic_store(&fh->closed[1], 0);
    for (int i = 0; i < 2; i++) { /* sleepers on the old channel look again */
        struct ring_ctl *ctl = (struct ring_ctl *)(map + CTL_OFF + i * CTL_SIZE);
        futex_wake(&ctl->head);
        futex_wake(&ctl->tail);
    }
    munmap(map, (size_t)st.st_size);
    return 0;
}

int dh_link_shm_open(const char *path, int side, dh_link **out)
{
    int fd = open(path, O_RDWR | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return DH_EIO;
    struct stat st;
    uint8_t *map = NULL;
    int rc = DH_EIO;
    if (fstat(fd, &st) == 0)
        rc = st.st_size < (off_t)SHM_MIN_BYTES || st.st_size > (1l << 30)
                 ? DH_EPROTO
                 : map_file(fd, (size_t)st.st_size, &map);
    close(fd);
    if (rc)
        return rc;
    rc = shm_bind(map, (size_t)st.st_size, side, DH_WAIT_FUTEX, 1, out);
    if (rc) {
        munmap(map, (size_t)st.st_size);
        return rc;
    }
    ((struct shm_file_hdr *)map)->pid[side] = (int32_t)getpid();
    return 0;
}

int dh_link_shm_create(const char *path, uint32_t file_bytes, dh_link **out)
{
    int rc = dh_shm_file_create(path, file_bytes);
    if (rc == 0 && (rc = dh_link_shm_open(path, 0, out)))
        unlink(path);
    return rc;
}

int dh_link_shm_attach(void *base, size_t len, int side, int wait_mode,
                       dh_link **out)
{
    if (wait_mode != DH_WAIT_FUTEX && wait_mode != DH_WAIT_POLL)
        return DH_EINVAL;
    return shm_bind(base, len, side, wait_mode, 0, out);
}
