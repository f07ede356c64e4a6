/* Native tests of the transport, built with AddressSanitizer and UBSan by
 * tests/native/test_native.py. Two threads share each ring, as two
 * processes would; every byte is checked. Prints "N passed, N failed". */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "crc32c.h"
#include "dh_transport.h"

#include "check.h"

static uint32_t rng_state = 12345;
static uint32_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return rng_state;
}

static void test_codec(void)
{
    uint8_t payload[300], buf[400];
    for (size_t i = 0; i < sizeof payload; i++)
        payload[i] = (uint8_t)i;
    dh_frame_hdr h = {.opcode = DH_OP_ECHO, .src = 3, .req_id = 77};
    int n = dh_frame_encode(buf, sizeof buf, &h, payload, sizeof payload);
    CHECK(n == (int)(DH_FRAME_HDR_SIZE + sizeof payload));
    dh_frame_hdr out;
    const uint8_t *p;
    CHECK(dh_frame_decode(buf, (size_t)n, &out, &p) == n);
    CHECK(out.req_id == 77 && out.src == 3 && !memcmp(p, payload, sizeof payload));
    for (int cut = 0; cut < n; cut++)
        CHECK(dh_frame_decode(buf, (size_t)cut, &out, &p) == DH_EAGAIN);
    for (int i = 0; i < n * 8; i++) { /* every single-bit flip is caught */
        buf[i / 8] ^= (uint8_t)(1u << (i % 8));
        int rc = dh_frame_decode(buf, (size_t)n, &out, &p);
        buf[i / 8] ^= (uint8_t)(1u << (i % 8));
        CHECK(rc == DH_EPROTO || rc == DH_EAGAIN);
    }
    CHECK(dh_frame_encode(buf, 10, &h, payload, sizeof payload) == DH_ETOOBIG);
    passed++;
}

struct stream_arg {
    dh_link *l;
    int count;
    int rc;
};

static void fill(uint8_t *b, uint32_t n, uint32_t seed)
{
    for (uint32_t i = 0; i < n; i++)
        b[i] = (uint8_t)(seed * 31 + i);
}

static void *producer(void *arg)
{
    struct stream_arg *a = arg;
    uint8_t *buf = malloc(DH_FRAME_MAX_PAYLOAD);
    uint32_t max = dh_link_max_payload(a->l);
    for (int i = 0; i < a->count && !a->rc; i++) {
        uint32_t n = (uint32_t)i * 2654435761u % (max < 9000 ? max : 9000);
        fill(buf, n, (uint32_t)i);
        dh_frame_hdr h = {.opcode = DH_OP_ECHO, .req_id = (uint64_t)i};
        a->rc = dh_link_send(a->l, &h, buf, n, 5000);
    }
    free(buf);
    return NULL;
}

/* Producer and consumer race through a small ring many times around. */
static void run_stream(dh_link *tx, dh_link *rx, int count)
{
    struct stream_arg a = {tx, count, 0};
    pthread_t t;
    CHECK(pthread_create(&t, NULL, producer, &a) == 0);
    uint8_t *buf = malloc(DH_FRAME_MAX_PAYLOAD), *want = malloc(DH_FRAME_MAX_PAYLOAD);
    int bad = 0;
    for (int i = 0; i < count && !bad; i++) {
        dh_frame_hdr h;
        if (dh_link_recv(rx, &h, buf, DH_FRAME_MAX_PAYLOAD, 5000) ||
            h.req_id != (uint64_t)i) {
            bad = 1;
            break;
        }
        fill(want, h.length, (uint32_t)i);
        bad = memcmp(buf, want, h.length) != 0;
    }
    pthread_join(t, NULL);
    free(buf);
    free(want);
    CHECK(!bad && a.rc == 0);
    passed++;
}

