/* CRC32C (Castagnoli; reflected polynomial 0x82F63B78, the iSCSI CRC).
 *
 * The SSE4.2 crc32 instruction folds 8 bytes into the CRC with a latency of
 * 3 cycles but can start one every cycle, so a single dependent stream runs
 * at a third of the instruction's throughput (~0.4 us per 4 KiB here). The
 * fast path splits a block into three equal lanes, runs one crc32 stream
 * over each at once, and joins them with carry-less multiplication (the
 * method of the Linux kernel's crc32c-pcl-intel and Intel ISA-L's 3-way
 * crc32c):
 *
 * With CRC state c, the instruction computes c' = (c * x^64 + d * x^32) mod P
 * over bit-reflected polynomials, so it is linear, and running it over a
 * lane of L bytes from state c equals running it from 0, then xoring in
 * c * x^(8L) mod P. For lanes A, B, C (A starts from the caller's state, B
 * and C from 0) the CRC of the whole block is therefore
 *
 *     crc(A) * x^(16L)  ^  crc(B) * x^(8L)  ^  crc(C)      (mod P).
 *
 * A carry-less product of two reflected 32-bit values, read as the 64-bit
 * reflected operand of crc32q, stands for their product times x, and
 * crc32q(0, d) = d * x^32 mod P; so crc32q(0, clmul(s, x^(8L-33) mod P)) =
 * s * x^(8L) mod P. Both products are xored into C's last 8 bytes before
 * its last crc32q, which does the reduction for free. The constants for
 * every lane length are computed once at first use.
 *
 * With AVX-512 and VPCLMULQDQ, blocks of 512 bytes or more are folded
 * instead, 256 bytes a step in four 512-bit registers (sixteen 128-bit
 * lanes), as Intel's white paper "Fast CRC Computation Using PCLMULQDQ"
 * and ISA-L's crc32_iscsi_by16_10 do: a lane X = Q0 x^64 + Q1 (Q0 its
 * first 8 bytes) moved 2048 bits on is congruent to
 *
 *     clmul(Q0, x^2079 mod P)  ^  clmul(Q1, x^2015 mod P)
 *
 * (each product carries x^33: one x from the reflected product and x^32
 * from the 32-bit constant sitting in the low half of a 64-bit operand),
 * a 128-bit value that is xored into the lane 256 bytes later. Folding
 * keeps the CRC of "registers, then the rest" equal to the CRC of the
 * block, so the last 256 bytes of registers are stored and run through
 * the three-lane path with the tail; no separate reduction is needed.
 *
 * dh_crc32c_copy copies a buffer and computes its CRC in the same pass:
 * the folding loop stores each 64 bytes it loads, so the source is read
 * once, and the CRC is of the bytes the copy holds even if the source
 * changes under it (a peer writing into a shared ring).
 *
 * Without PCLMUL the one-stream instruction is used, without SSE4.2
 * slicing-by-8 tables; all four give the same values. */
#include <pthread.h>
#include <string.h>

#include <immintrin.h>

#include "crc32c.h"
#include "dh_transport.h"

#define CRC_POLY 0x82F63B78u
/* Bytes per lane: at most LANE_MAX (blocks of 6 KiB; a 4 KiB buffer is one
 * block), and below LANE_MIN joining costs more than it saves. Multiples
 * of 8. */
#define LANE_MAX 2048u
#define LANE_MIN 32u

static uint32_t crc_table[8][256];
/* For a lane of 8w bytes: { x^(128w-33), x^(64w-33) } mod P, reflected:
 * the multipliers of lane A's and lane B's CRCs. */
_Alignas(16) static uint64_t crc_join[LANE_MAX / 8 + 1][2];
/* { x^2079, x^2015 } mod P, reflected: the fold of a lane by 256 bytes. */
static uint64_t crc_fold[2];
static enum dh_crc_path crc_best;
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ CRC_POLY : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^
                              crc_table[0][crc_table[t - 1][i] & 0xff];
    /* v = x^(31 + 8j) mod P: x^31 is bit 0 reflected, and one table step
     * with a zero byte multiplies by x^8. 64w - 33 = 31 + 8(8w - 8) and
     * 128w - 33 = 31 + 8(16w - 8). */
    uint32_t v = 1;
    for (uint32_t j = 0; j <= 16 * (LANE_MAX / 8) - 8; j++) {
        if (j % 16 == 8)
            crc_join[(j + 8) / 16][0] = v;
        if (j % 8 == 0 && j / 8 + 1 <= LANE_MAX / 8)
            crc_join[j / 8 + 1][1] = v;
        if (j == 256) /* 2079 = 31 + 8 * 256 */
            crc_fold[0] = v;
        if (j == 248) /* 2015 = 31 + 8 * 248 */
            crc_fold[1] = v;
        v = (v >> 8) ^ crc_table[0][v & 0xff];
    }
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("pclmul"))
        crc_best = __builtin_cpu_supports("avx512f") &&
                           __builtin_cpu_supports("vpclmulqdq")
                       ? DH_CRC_FOLD512
                       : DH_CRC_3WAY;
    else if (__builtin_cpu_supports("sse4.2"))
        crc_best = DH_CRC_SSE42;
    else
        crc_best = DH_CRC_TABLE;
}

