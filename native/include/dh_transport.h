/* The message transport between nodes: frame codec, shared-memory rings,
 * stream framing over a file descriptor, RPC and the link model.
 *
 * Wire format (little-endian), 32-byte header then the payload:
 *   u32 magic "DHF1" | u16 version | u16 opcode | u32 src node | u32 flags
 *   u64 request id   | u32 payload length       | u32 CRC32C
 * The CRC covers the header (with the CRC field zero) and the payload.
 * The decoder never trusts a length: it is checked against the frame limit
 * and against the bytes actually present before anything is read past the
 * header. */
#ifndef DH_TRANSPORT_H
#define DH_TRANSPORT_H

#include <stddef.h>
#include <stdint.h>

#include "dh_error.h"

#define DH_FRAME_MAGIC 0x31464844u /* "DHF1" */
#define DH_FRAME_VERSION 1u
#define DH_FRAME_HDR_SIZE 32u
#define DH_FRAME_MAX_PAYLOAD (1u << 20)

/* Frame flags. */
#define DH_F_REPLY 0x1u   /* a response; req_id names the request */
#define DH_F_ERROR 0x2u   /* a response whose payload is an error message */
#define DH_F_NOREPLY 0x4u /* a one-way request: the server sends nothing back */

/* Opcodes. Control, then LegoOS's pcache/memory traffic, then storage. */
enum dh_op {
    DH_OP_HELLO = 0x0001,
    DH_OP_PING = 0x0002,
    DH_OP_STATS = 0x0003,
    DH_OP_SHUTDOWN = 0x0004,
    DH_OP_EXEC = 0x0005,
    DH_OP_ECHO = 0x0006, /* benchmarks: reply with the payload */
    DH_OP_CTL = 0x0007,  /* the cluster's control socket: JSON both ways */
    DH_OP_ATTACH = 0x0008, /* open a channel (JSON: path, side, service) and serve it */
    DH_OP_P2M_PCACHE_MISS = 0x0100,
    DH_OP_P2M_PCACHE_FLUSH = 0x0101,
    DH_OP_P2M_PCACHE_MISS_FLUSH = 0x0102, /* miss with a piggybacked flush */
    DH_OP_P2M_ALLOC = 0x0104,
    DH_OP_P2M_FREE = 0x0105,
    DH_OP_P2M_CLONE = 0x0106, /* a copy of a region, for a forked child */
    DH_OP_M2M_REPLICA = 0x0110,
    DH_OP_SQL = 0x0200,
    DH_OP_GATE_CALL = 0x0300,
};

typedef struct dh_frame_hdr {
    uint32_t magic;
    uint16_t version;
    uint16_t opcode;
    uint32_t src;
    uint32_t flags;
    uint64_t req_id;
    uint32_t length;
    uint32_t checksum;
} dh_frame_hdr;

/* CRC32C (Castagnoli), incremental: pass 0 to start. 512-bit carry-less
 * folding with AVX-512 VPCLMULQDQ, three interleaved streams of the SSE4.2
 * crc32 instruction joined by PCLMULQDQ, one stream with SSE4.2 only, a
 * table otherwise; same values. */
uint32_t dh_crc32c(uint32_t crc, const void *buf, size_t n);
/* Copies n bytes from src to dst (no overlap) and returns dh_crc32c(crc)
 * of the bytes dst now holds: in one pass from DH_CRC_COPY_FUSED bytes on
 * where the CPU folds, else a copy and then a CRC pass over dst. */
#define DH_CRC_COPY_FUSED 512u
uint32_t dh_crc32c_copy(uint32_t crc, void *dst, const void *src, size_t n);

int dh_op_known(uint16_t opcode);

/* Writes header and payload into buf; fills magic, version, length and CRC.
 * Returns the frame's total size or DH_ETOOBIG / DH_EINVAL. */
int dh_frame_encode(uint8_t *buf, size_t cap, const dh_frame_hdr *h,
                    const void *payload, uint32_t len);

/* Checks a header alone (magic, version, opcode, length limit). The CRC is
 * not checked here: it needs the payload. */
int dh_frame_check_hdr(const uint8_t *buf, size_t n, dh_frame_hdr *out);

/* Decodes a whole frame held in buf[0..n). Returns the bytes it spans, or
 * DH_EAGAIN when buf holds only part of a frame, or DH_EPROTO. */
int dh_frame_decode(const uint8_t *buf, size_t n, dh_frame_hdr *out,
                    const uint8_t **payload);

/* ---- links ---------------------------------------------------------- */

typedef struct dh_link dh_link;

/* Optional injected delay: propagation latency plus serialization at a
 * bandwidth. Applied by the sender, which also gives back-pressure. */
typedef struct dh_link_model {
    uint64_t latency_ns;
    uint64_t bytes_per_sec; /* 0: unlimited */
} dh_link_model;

typedef struct dh_link_stats {
    uint64_t frames_sent;
    uint64_t frames_recv;
    uint64_t bytes_sent;
    uint64_t bytes_recv;
    uint64_t proto_errors;
    uint64_t stale_replies;
    uint64_t sleeps; /* times a waiter gave up spinning and blocked */
} dh_link_stats;

/* How a shm waiter blocks once spinning did not pay off: a futex works when
 * both ends share a kernel; polling with backoff works across VMs. */
enum dh_wait_mode { DH_WAIT_FUTEX = 0, DH_WAIT_POLL = 1 };

/* Shared-memory channel: a file holding two single-producer/single-consumer
 * rings, one each way, addressed by offsets only (the same file can back an
 * ivshmem device). file_bytes is a power of two >= 64 KiB; each ring gets a
 * quarter of it. Side 0 sends on ring 0, side 1 on ring 1. */