static void test_shm_wraparound(void)
{
    char path[] = "/dev/shm/dh-native-test-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    close(fd);
    unlink(path);
    dh_link *a, *b;
    CHECK(dh_link_shm_create(path, 64 << 10, &a) == 0);
    CHECK(dh_link_shm_open(path, 1, &b) == 0);
    unlink(path);
    run_stream(a, b, 20000);
    run_stream(b, a, 20000);

    /* Empty: times out. Full: times out, then drains. */
    dh_frame_hdr h;
    uint8_t buf[2048] = {0};
    CHECK(dh_link_recv(b, &h, buf, sizeof buf, 10) == DH_ETIMEDOUT);
    int sent = 0, rc;
    dh_frame_hdr s = {.opcode = DH_OP_ECHO};
    while ((rc = dh_link_send(a, &s, buf, 1000, 10)) == 0)
        sent++;
    CHECK(rc == DH_ETIMEDOUT && sent > 10);
    for (int i = 0; i < sent; i++)
        CHECK(dh_link_recv(b, &h, buf, sizeof buf, 10) == 0);
    CHECK(dh_link_recv(b, &h, buf, sizeof buf, 10) == DH_ETIMEDOUT);

    /* Raw sizes near 4 GiB are refused before anything is copied: the
     * record's size (4 + n, rounded up to 8) wraps to a few bytes. */
    for (uint32_t n = 0xfffffff0u; n != 0; n++)
        CHECK(dh_link_send_raw(a, buf, n, 10) == DH_ETOOBIG);
    CHECK(dh_link_recv(b, &h, buf, sizeof buf, 10) == DH_ETIMEDOUT);

    /* A record that lies is caught before it is read. */
    CHECK(dh_link_send_raw(a, "DHF1 garbage that is long enough...", 36, 10) == 0);
    CHECK(dh_link_recv(b, &h, buf, sizeof buf, 10) == DH_EPROTO);
    CHECK(dh_link_is_closed(b));
    CHECK(dh_link_send(a, &s, buf, 1, 10) == DH_ECLOSED);
    dh_link_destroy(a);
    dh_link_destroy(b);
    passed++;
}

static void test_stream_socket(void)
{
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    dh_link *a, *b;
    CHECK(dh_link_fd(sv[0], &a) == 0 && dh_link_fd(sv[1], &b) == 0);
    run_stream(a, b, 5000);

    /* Random garbage: rejected, never read out of bounds. */
    uint8_t junk[512], buf[1024];
    for (int round = 0; round < 200; round++) {
        int sp[2];
        CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sp) == 0);
        dh_link *r;
        CHECK(dh_link_fd(sp[1], &r) == 0);
        uint32_t n = rnd() % sizeof junk;
        for (uint32_t i = 0; i < n; i++)
            junk[i] = (uint8_t)rnd();
        if (n >= 4)
            memcpy(junk, "DHF1", 4);
        CHECK(write(sp[0], junk, n) == (ssize_t)n);
        close(sp[0]);
        dh_frame_hdr h;
        int rc = dh_link_recv(r, &h, buf, sizeof buf, 1000);
        CHECK(rc == DH_EPROTO || rc == DH_ECLOSED || rc == DH_ETOOBIG);
        dh_link_destroy(r);
    }
    dh_link_destroy(a);
    dh_link_destroy(b);
    passed++;
}

/* The copy floor with a ring-sized payload: the offset once wrapped modulo
 * ring - size, which is 0 there. */
static void test_floor_copy(void)
{
    uint64_t ns = 0;
    CHECK(dh_floor_copy(1u << 20, 3, &ns) == 0);
    CHECK(dh_floor_copy(4096, 1000, &ns) == 0 && ns > 0);
    CHECK(dh_floor_copy((1u << 20) + 1, 1, &ns) == DH_EINVAL);
    passed++;
}

/* CRC32C one bit at a time, straight from the definition. */
static uint32_t crc32c_bitwise(uint32_t crc, const uint8_t *p, size_t n)
{
    crc = ~crc;
    while (n--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = (crc & 1) ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
    }
    return ~crc;
}

/* Every path this CPU has (folding, three-stream, one-stream, table)
 * against the bitwise reference: known vectors, every length 0..4200 (past
 * the 512-byte fold threshold) at a random alignment and starting CRC,
 * lengths past one 6 KiB three-stream block, and a buffer split in two
 * anywhere. dh_crc32c_copy gives the same CRC and an exact copy, at any
 * alignment of either side, and writes nothing past the copy. */
