/* System calls and the interposer's own allocator, past every interposed
 * symbol: each allocation is a private mapping of its own (the C core makes
 * a handful, once), with its size in the page before it. */
#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "interpose.h"

void *dh_sys_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    long r = syscall(SYS_mmap, addr, len, prot, flags, fd, off);
    return r < 0 && r > -4096 ? MAP_FAILED : (void *)r;
}

int dh_sys_munmap(void *addr, size_t len) { return (int)syscall(SYS_munmap, addr, len); }
int dh_sys_madvise(void *addr, size_t len, int advice)
{
    return (int)syscall(SYS_madvise, addr, len, advice);
}
int dh_sys_mprotect(void *addr, size_t len, int prot)
{
    return (int)syscall(SYS_mprotect, addr, len, prot);
}

void *dh_raw_aligned_alloc(size_t align, size_t n)
{
    if (align > DH_PAGE || n > ((size_t)1 << 40)) {
        errno = EINVAL;
        return NULL;
    }
    size_t total = DH_PAGE + ((n + DH_PAGE - 1) & ~(size_t)(DH_PAGE - 1));
    uint8_t *m = dh_sys_mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                             -1, 0);
    if (m == MAP_FAILED)
        return NULL;
    memcpy(m, &total, sizeof total);
    return m + DH_PAGE;
}

void *dh_raw_malloc(size_t n) { return dh_raw_aligned_alloc(16, n); }

void *dh_raw_calloc(size_t n, size_t size)
{
    if (size && n > ((size_t)1 << 40) / size) {
        errno = ENOMEM;
        return NULL;
    }
    return dh_raw_malloc(n * size); /* fresh mappings are zero */
}

void dh_raw_free(void *p)
{
    if (!p)
        return;
    uint8_t *m = (uint8_t *)p - DH_PAGE;
    size_t total;
    memcpy(&total, m, sizeof total);
    dh_sys_munmap(m, total);
}

void dh_say(const char *a, const char *b, const char *c)
{
    const char *parts[] = {"disagg-harness: ", a, b, c, "\n"};
    for (int i = 0; i < 5; i++) {
        ssize_t rc = write(2, parts[i], strlen(parts[i]));
        (void)rc;
    }
}
