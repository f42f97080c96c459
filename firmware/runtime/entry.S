/* entry.S - from the first real-mode instruction to main().
 *
 * The walk a PC firmware makes (Intel SDM Vol. 3A, 9.9 "Mode switching" and 9.8.5 "Initializing
 * IA-32e mode"), with a self-check at each stage. A failed check writes FW_STATUS_BOOT | stage to
 * the exit port and stops:
 *   1 real mode       CR0.PE is clear
 *   2 protected mode  CR0.PE is set and CS holds our 32-bit code selector
 *   3 paging          PAE paging on: a write through the alias mapping reads back at its
 *                     identity address (so the CPU really walks our tables)
 *   4 long mode       EFER.LMA is set, 64-bit arithmetic works (in compatibility mode REX
 *                     prefixes would decode as inc/dec), the alias probe works in the 4-level tables
 *   5 CPL3            (when main runs in user mode) CS's RPL is 3 after the iretq
 *
 * KVM-PVM note: every instruction before the iretq to CPL3 runs in KVM's instruction emulator
 * (~1 us each), so this file stays short and avoids what that emulator lacks (int3, popcnt,
 * xsave, fwait, SSE). The VMM zeroes .bss when it loads the ELF, so we never clear it here.
 */
#include "fw.h"

#define CR0_PE 0x1
#define CR0_PG 0x80000000
#define CR0_CD 0x40000000
#define CR0_NW 0x20000000
#define CR4_PAE 0x20
#define MSR_EFER 0xc0000080
#define EFER_LME 0x100
#define EFER_LMA 0x400
#define PROBE_VALUE 0x5a5a1234

/* fail STAGE: report a failed boot check (any mode: only uses eax/edx). */
.macro fail stage
    movl $(FW_STATUS_BOOT | \stage), %eax
    movw $FW_PORT_EXIT, %dx
    outl %eax, %dx
    hlt
.endm

/* load_data_segments: every data segment register to the flat data descriptor. Needed after each
 * mode switch: a segment register keeps the descriptor cached when it was loaded (SDM Vol. 3,
 * 3.4.3), so the old mode's segments stay in force until reloaded. In 64-bit mode the CPU
 * ignores the bases and limits of DS, ES and SS; they are loaded anyway, so that no register keeps
 * a stale descriptor from the mode before. */
.macro load_data_segments
    movw $FW_SEL_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
.endm

/* ---------------------------------------------------------------- 16-bit real mode, at 0x8000 */
    .section .boot16, "awx"
    .code16
    .globl _start
_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $0x7ff0, %sp

    movl %cr0, %eax
    movl %eax, fw_boot_record + 0
    movw %cs, %cx
    movzwl %cx, %ecx
    movl %ecx, fw_boot_record + 4
    testl $CR0_PE, %eax
    jz 1f
    fail FW_STAGE_REAL
1:
    /* Protected mode: a GDT, CR0.PE, and a far jump to load CS with a 32-bit code selector.
     * The CPU comes out of reset with caching disabled (CR0.CD, CR0.NW); turn it on as a BIOS
     * does. */
    lgdtl gdt_ptr
    andl $~(CR0_CD | CR0_NW), %eax
    orl $CR0_PE, %eax
    movl %eax, %cr0
    ljmpl $FW_SEL_CODE32, $start32

    .balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
    .balign 8
    .globl fw_boot_record
fw_boot_record:                 /* struct fw_boot_record, filled in as we go */
    .fill 64, 1, 0

/* ---------------------------------------------------------------- 32-bit protected mode, at 1 MiB */
    .section .text.entry, "ax"
    .code32
start32:
    load_data_segments
    movl $kstack_top, %esp

    movl %cr0, %eax
    movl %eax, fw_boot_record + 8
    movw %cs, %cx
    movzwl %cx, %ecx
    movl %ecx, fw_boot_record + 12
    testl $CR0_PE, %eax
    jz 2f
    cmpl $FW_SEL_CODE32, %ecx
    je 1f
