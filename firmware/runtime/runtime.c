/* runtime.c - the C half of the firmware runtime: IDT and TSS set-up, the jump to main() at
 * CPL0 or CPL3, exception reports, and console output on the debug port. */
#include <stdarg.h>
#include "fw.h"

extern uint64_t fw_gdt_tss[2];
extern const uint64_t fw_isr_table[32];
extern char fw_kstack_top[], fw_ustack_top[];
extern char fw_user_start[];
__attribute__((noreturn)) void fw_enter_user(uint64_t rip, uint64_t rsp);

const volatile struct fw_args *const fw_args_block = (const volatile struct fw_args *)FW_ARGS_ADDR;

/* ---- console ---- */
void fw_putc(char c) { outb(FW_PORT_DEBUG, (uint8_t)c); }

void fw_puts(const char *s)
{
    while (*s)
        fw_putc(*s++);
}

static void put_unsigned(uint64_t v, unsigned base, int min_digits)
{
    char buf[24];
    int n = 0;
    do {
        unsigned d = v % base;
        buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v || n < min_digits);
    while (n)
        fw_putc(buf[--n]);
}

void fw_put_hex(uint64_t v)
{
    fw_puts("0x");
    put_unsigned(v, 16, 1);
}

void fw_put_dec(uint64_t v) { put_unsigned(v, 10, 1); }

void fw_printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            fw_putc(*fmt);
            continue;
        }
        int is_long = 0;
        if (fmt[1] == 'l') {
            is_long = 1;
            fmt++;
        }
        switch (*++fmt) {
        case 's': fw_puts(va_arg(ap, const char *)); break;
        case 'c': fw_putc((char)va_arg(ap, int)); break;
        case 'd': {
            int64_t v = is_long ? va_arg(ap, int64_t) : va_arg(ap, int);
            if (v < 0) {
                fw_putc('-');
                v = -v;
            }
            fw_put_dec((uint64_t)v);
            break;
        }
        case 'u': fw_put_dec(is_long ? va_arg(ap, uint64_t) : va_arg(ap, unsigned)); break;
        case 'x': fw_put_hex(is_long ? va_arg(ap, uint64_t) : va_arg(ap, unsigned)); break;
        case 'p': fw_put_hex((uint64_t)va_arg(ap, void *)); break;
        case '%': fw_putc('%'); break;
        case 0: fmt--; break;
        default: fw_putc('%'); fw_putc(*fmt); break;
        }
    }
    va_end(ap);
}

__attribute__((noreturn)) void fw_exit(uint32_t status)
{
    outl(FW_PORT_EXIT, status);
    /* The VMM stops at the exit port; if it does not, stay here. hlt is privileged, so at CPL3
     * we can only spin. */
    for (;;) {
        if (fw_cpl() == 0)
            __asm__ volatile("cli; hlt");
        else
            __asm__ volatile("pause");
    }
}

uint64_t fw_arg(unsigned i, uint64_t dflt)
{
    const volatile struct fw_args *a = fw_args_block;
    if (a->magic != FW_ARGS_MAGIC || i >= a->nargs || i >= FW_ARGS_MAX)
        return dflt;
    return a->arg[i];
}

/* ---- exceptions ---- */
struct fw_frame {           /* what isr_common leaves on the stack, lowest address first */
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error;
    uint64_t rip, cs, rflags, rsp, ss; /* pushed by the CPU (SDM 6.14.2) */
};

static const char *const exception_names[32] = {
    "#DE divide error", "#DB debug", "NMI", "#BP breakpoint", "#OF overflow", "#BR bound range",
    "#UD invalid opcode", "#NM device not available", "#DF double fault", "coprocessor overrun",
    "#TS invalid TSS", "#NP segment not present", "#SS stack fault", "#GP general protection",
    "#PF page fault", "reserved 15", "#MF x87 error", "#AC alignment check", "#MC machine check",
    "#XM SIMD error", "#VE virtualization", "#CP control protection", "reserved 22", "reserved 23",
    "reserved 24", "reserved 25", "reserved 26", "reserved 27", "#HV hypervisor injection",
    "#VC VMM communication", "#SX security", "reserved 31",
};

