/* Compartments and gates. See dh_pkey.h. */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <x86intrin.h>

#include "dh_pkey.h"
#include "dh_transport.h" /* dh_now_ns */
#include "gates_mpk.h"

#define MAX_COMPS 64
#define BATCH DH_GATE_BATCH /* per sample: amortises the clocks */

struct dh_comp {
    int backend;
    uint8_t *heap;
    size_t heap_size;
    uint8_t *stack;
    size_t stack_size;
    int pkey;
    uint32_t pkru;  /* the rights inside this compartment (MPK) */
    int accessible; /* MPROTECT: its heap is mapped RW right now */
};

static __thread dh_comp *current;
static dh_comp *registry[MAX_COMPS]; /* MPROTECT compartments (process-wide) */
static pthread_mutex_t registry_mu = PTHREAD_MUTEX_INITIALIZER;

/* ---- PKRU: always inlined, so WRPKRU appears only in dh_gate_* ------------- */

static inline __attribute__((always_inline)) uint32_t rdpkru(void)
{
    uint32_t eax, edx;
    __asm__ volatile(".byte 0x0f, 0x01, 0xee" : "=a"(eax), "=d"(edx) : "c"(0));
    return eax;
}

/* FlexOS's gate: write, then check the write took (a jump into the middle of
 * a gate must not leave PKRU at an attacker's value). */
static inline __attribute__((always_inline)) void set_pkru(uint32_t v)
{
    do
        __asm__ volatile(".byte 0x0f, 0x01, 0xef" ::"a"(v), "c"(0), "d"(0) : "memory");
    while (rdpkru() != v);
}

static int pkeys = -1; /* pkey_alloc works (so RDPKRU/WRPKRU do too); -1: not asked */

int dh_pkey_available(void)
{
    if (pkeys < 0) {
        int k = pkey_alloc(0, 0);
        pkeys = k >= 0;
        if (k >= 0)
            pkey_free(k);
    }
    return pkeys;
}

/* ---- life cycle ---------------------------------------------------------------- */

