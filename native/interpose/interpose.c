/* LD_PRELOAD interposer: an unmodified program's anonymous private memory
 * lives on a memory node, served by ExCache through real page faults.
 *
 * The program's heap: mimalloc (Debian's libmimalloc.so.2, preloaded after
 * this library) replaces glibc's malloc, whose main arena grows by an
 * internal brk nobody can interpose; mimalloc asks the OS for memory with
 * plain mmap/munmap/madvise/mprotect calls, which land here like the
 * program's own anonymous mappings (CPython's arenas, numpy's big arrays).
 * Each is carved from one ExCache region, the arena. Thread stacks made by
 * pthread_create (glibc maps those internally) come from the arena too.
 * File-backed and shared mappings, and the main thread's stack and the
 * program's data segment, stay local.
 *
 * Faults are served by ExCache's handler thread, not in a SIGBUS handler:
 * the kernel's own accesses to the program's memory (read(2) into a heap
 * buffer, a signal frame on a thread stack) must wait for the page too,
 * and only a userfaultfd reader makes them wait instead of failing.
 *
 * Configuration comes from the environment the harness sets: DH_BROKER
 * (the harness's socket), DH_CACHE_BYTES, DH_POLICY, DH_PREFETCH,
 * DH_ARENA_BYTES, DH_TIMEOUT_MS. Without DH_BROKER it does nothing. */
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdio_ext.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "interpose.h"

/* The build renames these for the C core (setup.py); here they are ours. */
#undef mmap
#undef munmap
#undef madvise
#undef mprotect
void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off);
int munmap(void *addr, size_t len);
int madvise(void *addr, size_t len, int advice);
int mprotect(void *addr, size_t len, int prot);

#define EXPORT __attribute__((visibility("default")))
#define RW (PROT_READ | PROT_WRITE)

enum { UNINIT, STARTING, ACTIVE, OFF };

static struct {
    atomic_int state;
    dh_excache *cache;
    uint8_t *base;
    uint64_t size;
    uint32_t region;
    struct dh_channel channel;
    const char *broker;
    atomic_ulong local_bytes; /* anonymous memory left local: the arena was full */
    atomic_ulong stacks, forks;
} G;

static __thread int in_self; /* this thread is inside the interposer */

static uint64_t env_u64(const char *name, uint64_t dflt)
{
    const char *v = getenv(name);
    return v && *v ? strtoull(v, NULL, 10) : dflt;
}

/* A process that cannot have the memory it was promised stops here, loudly,
 * rather than run with memory that is not what the user asked for. */
static void die(const char *what, const char *why)
{
    dh_say(what, ": ", why);
    _exit(70);
}

static int policy_from_env(void)
{
    const char *p = getenv("DH_POLICY");
    if (!p || !strcmp(p, "fifo"))
        return DH_POLICY_FIFO;
    return !strcmp(p, "lru") ? DH_POLICY_LRU : DH_POLICY_RANDOM;
}

static dh_link *connect_channel(void)
{
    char err[256];
    dh_link *link = NULL;
    if (dh_broker_hello(G.broker, &G.channel, err, sizeof err))
        die("no memory channel for this process", err);
    int rc = dh_broker_open(&G.channel, &link);
    if (rc)
        die("cannot open the memory channel", dh_strerror(rc));
    return link;
}

static void on_fork_prepare(void);
static void on_fork_parent(void);
static void on_fork_child(void);
static void report(void);

