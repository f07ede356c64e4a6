/* Native tests of the interposer's arena and raw allocator, built with
 * AddressSanitizer and UBSan by tests/native/test_native.py: a random
 * sequence of takes and gives against a page map of what should be in use.
 * Prints "N passed, N failed". */
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include "interpose.h"

#include "check.h"

#define PAGES 4096
static uint8_t *base;
static uint8_t used[PAGES];

static uint32_t rng = 99;
static uint32_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 17;
    rng ^= rng << 5;
    return rng;
}

static void test_raw_alloc(void)
{
    uint8_t *p = dh_raw_calloc(1000, 8);
    CHECK(p && (uintptr_t)p % DH_PAGE == 0);
    for (int i = 0; i < 8000; i++)
        CHECK(p[i] == 0);
    memset(p, 1, 8000);
    dh_raw_free(p);
    CHECK(dh_raw_calloc((size_t)1 << 40, 1 << 20) == NULL); /* overflow refused */
    CHECK(dh_raw_aligned_alloc(1 << 20, 10) == NULL);       /* beyond a page */
    passed++;
}

static void test_arena_random(void)
{
    CHECK(dh_arena_init(base, (uint64_t)PAGES * DH_PAGE) == 0);
    struct { uint8_t *p; uint64_t n; } live[256];
    int nlive = 0;
    for (int step = 0; step < 20000; step++) {
        if (nlive < 256 && (rnd() % 2 || !nlive)) {
            uint64_t n = 1 + rnd() % 64, align = rnd() % 4 ? DH_PAGE : 16 * DH_PAGE;
            uint8_t *p = dh_arena_take(n * DH_PAGE, align);
            if (!p)
                continue;
            uint64_t first = (uint64_t)(p - base) / DH_PAGE;
            CHECK((uintptr_t)p % align == 0 && first + n <= PAGES);
            for (uint64_t i = 0; i < n; i++) {
                CHECK(!used[first + i]); /* never handed out twice */
                used[first + i] = 1;
            }
            live[nlive].p = p;
            live[nlive++].n = n;
        } else {
            int k = (int)(rnd() % (uint32_t)nlive);
            /* Give back a part (the head, the tail, or all), as munmap may. */
            uint64_t n = live[k].n, cut = n > 1 ? rnd() % n : 0;
            uint8_t *p = live[k].p;
            uint64_t first = (uint64_t)(p - base) / DH_PAGE;
            dh_arena_give(p, (n - cut) * DH_PAGE);
            for (uint64_t i = 0; i < n - cut; i++)
                used[first + i] = 0;
            if (cut) {
                live[k].p = p + (n - cut) * DH_PAGE;
                live[k].n = cut;
            } else {
                live[k] = live[--nlive];
            }
        }
        uint64_t count = 0;
        for (int i = 0; i < PAGES; i++)
            count += used[i];
        CHECK(dh_arena_used() == count * DH_PAGE);
    }
    while (nlive) {
        nlive--;
        dh_arena_give(live[nlive].p, live[nlive].n * DH_PAGE);
    }
    CHECK(dh_arena_used() == 0);
    /* Everything coalesced again: one take of the whole arena succeeds. */
    CHECK(dh_arena_take((uint64_t)PAGES * DH_PAGE, DH_PAGE) == base);
    passed++;
}

static void test_arena_claim(void)
{
    CHECK(dh_arena_init(base, (uint64_t)PAGES * DH_PAGE) == 0);
    uint8_t *a = dh_arena_take(8 * DH_PAGE, DH_PAGE);
    CHECK(a == base);
    /* A MAP_FIXED over pages 4..11: 8..11 were free and are taken out. */
    dh_arena_claim(base + 4 * DH_PAGE, 8 * DH_PAGE);
    CHECK(dh_arena_used() == 12 * DH_PAGE);
    CHECK(dh_arena_take(DH_PAGE, DH_PAGE) == base + 12 * DH_PAGE);
    CHECK(dh_arena_has(base, DH_PAGE) && !dh_arena_has(base - DH_PAGE, DH_PAGE));
    CHECK(!dh_arena_has(base + (PAGES - 1) * DH_PAGE, 2 * DH_PAGE)); /* runs past the end */
    passed++;
}

int main(void)
{
    base = mmap(NULL, (size_t)(PAGES + 16) * DH_PAGE, PROT_NONE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    base = (uint8_t *)(((uintptr_t)base + 16 * DH_PAGE - 1) & ~(uintptr_t)(16 * DH_PAGE - 1));
    test_raw_alloc();
    test_arena_random();
    test_arena_claim();
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