int dh_comp_create(int backend, size_t heap_bytes, size_t stack_bytes, dh_comp **out)
{
    long pg = sysconf(_SC_PAGESIZE);
    if (backend < DH_BACKEND_NONE || backend > DH_BACKEND_MPK || !heap_bytes ||
        heap_bytes % (size_t)pg || stack_bytes % (size_t)pg)
        return DH_EINVAL;
    dh_comp *c = calloc(1, sizeof *c);
    if (!c)
        return DH_ENOMEM;
    c->backend = backend;
    c->pkey = -1;
    c->heap_size = heap_bytes;
    c->heap = mmap(NULL, heap_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int rc = c->heap == MAP_FAILED ? DH_ENOMEM : 0;
    if (!rc && stack_bytes) {
        c->stack_size = stack_bytes;
        c->stack = mmap(NULL, stack_bytes, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (c->stack == MAP_FAILED) {
            c->stack = NULL;
            rc = DH_ENOMEM;
        }
    }
    if (!rc && backend == DH_BACKEND_MPK) {
        c->pkey = pkey_alloc(0, 0);
        if (c->pkey < 0)
            rc = errno == ENOSPC ? DH_ENOMEM : DH_ENOSYS; /* no PKU: never pretend */
        else if (pkey_mprotect(c->heap, heap_bytes, PROT_READ | PROT_WRITE, c->pkey) ||
                 (c->stack && pkey_mprotect(c->stack, c->stack_size, PROT_READ | PROT_WRITE,
                                            c->pkey)))
            rc = DH_EIO;
        /* Inside: key 0 (the shared domain) and its own key; no other key. */
        c->pkru = DH_PKRU_OF(c->pkey);
        /* pkey_alloc opened the new key in this thread's PKRU, a value no
         * gate was built for; the shared view is every key open. */
        if (!rc && !current)
            rc = dh_gate_leave_all();
    }
    if (!rc && backend == DH_BACKEND_MPROTECT) {
        c->accessible = 1;
        pthread_mutex_lock(&registry_mu);
        rc = DH_ENOMEM;
        for (int i = 0; i < MAX_COMPS && rc; i++)
            if (!registry[i]) {
                registry[i] = c;
                rc = 0;
            }
        pthread_mutex_unlock(&registry_mu);
    }
    if (rc) {
        dh_comp_destroy(c);
        return rc;
    }
    *out = c;
    return 0;
}

void dh_comp_destroy(dh_comp *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&registry_mu);
    for (int i = 0; i < MAX_COMPS; i++)
        if (registry[i] == c)
            registry[i] = NULL;
    pthread_mutex_unlock(&registry_mu);
    if (current == c)
        current = NULL;
    if (c->heap && c->heap != MAP_FAILED)
        munmap(c->heap, c->heap_size);
    if (c->stack)
        munmap(c->stack, c->stack_size);
    if (c->pkey >= 0)
        pkey_free(c->pkey);
    free(c);
}

void *dh_comp_heap(const dh_comp *c) { return c->heap; }
size_t dh_comp_heap_size(const dh_comp *c) { return c->heap_size; }
int dh_comp_pkey(const dh_comp *c) { return c->pkey; }

/* ---- switching ------------------------------------------------------------------ */

static int set_access(dh_comp *c, int on)
{
    if (c->accessible == on)
        return 0;
    if (mprotect(c->heap, c->heap_size, on ? PROT_READ | PROT_WRITE : PROT_NONE))
        return DH_EIO;
    c->accessible = on;
    return 0;
}

/* MPROTECT: only `only`'s heap stays mapped (NULL: all of them). */
static int mprotect_view(dh_comp *only)
{
    int rc = 0;
    for (int i = 0; i < MAX_COMPS && !rc; i++)
        if (registry[i])
            rc = set_access(registry[i], only == NULL || registry[i] == only);
    return rc;
}

int dh_gate_enter(dh_comp *c)
{
    int rc = 0;
    if (c->backend == DH_BACKEND_MPK)
        set_pkru(c->pkru);
    else if (c->backend == DH_BACKEND_MPROTECT)
        rc = mprotect_view(c);
    if (!rc)
        current = c;
    return rc;
}

int dh_gate_leave_all(void)
{
    if (dh_pkey_available())
        set_pkru(0); /* every key open: a row of the gate table (gates_mpk.c) */
    current = NULL;
    return mprotect_view(NULL);
}

/* The MPK light gate, as FlexOS builds it: both PKRU values known at the
 * call site (FlexOS bakes them in at build time), nothing else touched
 * between the two writes. */
__attribute__((noinline)) static uint64_t dh_gate_mpk(uint32_t back, uint32_t to, dh_gate_fn fn,
                                                      void *arg)
{
    set_pkru(to);
    uint64_t r = fn(arg);
    set_pkru(back);
    return r;
}

/* The row of the gate tables for a call from here into callee: picked by
 * PKRU itself, which only a gate can have written (not `current`, memory a
 * callee could write); -1 if no gate wrote the caller's PKRU (pkey_set by
 * hand), when the general gates below serve. */
static int gate_row(const dh_comp *callee)
{
    return callee->pkey < 1 || callee->pkey > 15 ? -1 : dh_gate_mpk_row(rdpkru());
}

static dh_gate_mpk_fn mpk_gate(const dh_comp *callee)
{
    int row = gate_row(callee);
    return row < 0 ? NULL : dh_gate_mpk_table[row][callee->pkey];
}

static dh_gate_mpks_fn mpk_stack_gate(const dh_comp *callee)
{
    int row = gate_row(callee);
    return row < 0 ? NULL : dh_gate_mpks_table[row][callee->pkey];
}

__attribute__((noinline)) uint64_t dh_gate_call(dh_comp *callee, dh_gate_fn fn, void *arg)
{
    dh_comp *caller = current;
    uint64_t r;
    switch (callee->backend) {
    case DH_BACKEND_MPK: {
        /* PKRU itself says where we are: no other memory is touched, which
         * matters under TCG, where every WRPKRU flushes the whole TLB. */
        dh_gate_mpk_fn g = mpk_gate(callee);
        return g ? g(fn, arg) : dh_gate_mpk(rdpkru(), callee->pkru, fn, arg);
    }
    case DH_BACKEND_MPROTECT:
        /* The common case, a compartment calling another: two mprotects each
         * way. From the shared view, every other heap is revoked first. */
        if (caller && caller->backend == DH_BACKEND_MPROTECT) {
            set_access(caller, 0);
            set_access(callee, 1);
        } else {
            mprotect_view(callee);
        }
        current = callee;
        r = fn(arg);
        current = caller;
        if (caller && caller->backend == DH_BACKEND_MPROTECT) {
            set_access(callee, 0);
            set_access(caller, 1);
        } else {
            mprotect_view(NULL);
        }
        return r;
    default:
        return fn(arg);
    }
}

static uint64_t call_on_stack(dh_gate_fn fn, void *arg, void *top)
{
    uint64_t ret;
    __asm__ volatile("mov %%rsp, %%rbx\n\t"
                     "mov %[top], %%rsp\n\t"
                     "call *%[fn]\n\t"
                     "mov %%rbx, %%rsp\n\t"
                     : "=a"(ret), "+D"(arg)
                     : [top] "r"(top), [fn] "r"(fn)
                     : "rbx", "rcx", "rdx", "rsi", "r8", "r9", "r10", "r11", "memory", "cc",
                       "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
                       "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
    return ret;
}

/* A signal that arrives while a thread runs on a private stack (memory of
 * a key the kernel's default rights close) would have its frame written
 * there with those rights, and the process would die of it (Linux before
 * 6.13). So a thread gets an alternate signal stack in the shared domain
 * before its first private-stack gate, and every handler installed then
 * gets SA_ONSTACK: handlers run there, with the default rights, and
 * sigreturn restores the compartment's. A handler installed later without
 * SA_ONSTACK is not covered (CPython's have it). */
#define ALTSTACK_BYTES (64 << 10)
static __thread int altstack_ready;

static void signals_on_altstack(void)
{
    stack_t ss;
    if (altstack_ready)
        return;
    altstack_ready = 1;
    if (sigaltstack(NULL, &ss) == 0 && (ss.ss_flags & SS_DISABLE)) {
        void *p = mmap(NULL, ALTSTACK_BYTES, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (p != MAP_FAILED) {
            ss.ss_sp = p;
            ss.ss_size = ALTSTACK_BYTES;
            ss.ss_flags = 0;
            if (sigaltstack(&ss, NULL))
                munmap(p, ALTSTACK_BYTES);
        }
    }
    for (int sig = 1; sig < NSIG; sig++) {
        struct sigaction sa;
        if (sig == SIGKILL || sig == SIGSTOP || sigaction(sig, NULL, &sa))
            continue;
        if (sa.sa_handler != SIG_DFL && sa.sa_handler != SIG_IGN && !(sa.sa_flags & SA_ONSTACK)) {
            sa.sa_flags |= SA_ONSTACK;
            sigaction(sig, &sa, NULL);
        }
    }
}

__attribute__((noinline)) uint64_t dh_gate_call_stack(dh_comp *callee, dh_gate_fn fn,
                                                     void *arg)
{
    if (callee->backend != DH_BACKEND_MPK || !callee->stack)
        return dh_gate_call(callee, fn, arg);
    signals_on_altstack();
    dh_gate_mpks_fn g = mpk_stack_gate(callee);
    if (g)
        return g(fn, arg, callee->stack + callee->stack_size);
    uint32_t saved = rdpkru(); /* no gate wrote PKRU: the general one */
    set_pkru(callee->pkru);
    uint64_t r = call_on_stack(fn, arg, callee->stack + callee->stack_size);
    set_pkru(saved);
    return r;
}

uint32_t dh_gate_pkru(void) { return dh_pkey_available() ? rdpkru() : 0; }

static volatile uint32_t signal_pkru;
static volatile uintptr_t signal_sp;

static void on_test_signal(int sig)
{
    (void)sig;
    signal_pkru = rdpkru();
    signal_sp = (uintptr_t)__builtin_frame_address(0);
}

int dh_gate_test_signal(int sig)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_test_signal;
    sigemptyset(&sa.sa_mask);
    return sigaction(sig, &sa, NULL) ? DH_EIO : 0; /* no SA_ONSTACK: the gate adds it */
}

void dh_gate_test_signal_seen(uint32_t *pkru, uintptr_t *sp)
{
    *pkru = signal_pkru;
    *sp = signal_sp;
}

void *dh_gate_mpk_address(const dh_comp *callee)
{
    return callee->backend == DH_BACKEND_MPK ? (void *)mpk_gate(callee) : NULL;
}

/* ---- probing and reporting faults ------------------------------------------------ */

static __thread sigjmp_buf probe_jmp;
static __thread volatile sig_atomic_t probing;
static __thread volatile int probe_code;

static void on_probe_segv(int sig, siginfo_t *si, void *uc)
{
    (void)sig;
    (void)uc;
    if (probing) {
        probe_code = si->si_code;
        siglongjmp(probe_jmp, 1);
    }
    signal(SIGSEGV, SIG_DFL); /* not a probe: the retried access kills */
}

/* 1 if touching addr faulted; nothing here lives across the longjmp. */
__attribute__((noinline)) static int faulted(volatile uint8_t *p, int write)
{
    if (sigsetjmp(probe_jmp, 1))
        return 1;
    if (write)
        *p = *p;
    else
        (void)*p;
    return 0;
}

int dh_gate_probe(void *addr, int write, int *si_code)
{
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_probe_segv;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &old);
    int pku = dh_pkey_available();
    uint32_t pkru = pku ? rdpkru() : 0;
    probing = 1;
    int rc = faulted(addr, write) ? DH_EACCES : 0;
    probing = 0;
    if (rc) {
        *si_code = probe_code;
        if (pku)
            set_pkru(pkru); /* a signal handler runs with the default PKRU */
    }
    sigaction(SIGSEGV, &old, NULL);
    return rc;
}

static void on_report_segv(int sig, siginfo_t *si, void *uc)
{
    (void)sig;
    (void)uc;
    char buf[96];
    int n = snprintf(buf, sizeof buf, "dh: SIGSEGV si_code=%d addr=%p\n", si->si_code,
                     si->si_addr); /* formatting only: no allocation */
    ssize_t w = write(2, buf, (size_t)n);
    (void)w;
    signal(SIGSEGV, SIG_DFL);
}

void dh_segv_report_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_report_segv;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, NULL);
}

