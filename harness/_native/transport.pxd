from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "dh_transport.h" nogil:
    enum:
        DH_FRAME_MAGIC
        DH_FRAME_VERSION
        DH_FRAME_HDR_SIZE
        DH_FRAME_MAX_PAYLOAD
        DH_F_REPLY
        DH_F_ERROR
        DH_F_NOREPLY
        DH_WAIT_FUTEX
        DH_WAIT_POLL

    enum dh_op:
        DH_OP_HELLO
        DH_OP_PING
        DH_OP_STATS
        DH_OP_SHUTDOWN
        DH_OP_EXEC
        DH_OP_ECHO
        DH_OP_CTL
        DH_OP_ATTACH
        DH_OP_P2M_PCACHE_MISS
        DH_OP_P2M_PCACHE_FLUSH
        DH_OP_P2M_PCACHE_MISS_FLUSH
        DH_OP_P2M_ALLOC
        DH_OP_P2M_FREE
        DH_OP_M2M_REPLICA
        DH_OP_SQL
        DH_OP_GATE_CALL

    ctypedef struct dh_frame_hdr:
        uint32_t magic
        uint16_t version
        uint16_t opcode
        uint32_t src
        uint32_t flags
        uint64_t req_id
        uint32_t length
        uint32_t checksum

    ctypedef struct dh_link:
        pass

    ctypedef struct dh_link_model:
        uint64_t latency_ns
        uint64_t bytes_per_sec

    ctypedef struct dh_link_stats:
        uint64_t frames_sent
        uint64_t frames_recv
        uint64_t bytes_sent
        uint64_t bytes_recv
        uint64_t proto_errors
        uint64_t stale_replies
        uint64_t sleeps

    uint32_t dh_crc32c(uint32_t crc, const void *buf, size_t n)
    int dh_op_known(uint16_t opcode)
    int dh_frame_encode(uint8_t *buf, size_t cap, const dh_frame_hdr *h,
                        const void *payload, uint32_t len)
    int dh_frame_decode(const uint8_t *buf, size_t n, dh_frame_hdr *out,
                        const uint8_t **payload)

    int dh_shm_file_create(const char *path, uint32_t file_bytes)
    int dh_shm_file_reset(const char *path)
    int dh_link_shm_stale(const dh_link *l)
    int dh_link_shm_open(const char *path, int side, dh_link **out)
    int dh_link_shm_create(const char *path, uint32_t file_bytes, dh_link **out)
    int dh_link_shm_attach(void *base, size_t len, int side, int wait_mode,
                           dh_link **out)
    int dh_link_fd(int fd, dh_link **out)
    void dh_link_destroy(dh_link *l)
    void dh_link_close(dh_link *l)
    int dh_link_is_closed(const dh_link *l)
    void dh_link_set_src(dh_link *l, uint32_t nid)
    void dh_link_set_model(dh_link *l, const dh_link_model *m)
    void dh_link_get_stats(const dh_link *l, dh_link_stats *s)
    uint32_t dh_link_max_payload(const dh_link *l)
    int dh_link_send(dh_link *l, const dh_frame_hdr *h, const void *payload,
                     uint32_t len, int timeout_ms)
    int dh_link_recv(dh_link *l, dh_frame_hdr *h, void *buf, uint32_t cap,
                     int timeout_ms)
    int dh_link_send_raw(dh_link *l, const void *bytes, uint32_t n, int timeout_ms)
    int dh_rpc_call(dh_link *l, uint16_t op, const void *req, uint32_t req_len,
                    void *resp, uint32_t resp_cap, uint32_t *resp_len,
                    uint32_t *resp_flags, int timeout_ms)
    int dh_rpc_reply(dh_link *l, const dh_frame_hdr *req, uint32_t flags,
                     const void *payload, uint32_t len, int timeout_ms)
    int dh_rpc_echo_serve(dh_link *l, volatile int *stop)

    int dh_bench_rpc(dh_link *l, uint16_t op, uint32_t size, uint64_t *samples, size_t n)
    int dh_bench_rpc_rtt(dh_link *l, uint32_t size, uint64_t *samples, size_t n)
    int dh_bench_stream(dh_link *l, uint32_t size, uint64_t count, uint64_t *ns)
    int dh_floor_pingpong(uint32_t size, uint64_t *samples, size_t n)
    int dh_floor_copy(uint32_t size, uint64_t count, uint64_t *ns)
    int dh_floor_sock_serve(int fd, uint32_t size, int echo)
    int dh_floor_sock_rtt(int fd, uint32_t size, uint64_t *samples, size_t n)
    int dh_floor_sock_stream(int fd, uint32_t size, uint64_t count, uint64_t *ns)


cdef class Link:
    cdef dh_link *_l
    cdef bytearray _buf
    cdef str name
    cdef object _keep
    cdef _own(self, dh_link *l, str name)
    cdef dh_link *_live(self) except NULL


cdef class Samples:
    cdef uint64_t *v
    cdef size_t n
    cdef list values(self)
