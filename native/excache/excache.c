/* ExCache over userfaultfd. See dh_excache.h for the design.
 *
 * Everything reachable from serve_fault() is async-signal-safe: no malloc,
 * no stdio, no pthread locks (a spin lock on an atomic flag instead), only
 * ioctl/madvise/futex/clock_gettime system calls and memcpy. Buffers are
 * allocated when the cache is made. A thread can never fault while holding
 * the lock: the handler only touches pages it knows are present. */
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "excache_int.h"

/* ---- the process-wide SIGBUS hook -------------------------------------- */

#define MAX_CACHES 16
static _Atomic(dh_excache *) caches[MAX_CACHES];
static struct sigaction previous;
static pthread_once_t hook_once = PTHREAD_ONCE_INIT;

static int serve_fault(dh_excache *c, struct region *r, uintptr_t addr, int wp);

static void say(const char *a, const char *b)
{
    ssize_t rc = write(2, a, strlen(a));
    rc = write(2, b, strlen(b));
    (void)rc;
}

void ex_fatal(dh_excache *c, const char *why)
{
    /* No page to give the faulting code: ending the process is the only
     * answer that is neither a hang nor silently wrong data. */
    say("disagg-harness ExCache: cannot serve a page fault: ", why);
    if (c->why) { /* a local system call failed, not the memory node */
        char num[24], *p = num + sizeof num - 1;
        int e = c->why_errno;
        *p = 0;
        do
            *--p = (char)('0' + e % 10);
        while ((e /= 10) && p > num);
        say(" (errno ", p);
        say("); a local failure, the memory node ", c->label[0] ? c->label : "(unnamed)");
        say(" was answering. Aborting.\n", "");
    } else {
        say("; the memory node ", c->label[0] ? c->label : "(unnamed)");
        say(" is gone or not answering. Aborting.\n", "");
    }
    /* The default action, not the program's handler: one run here (Python's
     * faulthandler dumping its threads) would wait for pages only this
     * thread could bring in. */
    struct sigaction dfl = {.sa_handler = SIG_DFL};
    sigaction(SIGABRT, &dfl, NULL);
    abort();
}

struct region *ex_find(dh_excache *c, uintptr_t a)
{
    for (int i = 0; i < DH_EXCACHE_MAX_REGIONS; i++) {
        struct region *r = &c->regions[i];
        if (r->used && a >= (uintptr_t)r->base && a < (uintptr_t)r->base + r->size)
            return r;
    }
    return NULL;
}

/* serve_fault: the region was freed after the lockless lookup found it. */
#define EX_GONE 1

/* Not ours: whoever was there before gets it (Python's faulthandler, say),
 * or the default action. A fault's retried access raises it again, then
 * with the default action; a signal that will not come again (sent by a
 * process, or a memory error reported ahead of any access) is raised anew,
 * to be taken when this handler returns. */
static void pass_on(int sig, siginfo_t *si, void *uc)
{
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, si, uc);
    } else if (previous.sa_handler != SIG_IGN && previous.sa_handler != SIG_DFL) {
        previous.sa_handler(sig);
    } else {
        sigaction(SIGBUS, &previous, NULL);
        if (previous.sa_handler == SIG_DFL && (si->si_code <= 0 || si->si_code == BUS_MCEERR_AO))
            raise(sig);
    }
}

static void on_sigbus(int sig, siginfo_t *si, void *uc)
{
    int saved = errno; /* the interrupted code's; the system calls below change it */
    /* userfaultfd's SIGBUS says BUS_ADRERR. A hardware memory error
     * (BUS_MCEERR_AR/AO) on a region page is no page to fetch: served as one,
     * the access would fault again forever. */
    uintptr_t a = (uintptr_t)si->si_addr;
    for (int i = 0; i < MAX_CACHES && si->si_code == BUS_ADRERR; i++) {
        dh_excache *c = atomic_load(&caches[i]);
        struct region *r;
        if (c && c->mode == DH_FAULT_SIGBUS && (r = ex_find(c, a))) {
            int rc = serve_fault(c, r, a, -1);
            if (rc < 0)
                ex_fatal(c, dh_strerror(rc));
            if (rc == EX_GONE)
                break; /* freed meanwhile: not ours now */
            errno = saved;
            return;
        }
    }
    pass_on(sig, si, uc);
    errno = saved;
}

