/* Compartments and gates, FlexOS-style.
 *
 * A compartment owns a heap. Code runs "in" one compartment at a time and may
 * touch its own heap and the shared domain (everything else: code, stacks,
 * ordinary memory); another compartment's heap faults. A gate calls a
 * function in another compartment and returns, switching rights both ways.
 *
 * Backends:
 *   NONE      a plain call: no isolation (FlexOS's function-call baseline)
 *   MPROTECT  inactive heaps are PROT_NONE; a gate mprotects the caller's heap
 *             away and the callee's in, and back (portable; SEGV_ACCERR)
 *   MPK       each heap carries its own protection key; a gate writes PKRU
 *             (WRPKRU) (SEGV_PKUERR); where pkey_alloc works: PKU CPUs and
 *             TCG guests with -cpu max
 * Gates come light (shared stack) or, for MPK, with the callee on a private
 * stack tagged with its key (FlexOS's MPK-DSS).
 *
 * Every WRPKRU lives in a function named dh_gate_*, so the binary inspector
 * can tell gates from stray PKRU writes, and each is followed by its check. */
#ifndef DH_PKEY_H
#define DH_PKEY_H

#include <stddef.h>
#include <stdint.h>

#include "dh_error.h"

enum dh_backend { DH_BACKEND_NONE = 0, DH_BACKEND_MPROTECT = 1, DH_BACKEND_MPK = 2 };

typedef struct dh_comp dh_comp;
typedef uint64_t (*dh_gate_fn)(void *arg);

/* 1 if this CPU and kernel give protection keys (pkey_alloc succeeds). */
int dh_pkey_available(void);

int dh_comp_create(int backend, size_t heap_bytes, size_t stack_bytes, dh_comp **out);
void dh_comp_destroy(dh_comp *c);
void *dh_comp_heap(const dh_comp *c);
size_t dh_comp_heap_size(const dh_comp *c);
int dh_comp_pkey(const dh_comp *c);

/* Makes c the current compartment of this thread (only its heap is
 * accessible). All compartments in use together must share a backend. */
int dh_gate_enter(dh_comp *c);
/* Leaves compartments: every heap accessible again (the shared domain's
 * view, for setting up and tearing down). */
int dh_gate_leave_all(void);

/* Calls fn(arg) in callee, from the current compartment, and switches back. */
uint64_t dh_gate_call(dh_comp *callee, dh_gate_fn fn, void *arg);
/* The same, on the callee's private stack (MPK only). */
uint64_t dh_gate_call_stack(dh_comp *callee, dh_gate_fn fn, void *arg);

/* MPK gates are one per (caller's PKRU, callee's key), both rights
 * immediates in the code (native/pkey/gates_mpk.c). For tests and tools:
 * PKRU now (0 without protection keys); the light gate a call from here
 * into callee takes (NULL if none: not MPK, or PKRU written outside the
 * gates); and a jump into the middle of a light gate, to `target` (one of
 * its WRPKRUs), with EAX = pkru and fn(arg) the call the gate goes on to
 * make, as code trying to borrow the gate's WRPKRU would. */
uint32_t dh_gate_pkru(void);
void *dh_gate_mpk_address(const dh_comp *callee);
uint64_t dh_gate_test_jump(void *target, uint32_t pkru, dh_gate_fn fn, void *arg);
/* For tests: a handler for sig that notes PKRU and its own stack address
 * when it runs (installed without SA_ONSTACK), and what it noted last. */
int dh_gate_test_signal(int sig);
void dh_gate_test_signal_seen(uint32_t *pkru, uintptr_t *sp);

/* Touches addr from the current compartment, surviving a protection fault:
 * 0 if the access worked, DH_EACCES if it faulted (si_code in *si_code). */
int dh_gate_probe(void *addr, int write, int *si_code);

/* Prints "dh: SIGSEGV si_code=N addr=0x..." on stderr before the process
 * dies of a SIGSEGV: for tests that check how a violation ended. */
void dh_segv_report_install(void);

/* Benchmarks: n samples, each the TSC cycles and ns of DH_GATE_BATCH round
 * trips through a gate to an empty function; and their floors. */
#define DH_GATE_BATCH 100
int dh_bench_gate(dh_comp *callee, int private_stack, uint64_t *cycles, uint64_t *ns,
                  size_t n);
int dh_floor_call(uint64_t *cycles, uint64_t *ns, size_t n);
int dh_gate_floor_wrpkru_pair(uint64_t *cycles, uint64_t *ns, size_t n);
int dh_floor_mprotect(dh_comp *a, dh_comp *b, uint64_t *cycles, uint64_t *ns, size_t n);

#endif