static void start(void)
{
    G.broker = getenv("DH_BROKER");
    if (!G.broker || !*G.broker) {
        atomic_store(&G.state, OFF);
        return;
    }
    in_self = 1;
    dh_link *link = connect_channel();
    uint64_t cap = env_u64("DH_CACHE_BYTES", 16 << 20);
    uint32_t ways = cap / DH_PAGE < 64 ? (uint32_t)(cap / DH_PAGE) : 64;
    if (!ways)
        die("DH_CACHE_BYTES", "the cache must hold at least one 4 KiB page");
    cap -= cap % ((uint64_t)ways * DH_PAGE);
    int rc = dh_excache_create(link, cap, ways, policy_from_env(), DH_FAULT_THREAD,
                               (int)env_u64("DH_TIMEOUT_MS", 5000), &G.cache);
    if (rc)
        die("cannot make the ExCache", dh_strerror(rc));
    uint64_t sets = cap / DH_PAGE / ways, pf = env_u64("DH_PREFETCH", 8);
    pf = pf < 1 ? 1 : pf > DH_PREFETCH_MAX ? DH_PREFETCH_MAX : pf;
    dh_excache_set_prefetch(G.cache, (uint32_t)(pf < sets ? pf : sets));
    dh_excache_set_predict_writes(G.cache, 1);
    dh_excache_set_label(G.cache, G.channel.label);
    G.size = env_u64("DH_ARENA_BYTES", (uint64_t)32 << 30) & ~(uint64_t)(DH_PAGE - 1);
    void *base;
    if ((rc = dh_excache_alloc(G.cache, G.size, &base, &G.region)))
        die("cannot reserve the remote arena", dh_strerror(rc));
    G.base = base;
    if (dh_arena_init(G.base, G.size))
        die("cannot track the arena", "out of memory");
    pthread_atfork(on_fork_prepare, on_fork_parent, on_fork_child);
    atexit(report);
    in_self = 0;
    atomic_store(&G.state, ACTIVE);
}

/* 1 when this call should be served from the arena. The first interposed
 * call (often mimalloc's first mmap, before any constructor) starts it. */
static int active(void)
{
    if (in_self)
        return 0;
    int s = atomic_load(&G.state);
    if (s == UNINIT && atomic_compare_exchange_strong(&G.state, &s, STARTING)) {
        start();
        s = atomic_load(&G.state);
    }
    while (s == STARTING) {
        sched_yield();
        s = atomic_load(&G.state);
    }
    return s == ACTIVE;
}

__attribute__((constructor)) static void init(void) { active(); }

static int arena_candidate(int flags, int fd)
{
    return (flags & MAP_ANONYMOUS) && (flags & MAP_TYPE) == MAP_PRIVATE && fd == -1 &&
           !(flags & (MAP_HUGETLB | MAP_GROWSDOWN | MAP_32BIT));
}

/* Memory handed back: its contents are gone (the next touch is zero), its
 * addresses free for the next mapping, its access restored. */
static void release(void *addr, size_t len)
{
    dh_excache_discard(G.cache, addr, len, 1);
    dh_sys_mprotect(addr, len, RW);
    dh_arena_claim(addr, len); /* munmap may name pages that are already free */
    dh_arena_give(addr, len);
}

EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    if (!active())
        return dh_sys_mmap(addr, len, prot, flags, fd, off);
    if (flags & (MAP_FIXED | MAP_FIXED_NOREPLACE)) {
        if (!dh_arena_has(addr, len))
            return dh_sys_mmap(addr, len, prot, flags, fd, off);
        if ((flags & MAP_FIXED_NOREPLACE) && !dh_arena_free(addr, len)) {
            errno = EEXIST; /* arena pages in use are a mapping that exists */
            return MAP_FAILED;
        }
        flags = (flags & ~MAP_FIXED_NOREPLACE) | MAP_FIXED;
        if (!arena_candidate(flags, fd)) {
            /* A file or shared mapping over arena pages: they leave the
             * arena for good (the cache forgets them; the kernel replaces
             * the mapping). */
            dh_excache_discard(G.cache, addr, len, 0);
            dh_arena_claim(addr, len);
            return dh_sys_mmap(addr, len, prot, flags, fd, off);
        }
        /* Fresh anonymous pages in place (mimalloc decommits this way). */
        dh_excache_discard(G.cache, addr, len, 1);
        dh_arena_claim(addr, len);
        dh_sys_mprotect(addr, len, prot);
        return addr;
    }
    if (!arena_candidate(flags, fd) || !len)
        return dh_sys_mmap(addr, len, prot, flags, fd, off);
    /* Large mappings aligned as their size suggests: allocators ask for
     * aligned segments and otherwise map twice the size to trim it. */
    uint64_t align = len >= (4u << 20) ? (4u << 20) : DH_PAGE;
    void *p = dh_arena_take(len, align);
    if (!p) {
        if (!atomic_fetch_add(&G.local_bytes, len))
            dh_say("the remote arena is full (DH_ARENA_BYTES)", "; ",
                   "further anonymous memory of this process stays local");
        return dh_sys_mmap(addr, len, prot, flags, fd, off);
    }
    if (prot != RW)
        dh_sys_mprotect(p, len, prot);
    return p;
}

EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
    __attribute__((alias("mmap")));

EXPORT int munmap(void *addr, size_t len)
{
    if (!active() || !dh_arena_has(addr, len))
        return dh_sys_munmap(addr, len);
    if ((uintptr_t)addr % DH_PAGE) {
        errno = EINVAL;
        return -1;
    }
    release(addr, len);
    return 0;
}

EXPORT int madvise(void *addr, size_t len, int advice)
{
    if (!active() || !dh_arena_has(addr, len))
        return dh_sys_madvise(addr, len, advice);
    switch (advice) {
    case MADV_DONTNEED:
    case MADV_FREE:
    case MADV_REMOVE:
        return dh_excache_discard(G.cache, addr, len, 1) ? (errno = EINVAL, -1) : 0;
    case MADV_HUGEPAGE: /* the cache installs 4 KiB pages; a split mapping buys nothing */
    case MADV_NOHUGEPAGE:
    case MADV_DONTFORK: /* a forked child gets its own copy of the arena */
    case MADV_DOFORK:
    case MADV_WIPEONFORK:
    case MADV_KEEPONFORK:
        return 0;
    default:
        return dh_sys_madvise(addr, len, advice);
    }
}

EXPORT int mprotect(void *addr, size_t len, int prot)
{
    if (active() && dh_arena_has(addr, len) && prot != RW &&
        dh_excache_evict_range(G.cache, addr, len)) {
        /* Pages it cannot read any more must not be in the cache, whose
         * eviction copies them: they wait on the memory node. */
        errno = ENOMEM;
        return -1;
    }
    return dh_sys_mprotect(addr, len, prot);
}

EXPORT void *mremap(void *old, size_t old_len, size_t new_len, int flags, ...)
{
    void *fixed = NULL;
    if (flags & MREMAP_FIXED) {
        va_list ap;
        va_start(ap, flags);
        fixed = va_arg(ap, void *);
        va_end(ap);
    }
    if (!active() || !dh_arena_has(old, old_len))
        return (void *)syscall(SYS_mremap, old, old_len, new_len, flags, fixed);
    if (new_len <= old_len) { /* shrinking never moves */
        size_t keep = (new_len + DH_PAGE - 1) & ~(size_t)(DH_PAGE - 1);
        if (keep < old_len)
            release((uint8_t *)old + keep, old_len - keep);
        return old;
    }
    if (!(flags & MREMAP_MAYMOVE) || (flags & MREMAP_FIXED)) {
        errno = ENOMEM; /* growing in place is allowed to fail */
        return MAP_FAILED;
    }
    void *p = mmap(NULL, new_len, RW, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return p;
    memcpy(p, old, old_len);
    munmap(old, old_len);
    return p;
}

/* ---- thread stacks ------------------------------------------------------ */

/* What glibc writes in a child before the child's cache is ready (it
 * resets every FILE's lock, and reads the other threads' descriptors at
 * the top of their stacks) must be resident when the parent forks, or the
 * child would see zero pages there: bring it in. */
#define MAX_STACKS 4096
static struct { uint8_t *top; } stacks[MAX_STACKS];
static atomic_uint nstacks;


struct thread_start {
    void *(*fn)(void *);
    void *arg;
};

static void *run_thread(void *p)
{
    struct thread_start t = *(struct thread_start *)p;
    dh_raw_free(p);
    return t.fn(t.arg);
}

typedef int (*create_fn)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);

/* A copy of attr (or the defaults) with a stack from the arena. */
static int arena_attr(const pthread_attr_t *attr, pthread_attr_t *out, void **stack,
                      size_t *total)
{
    pthread_attr_t def;
    if (!attr) {
        if (pthread_getattr_default_np(&def))
            return -1;
        attr = &def;
    }
    size_t size = 0, guard = 0;
    int detach = 0, inherit = 0, policy = 0, scope = 0;
    struct sched_param sp;
    pthread_attr_getstacksize(attr, &size);
    pthread_attr_getguardsize(attr, &guard);
    pthread_attr_getdetachstate(attr, &detach);
    pthread_attr_getinheritsched(attr, &inherit);
    pthread_attr_getschedpolicy(attr, &policy);
    pthread_attr_getschedparam(attr, &sp);
    pthread_attr_getscope(attr, &scope);
    if (attr == &def)
        pthread_attr_destroy(&def);
    guard = (guard + DH_PAGE - 1) & ~(size_t)(DH_PAGE - 1);
    size = (size + DH_PAGE - 1) & ~(size_t)(DH_PAGE - 1);
    *total = size + guard;
    if (!(*stack = mmap(NULL, *total, RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0)) ||
        *stack == MAP_FAILED)
        return -1;
    if (guard)
        mprotect(*stack, guard, PROT_NONE);
    pthread_attr_init(out);
    pthread_attr_setstack(out, (uint8_t *)*stack + guard, size);
    pthread_attr_setdetachstate(out, detach);
    pthread_attr_setinheritsched(out, inherit);
    pthread_attr_setschedpolicy(out, policy);
    pthread_attr_setschedparam(out, &sp);
    pthread_attr_setscope(out, scope);
    return 0;
}

EXPORT int pthread_create(pthread_t *th, const pthread_attr_t *attr, void *(*fn)(void *),
                          void *arg)
{
    static create_fn real;
    if (!real)
        real = (create_fn)dlsym(RTLD_NEXT, "pthread_create");
    /* A stack of the caller's own: glibc reports none as -size (its stack
     * address is the top, minus the size), so only a nonzero top is one. */
    void *given = NULL;
    size_t given_size = 0;
    if (attr)
        pthread_attr_getstack(attr, &given, &given_size);
    pthread_attr_t a;
    void *stack;
    size_t total;
    struct thread_start *t;
    if (!active() || (uintptr_t)given + given_size != 0 || arena_attr(attr, &a, &stack, &total) ||
        !(t = dh_raw_malloc(sizeof *t)))
        return real(th, attr, fn, arg);
    /* glibc neither frees nor reuses a stack it was given: the stack stays
     * in the arena after the thread ends (a remote-memory leak of one
     * stack per thread, never wrong data). */
    *t = (struct thread_start){fn, arg};
    int rc = real(th, &a, run_thread, t);
    pthread_attr_destroy(&a);
    if (rc) {
        dh_raw_free(t);
        munmap(stack, total);
    } else {
        atomic_fetch_add(&G.stacks, 1);
        unsigned i = atomic_fetch_add(&nstacks, 1);
        if (i < MAX_STACKS)
            stacks[i].top = (uint8_t *)stack + total;
    }
    return rc;
}

/* ---- fork ------------------------------------------------------------------ */

static int forking; /* the prepare handler ran (not for a fork before start) */

static void touch(const volatile void *p)
{
    if (p && dh_arena_has((const void *)p, 1))
        (void)*(const volatile uint8_t *)p;
}

static void bring_in_fork_state(void)
{
    FILE **list = dlsym(RTLD_DEFAULT, "_IO_list_all");
    for (FILE *f = list ? *list : NULL; f; f = f->_chain) {
        touch(f);
        touch(f->_lock);
    }
    unsigned n = atomic_load(&nstacks);
    for (unsigned i = 0; i < n && i < MAX_STACKS; i++)
        for (int k = 1; k <= 3; k++) /* glibc's descriptor and TLS: the top pages */
            touch(stacks[i].top - (size_t)k * DH_PAGE);
}

static void on_fork_prepare(void)
{
    if (atomic_load(&G.state) != ACTIVE || in_self)
        return;
    bring_in_fork_state();
    int rc = dh_excache_fork_prepare(G.cache);
    if (rc)
        die("fork: cannot copy this process's memory for the child", dh_strerror(rc));
    forking = 1;
}

static void on_fork_parent(void)
{
    if (forking) {
        forking = 0;
        atomic_fetch_add(&G.forks, 1);
        dh_excache_fork_parent(G.cache);
    }
}

static void on_fork_child(void)
{
    if (!forking)
        return;
    forking = 0;
    atomic_store(&G.forks, 0);
    atomic_store(&G.stacks, 0);
    in_self = 1;
    /* The child's own channel; the parent's link stays mapped, unused
     * (closing it would close the parent's side). */
    int rc = dh_excache_fork_child(G.cache, connect_channel());
    if (rc)
        die("fork: the child cannot serve its own memory", dh_strerror(rc));
    if (dh_excache_untracked(G.cache, G.base, G.size))
        die("fork: the child touched remote pages before its cache was ready",
            "they would read as zero, not as the parent's; stopping it");
    dh_excache_reset_stats(G.cache);
    G.region = dh_excache_region_id(G.cache, G.base);
    in_self = 0;
}

/* ---- the report at exit -------------------------------------------------------- */

static void report(void)
{
    if (atomic_load(&G.state) != ACTIVE)
        return;
    in_self = 1;
    dh_excache_stats s;
    dh_excache_get_stats(G.cache, &s);
    uint64_t resident = 0, dirty = 0;
    dh_excache_region_stats(G.cache, G.base, &resident, &dirty);
    char buf[2048], *p = buf, *end = buf + sizeof buf;
    p += snprintf(p, (size_t)(end - p),
                  "{\"pid\": %d, \"region\": %u, \"resident_pages\": %lu, \"dirty_pages\": %lu, "
                  "\"peak_remote_bytes\": %lu, \"remote_bytes\": %lu, "
                  "\"local_fallback_bytes\": %lu, \"thread_stacks\": %lu, \"forks\": %lu, "
                  "\"excache\": {\"misses\": %lu, \"remote_fetches\": %lu, "
                  "\"zero_fills\": %lu, \"wp_faults\": %lu, \"evictions\": %lu, "
                  "\"clean_drops\": %lu, \"dirty_flushes\": %lu, \"piggybacked\": %lu, "
                  "\"prefetched\": %lu, \"failovers\": %lu, \"resident\": %lu, \"hist\": [",
                  getpid(), G.region, resident, dirty, dh_arena_peak(), dh_arena_used(), atomic_load(&G.local_bytes),
                  atomic_load(&G.stacks), atomic_load(&G.forks), s.misses, s.remote_fetches,
                  s.zero_fills, s.wp_faults, s.evictions, s.clean_drops, s.dirty_flushes,
                  s.piggybacked, s.prefetched, s.failovers, s.resident);
    for (int i = 0; i < DH_HIST_BUCKETS && p < end; i++)
        p += snprintf(p, (size_t)(end - p), "%s%lu", i ? ", " : "", s.hist[i]);
    if (p < end)
        snprintf(p, (size_t)(end - p), "]}}");
    dh_broker_report(buf);
}