/* ---- benchmarks -------------------------------------------------------------------- */

__attribute__((noinline)) static uint64_t empty(void *arg)
{
    __asm__ volatile("" ::: "memory");
    return (uint64_t)(uintptr_t)arg;
}

static uint64_t (*volatile target)(void *) = empty; /* an indirect call, as a gate makes */

#define SAMPLE(body)                                                         \
    for (size_t s = 0; s < n; s++) {                                         \
        uint64_t t0 = dh_now_ns(), c0 = __rdtsc();                           \
        for (int rep_ = 0; rep_ < BATCH; rep_++) {                           \
            body;                                                            \
        }                                                                    \
        uint64_t c1 = __rdtsc(), t1 = dh_now_ns();                           \
        cycles[s] = c1 - c0; /* for BATCH calls: the caller divides */      \
        ns[s] = t1 - t0;                                                     \
    }

/* What a caller compiled against a compartment does. FlexOS fixes each
 * gate's backend when the image is built (a none gate is a plain call); ours
 * is fixed when the compartment is made, so the call site holds it, and the
 * MPK gate for this caller and callee, rather than choosing them per call. */
static inline __attribute__((always_inline)) uint64_t gate(int backend, dh_gate_mpk_fn light,
                                                           dh_gate_mpks_fn stacked,
                                                           dh_comp *callee, dh_gate_fn fn)
{
    if (backend == DH_BACKEND_NONE)
        return fn(NULL);
    if (stacked)
        return stacked(fn, NULL, callee->stack + callee->stack_size);
    if (light)
        return light(fn, NULL);
    return dh_gate_call(callee, fn, NULL);
}