static void install_hook(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &previous);
}

/* ---- the protocol to the memory node --------------------------------------- */

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

uint64_t ex_page_index(struct region *r, uintptr_t page)
{
    return (page - (uintptr_t)r->base) / DH_PAGE;
}

static int on_mnode(struct region *r, uint64_t idx)
{
    return r->on_mnode[idx / 8] >> (idx % 8) & 1;
}

uint8_t *ex_was_dirty(struct region *r) { return r->on_mnode + (r->size / DH_PAGE + 7) / 8; }

/* A page written back now is on the mnode. Whether writes are expected when
 * it comes back is learnt only from writes the cache saw (a write-protect
 * fault), or kept for a page that was predicted: a fresh page counted dirty
 * by assumption teaches nothing (numpy's inputs are written once, at their
 * creation, and only read after). */
static void mark_written_back(struct region *r, uint64_t idx, const struct line *l)
{
    r->on_mnode[idx / 8] |= (uint8_t)(1u << (idx % 8));
    uint8_t *w = &ex_was_dirty(r)[idx / 8], bit = (uint8_t)(1u << (idx % 8));
    if (l->assumed == ASSUMED_FRESH)
        *w &= (uint8_t)~bit;
    else
        *w |= bit;
}

/* Whether a page comes back writable and dirty: it was written in its last
 * stay in the cache, so it is likely written again (redis's LRU clock,
 * CPython's refcounts, a match finder's tables), and its write-protect
 * fault would only cost another round through the handler. */
static int expects_writes(dh_excache *c, struct region *r, uint64_t idx)
{
    return c->predict_writes && (ex_was_dirty(r)[idx / 8] >> (idx % 8) & 1);
}

/* The prediction for a miss: one in eight comes in clean anyway, so a page
 * that stopped being written is evicted clean, which forgets it. */
static int predicted_dirty(dh_excache *c, struct region *r, uint64_t idx)
{
    return expects_writes(c, r, idx) && ++c->predict_tick % 8 != 0;
}

/* Fetches n pages from idx into c->page, carrying a dirty victim (in c->req)
 * along. */
static int fetch(dh_excache *c, struct region *r, uint64_t idx, uint32_t n,
                 struct line *dirty_victim)
{
    if (!c->link) { /* the floor: a local store */
        if (dirty_victim)
            memcpy(dirty_victim->r->local + ex_page_index(dirty_victim->r, dirty_victim->page) *
                       DH_PAGE, c->req + 24, DH_PAGE);
        memcpy(c->page, r->local + idx * DH_PAGE, (size_t)n * DH_PAGE);
        return 0;
    }
    if (dirty_victim) {
        put32(c->req, r->id);
        put32(c->req + 4, dirty_victim->r->id);
        put64(c->req + 8, idx);
        put64(c->req + 16, ex_page_index(dirty_victim->r, dirty_victim->page));
        put32(c->req + 24 + DH_PAGE, n);
        c->st.piggybacked++;
        return ex_rpc(c, DH_OP_P2M_PCACHE_MISS_FLUSH, 28 + DH_PAGE, n * DH_PAGE);
    }
    put32(c->req, r->id);
    put32(c->req + 4, n);
    put64(c->req + 8, idx);
    return ex_rpc(c, DH_OP_P2M_PCACHE_MISS, 16, n * DH_PAGE);
}

/* While a fork is under way, a page written back also goes to the region's
 * copy (made when the fork began): the child's memory is the parent's as
 * it is at the fork, written back or not. The page is still mapped (and
 * write-protected) here. */
static int mirror(dh_excache *c, struct region *r, uint64_t idx, uintptr_t page)
{
    if (!c->mirroring || !c->link)
        return 0;
    put32(c->req, r->clone_id);
    put32(c->req + 4, 0);
    put64(c->req + 8, idx);
    memcpy(c->req + 16, (void *)page, DH_PAGE);
    return ex_rpc(c, DH_OP_P2M_PCACHE_FLUSH, 16 + DH_PAGE, 0);
}

