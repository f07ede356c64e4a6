/* The MPK gates with immediate rights (gates_mpk.c), inside the pkey module. */
#ifndef DH_GATES_MPK_H
#define DH_GATES_MPK_H

#include <stdint.h>

#define DH_GATE_ROWS 17            /* callers: PKRU 0, key 1..15, the default */
#define DH_PKRU_DEFAULT 0x55555554u /* the kernel's: key 0 only */
#define DH_PKRU_OF(k) (0xfffffffcu & ~(3u << (2 * (k)))) /* key 0 and key k */

typedef uint64_t (*dh_gate_mpk_fn)(uint64_t (*fn)(void *), void *arg);
typedef uint64_t (*dh_gate_mpks_fn)(uint64_t (*fn)(void *), void *arg, void *stack_top);

/* [row][key]: row from dh_gate_mpk_row(the caller's PKRU); key 1..15. */
extern const dh_gate_mpk_fn dh_gate_mpk_table[DH_GATE_ROWS][16] __attribute__((visibility("hidden")));
extern const dh_gate_mpks_fn dh_gate_mpks_table[DH_GATE_ROWS][16]
    __attribute__((visibility("hidden")));

/* The row of the caller whose PKRU this is, or -1 if no gate set it (a PKRU
 * written outside the gates). */
int dh_gate_mpk_row(uint32_t pkru);

#endif