2:  fail FW_STAGE_PROTECTED
1:
    /* A #GP handler for the rest of the 32-bit walk: some hosts refuse the architectural way
     * into long mode (see pm_refused below). Its gate is built here because the assembler
     * cannot split a relocated address into the gate's two halves. */
    movl $pm_refused, %eax
    movw %ax, idt32 + 13 * 8
    movw $FW_SEL_CODE32, idt32 + 13 * 8 + 2
    movw $0x8e00, idt32 + 13 * 8 + 4          /* present, DPL0, 32-bit interrupt gate */
    shrl $16, %eax
    movw %ax, idt32 + 13 * 8 + 6
    lidt idt32_ptr

    /* PAE paging (SDM 4.4): CR4.PAE, CR3 -> a 4-entry PDPT, then CR0.PG. */
    movl %cr4, %eax
    orl $CR4_PAE, %eax
    movl %eax, %cr4
    movl $pae_pdpt, %eax
    movl %eax, %cr3
    movl %cr0, %eax
    orl $CR0_PG, %eax
    movl %eax, %cr0
    call check_paging
    /* Long mode (SDM 9.8.5): paging off, CR3 -> PML4, EFER.LME, paging on (the CPU sets
     * EFER.LMA), then a far jump to a code segment with L=1 leaves compatibility mode. */
    movl %cr0, %eax
    andl $~CR0_PG, %eax
    movl %eax, %cr0
    movl $pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    orl $CR0_PG, %eax
    movl %eax, %cr0
    ljmpl $FW_SEL_CODE64, $start64

/* check_paging: stage 3's check, with paging on (PAE, or 4-level in compatibility mode):
 * write through the alias, read back through the identity map. */
check_paging:
    movl %cr0, %eax
    movl %eax, fw_boot_record + 16
    movl %cr4, %eax
    movl %eax, fw_boot_record + 20
    testl $CR0_PG, fw_boot_record + 16
    jz 2f
    movl $0, paging_probe
    movl $PROBE_VALUE, FW_ALIAS_BASE + paging_probe
    movl paging_probe, %eax
    movl %eax, fw_boot_record + 24
    cmpl $PROBE_VALUE, %eax
    jne 2f
    ret
2:  fail FW_STAGE_PAGING

/* pm_refused: #GP from `mov %eax, %cr0` (PG) or `wrmsr` (EFER.LME) above. KVM-PVM hosts do this:
 * their MMU only shadows 4-level tables and they cannot run legacy paging, so the guest cannot
 * switch itself into long mode. We ask the VMM instead: an `outl` of FW_ASSIST_LONG_MODE to
 * FW_PORT_ASSIST makes it set EFER.LME/LMA and CR0.PG with KVM_SET_SREGS, keeping our CR3 and
 * CR4, exactly what the refused instructions would have done; we carry on at the next
 * instruction in compatibility mode. A VMM without the assist leaves CR0.PG clear and
 * check_paging reports stage 3. */
pm_refused:
    movl $kstack_top, %esp                    /* drop the exception frame */
    movl $1, fw_boot_record + 28              /* fw_boot_record.assisted */
    movl %cr0, %eax
    andl $~CR0_PG, %eax
    movl %eax, %cr0
    movl %cr4, %eax
    orl $CR4_PAE, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $FW_ASSIST_LONG_MODE, %eax
    movw $FW_PORT_ASSIST, %dx
    outl %eax, %dx
    call check_paging
    ljmpl $FW_SEL_CODE64, $start64

/* ---------------------------------------------------------------- 64-bit long mode */
    .code64
start64:
    load_data_segments
    movq $kstack_top, %rsp

    movq %cr0, %rax
    movq %rax, fw_boot_record + 32
    movq %cr4, %rax
    movq %rax, fw_boot_record + 40
    movl $MSR_EFER, %ecx
    rdmsr
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, fw_boot_record + 48
    movq %rax, %rbx
    movw %cs, %cx
    movzwq %cx, %rcx
    movq %rcx, fw_boot_record + 56
    testq $EFER_LMA, %rbx
    jz 2f
    cmpq $FW_SEL_CODE64, %rcx
    jne 2f
    movabsq $0x10000000000, %rax        /* 1 << 40: needs REX.W, i.e. 64-bit mode */
    shrq $40, %rax
    cmpq $1, %rax
    jne 2f
    movl $0, paging_probe
    movl $~PROBE_VALUE, FW_ALIAS_BASE + paging_probe
    cmpl $~PROBE_VALUE, paging_probe
    je 1f
2:  fail FW_STAGE_LONG
1:
    call fw_start64                     /* runtime.c: IDT, TSS, then main() at CPL0 or CPL3 */
    fail FW_STAGE_LONG                  /* not reached */

/* fw_enter_user(rip, rsp): iretq to 64-bit CPL3 with IOPL=3 (so `in`/`out` are allowed) and
 * interrupts off. SDM 6.14.3: iretq pops RIP, CS, RFLAGS, RSP, SS. */
    .globl fw_enter_user
fw_enter_user:
    movw $FW_SEL_UDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    pushq $FW_SEL_UDATA
    pushq %rsi
    pushq $0x3002                       /* IOPL=3, IF=0, bit 1 (always 1) */
    pushq $FW_SEL_UCODE64
    pushq %rdi
    iretq

/* First instruction at CPL3. */
    .globl fw_user_start
