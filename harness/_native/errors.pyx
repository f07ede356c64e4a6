# cython: language_level=3
"""The one place C error codes become Python exceptions."""

from libc.errno cimport errno
import os

from harness.errors import (
    BackupBehind, LinkClosed, NotSupported, ProtocolError, TransportError, TransportTimeout,
)


cdef int check(int rc, str what) except -1:
    """Raises the exception for a negative dh_ error code; returns rc otherwise."""
    if rc >= 0:
        return rc
    cdef int err = errno
    msg = f"{what}: {dh_strerror(rc).decode()}"
    if rc == DH_EINVAL:
        raise ValueError(msg)
    if rc == DH_ENOMEM:
        raise MemoryError(msg)
    if rc == DH_EIO:
        raise TransportError(f"{msg} ({os.strerror(err)})", errno=err)
    if rc == DH_ETIMEDOUT:
        raise TransportTimeout(msg)
    if rc == DH_ECLOSED:
        raise LinkClosed(msg)
    if rc == DH_EPROTO:
        raise ProtocolError(msg + "; the link was closed")
    if rc == DH_ENOSYS:
        raise NotSupported(msg)
    if rc == DH_ESTALE:
        raise BackupBehind(msg)
    raise TransportError(msg)


def strerror(int code) -> str:
    return dh_strerror(code).decode()