static void test_crc32c(void)
{
    enum dh_crc_path best = dh_crc32c_best();
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("pclmul"))
        CHECK(best == (__builtin_cpu_supports("avx512f") &&
                               __builtin_cpu_supports("vpclmulqdq")
                           ? DH_CRC_FOLD512
                           : DH_CRC_3WAY));
    CHECK(dh_crc32c(0, "123456789", 9) == 0xE3069283u);
    CHECK(dh_crc32c(0, NULL, 0) == 0 && dh_crc32c(0x1234, NULL, 0) == 0x1234);
    static uint8_t zeros[32], ones[32];
    memset(ones, 0xff, sizeof ones);
    for (int path = DH_CRC_TABLE; path <= (int)best; path++) {
        CHECK(dh_crc32c_path(path, 0, "123456789", 9) == 0xE3069283u);
        /* RFC 3720 B.4: 32 bytes of zeros, of ones. */
        CHECK(dh_crc32c_path(path, 0, zeros, sizeof zeros) == 0x8A9136AAu);
        CHECK(dh_crc32c_path(path, 0, ones, sizeof ones) == 0x62A8AB43u);
    }
    enum { MAXLEN = 20000 };
    static uint8_t buf[MAXLEN + 64];
    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = (uint8_t)rnd();
    for (size_t n = 0; n <= MAXLEN; n += n < 4200 ? 1 : 397) {
        const uint8_t *p = buf + rnd() % 64;
        uint32_t init = n % 3 ? rnd() : 0;
        uint32_t want = crc32c_bitwise(init, p, n);
        CHECK(dh_crc32c(init, p, n) == want);
        for (int path = DH_CRC_TABLE; path <= (int)best; path++)
            CHECK(dh_crc32c_path(path, init, p, n) == want);
        static uint8_t dst[MAXLEN + 128];
        size_t d = rnd() % 64;
        memset(dst, 0xa5, sizeof dst);
        CHECK(dh_crc32c_copy(init, dst + d, p, n) == want);
        CHECK(memcmp(dst + d, p, n) == 0);
        CHECK(dst[d + n] == 0xa5 && (d == 0 || dst[d - 1] == 0xa5));
    }
    for (int i = 0; i < 2000; i++) {
        size_t n = rnd() % MAXLEN, k = n ? rnd() % n : 0;
        const uint8_t *p = buf + rnd() % 64;
        CHECK(dh_crc32c(dh_crc32c(0, p, k), p + k, n - k) ==
              dh_crc32c_path(DH_CRC_TABLE, 0, p, n));
    }
    passed++;
}

static void *echo_thread(void *arg)
{
    volatile int stop = 0;
    dh_rpc_echo_serve(arg, &stop);
    return NULL;
}

static void test_rpc(void)
{
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    dh_link *c, *s;
    CHECK(dh_link_fd(sv[0], &c) == 0 && dh_link_fd(sv[1], &s) == 0);
    pthread_t t;
    CHECK(pthread_create(&t, NULL, echo_thread, s) == 0);
    uint8_t req[4096], resp[4096];
    uint32_t got = 0, flags = 0;
    fill(req, sizeof req, 9);
    for (int i = 0; i < 100; i++) {
        CHECK(dh_rpc_call(c, DH_OP_ECHO, req, sizeof req, resp, sizeof resp, &got,
                          &flags, 2000) == 0);
        CHECK(got == sizeof req && !memcmp(req, resp, got) && flags & DH_F_REPLY);
    }
    CHECK(dh_rpc_call(c, DH_OP_SHUTDOWN, NULL, 0, resp, sizeof resp, &got, NULL,
                      2000) == 0);
    pthread_join(t, NULL);
    /* Nobody serves now: the call times out instead of hanging. */
    CHECK(dh_rpc_call(c, DH_OP_PING, NULL, 0, resp, sizeof resp, &got, NULL, 50) ==
          DH_ETIMEDOUT);
    dh_link_destroy(c);
    dh_link_destroy(s);
    passed++;
}

int main(void)
{
    test_crc32c();
    test_codec();
    test_shm_wraparound();
    test_stream_socket();
    test_rpc();
    test_floor_copy();
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
