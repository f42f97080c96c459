/* modes: the CPU-mode walk, stage by stage, as the runtime made it (runtime/entry.S).
 *
 * entry.S checks each stage as it goes and records what it saw in fw_boot_record; here we check
 * the record again, check what can be checked live in main() (64-bit arithmetic, CS.L in the GDT,
 * a write through the paging alias, the privilege level, port access), and print one line per
 * stage:  "stage N <name>: <what was seen>: ok|FAILED". Exit status: 0 if every stage passed,
 * else the number of the first stage that failed. */
#include "fw.h"

#define CR0_PE 0x1u
#define CR0_PG 0x80000000u
#define CR4_PAE 0x20u
#define EFER_LME 0x100u
#define EFER_LMA 0x400u
#define GDT_L (1ull << 53)
#define GDT_D (1ull << 54)

static int first_failure;

static void stage(int n, const char *name, int ok)
{
    fw_printf(": %s\n", ok ? "ok" : "FAILED");
    if (!ok && !first_failure)
        first_failure = n;
    (void)name;
}

int main(void)
{
    const struct fw_boot_record *r = &fw_boot_record;
    uint16_t cs, ss;
    __asm__ volatile("mov %%cs, %0; mov %%ss, %1" : "=r"(cs), "=r"(ss));

    fw_printf("stage 1 real mode: CR0=%x PE=%u CS=%x", r->real_cr0, r->real_cr0 & CR0_PE, r->real_cs);
    stage(1, "real mode", !(r->real_cr0 & CR0_PE));

    fw_printf("stage 2 protected mode: CR0=%x PE=%u CS=%x (32-bit code)", r->pm_cr0,
              r->pm_cr0 & CR0_PE, r->pm_cs);
    stage(2, "protected mode", (r->pm_cr0 & CR0_PE) && r->pm_cs == FW_SEL_CODE32);

    fw_printf("stage 3 paging: CR0=%x PG=%u CR4=%x PAE=%u, alias write read back %x, %s", r->pg_cr0,
              r->pg_cr0 >> 31, r->pg_cr4, (r->pg_cr4 & CR4_PAE) >> 5, r->pg_probe,
              r->assisted ? "4-level tables (the host refused the guest's own switch; long mode "
                            "entered with the VMM's assist)"
                          : "32-bit PAE tables");
    stage(3, "paging", (r->pg_cr0 & CR0_PG) && (r->pg_cr4 & CR4_PAE) && r->pg_probe == 0x5a5a1234);

    /* Live: a 64-bit shift (REX.W would decode as dec in compatibility mode), the L bit of the
     * descriptor our CS selects, and a write through the alias mapping read back directly. */
    volatile uint64_t big = 1ull << 40;
    uint64_t shifted = big >> 40;
    /* The L bit of the descriptor 64-bit CPL0 code ran on (entry.S recorded CS there). Not our
     * live CS: at CPL3 a KVM-PVM host runs guest code on its own user segments, so CS reads as
     * the host's __USER_CS (0x33), not our 0x2b. */
    uint64_t desc = fw_gdt[(r->lm_cs >> 3) & 7];
    static volatile uint32_t probe;
    probe = 0;
    *(volatile uint32_t *)(FW_ALIAS_BASE + (uint64_t)&probe) = 0xc0ffee;
    fw_printf("stage 4 long mode: EFER=%lx LME=%u LMA=%u CR0=%lx CR4=%lx CS=%lx L=%u D=%u, "
              "64-bit shift %s, alias write read back %x",
              r->lm_efer, (unsigned)(r->lm_efer >> 8) & 1, (unsigned)(r->lm_efer >> 10) & 1,
              r->lm_cr0, r->lm_cr4, r->lm_cs, !!(desc & GDT_L), !!(desc & GDT_D),
              shifted == 1 ? "ok" : "wrong", probe);
    stage(4, "long mode",
          (r->lm_efer & (EFER_LME | EFER_LMA)) == (EFER_LME | EFER_LMA) && (r->lm_cr0 & CR0_PG)
              && r->lm_cs == FW_SEL_CODE64 && (desc & GDT_L) && !(desc & GDT_D) && shifted == 1
              && probe == 0xc0ffee);

    unsigned cpl = cs & 3;
    int want3 = !(fw_args_block->magic == FW_ARGS_MAGIC && (fw_args_block->flags & FW_ARGS_CPL0));
    uint8_t readback = inb(FW_PORT_DEBUG); /* a port read works at CPL3 only if the TSS allows it */
    if (want3) {
        fw_printf("stage 5 CPL3: CS=%x SS=%x CPL=%u%s, port %x readable (read %x)", cs, ss, cpl,
                  cs == FW_SEL_UCODE64 ? "" : " (not our 0x2b: the host's own user segments)",
                  FW_PORT_DEBUG, readback);
        stage(5, "CPL3", cpl == 3 && (ss & 3) == 3);
    } else {
        fw_printf("stage 5 CPL0 (as asked, no drop to CPL3): CS=%x SS=%x CPL=%u", cs, ss, cpl);
        stage(5, "CPL0", cpl == 0);
    }
    fw_printf("modes: %s\n", first_failure ? "a stage FAILED" : "all stages passed");
    return first_failure;
}