int dh_shm_file_create(const char *path, uint32_t file_bytes);
/* Starts a channel file afresh for a restarted node: both rings empty, and
 * every end bound before the reset sees its peer gone (DH_ECLOSED), so its
 * owner opens the file again. */
int dh_shm_file_reset(const char *path);
/* 1 when l is an shm link whose channel was reset since it was opened. */
int dh_link_shm_stale(const dh_link *l);
int dh_link_shm_open(const char *path, int side, dh_link **out);
/* Creates the file and opens it as side 0. */
int dh_link_shm_create(const char *path, uint32_t file_bytes, dh_link **out);
/* Uses memory the caller mapped (an ivshmem BAR) that already holds a
 * channel; the caller keeps the mapping alive. */
int dh_link_shm_attach(void *base, size_t len, int side, int wait_mode,
                       dh_link **out);
/* A byte stream (Unix or TCP socket, virtio-serial port); takes the fd. */
int dh_link_fd(int fd, dh_link **out);

void dh_link_destroy(dh_link *l);
/* Marks the link closed; the peer's next receive reports DH_ECLOSED. */
void dh_link_close(dh_link *l);
int dh_link_is_closed(const dh_link *l);
void dh_link_set_src(dh_link *l, uint32_t nid);
void dh_link_set_model(dh_link *l, const dh_link_model *m);
void dh_link_get_stats(const dh_link *l, dh_link_stats *s);
/* Largest payload this link can carry in one frame. */
uint32_t dh_link_max_payload(const dh_link *l);

/* timeout_ms < 0 waits without limit (the Python layer always passes one). */
int dh_link_send(dh_link *l, const dh_frame_hdr *h, const void *payload,
                 uint32_t len, int timeout_ms);
/* Receives one frame; its payload goes to buf. A malformed frame closes the
 * link and returns DH_EPROTO. */
int dh_link_recv(dh_link *l, dh_frame_hdr *h, void *buf, uint32_t cap,
                 int timeout_ms);
/* Sends bytes as one unchecked message: for tests that feed a peer garbage. */
int dh_link_send_raw(dh_link *l, const void *bytes, uint32_t n, int timeout_ms);

/* ---- RPC -------------------------------------------------------------- */

/* Sends a request and waits for the reply with the same request id. Late
 * replies to earlier, timed-out calls are dropped and counted. */
int dh_rpc_call(dh_link *l, uint16_t op, const void *req, uint32_t req_len,
                void *resp, uint32_t resp_cap, uint32_t *resp_len,
                uint32_t *resp_flags, int timeout_ms);
/* dh_rpc_call in two halves, so the caller can work while the peer does:
 * start sends the request (its id in *req_id), finish waits for its reply.
 * (finish's timeout counts from its own start.) */
int dh_rpc_start(dh_link *l, uint16_t op, const void *req, uint32_t req_len, uint64_t *req_id,
                 int timeout_ms);
int dh_rpc_finish(dh_link *l, uint64_t req_id, void *resp, uint32_t resp_cap,
                  uint32_t *resp_len, uint32_t *resp_flags, int timeout_ms);
int dh_rpc_reply(dh_link *l, const dh_frame_hdr *req, uint32_t flags,
                 const void *payload, uint32_t len, int timeout_ms);
/* A request handler for dh_rpc_serve: sets *reply (and returns its length)
 * or returns a negative dh_ error to answer with an error frame; either way
 * it may add protocol flags to the answer in *flags (0 on entry). */
typedef int (*dh_rpc_handler)(void *ctx, const dh_frame_hdr *h, uint8_t *in,
                              const uint8_t **reply, uint32_t *flags);
/* Serves requests until *stop, SHUTDOWN (answered, then returns) or the link
 * closes; one-way frames are handled without a reply. Returns 0 on a clean
 * end. */
int dh_rpc_serve(dh_link *l, volatile int *stop, dh_rpc_handler fn, void *ctx);
/* Serves ECHO (and PING) with dh_rpc_serve: the benchmarks' far end. */
int dh_rpc_echo_serve(dh_link *l, volatile int *stop);

/* ---- benchmarks and their floors ---------------------------------------- */

/* RPC round trips of `size`-byte requests of opcode op (ECHO: the reply
 * carries them back; GATE_CALL: a call into another node's compartment,
 * whose reply is empty); samples in ns. */
int dh_bench_rpc(dh_link *l, uint16_t op, uint32_t size, uint64_t *samples, size_t n);
int dh_bench_rpc_rtt(dh_link *l, uint32_t size, uint64_t *samples, size_t n);
/* Sends count one-way frames of size bytes then one round trip; *ns is the
 * whole time. */
int dh_bench_stream(dh_link *l, uint32_t size, uint64_t count, uint64_t *ns);
/* Floor for shm: size bytes bounced between two threads through shared
 * memory (64 bytes: a cache-line ping-pong); samples in ns. */
int dh_floor_pingpong(uint32_t size, uint64_t *samples, size_t n);
/* Floor for shm throughput: the two memcpys a ring message costs; *ns for
 * count messages of size bytes. */
int dh_floor_copy(uint32_t size, uint64_t count, uint64_t *ns);
/* Floors for sockets: a raw echo (or sink) of size-byte messages. */
int dh_floor_sock_serve(int fd, uint32_t size, int echo);
int dh_floor_sock_rtt(int fd, uint32_t size, uint64_t *samples, size_t n);
int dh_floor_sock_stream(int fd, uint32_t size, uint64_t count, uint64_t *ns);

uint64_t dh_now_ns(void);

#endif
