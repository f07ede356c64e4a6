/* The ExCache benchmark's loops and floors, in C so that Python's overhead
 * is in neither (as native/transport/floor.c for the transport). Benchmark
 * code only: the interposer leaves this file out. */
#include <string.h>

#include "excache_int.h"

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