/* Writes back the page whose data is at c->req + 24. */
static int flush_one(dh_excache *c, struct line *v)
{
    uint64_t idx = ex_page_index(v->r, v->page);
    if (!c->link) {
        memcpy(v->r->local + idx * DH_PAGE, c->req + 24, DH_PAGE);
        return 0;
    }
    put32(c->req, v->r->id);
    put32(c->req + 4, 0);
    put64(c->req + 8, idx);
    memmove(c->req + 16, c->req + 24, DH_PAGE);
    return ex_rpc(c, DH_OP_P2M_PCACHE_FLUSH, 16 + DH_PAGE, 0);
}

/* ---- userfaultfd helpers ---------------------------------------------------- */

int ex_protect(dh_excache *c, uintptr_t page, int on)
{
    struct uffdio_writeprotect wp = {
        .range = {.start = page, .len = DH_PAGE},
        .mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    if (ioctl(c->uffd, UFFDIO_WRITEPROTECT, &wp)) {
        c->why = on ? "UFFDIO_WRITEPROTECT (protecting a line) failed"
                    : "UFFDIO_WRITEPROTECT (unprotecting a line) failed";
        c->why_errno = errno;
        return DH_EIO;
    }
    return 0;
}

/* Copies len bytes in; 0, or the errno. A page that is already there
 * (EEXIST) counts as installed only when the copy was of that page alone. */
static int copy_in(dh_excache *c, uintptr_t page, const uint8_t *src, uint64_t len,
                   int writable)
{
    struct uffdio_copy cp = {
        .dst = page, .src = (uintptr_t)src, .len = len,
        .mode = writable ? 0 : UFFDIO_COPY_MODE_WP, /* clean until the first write faults */
    };
    if (!ioctl(c->uffd, UFFDIO_COPY, &cp))
        return 0;
    return errno == EEXIST && len == DH_PAGE ? 0 : errno;
}

/* One UFFDIO_COPY for the window; page by page when that does not install
 * all of it, since a window may cross from one mapping to the next
 * (mprotect and madvise split a region's mappings) and one copy may not. */
static int install(dh_excache *c, uintptr_t page, uint32_t n, int writable)
{
    int e = copy_in(c, page, c->page, (uint64_t)n * DH_PAGE, writable);
    if (e && n > 1) {
        e = 0;
        for (uint32_t i = 0; i < n && !e; i++)
            e = copy_in(c, page + (uintptr_t)i * DH_PAGE, c->page + (size_t)i * DH_PAGE,
                        DH_PAGE, writable);
    }
    if (e) {
        c->why = "UFFDIO_COPY (installing a page) failed";
        c->why_errno = e;
        return DH_EIO;
    }
    return 0;
}

void ex_lock(dh_excache *c)
{
    /* Spin a little, then yield: the holder may be waiting for the memory
     * node, which needs a core that a spinner would keep. */
    for (unsigned i = 0; atomic_flag_test_and_set_explicit(&c->lock, memory_order_acquire); i++) {
        if (i < 256)
            __builtin_ia32_pause();
        else
            sched_yield();
    }
}

void ex_unlock(dh_excache *c) { atomic_flag_clear_explicit(&c->lock, memory_order_release); }

static uint64_t now_ns(void) { return dh_now_ns(); }

static struct line *victim_of(dh_excache *c, struct line *set)
{
    struct line *v = NULL;
    for (uint32_t w = 0; w < c->ways; w++)
        if (!set[w].page)
            return &set[w];
    switch (c->policy) {
    case DH_POLICY_RANDOM:
        c->rng ^= c->rng << 13;
        c->rng ^= c->rng >> 17;
        c->rng ^= c->rng << 5;
        return &set[c->rng % c->ways];
    case DH_POLICY_LRU: /* least recently faulted: hits are invisible to userfaultfd */
        v = &set[0];
        for (uint32_t w = 1; w < c->ways; w++)
            if (set[w].touched < v->touched)
                v = &set[w];
        return v;
    default:
        v = &set[0];
        for (uint32_t w = 1; w < c->ways; w++)
            if (set[w].filled < v->filled)
                v = &set[w];
        return v;
    }
}

struct line *ex_set_of(dh_excache *c, uintptr_t page)
{
    return &c->lines[(uint64_t)(page / DH_PAGE) % c->nsets * c->ways];
}

struct line *ex_resident_line(dh_excache *c, struct line *set, uintptr_t page)
{
    for (uint32_t w = 0; w < c->ways; w++)
        if (set[w].page == page)
            return &set[w];
    return NULL;
}

/* How many lines a remote miss at page idx brings in: the following pages
 * while they are on the memory node, not resident, and their victims clean.
 * Their victims go to c->pf[1..]. Consecutive pages fall in distinct sets
 * (the window is at most nsets), so no victim is chosen twice. */
static uint32_t window(dh_excache *c, struct region *r, uint64_t idx)
{
    uint32_t n = 1;
    uint64_t pages = r->size / DH_PAGE;
    int dirty = expects_writes(c, r, idx); /* one UFFDIO_COPY: one mode for the window */
    for (; n < c->prefetch && idx + n < pages && on_mnode(r, idx + n) &&
           expects_writes(c, r, idx + n) == dirty;
         n++) {
        uintptr_t q = (uintptr_t)r->base + (idx + n) * DH_PAGE;
        struct line *set = ex_set_of(c, q);
        if (ex_resident_line(c, set, q))
            break;
        struct line *v = victim_of(c, set);
        if (v->page && v->dirty)
            break;
        c->pf[n] = v;
    }
    return n;
}

/* Drops a clean or written-back victim's mapping; runs of adjacent pages go
 * in one madvise. */
static void drop(dh_excache *c, struct line *v, uintptr_t *run, uint64_t *len)
{
    if (!v->dirty) { /* not written in this stay: no longer expect writes */
        uint64_t i = ex_page_index(v->r, v->page);
        ex_was_dirty(v->r)[i / 8] &= (uint8_t)~(1u << (i % 8));
    }
    c->st.resident--;
    v->r->resident--;
    v->r->dirty -= v->dirty;
    if (*len && *run + *len == v->page) {
        *len += DH_PAGE;
        return;
    }
    if (*len)
        madvise((void *)*run, *len, MADV_DONTNEED);
    *run = v->page;
    *len = DH_PAGE;
}

static void record(dh_excache *c, uint64_t t0)
{
    uint64_t d = now_ns() - t0;
    int b = d ? 63 - __builtin_clzll(d) : 0;
    c->st.hist[b < DH_HIST_BUCKETS ? b : DH_HIST_BUCKETS - 1]++;
}

/* wp: 1 a write-protect fault, 0 a missing page, -1 unknown (SIGBUS says
 * neither): a resident page means a write to a clean line. */
static int in_region(const struct region *r, uintptr_t a)
{
    return r->used && a >= (uintptr_t)r->base && a - (uintptr_t)r->base < r->size;
}

static int serve_fault(dh_excache *c, struct region *r, uintptr_t addr, int wp)
{
    uintptr_t page = addr & ~(uintptr_t)(DH_PAGE - 1);
    ex_lock(c);
    /* r was found without the lock: dh_excache_free may have taken it since
     * (it marks it unused under the lock before it unmaps it). Then there is
     * nothing to serve; a handler thread's faulting thread is woken when
     * free unregisters the range. */
    if (!in_region(r, addr) && !(r = ex_find(c, addr))) {
        ex_unlock(c);
        return c->mode == DH_FAULT_SIGBUS ? EX_GONE : 0;
    }
    uint64_t t0 = now_ns();
    struct line *set = ex_set_of(c, page);
    struct line *hit = ex_resident_line(c, set, page);
    int rc = 0;
    if (hit) {
        /* Present: the first write to a clean line (or a fault another
         * thread already served). Marking dirty is always safe. */
        hit->touched = ++c->clock;
        if (wp == 1 || (wp == -1 && !hit->dirty)) {
            hit->r->dirty += !hit->dirty;
            hit->dirty = 1;
            hit->assumed = SEEN;
            c->st.wp_faults++;
            rc = ex_protect(c, page, 0);
        } else if (wp == -1) {
            /* A fault on a dirty line: still write-protected (a write-back
             * that failed left it so) or made writable by another thread
             * meanwhile. A dirty line is writable: without this the write
             * would fault again forever. */
            rc = ex_protect(c, page, 0);
        } else if (c->mode == DH_FAULT_THREAD) { /* a stale message: just wake */
            struct uffdio_range rg = {.start = page, .len = DH_PAGE};
            ioctl(c->uffd, UFFDIO_WAKE, &rg);
        }
        ex_unlock(c);
        return rc;
    }
    c->st.misses++;
    struct line *v = victim_of(c, set);
    struct line *dirty_victim = NULL;
    if (v->page) {
        c->st.evictions++;
        if (v->dirty) {
            /* Stop writers first, so no store lands after the copy. */
            if ((rc = ex_protect(c, v->page, 1)))
                goto out;
            memcpy(c->req + 24, (void *)v->page, DH_PAGE);
            dirty_victim = v;
            c->st.dirty_flushes++;
        } else {
            c->st.clean_drops++;
        }
    }
    uint64_t idx = ex_page_index(r, page);
    uint32_t n = 1;
    int fresh = !on_mnode(r, idx); /* zero-filled: written soon, so maybe dirty at once */
    if (!fresh) {
        n = window(c, r, idx);
        rc = fetch(c, r, idx, n, dirty_victim);
        c->st.remote_fetches++;
    } else {
        if (dirty_victim)
            rc = flush_one(c, dirty_victim);
        memset(c->page, 0, DH_PAGE);
        c->st.zero_fills++;
    }
    if (rc)
        goto out;
    if (dirty_victim) {
        struct region *vr = dirty_victim->r;
        uint64_t vi = ex_page_index(vr, v->page);
        mark_written_back(vr, vi, dirty_victim);
        if ((rc = mirror(c, vr, vi, v->page)))
            goto out;
    }
    c->pf[0] = v;
    uintptr_t run = 0;
    uint64_t len = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (!c->pf[i]->page)
            continue;
        if (i) {
            c->st.evictions++;
            c->st.clean_drops++;
        }
        drop(c, c->pf[i], &run, &len);
    }
    if (len)
        madvise((void *)run, len, MADV_DONTNEED);
    int dirty = fresh ? c->predict_writes : predicted_dirty(c, r, idx);
    if ((rc = install(c, page, n, dirty)))
        goto out;
    r->dirty += (uint64_t)dirty * n;
    for (uint32_t i = 0; i < n; i++) {
        struct line *l = c->pf[i];
        l->page = page + (uintptr_t)i * DH_PAGE;
        l->r = r;
        l->dirty = (uint8_t)dirty;
        l->assumed = !dirty ? SEEN : fresh ? ASSUMED_FRESH : ASSUMED_PREDICTED;
        l->filled = l->touched = ++c->clock;
    }
    c->st.prefetched += n - 1;
    c->st.resident += n;
    r->resident += n;
    record(c, t0);
out:
    ex_unlock(c);
    return rc;
}

