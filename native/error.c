#include "dh_error.h"

const char *dh_strerror(int code)
{
    switch (code) {
    case DH_OK: return "ok";
    case DH_EINVAL: return "invalid argument";
    case DH_ENOMEM: return "out of memory";
    case DH_EIO: return "system call failed";
    case DH_ETIMEDOUT: return "timed out";
    case DH_ECLOSED: return "link closed by peer";
    case DH_EPROTO: return "malformed frame";
    case DH_EAGAIN: return "would block";
    case DH_ETOOBIG: return "message too big";
    case DH_ENOSYS: return "not available on this host";
    case DH_EACCES: return "protection fault";
    case DH_ESTALE:
        return "the memory node failed and its backup missed acknowledged writes (replication "
               "to it had failed), so failing over would return old pages";
    case DH_EFENCED: return "refused: this memory node was replaced by its replica";
    default: return "unknown error";
    }
}
