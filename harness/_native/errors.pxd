cdef extern from "dh_error.h":
    enum:
        DH_OK
        DH_EINVAL
        DH_ENOMEM
        DH_EIO
        DH_ETIMEDOUT
        DH_ECLOSED
        DH_EPROTO
        DH_EAGAIN
        DH_ETOOBIG
        DH_ENOSYS
        DH_EACCES
        DH_ESTALE
    const char *dh_strerror(int code)

cdef int check(int rc, str what) except -1
