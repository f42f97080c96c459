/* timer: the PC's timer interrupt, end to end - 8254 channel 0 -> 8259 IRQ 0 -> vector 0x30.
 *
 * Run on Machine(irqchip="user") (run_firmware(..., irqchip="user")): pykvm's Python 8259 pair and
 * 8254 (pykvm/devices/userirq.py), the vector injected with KVM_INTERRUPT. The guest:
 *   1. installs IDT gates for vectors 0x30-0x3f (fw_set_interrupt_gate): IRQ 0's handler counts and
 *      sends a non-specific EOI; IR7/IR15 (0x37/0x3f) count spurious interrupts, which get no EOI
 *      (the 8259 set no ISR bit for them); any other IRQ counts as unexpected and is EOId
 *   2. programs both 8259s the way Linux's init_8259A does: ICW1 0x11 (edge, cascade, ICW4),
 *      ICW2 vector base 0x30 / 0x38, ICW3 0x04 (slave on IR2) / 0x02 (cascade identity), ICW4
 *      0x01 (8086 mode, normal EOI); then masks everything but IRQ 0
 *   3. programs 8254 channel 0: control word 0x34 (channel 0, lobyte/hibyte, mode 2 "rate
 *      generator", binary), reload arg[1] (default 1193: 1193182 Hz / 1193 = 1000.15 Hz)
 *   4. `sti` (allowed at CPL3: IOPL=3), writes 1 to the marker port arg[2] (default 0x510) so the
 *      VMM can start its clock, and waits for arg[0] interrupts (default 200):
 *        arg[3] = 0: polling the PIT - channel 2 runs as a stopwatch (mode 2, reload 65536,
 *                    gated by port 0x61 bit 0); the guest latches it (control word 0x80), reads
 *                    the count and counts its reloads (the count going up), so it measures the
 *                    elapsed time in PIT ticks too; every poll is three port exits
 *        arg[3] = 1: a pure `pause` spin with no exits at all, so each interrupt must come from
 *                    the VMM kicking the vCPU out of KVM_RUN at the PIT's deadline
 *        arg[3] = 2: `hlt` in a loop (CPL0 only): KVM_EXIT_HLT, the VMM sleeps until the PIT's
 *                    next deadline and injects
 *      The wait also ends after 10 x arg[0] channel-0 periods (mode 0) or 2^32 spins (mode 1) so a
 *      broken interrupt path reports rather than hangs (mode 2 relies on the VMM's timeout).
 *   `sti` needs IOPL >= CPL. A KVM-PVM host does not keep the IOPL=3 the runtime gives CPL3 code
 *   (firmware/README.md), so there the program must run at CPL0 (run_firmware(cpl=0), emulated:
 *   fine for a few hundred interrupts); at CPL3 with IOPL < 3 it says so and exits 3.
 *   5. `cli`, marker 2, masks IRQ 0, reads the master's ISR (OCW3 0x0b: must be 0, every EOI was
 *      taken) and prints one line:
 *        timer: irq0=N spurious7=A spurious15=B other=C reloads=R ticks=T isr=X
 *      Exit status 0 if N >= arg[0] and A = B = C = X = 0, else 1.
 *
 * The handlers run at CPL0: on a KVM-PVM host every instruction there is emulated (~1 us each), so
 * they are a handful of instructions in assembly, not C (no prologue, no SSE, nothing to save but
 * %rax).
 */
#include "fw.h"

#define VEC_BASE 0x30
#define PIC1_CMD 0x20
#define PIC1_DATA 0x21
#define PIC2_CMD 0xa0
#define PIC2_DATA 0xa1
#define PIT_CH0 0x40
#define PIT_CH2 0x42
#define PIT_CTRL 0x43
#define PORT_61 0x61
#define PIT_HZ 1193182

/* counts[i]: interrupts taken at vector 0x30 + i. Written by the CPL0 handlers. */
volatile uint64_t timer_counts[16];

/* One stub per vector 0x30-0x3f. irq_stub V EOI: count, EOI to the master (and the slave for
 * 0x38-0x3f), iretq. */
#define STUBS                                                                                      \
    STUB(0, 1) STUB(1, 1) STUB(2, 1) STUB(3, 1) STUB(4, 1) STUB(5, 1) STUB(6, 1) STUB(7, 0)        \
    STUB(8, 2) STUB(9, 2) STUB(10, 2) STUB(11, 2) STUB(12, 2) STUB(13, 2) STUB(14, 2) STUB(15, 0)

__asm__(".macro irq_stub n, eoi\n"
        "timer_stub\\n:\n"
        "    pushq %rax\n"
        "    incq timer_counts + 8 * \\n\n"
        "    .if \\eoi == 2\n"
        "    movb $0x20, %al\n"
        "    outb %al, $0xa0\n"        /* non-specific EOI to the slave, then the master */
        "    .endif\n"
        "    .if \\eoi >= 1\n"
        "    movb $0x20, %al\n"
        "    outb %al, $0x20\n"
        "    .endif\n"
        "    popq %rax\n"
        "    iretq\n"
        ".endm\n");

#define STUB(n, eoi) __asm__(".pushsection .text\n irq_stub " #n ", " #eoi "\n.popsection");
STUBS
#undef STUB
#define STUB(n, eoi) extern char timer_stub##n[];
STUBS
#undef STUB

