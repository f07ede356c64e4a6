/* Frame codec. Its CRC32C, dh_crc32c, is in crc32c.c. */
#include <string.h>

#include "link.h"

int dh_op_known(uint16_t op)
{
    switch (op) {
    case DH_OP_HELLO: case DH_OP_PING: case DH_OP_STATS: case DH_OP_SHUTDOWN:
    case DH_OP_EXEC: case DH_OP_ECHO: case DH_OP_CTL: case DH_OP_ATTACH:
    case DH_OP_P2M_PCACHE_MISS: case DH_OP_P2M_PCACHE_FLUSH:
    case DH_OP_P2M_PCACHE_MISS_FLUSH: case DH_OP_P2M_ALLOC: case DH_OP_P2M_FREE:
    case DH_OP_P2M_CLONE: case DH_OP_M2M_REPLICA: case DH_OP_SQL: case DH_OP_GATE_CALL:
        return 1;
    default:
        return 0;
    }
}

/* x86-64 is little-endian, the wire too: the header is stored as is. */
_Static_assert(sizeof(dh_frame_hdr) == DH_FRAME_HDR_SIZE, "header layout");
_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "little-endian host");

int dh_frame_encode(uint8_t *buf, size_t cap, const dh_frame_hdr *h,
                    const void *payload, uint32_t len)
{
    if (len > DH_FRAME_MAX_PAYLOAD)
        return DH_ETOOBIG;
    if (cap < DH_FRAME_HDR_SIZE + (size_t)len)
        return DH_ETOOBIG;
    if (!dh_op_known(h->opcode))
        return DH_EINVAL;
    dh_frame_hdr w = *h;
    w.magic = DH_FRAME_MAGIC;
    w.version = DH_FRAME_VERSION;
    w.length = len;
    w.checksum = dh_frame_crc(&w, payload);
    memcpy(buf, &w, sizeof w);
    if (len)
        memcpy(buf + sizeof w, payload, len);
    return (int)(DH_FRAME_HDR_SIZE + len);
}

int dh_frame_check_hdr(const uint8_t *buf, size_t n, dh_frame_hdr *out)
{
    if (n < DH_FRAME_HDR_SIZE)
        return DH_EAGAIN;
    dh_frame_hdr h;
    memcpy(&h, buf, sizeof h);
    if (h.magic != DH_FRAME_MAGIC || h.version != DH_FRAME_VERSION ||
        h.length > DH_FRAME_MAX_PAYLOAD || !dh_op_known(h.opcode))
        return DH_EPROTO;
    *out = h;
    return 0;
}

/* CRC of a header as sent: computed with its checksum field zero. */
static uint32_t hdr_crc(const dh_frame_hdr *h)
{
    dh_frame_hdr z = *h;
    z.checksum = 0;
    return dh_crc32c(0, &z, sizeof z);
}

int dh_frame_decode(const uint8_t *buf, size_t n, dh_frame_hdr *out,
                    const uint8_t **payload)
{
    dh_frame_hdr h;
    int rc = dh_frame_check_hdr(buf, n, &h);
    if (rc)
        return rc;
    if (n - DH_FRAME_HDR_SIZE < h.length)
        return DH_EAGAIN;
    if (dh_frame_verify_split(&h, buf + DH_FRAME_HDR_SIZE))
        return DH_EPROTO;
    *out = h;
    *payload = buf + DH_FRAME_HDR_SIZE;
    return (int)(DH_FRAME_HDR_SIZE + h.length);
}

int dh_frame_verify_split(const dh_frame_hdr *h, const void *payload)
{
    return dh_frame_crc(h, payload) == h->checksum ? 0 : DH_EPROTO;
}

uint32_t dh_frame_copy_crc(const dh_frame_hdr *h, void *dst, const void *payload)
{
    uint32_t crc = hdr_crc(h);
    return h->length ? dh_crc32c_copy(crc, dst, payload, h->length) : crc;
}

uint32_t dh_frame_crc(const dh_frame_hdr *h, const void *payload)
{
    uint32_t crc = hdr_crc(h);
    return h->length ? dh_crc32c(crc, payload, h->length) : crc;
}
