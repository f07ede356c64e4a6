/* The interposer's internals: a shared library loaded with LD_PRELOAD that
 * puts a program's anonymous private memory in one ExCache region (the
 * arena) whose pages live on a memory node. See interpose.c. */
#ifndef DH_INTERPOSE_H
#define DH_INTERPOSE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "dh_excache.h"

/* System calls without the interposed symbols (raw.c). The C core is built
 * into this library with its mmap, malloc, ... renamed to these (setup.py),
 * so nothing the interposer needs for itself comes from the arena. */
void *dh_sys_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off);
int dh_sys_munmap(void *addr, size_t len);
int dh_sys_madvise(void *addr, size_t len, int advice);
int dh_sys_mprotect(void *addr, size_t len, int prot);
void *dh_raw_malloc(size_t n);
void *dh_raw_calloc(size_t n, size_t size);
void *dh_raw_aligned_alloc(size_t align, size_t n);
void dh_raw_free(void *p);
void dh_say(const char *a, const char *b, const char *c);

/* The arena's address ranges (arena.c): page-granular first fit. */
int dh_arena_init(uint8_t *base, uint64_t size);
void *dh_arena_take(uint64_t len, uint64_t align);
void dh_arena_give(void *addr, uint64_t len);
void dh_arena_claim(void *addr, uint64_t len); /* a MAP_FIXED over free pages */
int dh_arena_has(const void *addr, uint64_t len);
/* 1 when all of [addr, addr+len) is free (no mapping of the program's). */
int dh_arena_free(const void *addr, uint64_t len);
uint64_t dh_arena_used(void);
uint64_t dh_arena_peak(void);

/* The broker (broker.c): the harness process that hands this process a
 * channel to the memory node and takes its counters at exit. */
struct dh_channel {
    char kind[16]; /* "shm" (a file) or "ivshmem" (a guest's PCI device) */
    char path[256];
    int side;
    uint64_t latency_ns, bytes_per_sec;
    char label[48]; /* the memory node's name */
};
int dh_broker_hello(const char *socket_path, struct dh_channel *ch, char *err, size_t cap);
int dh_broker_open(const struct dh_channel *ch, dh_link **out);
void dh_broker_report(const char *json);

#endif
