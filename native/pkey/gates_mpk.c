/* MPK gates whose rights are immediates (ERIM's and FlexOS's rule): one
 * gate for every pair (caller's PKRU, callee's key), each switching to the
 * callee's rights, calling, and switching back to the caller's, where both
 * PKRU values are constants in the instruction stream. After each WRPKRU
 * the gate compares EAX with the constant and, if they differ, writes the
 * constant again: code that jumps straight to a WRPKRU with a PKRU of its
 * own choosing ends up with the gate's, so the jump gains nothing; and the
 * rights restored on return come from the gate, never from memory the
 * callee could have written.
 *
 * Callers: row 0 is the shared view with every heap open (PKRU 0, after
 * dh_gate_leave_all), rows 1..15 a compartment holding key j (key 0 and j
 * open), row 16 the kernel's default (key 0 only: 0x55555554). Callees:
 * key 1..15. Light gates take (fn, arg); private-stack gates (fn, arg, top)
 * and run fn on the stack whose top is given, 16-byte aligned. */
#include "gates_mpk.h"

/* GNU as macros, expanded for every (row, key): PKRU for a row or key. */
__asm__(
    ".macro DH_PKRU_ROW j\n"
    "  .if \\j == 0\n"
    "    .set dh_back, 0\n"
    "  .elseif \\j == 16\n"
    "    .set dh_back, 0x55555554\n"
    "  .else\n"
    "    .set dh_back, 0xfffffffc & ~(3 << (2 * \\j))\n"
    "  .endif\n"
    ".endm\n"
    /* WRPKRU of the immediate v, checked against the immediate. */
    ".macro DH_SETPKRU v\n"
    "  1: mov $\\v, %eax\n"
    "  xor %ecx, %ecx\n"
    "  xor %edx, %edx\n"
    "  .byte 0x0f, 0x01, 0xef\n" /* wrpkru */
    "  cmp $\\v, %eax\n"
    "  jne 1b\n"
    ".endm\n"
    ".macro DH_GATE j k\n"
    "  DH_PKRU_ROW \\j\n"
    "  .set dh_to, 0xfffffffc & ~(3 << (2 * \\k))\n"
    "  .text\n"
    "  .p2align 4\n"
    "  .hidden dh_gate_mpk_\\j\\()_\\k\n"
    "  .type dh_gate_mpk_\\j\\()_\\k, @function\n"
    "dh_gate_mpk_\\j\\()_\\k:\n"
    "  push %rbx\n"
    "  mov %rdi, %r8\n"
    "  mov %rsi, %r9\n"
    "  DH_SETPKRU dh_to\n"
    "  mov %r9, %rdi\n"
    "  call *%r8\n"
    "  mov %rax, %rbx\n"
    "  DH_SETPKRU dh_back\n"
    "  mov %rbx, %rax\n"
    "  pop %rbx\n"
    "  ret\n"
    "  .size dh_gate_mpk_\\j\\()_\\k, . - dh_gate_mpk_\\j\\()_\\k\n"
    "  .p2align 4\n"
    "  .hidden dh_gate_mpks_\\j\\()_\\k\n"
    "  .type dh_gate_mpks_\\j\\()_\\k, @function\n"
    "dh_gate_mpks_\\j\\()_\\k:\n"
    "  push %rbx\n"
    "  push %rbp\n"
    "  mov %rsp, %rbx\n"
    "  mov %rdi, %r8\n"
    "  mov %rsi, %r9\n"
    "  mov %rdx, %r10\n"
    "  DH_SETPKRU dh_to\n"
    "  mov %r10, %rsp\n"
    "  mov %r9, %rdi\n"
    "  call *%r8\n"
    "  mov %rbx, %rsp\n"
    "  mov %rax, %rbp\n"
    "  DH_SETPKRU dh_back\n"
    "  mov %rbp, %rax\n"
    "  pop %rbp\n"
    "  pop %rbx\n"
    "  ret\n"
    "  .size dh_gate_mpks_\\j\\()_\\k, . - dh_gate_mpks_\\j\\()_\\k\n"
    ".endm\n"
    ".macro DH_ROW_GATES j\n"
    "  .irp k, 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n"
    "    DH_GATE \\j, \\k\n"
    "  .endr\n"
    ".endm\n"
    ".macro DH_ROW_TABLE prefix, j\n"
    "  .quad 0\n"
    "  .irp k, 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n"
    "    .quad \\prefix\\()_\\j\\()_\\k\n"
    "  .endr\n"
    ".endm\n"
    ".irp j, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16\n"
    "  DH_ROW_GATES \\j\n"
    ".endr\n"
    ".section .data.rel.ro, \"aw\"\n"
    ".p2align 3\n"
    ".hidden dh_gate_mpk_table\n"
    ".globl dh_gate_mpk_table\n"
    "dh_gate_mpk_table:\n"
    ".irp j, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16\n"
    "  DH_ROW_TABLE dh_gate_mpk, \\j\n"
    ".endr\n"
    ".hidden dh_gate_mpks_table\n"
    ".globl dh_gate_mpks_table\n"
    "dh_gate_mpks_table:\n"
    ".irp j, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16\n"
    "  DH_ROW_TABLE dh_gate_mpks, \\j\n"
    ".endr\n"
    ".text\n"
    /* dh_gate_test_jump(target, pkru, fn, arg): the frame a light gate has
     * when it reaches its WRPKRU (the saved %rbx, then where its ret goes),
     * fn and arg where it keeps them, and a jump. */
    ".p2align 4\n"
    ".globl dh_gate_test_jump\n"
    ".hidden dh_gate_test_jump\n"
    ".type dh_gate_test_jump, @function\n"
    "dh_gate_test_jump:\n"
    "  push %rbx\n"
    "  push %rbp\n"
    "  push %r12\n"
    "  mov %rdi, %r11\n"
    "  lea 2f(%rip), %rax\n"
    "  push %rax\n"
    "  push %rbx\n"
    "  mov %rdx, %r8\n"
    "  mov %rcx, %r9\n"
    "  mov %esi, %eax\n"
    "  xor %ecx, %ecx\n"
    "  xor %edx, %edx\n"
    "  jmp *%r11\n"
    "2:\n"
    "  pop %r12\n"
    "  pop %rbp\n"
    "  pop %rbx\n"
    "  ret\n"
    ".size dh_gate_test_jump, . - dh_gate_test_jump\n");

int dh_gate_mpk_row(uint32_t pkru)
{
    if (pkru == 0)
        return 0;
    if (pkru == DH_PKRU_DEFAULT)
        return DH_GATE_ROWS - 1;
    for (int j = 1; j < 16; j++)
        if (pkru == DH_PKRU_OF(j))
            return j;
    return -1;
}
