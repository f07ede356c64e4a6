/* Error codes shared by every C module. Fallible functions return 0 (or a
 * non-negative count) on success and one of these negative codes on failure;
 * harness/_native/errors.pyx maps them to Python exceptions. */
#ifndef DH_ERROR_H
#define DH_ERROR_H

enum dh_err {
    DH_OK = 0,
    DH_EINVAL = -1,    /* bad argument from the caller */
    DH_ENOMEM = -2,
    DH_EIO = -3,       /* a system call failed; errno says which */
    DH_ETIMEDOUT = -4, /* a wait ran out of time */
    DH_ECLOSED = -5,   /* the peer closed the link or died */
    DH_EPROTO = -6,    /* a malformed frame: the link is closed */
    DH_EAGAIN = -7,    /* nothing to do without waiting (non-blocking use) */
    DH_ETOOBIG = -8,   /* payload larger than the frame limit or the buffer */
    DH_ENOSYS = -9,    /* not available on this host */
    DH_EACCES = -10,   /* a protection fault: memory of another compartment */
    DH_ESTALE = -11,   /* the backup memory node missed acknowledged writes */
    DH_EFENCED = -12,  /* a memory node whose replica took over refuses requests */
};

const char *dh_strerror(int code);

#endif
