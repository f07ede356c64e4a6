/* Internal: the four ways dh_crc32c can compute a CRC32C, so the native
 * tests can check each against a reference. Not a public header. */
#ifndef DH_CRC32C_INTERNAL_H
#define DH_CRC32C_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

enum dh_crc_path {
    DH_CRC_TABLE,  /* slicing-by-8 tables: any CPU */
    DH_CRC_SSE42,  /* one stream of the crc32 instruction: SSE4.2 */
    DH_CRC_3WAY,   /* three streams combined by PCLMULQDQ: SSE4.2 + PCLMUL */
    DH_CRC_FOLD512, /* 512-bit carry-less folding: + AVX-512F, VPCLMULQDQ */
};

/* The path dh_crc32c uses on this CPU (the fastest it has). */
enum dh_crc_path dh_crc32c_best(void);
/* dh_crc32c by one path; the caller checks the CPU has it (path <= best). */
uint32_t dh_crc32c_path(enum dh_crc_path path, uint32_t crc, const void *buf,
                        size_t n);

#endif
