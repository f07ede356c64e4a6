from libc.stdint cimport uint32_t, uint64_t, uintptr_t

cdef extern from "dh_pkey.h" nogil:
    enum:
        DH_BACKEND_NONE
        DH_BACKEND_MPROTECT
        DH_BACKEND_MPK
        DH_GATE_BATCH

    ctypedef struct dh_comp:
        pass
    ctypedef uint64_t (*dh_gate_fn)(void *arg)

    int dh_pkey_available()
    int dh_comp_create(int backend, size_t heap_bytes, size_t stack_bytes, dh_comp **out)
    void dh_comp_destroy(dh_comp *c)
    void *dh_comp_heap(const dh_comp *c)
    size_t dh_comp_heap_size(const dh_comp *c)
    int dh_comp_pkey(const dh_comp *c)
    int dh_gate_enter(dh_comp *c)
    int dh_gate_leave_all()
    uint64_t dh_gate_call(dh_comp *callee, dh_gate_fn fn, void *arg)
    uint64_t dh_gate_call_stack(dh_comp *callee, dh_gate_fn fn, void *arg)
    int dh_gate_probe(void *addr, int write, int *si_code)
    uint32_t dh_gate_pkru()
    void *dh_gate_mpk_address(const dh_comp *callee)
    uint64_t dh_gate_test_jump(void *target, uint32_t pkru, dh_gate_fn fn, void *arg)
    int dh_gate_test_signal(int sig)
    void dh_gate_test_signal_seen(uint32_t *pkru, uintptr_t *sp)
    void dh_segv_report_install()
    int dh_bench_gate(dh_comp *callee, int private_stack, uint64_t *cycles, uint64_t *ns,
                      size_t n)
    int dh_floor_call(uint64_t *cycles, uint64_t *ns, size_t n)
    int dh_gate_floor_wrpkru_pair(uint64_t *cycles, uint64_t *ns, size_t n)
    int dh_floor_mprotect(dh_comp *a, dh_comp *b, uint64_t *cycles, uint64_t *ns, size_t n)