int dh_bench_gate(dh_comp *callee, int private_stack, uint64_t *cycles, uint64_t *ns, size_t n)
{
    if (private_stack && (callee->backend != DH_BACKEND_MPK || !callee->stack))
        return DH_EINVAL;
    const int backend = callee->backend;
    dh_gate_mpk_fn light = NULL;
    dh_gate_mpks_fn stacked = NULL;
    if (backend == DH_BACKEND_MPK) {
        light = private_stack ? NULL : mpk_gate(callee);
        stacked = private_stack ? mpk_stack_gate(callee) : NULL;
        if (private_stack)
            signals_on_altstack();
        if (!light && !stacked)
            return DH_EINVAL; /* PKRU was written outside the gates */
    }
    /* One loop per backend, each with it as a constant: a call site built
     * for one compartment knows its backend, so it tests nothing per call
     * (a none gate is the plain indirect call its floor makes). */
    switch (backend) {
    case DH_BACKEND_NONE:
        SAMPLE(gate(DH_BACKEND_NONE, NULL, NULL, callee, target))
        break;
    case DH_BACKEND_MPK:
        if (stacked)
            SAMPLE(gate(DH_BACKEND_MPK, NULL, stacked, callee, target))
        else
            SAMPLE(gate(DH_BACKEND_MPK, light, NULL, callee, target))
        break;
    default:
        SAMPLE(gate(backend, NULL, NULL, callee, target))
    }
    return 0;
}

int dh_floor_call(uint64_t *cycles, uint64_t *ns, size_t n)
{
    SAMPLE(target(NULL))
    return 0;
}

int dh_gate_floor_wrpkru_pair(uint64_t *cycles, uint64_t *ns, size_t n)
{
    uint32_t was = rdpkru();
    SAMPLE(set_pkru(was ^ 0xc0000000u); target(NULL); set_pkru(was))
    return 0;
}

int dh_floor_mprotect(dh_comp *a, dh_comp *b, uint64_t *cycles, uint64_t *ns, size_t n)
{
    /* The four calls a round trip between two mprotect compartments makes. */
    SAMPLE(mprotect(a->heap, a->heap_size, PROT_NONE);
           mprotect(b->heap, b->heap_size, PROT_READ | PROT_WRITE);
           target(NULL);
           mprotect(b->heap, b->heap_size, PROT_NONE);
           mprotect(a->heap, a->heap_size, PROT_READ | PROT_WRITE))
    return 0;
}