static void (*const stubs[16])(void) = {
#define STUB(n, eoi) (void (*)(void))timer_stub##n,
    STUBS
#undef STUB
};

/* Channel 2, the guest's stopwatch: mode 2 with the largest reload (65536 ticks, 55 ms), counting
 * while port 0x61 bit 0 (GATE2) is set. Polls come far more often than every 55 ms, so a count
 * that went up since the last poll is exactly one reload. */
static uint16_t pit2_read(void)
{
    outb(PIT_CTRL, 0x80); /* counter latch command, channel 2 */
    uint8_t lo = inb(PIT_CH2), hi = inb(PIT_CH2);
    return (uint16_t)(lo | hi << 8);
}

int main(void)
{
    uint64_t want = fw_arg(0, 200), reload = fw_arg(1, 1193), marker = fw_arg(2, 0x510);
    uint64_t mode = fw_arg(3, 0);
    if (reload < 2 || reload > 0xffff) {
        fw_printf("timer: reload %lu out of range\n", reload);
        return 2;
    }
    for (unsigned i = 0; i < 16; i++)
        fw_set_interrupt_gate(VEC_BASE + i, stubs[i]);

    /* The 8259 pair, as Linux's init_8259A. */
    outb(PIC1_DATA, 0xff);
    outb(PIC2_DATA, 0xff);
    outb(PIC1_CMD, 0x11);
    outb(PIC1_DATA, VEC_BASE);
    outb(PIC1_DATA, 0x04);
    outb(PIC1_DATA, 0x01);
    outb(PIC2_CMD, 0x11);
    outb(PIC2_DATA, VEC_BASE + 8);
    outb(PIC2_DATA, 0x02);
    outb(PIC2_DATA, 0x01);
    outb(PIC1_DATA, 0xfe); /* IRQ 0 only */
    outb(PIC2_DATA, 0xff);

    /* 8254 channel 0, mode 2. */
    outb(PIT_CTRL, 0x34);
    outb(PIT_CH0, (uint8_t)reload);
    outb(PIT_CH0, (uint8_t)(reload >> 8));
    /* Channel 2: mode 2, reload 0 (= 65536), GATE2 on, the speaker off. */
    outb(PORT_61, (uint8_t)((inb(PORT_61) & ~0x02) | 0x01));
    outb(PIT_CTRL, 0xb4);
    outb(PIT_CH2, 0);
    outb(PIT_CH2, 0);
    static const char *const how[] = {"polling PIT channel 2", "spinning", "in hlt"};
    fw_printf("timer: PIT channel 0 mode 2, reload %lu (%lu Hz), waiting for %lu interrupts %s "
              "at CPL%u\n", reload, PIT_HZ / reload, want, how[mode > 2 ? 2 : mode], fw_cpl());

    /* `sti` needs CPL <= IOPL. The runtime asks for IOPL=3 at CPL3, but a KVM-PVM host does not
     * keep it (firmware/README.md): there, run this program at CPL0 (run_firmware(cpl=0)). */
    uint64_t rflags;
    __asm__ volatile("pushfq; popq %0" : "=r"(rflags));
    unsigned iopl = (unsigned)(rflags >> 12) & 3;
    if (fw_cpl() > iopl) {
        fw_printf("timer: cannot enable interrupts at CPL%u with IOPL=%u: run at CPL0\n", fw_cpl(),
                  iopl);
        return 3;
    }

    uint64_t reloads = 0, ticks = 0;
    uint16_t first = pit2_read(), prev = first, now = first;
    __asm__ volatile("sti" ::: "memory");
    if (marker)
        outb((uint16_t)marker, 1);
    if (mode == 0) {
        while (timer_counts[0] < want && reloads * 65536 < 10 * want * reload) {
            now = pit2_read();
            if (now > prev)
                reloads++;
            prev = now;
        }
    } else if (mode == 1) {
        for (uint64_t spins = 0; timer_counts[0] < want && spins < (1ull << 32); spins++)
            __asm__ volatile("pause" ::: "memory");
    } else {
        /* hlt with IF=1: the VMM waits for the next interrupt (KVM_EXIT_HLT). CPL0 only. */
        while (timer_counts[0] < want)
            __asm__ volatile("hlt" ::: "memory");
    }
    __asm__ volatile("cli" ::: "memory");
    if (marker)
        outb((uint16_t)marker, 2);
    outb(PIC1_DATA, 0xff);
    if (mode == 0)
        ticks = reloads * 65536 + first - now;

    outb(PIC1_CMD, 0x0b); /* OCW3: read ISR */
    uint8_t isr = inb(PIC1_CMD);
    outb(PIC1_CMD, 0x0a); /* back to IRR */
    uint64_t other = 0;
    for (unsigned i = 1; i < 16; i++)
        if (i != 7 && i != 15)
            other += timer_counts[i];
    fw_printf("timer: irq0=%lu spurious7=%lu spurious15=%lu other=%lu reloads=%lu ticks=%lu "
              "isr=%x\n", timer_counts[0], timer_counts[7], timer_counts[15], other, reloads, ticks,
              isr);
    return timer_counts[0] >= want && !timer_counts[7] && !timer_counts[15] && !other && !isr ? 0
                                                                                                : 1;
}