fw_user_start:
    movw %cs, %ax
    andw $3, %ax
    cmpw $3, %ax
    je 1f
    fail FW_STAGE_CPL3
1:  call main
    movl %eax, %edi
    call fw_exit

/* ---------------------------------------------------------------- exceptions 0-31
 * Each stub makes the frame uniform (a 0 where the CPU pushes no error code), pushes its vector
 * and jumps to the common path, which saves the general registers and calls fw_exception (C). */
.macro isr vec, has_error
isr\vec:
    .if \has_error == 0
    pushq $0
    .endif
    pushq $\vec
    jmp isr_common
.endm

isr_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    call fw_exception                   /* noreturn */
    hlt

    isr 0, 0
    isr 1, 0
    isr 2, 0
    isr 3, 0
    isr 4, 0
    isr 5, 0
    isr 6, 0
    isr 7, 0
    isr 8, 1
    isr 9, 0
    isr 10, 1
    isr 11, 1
    isr 12, 1
    isr 13, 1
    isr 14, 1
    isr 15, 0
    isr 16, 0
    isr 17, 1
    isr 18, 0
    isr 19, 0
    isr 20, 0
    isr 21, 1
    isr 22, 0
    isr 23, 0
    isr 24, 0
    isr 25, 0
    isr 26, 0
    isr 27, 0
    isr 28, 0
    isr 29, 1
    isr 30, 1
    isr 31, 0

    .section .rodata
    .balign 8
    .globl fw_isr_table
fw_isr_table:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad isr\v
    .endr

/* ---------------------------------------------------------------- descriptor tables */
    .data
    .balign 16
    .globl fw_gdt_tss, fw_gdt
gdt:
fw_gdt:
    .quad 0                             /* 0x00 null */
    .quad 0x00cf9b000000ffff            /* 0x08 32-bit code, DPL0: base 0, 4 GiB, D=1 */
    .quad 0x00cf93000000ffff            /* 0x10 data, DPL0 */
    .quad 0x00af9b000000ffff            /* 0x18 64-bit code, DPL0: L=1 */
    .quad 0x00cff3000000ffff            /* 0x20 data, DPL3 (selector 0x23) */
    .quad 0x00affb000000ffff            /* 0x28 64-bit code, DPL3 (selector 0x2b) */
fw_gdt_tss:
    .quad 0, 0                          /* 0x30 64-bit TSS: 16 bytes, filled in by runtime.c */
gdt_end:

/* A word the paging checks write through FW_ALIAS_BASE and read back through the identity map. */
    .balign 4
paging_probe:
    .long 0

/* The 32-bit IDT: only #GP (vector 13) is present, filled in at start32. */
    .balign 8
idt32:
    .fill 14, 8, 0
idt32_ptr:
    .word 14 * 8 - 1
    .long idt32

/* ---------------------------------------------------------------- page tables
 * Identity map of the first 1 GiB with 2 MiB pages, user-accessible and writable (flags 0x87:
 * P, RW, US, PS) so CPL3 code can touch any of it, plus the alias: virtual 1 GiB + x -> x for
 * x < 2 MiB, plus the MMIO hole (3-4 GiB, uncached) so CPL3 programs can drive MMIO devices. The 4-level tables (PML4 -> PDPT) and the PAE table (4-entry PDPT; its entries may
 * only have P set, SDM 4.4.1) share the page directories. */
    .section .data.pagetables, "aw"
    .balign 4096
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd_identity + 0x7
    .quad pd_alias + 0x7
    .quad 0
    .quad pd_mmio + 0x7
    .fill 508, 8, 0
pd_identity:
    .set i, 0
    .rept 512
    .quad (i << 21) | 0x87
    .set i, i + 1
    .endr
pd_alias:
    .quad 0x87
    .fill 511, 8, 0
/* The MMIO hole, 3-4 GiB (pykvm.x86.layout.MMIO_HOLE_START: virtio-mmio at 0xd0000000, PCI BARs),
 * identity-mapped for CPL3 drivers with caching off (flags 0x9f: P, RW, US, PWT, PCD, PS). */
pd_mmio:
    .set i, 0
    .rept 512
    .quad (0xc0000000 + (i << 21)) | 0x9f
    .set i, i + 1
    .endr
pae_pdpt:
    .quad pd_identity + 0x1
    .quad pd_alias + 0x1
    .quad 0
    .quad pd_mmio + 0x1

/* ---------------------------------------------------------------- stacks */
    .bss
    .balign 16
    .globl fw_kstack_top, fw_ustack_top
    .space 16384
kstack_top:
fw_kstack_top:
    .space 16384
fw_ustack_top:
