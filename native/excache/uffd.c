/* The cache's userfaultfd calls, one helper per ioctl (after the kernel's
 * tools/testing/selftests/mm/uffd-common.c). Each failure names its call in
 * c->why, with the errno: the fatal message then says a local call failed,
 * not the memory node. Async-signal-safe: the fault path calls them. */
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "excache_int.h"

/* Records the local call that failed and returns rc. */
static int failed(dh_excache *c, const char *why, int e, int rc)
{
    c->why = why;
    c->why_errno = e;
    return rc;
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
        return failed(c, "userfaultfd() failed", errno, errno == ENOSYS ? DH_ENOSYS : DH_EIO);
    struct uffdio_api api = {
        .api = UFFD_API,
        .features = UFFD_FEATURE_PAGEFAULT_FLAG_WP |
                    (c->mode == DH_FAULT_SIGBUS ? UFFD_FEATURE_SIGBUS : 0),
    };
    if (ioctl(c->uffd, UFFDIO_API, &api))
        return failed(c, "UFFDIO_API (write-protect faults, SIGBUS for that mode) failed", errno,
                      errno == EINVAL ? DH_ENOSYS : DH_EIO);
    return 0;
}

int ex_register(dh_excache *c, void *base, uint64_t size)
{
    struct uffdio_register reg = {
        .range = {.start = (uintptr_t)base, .len = size},
        .mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP,
    };
    if (ioctl(c->uffd, UFFDIO_REGISTER, &reg))
        return failed(c, "UFFDIO_REGISTER (a region, missing and write-protect) failed", errno,
                      errno == EINVAL ? DH_ENOSYS : DH_EIO);
    return 0;
}

int ex_unregister(dh_excache *c, void *base, uint64_t size)
{
    struct uffdio_range rg = {.start = (uintptr_t)base, .len = size};
    if (ioctl(c->uffd, UFFDIO_UNREGISTER, &rg))
        return failed(c, "UFFDIO_UNREGISTER (a freed region) failed", errno, DH_EIO);
    return 0;
}

int ex_protect(dh_excache *c, uintptr_t page, int on)
{
    struct uffdio_writeprotect wp = {
        .range = {.start = page, .len = DH_PAGE},
        .mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    if (ioctl(c->uffd, UFFDIO_WRITEPROTECT, &wp))
        return failed(c, on ? "UFFDIO_WRITEPROTECT (protecting a line) failed"
                            : "UFFDIO_WRITEPROTECT (unprotecting a line) failed",
                      errno, DH_EIO);
    return 0;
}

int ex_wake(dh_excache *c, uintptr_t page)
{
    struct uffdio_range rg = {.start = page, .len = DH_PAGE};
    if (ioctl(c->uffd, UFFDIO_WAKE, &rg))
        return failed(c, "UFFDIO_WAKE (a thread whose page is in) failed", errno, DH_EIO);
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

int ex_install(dh_excache *c, uintptr_t page, uint32_t n, int writable)
{
    int e = copy_in(c, page, c->page, (uint64_t)n * DH_PAGE, writable);
    if (e && n > 1) {
        e = 0;
        for (uint32_t i = 0; i < n && !e; i++)
            e = copy_in(c, page + (uintptr_t)i * DH_PAGE, c->page + (size_t)i * DH_PAGE,
                        DH_PAGE, writable);
    }
    return e ? failed(c, "UFFDIO_COPY (installing a page) failed", e, DH_EIO) : 0;
}
