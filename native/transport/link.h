/* Internal: what every kind of link shares. Not a public header. */
#ifndef DH_LINK_INTERNAL_H
#define DH_LINK_INTERNAL_H

#include <stdatomic.h>

#include "dh_transport.h"

#define DH_NO_DEADLINE UINT64_MAX

/* A timeout whose clock starts at the first real wait: reading the clock
 * costs ~23 ns here, several times a small round trip's budget. */
typedef struct dh_timeout {
    int ms;      /* < 0: no limit */
    uint64_t at; /* absolute deadline once started, else 0 */
} dh_timeout;

static inline dh_timeout dh_timeout_ms(int ms) { return (dh_timeout){ms, 0}; }
uint64_t dh_timeout_at(dh_timeout *t);
/* Milliseconds left, for poll(); -1 when unlimited. */
int dh_timeout_left_ms(dh_timeout *t);

struct dh_link_ops {
    /* h is complete (length filled in; the CRC too unless crc_on_copy). */
    int (*send)(dh_link *l, const dh_frame_hdr *h, const void *payload,
                dh_timeout *t);
    int (*send_raw)(dh_link *l, const void *bytes, uint32_t n,
                    dh_timeout *t);
    int (*recv)(dh_link *l, dh_frame_hdr *h, void *buf, uint32_t cap,
                dh_timeout *t);
    void (*close)(dh_link *l);
    void (*destroy)(dh_link *l);
    /* send computes the CRC as it copies the payload: a frame's bytes are
     * then read once on the way out. */
    int crc_on_copy;
};

struct dh_link {
    const struct dh_link_ops *ops;
    uint32_t src;
    uint32_t max_payload;
    uint64_t next_req;
    dh_link_model model;
    uint64_t wire_free_ns;
    uint64_t spin_ns;
    atomic_int closed;
    /* Written by the one thread that sends or receives on each side. */
    dh_link_stats st;
};

void dh_link_base_init(dh_link *l, const struct dh_link_ops *ops);
/* Checks the CRC of a frame whose header and payload are held apart. */
int dh_frame_verify_split(const dh_frame_hdr *h, const void *payload);
/* The CRC a header needs for this payload. */
uint32_t dh_frame_crc(const dh_frame_hdr *h, const void *payload);
/* The same, copying the payload to dst in the same pass. */
uint32_t dh_frame_copy_crc(const dh_frame_hdr *h, void *dst, const void *payload);

static inline void dh_cpu_relax(void) { __builtin_ia32_pause(); }

#endif