/* Called by isr_common at CPL0. One line the VMM can parse, then the distinctive status. */
__attribute__((noreturn)) void fw_exception(struct fw_frame *f)
{
    unsigned v = (unsigned)f->vector & 31;
    uint64_t cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    fw_printf("\nfw: exception %u (%s) at rip=%lx cs=%lx error=%lx cr2=%lx rsp=%lx rflags=%lx\n", v,
              exception_names[v], f->rip, f->cs, f->error, cr2, f->rsp, f->rflags);
    fw_exit(FW_STATUS_EXCEPTION | v);
}

/* ---- descriptor tables ---- */
struct idt_gate {
    uint16_t offset_low, selector;
    uint8_t ist, type_attr;
    uint16_t offset_mid;
    uint32_t offset_high, reserved;
};

/* All 256 vectors: 0-31 are the exception stubs, the rest stay not-present (#NP if raised) until a
 * program installs a handler with fw_set_interrupt_gate. */
static struct idt_gate idt[256] __attribute__((aligned(16)));
static struct { /* 64-bit TSS (SDM 8.7): only RSP0 matters here, the stack for CPL3 -> CPL0 */
    uint32_t reserved0;
    uint64_t rsp[3];
    uint64_t reserved1;
    uint64_t ist[7];
    uint64_t reserved2;
    uint16_t reserved3, iomap_base;
    uint8_t iomap[8192 + 1];    /* I/O permission bitmap: a 0 bit lets CPL3 use that port */
} __attribute__((packed, aligned(16))) tss;

struct __attribute__((packed)) table_ptr {
    uint16_t limit;
    uint64_t base;
};

void fw_set_interrupt_gate(unsigned vector, void (*handler)(void))
{
    uint64_t h = (uint64_t)handler;
    idt[vector & 0xff] = (struct idt_gate){
        .offset_low = (uint16_t)h,
        .selector = FW_SEL_CODE64,
        .ist = 0,
        .type_attr = 0x8e, /* present, DPL0, 64-bit interrupt gate */
        .offset_mid = (uint16_t)(h >> 16),
        .offset_high = (uint32_t)(h >> 32),
    };
}

static void setup_tables(void)
{
    for (int v = 0; v < 32; v++)
        fw_set_interrupt_gate((unsigned)v, (void (*)(void))fw_isr_table[v]);
    /* #BP may be raised from user mode: `int3` checks the gate's DPL against CPL like any `int n`
     * (SDM 6.12.1.1) and a DPL0 gate turns a CPL3 int3 into #GP. Linux makes it a DPL3 "system
     * gate" for the same reason (arch/x86/kernel/idt.c); so do we, so that a debugger's int3 in
     * CPL3 code is a #BP the VMM can intercept (KVM_GUESTDBG_USE_SW_BP). */
    idt[3].type_attr = 0xee;
    struct table_ptr idtr = {sizeof(idt) - 1, (uint64_t)idt};
    __asm__ volatile("lidt %0" ::"m"(idtr));

    tss.rsp[0] = (uint64_t)fw_kstack_top;
    tss.iomap_base = __builtin_offsetof(__typeof__(tss), iomap);
    tss.iomap[8192] = 0xff; /* the byte after the bitmap must have all bits set (SDM 20.5.2) */
    uint64_t base = (uint64_t)&tss, limit = sizeof(tss) - 1;
    fw_gdt_tss[0] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ull << 40) /* P, type 9 */
                    | (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    fw_gdt_tss[1] = base >> 32;
    __asm__ volatile("ltr %w0" ::"r"(FW_SEL_TSS));
}

/* Called by entry.S in 64-bit mode at CPL0 on the kernel stack. */
__attribute__((noreturn)) void fw_start64(void)
{
    setup_tables();
    const volatile struct fw_args *a = fw_args_block;
    int cpl0 = a->magic == FW_ARGS_MAGIC && (a->flags & FW_ARGS_CPL0);
    if (cpl0)
        fw_exit((uint32_t)main());
    fw_enter_user((uint64_t)fw_user_start, (uint64_t)fw_ustack_top);
}

/* ---- what gcc may call even in a freestanding program (struct copies, zeroing) ---- */
void *memset(void *d, int c, unsigned long n)
{
    unsigned char *p = d;
    while (n--)
        *p++ = (unsigned char)c;
    return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
    unsigned char *p = d;
    const unsigned char *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

int memcmp(const void *a, const void *b, unsigned long n)
{
    const unsigned char *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q)
            return *p - *q;
    return 0;
}