/* ---- the handler thread (fault_mode THREAD) ------------------------------------ */

/* After a fault the handler keeps reading the userfaultfd this long before
 * it sleeps again: a paging program faults in bursts, and waking a sleeping
 * handler costs a cross-core wake-up per fault (18-60 us here). It yields
 * while it spins, and with one CPU it does not spin: the program it just
 * woke needs that CPU. */
#define HANDLER_SPIN_NS 50000

static void *handler(void *arg)
{
    dh_excache *c = arg;
    /* The program's signals are not this thread's: a handler run here could
     * fault on memory only this thread can bring in. */
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    struct uffd_msg msgs[16];
    uint64_t busy_until = 0, spin = sysconf(_SC_NPROCESSORS_ONLN) > 1 ? HANDLER_SPIN_NS : 0;
    while (!atomic_load(&c->stop)) {
        ssize_t n = read(c->uffd, msgs, sizeof msgs);
        if (n <= 0) {
            if (dh_now_ns() < busy_until) {
                sched_yield();
                continue;
            }
            struct pollfd p = {.fd = c->uffd, .events = POLLIN};
            poll(&p, 1, 100);
            continue;
        }
        for (ssize_t i = 0; i < n / (ssize_t)sizeof msgs[0]; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            uintptr_t a = msgs[i].arg.pagefault.address;
            struct region *r = ex_find(c, a);
            int wp = (msgs[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) != 0;
            int rc = r ? serve_fault(c, r, a, wp) : 0;
            if (rc)
                ex_fatal(c, c->why ? c->why : dh_strerror(rc));
        }
        busy_until = dh_now_ns() + spin;
    }
    return NULL;
}

int dh_fd_high(int fd)
{
    if (fd < 0 || fd >= DH_FD_HIGH)
        return fd;
    int hi = fcntl(fd, F_DUPFD_CLOEXEC, DH_FD_HIGH);
    if (hi < 0)
        return fd; /* a low limit on open files: keep the one we have */
    close(fd);
    return hi;
}

int ex_open_uffd(dh_excache *c)
{
    c->uffd = dh_fd_high((int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
    if (c->uffd < 0)
        return errno == ENOSYS ? DH_ENOSYS : DH_EIO;
    struct uffdio_api api = {
        .api = UFFD_API,
        .features = UFFD_FEATURE_PAGEFAULT_FLAG_WP |
                    (c->mode == DH_FAULT_SIGBUS ? UFFD_FEATURE_SIGBUS : 0),
    };
    if (ioctl(c->uffd, UFFDIO_API, &api))
        return errno == EINVAL ? DH_ENOSYS : DH_EIO;
    return 0;
}

int ex_register(dh_excache *c, void *base, uint64_t size)
{
    struct uffdio_register reg = {
        .range = {.start = (uintptr_t)base, .len = size},
        .mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP,
    };
    if (ioctl(c->uffd, UFFDIO_REGISTER, &reg))
        return errno == EINVAL ? DH_ENOSYS : DH_EIO;
    return 0;
}

int ex_start_handler(dh_excache *c)
{
    atomic_store(&c->stop, 0);
    if (pthread_create(&c->thread, NULL, handler, c))
        return DH_EIO;
    c->thread_running = 1;
    return 0;
}

/* ---- life cycle ----------------------------------------------------------- */

int dh_excache_create(dh_link *link, uint64_t capacity, uint32_t ways, int policy,
                      int fault_mode, int timeout_ms, dh_excache **out)
{
    if (!ways || capacity < (uint64_t)ways * DH_PAGE || capacity % ((uint64_t)ways * DH_PAGE) ||
        policy < DH_POLICY_FIFO || policy > DH_POLICY_RANDOM ||
        (fault_mode != DH_FAULT_SIGBUS && fault_mode != DH_FAULT_THREAD))
        return DH_EINVAL;
    if (link && dh_link_max_payload(link) < 28 + DH_PAGE)
        return DH_ETOOBIG;
    dh_excache *c = calloc(1, sizeof *c);
    if (!c)
        return DH_ENOMEM;
    c->link = link;
    c->ways = ways;
    c->nsets = (uint32_t)(capacity / DH_PAGE / ways);
    c->policy = policy;
    c->prefetch = 1;
    c->mode = fault_mode;
    c->timeout_ms = timeout_ms;
    c->rng = 2463534242u;
    ex_failover_init(c);
    atomic_flag_clear(&c->lock);
    c->lines = calloc((size_t)c->nsets * ways, sizeof *c->lines);
    c->req = malloc(28 + DH_PAGE);
    c->page = aligned_alloc(DH_PAGE, (size_t)DH_PAGE * DH_PREFETCH_MAX);
    int rc = c->lines && c->req && c->page ? 0 : DH_ENOMEM;
    if (!rc)
        rc = ex_open_uffd(c);
    if (!rc && fault_mode == DH_FAULT_SIGBUS) {
        pthread_once(&hook_once, install_hook);
        rc = DH_ENOMEM;
        for (int i = 0; i < MAX_CACHES && rc; i++) {
            dh_excache *none = NULL;
            if (atomic_compare_exchange_strong(&caches[i], &none, c))
                rc = 0;
        }
    }
    if (!rc && fault_mode == DH_FAULT_THREAD)
        rc = ex_start_handler(c);
    if (rc) {
        dh_excache_destroy(c);
        return rc;
    }
    *out = c;
    return 0;
}

int dh_excache_set_prefetch(dh_excache *c, uint32_t n)
{
    if (n < 1 || n > DH_PREFETCH_MAX || n > c->nsets)
        return DH_EINVAL;
    if (c->link && dh_link_max_payload(c->link) < n * DH_PAGE)
        return DH_ETOOBIG;
    ex_lock(c);
    c->prefetch = n;
    ex_unlock(c);
    return 0;
}

void dh_excache_set_predict_writes(dh_excache *c, int on)
{
    ex_lock(c);
    c->predict_writes = on;
    ex_unlock(c);
}

void dh_excache_set_label(dh_excache *c, const char *label)
{
    ex_lock(c);
    snprintf(c->label, sizeof c->label, "%s", label);
    ex_unlock(c);
}

int ex_write_back(dh_excache *c, struct line *l)
{
    int rc;
    if ((rc = ex_protect(c, l->page, 1)))
        return rc;
    memcpy(c->req + 24, (void *)l->page, DH_PAGE);
    if ((rc = flush_one(c, l)))
        return rc;
    uint64_t vi = ex_page_index(l->r, l->page);
    mark_written_back(l->r, vi, l);
    if ((rc = mirror(c, l->r, vi, l->page)))
        return rc;
    l->dirty = 0;
    l->assumed = SEEN;
    l->r->dirty--;
    c->st.dirty_flushes++;
    return 0;
}

int dh_excache_flush(dh_excache *c)
{
    int rc = 0;
    ex_lock(c);
    for (uint64_t i = 0; i < (uint64_t)c->nsets * c->ways && !rc; i++)
        if (c->lines[i].page && c->lines[i].dirty)
            rc = ex_write_back(c, &c->lines[i]);
    ex_unlock(c);
    return rc;
}

int dh_excache_region_stats(dh_excache *c, void *addr, uint64_t *resident, uint64_t *dirty)
{
    ex_lock(c);
    struct region *r = ex_find(c, (uintptr_t)addr);
    if (r) {
        *resident = r->resident;
        *dirty = r->dirty;
    }
    ex_unlock(c);
    return r ? 0 : DH_EINVAL;
}

void dh_excache_get_stats(dh_excache *c, dh_excache_stats *s)
{
    ex_lock(c);
    *s = c->st;
    s->backup_in_sync = c->backup && c->synced;
    ex_unlock(c);
}

void dh_excache_reset_stats(dh_excache *c)
{
    ex_lock(c);
    uint64_t resident = c->st.resident;
    memset(&c->st, 0, sizeof c->st);
    c->st.resident = resident;
    ex_unlock(c);
}

void dh_excache_destroy(dh_excache *c)
{
    if (!c)
        return;
    for (int i = 0; i < MAX_CACHES; i++) {
        dh_excache *me = c;
        atomic_compare_exchange_strong(&caches[i], &me, NULL);
    }
    if (c->thread_running) {
        atomic_store(&c->stop, 1);
        pthread_join(c->thread, NULL);
    }
    for (int i = 0; i < DH_EXCACHE_MAX_REGIONS; i++)
        if (c->regions[i].used) {
            munmap(c->regions[i].base, c->regions[i].size);
            if (c->regions[i].local)
                munmap(c->regions[i].local, c->regions[i].size);
            free(c->regions[i].on_mnode);
        }
    if (c->uffd > 0)
        close(c->uffd);
    free(c->lines);
    free(c->req);
    free(c->page);
    free(c);
}

/* ---- the floor -------------------------------------------------------------- */

int dh_excache_floor_fault(int fault_mode, uint64_t *samples, size_t n)
{
    dh_excache *c;
    uint64_t cap = (uint64_t)(n + 64) * DH_PAGE;
    cap -= cap % (64 * DH_PAGE);
    int rc = dh_excache_create(NULL, cap + 64 * DH_PAGE, 64, DH_POLICY_FIFO, fault_mode, 1000,
                               &c);
    if (rc)
        return rc;
    void *addr;
    uint32_t id;
    if ((rc = dh_excache_alloc(c, (uint64_t)n * DH_PAGE, &addr, &id))) {
        dh_excache_destroy(c);
        return rc;
    }
    /* Every page "lives on the store", so each fault copies it from local memory. */
    memset(c->regions[id - 1].on_mnode, 0xff, (n + 7) / 8);
    dh_excache_time_touch(addr, n, 0, samples);
    dh_excache_destroy(c);
    return 0;
}

void dh_excache_time_touch(void *addr, size_t npages, int write, uint64_t *samples)
{
    volatile uint8_t *p = addr;
    for (size_t i = 0; i < npages; i++) {
        uint64_t t0 = dh_now_ns();
        if (write)
            p[i * DH_PAGE] = (uint8_t)i;
        else
            (void)p[i * DH_PAGE];
        samples[i] = dh_now_ns() - t0;
    }
}