static inline uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

__attribute__((target("sse4.2"))) static uint32_t crc_sse42(uint32_t c,
                                                            const uint8_t *p,
                                                            size_t n)
{
    uint64_t c64 = c;
    while (n >= 8) {
        c64 = _mm_crc32_u64(c64, load64(p));
        p += 8;
        n -= 8;
    }
    c = (uint32_t)c64;
    while (n--)
        c = _mm_crc32_u8(c, *p++);
    return c;
}

__attribute__((target("sse4.2,pclmul"))) static uint32_t
crc_3way(uint32_t c, const uint8_t *p, size_t n)
{
    uint64_t ca = c;
    while (n >= 3 * LANE_MIN) {
        size_t lane = n >= 3 * LANE_MAX ? LANE_MAX : n / 24 * 8;
        size_t w = lane / 8;
        const uint8_t *b = p + lane, *cc = p + 2 * lane;
        uint64_t cb = 0, cx = 0;
        for (size_t i = 0; i < w - 1; i++) {
            ca = _mm_crc32_u64(ca, load64(p + 8 * i));
            cb = _mm_crc32_u64(cb, load64(b + 8 * i));
            cx = _mm_crc32_u64(cx, load64(cc + 8 * i));
        }
        ca = _mm_crc32_u64(ca, load64(p + lane - 8));
        cb = _mm_crc32_u64(cb, load64(b + lane - 8));
        __m128i k = _mm_load_si128((const __m128i *)crc_join[w]);
        __m128i s = _mm_set_epi64x((long long)cb, (long long)ca);
        __m128i t = _mm_xor_si128(_mm_clmulepi64_si128(s, k, 0x00),
                                  _mm_clmulepi64_si128(s, k, 0x11));
        ca = _mm_crc32_u64(cx, load64(cc + lane - 8) ^
                                   (uint64_t)_mm_cvtsi128_si64(t));
        p += 3 * lane;
        n -= 3 * lane;
    }
    while (n >= 8) {
        ca = _mm_crc32_u64(ca, load64(p));
        p += 8;
        n -= 8;
    }
    c = (uint32_t)ca;
    if (n & 4) {
        uint32_t v;
        memcpy(&v, p, 4);
        c = _mm_crc32_u32(c, v);
        p += 4;
    }
    if (n & 2) {
        uint16_t v;
        memcpy(&v, p, 2);
        c = _mm_crc32_u16(c, v);
        p += 2;
    }
    if (n & 1)
        c = _mm_crc32_u8(c, *p);
    return c;
}

#define FOLD_STEP 256u

/* Loads 64 bytes of the next step, stores them to *dst when copying, and
 * folds x into them: the CRC is of exactly the bytes the copy holds. */
__attribute__((target("avx512f,vpclmulqdq"))) static inline __m512i
fold_lane(__m512i x, __m512i k, const uint8_t *next, uint8_t *dst)
{
    __m512i d = _mm512_loadu_si512(next);
    if (dst)
        _mm512_storeu_si512(dst, d);
    __m512i lo = _mm512_clmulepi64_epi128(x, k, 0x00);
    __m512i hi = _mm512_clmulepi64_epi128(x, k, 0x11);
    /* 0x96: a ^ b ^ c */
    return _mm512_ternarylogic_epi64(lo, hi, d, 0x96);
}

__attribute__((target("avx512f"))) static inline __m512i
load_lane(const uint8_t *p, uint8_t *dst)
{
    __m512i d = _mm512_loadu_si512(p);
    if (dst)
        _mm512_storeu_si512(dst, d);
    return d;
}

/* The CRC of p[0..n), and with dst also a copy of it to dst: one pass over
 * the source instead of a copy and a CRC pass (inlined twice, so the dst
 * tests fold away). */
