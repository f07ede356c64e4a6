/* ExCache over userfaultfd. See dh_excache.h for the design. This file: the
 * two ways a fault reaches the cache (the process-wide SIGBUS hook and the
 * handler thread) and the cache's life cycle; cache.c serves the fault,
 * uffd.c makes the userfaultfd calls, failover.c the requests.
 *
 * Everything reachable from ex_serve_fault() is async-signal-safe: no malloc,
 * no stdio, no pthread locks (a spin lock on an atomic flag instead), only
 * ioctl/madvise/futex/clock_gettime system calls and memcpy. Buffers are
 * allocated when the cache is made. A thread can never fault while holding
 * the lock: the handler only touches pages it knows are present. */
#include <errno.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "excache_int.h"

/* ---- the process-wide SIGBUS hook -------------------------------------- */

#define MAX_CACHES 16
static _Atomic(dh_excache *) caches[MAX_CACHES];
static struct sigaction previous;
static pthread_mutex_t hook_lock = PTHREAD_MUTEX_INITIALIZER;

static void say(const char *a, const char *b)
{
    ssize_t rc = write(2, a, strlen(a));
    rc = write(2, b, strlen(b));
    (void)rc;
}

void ex_fatal(dh_excache *c, int rc)
{
    /* No page to give the faulting code: ending the process is the only
     * answer that is neither a hang nor silently wrong data. */
    say("disagg-harness ExCache: cannot serve a page fault: ", c->why ? c->why : dh_strerror(rc));
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
            int rc = ex_serve_fault(c, r, a, -1);
            if (rc < 0)
                ex_fatal(c, rc);
            if (rc == EX_GONE)
                break; /* freed meanwhile: not ours now */
            errno = saved;
            return;
        }
    }
    pass_on(sig, si, uc);
    errno = saved;
}

/* Installed when a SIGBUS-mode cache is made, and again if another handler
 * replaced it since (Python's faulthandler.enable() does, and so does an
 * in-process pytest run): the one that replaced it is then passed on to. */
static void install_hook(void)
{
    struct sigaction sa, now;
    pthread_mutex_lock(&hook_lock);
    sigaction(SIGBUS, NULL, &now);
    if (!(now.sa_flags & SA_SIGINFO) || now.sa_sigaction != on_sigbus) {
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_RESTART;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGBUS, &sa, &previous);
    }
    pthread_mutex_unlock(&hook_lock);
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
            int rc = r ? ex_serve_fault(c, r, a, wp) : 0;
            if (rc)
                ex_fatal(c, rc);
        }
        busy_until = dh_now_ns() + spin;
    }
    return NULL;
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
    if (link && dh_link_max_payload(link) < sizeof(union p2m_request))
        return DH_ETOOBIG;
    dh_excache *c = calloc(1, sizeof *c);
    if (!c)
        return DH_ENOMEM;
    c->uffd = -1; /* none yet: a failed create must not close descriptor 0 */
    c->pidfd = -1;
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
    c->req = malloc(sizeof *c->req);
    c->page = aligned_alloc(DH_PAGE, (size_t)DH_PAGE * DH_PREFETCH_MAX);
    int rc = c->lines && c->req && c->page ? 0 : DH_ENOMEM;
    if (!rc)
        rc = ex_open_uffd(c);
    if (!rc && fault_mode == DH_FAULT_SIGBUS) {
        install_hook();
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
    if (c->uffd >= 0)
        close(c->uffd);
    if (c->pidfd >= 0 && c->pidfd_of == getpid())
        close(c->pidfd);
    free(c->lines);
    free(c->req);
    free(c->page);
    free(c);
}

