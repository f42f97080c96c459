/* fw.h - the tiny runtime every pykvm firmware program is linked with.
 *
 * A program is a freestanding x86-64 ELF. The VMM loads its PT_LOAD segments at their physical
 * addresses and starts the vCPU in 16-bit real mode at the ELF entry, CS:IP = 0:0x8000 (section
 * .boot16). runtime/entry.S then walks the CPU up the way a PC firmware does (real mode ->
 * protected mode -> PAE paging -> long mode), checking each stage, sets up an IDT, a TSS and
 * user segments, and calls main() at CPL0 or - the default - at CPL3 with IOPL=3, where a KVM-PVM
 * host runs guest code natively instead of emulating it. main()'s return value is written to the
 * exit port.
 *
 * Talking to the VMM (pykvm/x86/layout.py names the same ports):
 *   port 0xE9 (FW_PORT_DEBUG)  each byte written is console output (the Bochs/QEMU debug console)
 *   port 0xF4 (FW_PORT_EXIT)   a 32-bit `out` of the exit status ends the program
 *   port 0xF8 (FW_PORT_ASSIST) mode-switch help from the VMM, on hosts that need it (below)
 *
 * Exit statuses: main()'s return value (keep it below 0x1000), or
 *   FW_STATUS_EXCEPTION | vector   a CPU exception the program did not expect (0x1000 + vector)
 *   FW_STATUS_BOOT | stage         a mode-switch self-check failed in runtime/entry.S (0x2000 + stage)
 *
 * The args block (written by the VMM before the first instruction; pykvm/testing/firmware.py
 * writes it - keep the two in step). Little-endian, at guest-physical FW_ARGS_ADDR = 0x5000:
 *   +0   u32 magic     FW_ARGS_MAGIC ("PKFA"); anything else: defaults (CPL3, no args)
 *   +4   u32 flags     bit 0 FW_ARGS_CPL0: run main() at CPL0 (default: CPL3, IOPL=3)
 *   +8   u32 nargs     how many of arg[] are valid (at most FW_ARGS_MAX)
 *   +12  u32 reserved  0
 *   +16  u64 arg[14]   integer parameters, meaning defined by each program
 *   (128 bytes in all)
 */
#ifndef PYKVM_FW_H
#define PYKVM_FW_H

#define FW_PORT_DEBUG 0xe9
#define FW_PORT_EXIT 0xf4
/* The VMM's mode-switch assist (runtime/entry.S, pm_refused): an `outl` of FW_ASSIST_LONG_MODE
 * asks the VMM to set EFER.LME|LMA and CR0.PG for us, on hosts (KVM-PVM) that refuse the guest's
 * own wrmsr/mov-to-CR0. */
#define FW_PORT_ASSIST 0xf8
#define FW_ASSIST_LONG_MODE 1

#define FW_STATUS_EXCEPTION 0x1000
#define FW_STATUS_BOOT 0x2000

#define FW_ARGS_ADDR 0x5000
#define FW_ARGS_MAGIC 0x41464b50 /* "PKFA" little-endian */
#define FW_ARGS_CPL0 0x1
#define FW_ARGS_MAX 14

/* Boot stages, in order; entry.S exits with FW_STATUS_BOOT | stage when a stage's check fails. */
#define FW_STAGE_REAL 1
#define FW_STAGE_PROTECTED 2
#define FW_STAGE_PAGING 3
#define FW_STAGE_LONG 4
#define FW_STAGE_CPL3 5

/* GDT selectors (runtime/entry.S). */
#define FW_SEL_CODE32 0x08
#define FW_SEL_DATA 0x10
#define FW_SEL_CODE64 0x18
#define FW_SEL_UDATA 0x23 /* index 4, RPL 3 */
#define FW_SEL_UCODE64 0x2b /* index 5, RPL 3 */
#define FW_SEL_TSS 0x30

/* The paging probe: virtual FW_ALIAS_BASE + x maps physical x for x < 2 MiB (a second mapping of
 * the first 2 MiB in both the PAE and the 4-level tables), so a write through the alias that reads
 * back through the identity map proves the page tables are the ones the CPU walks. */
#define FW_ALIAS_BASE 0x40000000

#ifndef __ASSEMBLER__
#include <stdint.h>

struct fw_args {
    uint32_t magic;
    uint32_t flags;
    uint32_t nargs;
    uint32_t reserved;
    uint64_t arg[FW_ARGS_MAX];
};

/* What entry.S saw at each stage, kept for programs like `modes` to report. */
struct fw_boot_record {
    uint32_t real_cr0;      /* CR0 in real mode */
    uint32_t real_cs;       /* CS selector in real mode */
    uint32_t pm_cr0;        /* CR0 after setting PE */
    uint32_t pm_cs;         /* CS selector after the far jump */
    uint32_t pg_cr0;        /* CR0 with PAE paging on */
    uint32_t pg_cr4;        /* CR4 with PAE paging on */
    uint32_t pg_probe;      /* the value read back through the identity map after the alias write */
    uint32_t assisted;      /* 1: long mode was entered with the VMM's assist (FW_PORT_ASSIST) */
    uint64_t lm_cr0, lm_cr4, lm_efer, lm_cs; /* in 64-bit mode, before the IDT/TSS */
};

extern struct fw_boot_record fw_boot_record;
extern const uint64_t fw_gdt[8];   /* the runtime's GDT (selectors above) */
extern const volatile struct fw_args *const fw_args_block;

/* The program's entry point; its return value is the exit status. */
int main(void);

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* Console output on the debug port. */
void fw_putc(char c);
void fw_puts(const char *s);          /* no newline added */
void fw_put_hex(uint64_t v);          /* 0x-prefixed */
void fw_put_dec(uint64_t v);
void fw_printf(const char *fmt, ...); /* %s %c %d %u %x %lx %lu %ld %p %%: enough for tests */

/* End the program with `status` (written to the exit port); never returns. */
__attribute__((noreturn)) void fw_exit(uint32_t status);

/* Arguments from the VMM: the i-th integer parameter, or `dflt` if the VMM gave fewer. */
uint64_t fw_arg(unsigned i, uint64_t dflt);
/* Point IDT entry `vector` at `handler` (a 64-bit interrupt gate, DPL0: the handler runs at CPL0,
 * emulated on KVM-PVM hosts, and must end in iretq; see firmware/timer.c). The IDT is ordinary
 * user-accessible memory here, so CPL3 programs may call this too. */
void fw_set_interrupt_gate(unsigned vector, void (*handler)(void));
/* The current privilege level (CS's low two bits). */
static inline unsigned fw_cpl(void)
{
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return cs & 3;
}
#endif
#endif
