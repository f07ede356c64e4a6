/* The arena's free address ranges: a sorted array of extents, first fit,
 * coalesced on return. The program's mmap calls are few and large next to
 * its page faults (mimalloc maps segments, CPython 1 MiB arenas), so a
 * linear scan is cheap. */
#include <sched.h>
#include <stdatomic.h>
#include <string.h>

#include "interpose.h"

#define MAX_EXTENTS 65536

struct extent {
    uint64_t start, len; /* pages from the arena's base */
};

static struct {
    uint8_t *base;
    uint64_t pages;
    struct extent *free; /* sorted by start, never adjacent */
    uint32_t n;
    uint64_t used, peak; /* pages handed out */
    atomic_flag lock;
} A = {.lock = ATOMIC_FLAG_INIT};

static void lock(void)
{
    while (atomic_flag_test_and_set_explicit(&A.lock, memory_order_acquire))
        sched_yield();
}

static void unlock(void) { atomic_flag_clear_explicit(&A.lock, memory_order_release); }

int dh_arena_init(uint8_t *base, uint64_t size)
{
    if (!A.free && !(A.free = dh_raw_calloc(MAX_EXTENTS, sizeof *A.free)))
        return -1;
    A.used = A.peak = 0;
    A.base = base;
    A.pages = size / DH_PAGE;
    A.free[0] = (struct extent){0, A.pages};
    A.n = 1;
    return 0;
}

int dh_arena_has(const void *addr, uint64_t len)
{
    const uint8_t *p = addr;
    return A.base && p >= A.base && p < A.base + A.pages * DH_PAGE && len &&
           len <= (uint64_t)(A.base + A.pages * DH_PAGE - p);
}

static void remove_at(uint32_t i)
{
    memmove(&A.free[i], &A.free[i + 1], (A.n - i - 1) * sizeof *A.free);
    A.n--;
}

static int insert_at(uint32_t i, struct extent e)
{
    if (A.n == MAX_EXTENTS)
        return -1;
    memmove(&A.free[i + 1], &A.free[i], (A.n - i) * sizeof *A.free);
    A.free[i] = e;
    A.n++;
    return 0;
}

/* Takes [s, s+n) out of free extent i (it lies inside it). */
static int carve(uint32_t i, uint64_t s, uint64_t n)
{
    struct extent e = A.free[i];
    uint64_t tail = e.start + e.len - (s + n);
    if (s == e.start && !tail) {
        remove_at(i);
    } else if (s == e.start) {
        A.free[i] = (struct extent){s + n, tail};
    } else {
        A.free[i].len = s - e.start;
        if (tail && insert_at(i + 1, (struct extent){s + n, tail}))
            return -1;
    }
    A.used += n;
    if (A.used > A.peak)
        A.peak = A.used;
    return 0;
}

void *dh_arena_take(uint64_t len, uint64_t align)
{
    uint64_t n = (len + DH_PAGE - 1) / DH_PAGE, a = align > DH_PAGE ? align / DH_PAGE : 1;
    void *out = NULL;
    lock();
    for (uint32_t i = 0; i < A.n && !out; i++) {
        uint64_t base = (uint64_t)(uintptr_t)A.base / DH_PAGE;
        uint64_t s = A.free[i].start, mis = (base + s) % a;
        if (mis)
            s += a - mis;
        if (s + n <= A.free[i].start + A.free[i].len && !carve(i, s, n))
            out = A.base + s * DH_PAGE;
    }
    unlock();
    return out;
}

void dh_arena_claim(void *addr, uint64_t len)
{
    uint64_t lo = (uint64_t)((uint8_t *)addr - A.base) / DH_PAGE;
    uint64_t hi = lo + (len + DH_PAGE - 1) / DH_PAGE;
    lock();
    for (uint32_t i = 0; i < A.n;) {
        struct extent e = A.free[i];
        uint64_t s = e.start > lo ? e.start : lo, t = e.start + e.len < hi ? e.start + e.len : hi;
        if (s < t && !carve(i, s, t - s))
            continue; /* extent i changed: look at it again */
        i++;
    }
    unlock();
}

void dh_arena_give(void *addr, uint64_t len)
{
    uint64_t s = (uint64_t)((uint8_t *)addr - A.base) / DH_PAGE, n = (len + DH_PAGE - 1) / DH_PAGE;
    lock();
    uint32_t i = 0;
    while (i < A.n && A.free[i].start < s)
        i++;
    int before = i > 0 && A.free[i - 1].start + A.free[i - 1].len == s;
    int after = i < A.n && s + n == A.free[i].start;
    if (before && after) {
        A.free[i - 1].len += n + A.free[i].len;
        remove_at(i);
    } else if (before) {
        A.free[i - 1].len += n;
    } else if (after) {
        A.free[i].start = s;
        A.free[i].len += n;
    } else if (insert_at(i, (struct extent){s, n})) {
        n = 0; /* no room to record it: those pages stay out of use */
    }
    A.used -= n;
    unlock();
}

uint64_t dh_arena_used(void) { return A.used * DH_PAGE; }
uint64_t dh_arena_peak(void) { return A.peak * DH_PAGE; }

int dh_arena_free(const void *addr, uint64_t len)
{
    uint64_t s = (uint64_t)((const uint8_t *)addr - A.base) / DH_PAGE;
    uint64_t n = (len + DH_PAGE - 1) / DH_PAGE;
    int inside = 0;
    lock();
    for (uint32_t i = 0; i < A.n && !inside; i++)
        inside = A.free[i].start <= s && s + n <= A.free[i].start + A.free[i].len;
    unlock();
    return inside;
}