__attribute__((target("sse4.2,pclmul,avx512f,vpclmulqdq"))) static inline uint32_t
fold512(uint32_t c, const uint8_t *p, size_t n, uint8_t *dst)
{
    /* dh_crc32c_copy folds from this size on; below it there is no dst. */
    _Static_assert(DH_CRC_COPY_FUSED == 2 * FOLD_STEP, "fused from the fold's threshold");
    if (n < 2 * FOLD_STEP)
        return crc_3way(c, p, n);
    /* The state is xored into the first 4 bytes: a reflected CRC from state
     * c over M equals one from 0 over M with c added to its start. */
    __m512i x0 = _mm512_xor_si512(load_lane(p, dst),
                                  _mm512_zextsi128_si512(_mm_cvtsi32_si128((int)c)));
    __m512i x1 = load_lane(p + 64, dst ? dst + 64 : NULL);
    __m512i x2 = load_lane(p + 128, dst ? dst + 128 : NULL);
    __m512i x3 = load_lane(p + 192, dst ? dst + 192 : NULL);
    /* Q0 (the low qword of each lane) meets x^2079, Q1 meets x^2015. */
    __m512i k = _mm512_broadcast_i32x4(_mm_set_epi64x((long long)crc_fold[1],
                                                      (long long)crc_fold[0]));
    p += FOLD_STEP;
    n -= FOLD_STEP;
    if (dst)
        dst += FOLD_STEP;
    while (n >= FOLD_STEP) {
        x0 = fold_lane(x0, k, p, dst);
        x1 = fold_lane(x1, k, p + 64, dst ? dst + 64 : NULL);
        x2 = fold_lane(x2, k, p + 128, dst ? dst + 128 : NULL);
        x3 = fold_lane(x3, k, p + 192, dst ? dst + 192 : NULL);
        p += FOLD_STEP;
        n -= FOLD_STEP;
        if (dst)
            dst += FOLD_STEP;
    }
    _Alignas(64) uint8_t rest[FOLD_STEP];
    _mm512_store_si512(rest, x0);
    _mm512_store_si512(rest + 64, x1);
    _mm512_store_si512(rest + 128, x2);
    _mm512_store_si512(rest + 192, x3);
    c = crc_3way(0, rest, FOLD_STEP);
    if (!dst)
        return crc_3way(c, p, n);
    memcpy(dst, p, n); /* the tail, checked on the copy */
    return crc_3way(c, dst, n);
}

__attribute__((target("sse4.2,pclmul,avx512f,vpclmulqdq"))) static uint32_t
crc_fold512(uint32_t c, const uint8_t *p, size_t n)
{
    return fold512(c, p, n, NULL);
}

__attribute__((target("sse4.2,pclmul,avx512f,vpclmulqdq"))) static uint32_t
crc_fold512_copy(uint32_t c, uint8_t *dst, const uint8_t *p, size_t n)
{
    return fold512(c, p, n, dst);
}

static uint32_t crc_soft(uint32_t c, const uint8_t *p, size_t n)
{
    while (n >= 8) {
        uint32_t lo, hi;
        memcpy(&lo, p, 4);
        memcpy(&hi, p + 4, 4);
        lo ^= c;
        c = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^
            crc_table[5][(lo >> 16) & 0xff] ^ crc_table[4][lo >> 24] ^
            crc_table[3][hi & 0xff] ^ crc_table[2][(hi >> 8) & 0xff] ^
            crc_table[1][(hi >> 16) & 0xff] ^ crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--)
        c = crc_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    return c;
}

enum dh_crc_path dh_crc32c_best(void)
{
    pthread_once(&crc_once, crc_init);
    return crc_best;
}

static inline uint32_t crc_run(enum dh_crc_path path, uint32_t crc,
                               const void *buf, size_t n)
{
    uint32_t c = ~crc;
    switch (path) {
    case DH_CRC_FOLD512:
        c = crc_fold512(c, buf, n);
        break;
    case DH_CRC_3WAY:
        c = crc_3way(c, buf, n);
        break;
    case DH_CRC_SSE42:
        c = crc_sse42(c, buf, n);
        break;
    default:
        c = crc_soft(c, buf, n);
        break;
    }
    return ~c;
}

uint32_t dh_crc32c_path(enum dh_crc_path path, uint32_t crc, const void *buf,
                        size_t n)
{
    pthread_once(&crc_once, crc_init);
    return crc_run(path, crc, buf, n);
}

uint32_t dh_crc32c(uint32_t crc, const void *buf, size_t n)
{
    pthread_once(&crc_once, crc_init);
    return crc_run(crc_best, crc, buf, n);
}

uint32_t dh_crc32c_copy(uint32_t crc, void *dst, const void *src, size_t n)
{
    pthread_once(&crc_once, crc_init);
    if (crc_best == DH_CRC_FOLD512 && n >= DH_CRC_COPY_FUSED)
        return ~crc_fold512_copy(~crc, dst, src, n);
    /* Without the fold the CRC pass runs over the copy, hot in L1. */
    memcpy(dst, src, n);
    return crc_run(crc_best, crc, dst, n);
}
