/* mbcheck.c - a multiboot kernel that checks what the boot loader gave it, and says so.
 *
 * It prints one line per fact on the debug console (port 0xe9), so the host can compare them with
 * what it passed, and checks what it can on its own (Multiboot 0.6.96, section 3.3 "Boot
 * information format"; 3.2 "Machine state"). It returns, and entry.S writes to isa-debug-exit:
 *   the value of "exit=N" on the command line (default 0) if every check passed, else
 *   0x80 + the number of the first failed check (the CHECK lines below).
 * Command line words it reads: exit=N, mods=N (the number of modules to expect), testdev=1 (check
 * QEMU's pc-testdev scratch register at port 0xe0: a 32-bit write read back 16 bits at a time),
 * bochs=1 (end by writing "Shutdown" to the Bochs port 0x8900 instead of isa-debug-exit).
 *
 * It also reads QEMU's fw_cfg (docs/specs/fw_cfg.rst, legacy I/O at 0x510/0x511): the signature,
 * the CPU count, the RAM size and, if present, the file "opt/pykvm/greeting" - once through the
 * data port and once more through the DMA interface ("Guest-side DMA Interface": a big-endian
 * FWCfgDmaAccess {control, length, address} whose physical address goes to port 0x514/0x518).
 *
 * All of this runs at CPL0, which a KVM-PVM host emulates instruction by instruction: it stays
 * short (a few thousand instructions).
 */
#include <stdint.h>

struct mb_info {               /* 3.3, the fields we use */
    uint32_t flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
    uint32_t syms[4];
    uint32_t mmap_length, mmap_addr;
    uint32_t drives_length, drives_addr, config_table, boot_loader_name;
};
struct mb_module { uint32_t mod_start, mod_end, string, reserved; };
struct mb_mmap { uint32_t size; uint64_t base_addr, length; uint32_t type; } __attribute__((packed));

extern char _start_image[], _end[];

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
/* "memory": the device may read or write RAM (fw_cfg DMA) - no loads or stores move across it */
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline uint16_t inw(uint16_t port) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static void puts_(const char *s) { while (*s) outb(0xe9, (uint8_t)*s++); }
static void hex(uint64_t v)
{
    char buf[19];
    int i = 18;
    buf[i] = 0;
    do { buf[--i] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    puts_(buf + i);
}
static void line(const char *label, uint64_t v) { puts_(label); hex(v); puts_("\n"); }

static int failed;             /* the first failed check, 0 if none */
#define CHECK(n, cond) do { if (!(cond) && !failed) { failed = (n); line("FAIL check ", n); } } while (0)

static uint32_t number(const char *s)
{
    uint32_t v = 0, base = 10;
    if (s[0] == '0' && s[1] == 'x') { base = 16; s += 2; }
    for (;; s++) {
        uint32_t d = (*s >= '0' && *s <= '9') ? *s - '0' : (*s >= 'a' && *s <= 'f') ? *s - 'a' + 10 : 99;
        if (d >= base) return v;
        v = v * base + d;
    }
}
/* The value after "key=" in the command line, or dflt. */
static uint32_t word(const char *cmdline, const char *key, uint32_t dflt)
{
    for (const char *p = cmdline; *p; p++) {
        if (p != cmdline && p[-1] != ' ') continue;
        const char *k = key, *q = p;
        while (*k && *q == *k) { k++; q++; }
        if (!*k && *q == '=') return number(q + 1);
    }
    return dflt;
}

static void fw_cfg_select(uint16_t key) { outw(0x510, key); }
static uint32_t fw_cfg_read(int n)
{
    uint32_t v = 0;
    for (int i = 0; i < n; i++) v |= (uint32_t)inb(0x511) << (8 * i);
    return v;
}
static uint32_t be32(uint32_t v) { return __builtin_bswap32(v); }

struct fw_cfg_dma { uint32_t control, length; uint64_t address; } __attribute__((packed, aligned(16)));
static struct fw_cfg_dma dma;
static char dma_buf[200];

/* Read `size` bytes of item `sel` by DMA into dma_buf; returns the final control word (0: done). */
static uint32_t fw_cfg_dma_read(uint16_t sel, uint32_t size)
{
    dma.control = be32(((uint32_t)sel << 16) | 0x08 | 0x02);      /* select + read */
    dma.length = be32(size);
    dma.address = (uint64_t)be32((uint32_t)dma_buf) << 32;          /* big-endian 64-bit */
    outl(0x514, 0);                                                  /* high half: 0 */
    outl(0x518, be32((uint32_t)&dma));                               /* low half: go */
    return be32(dma.control);
}

static void fw_cfg_report(void)
{
    fw_cfg_select(0x00);
    uint32_t sig = fw_cfg_read(4);
    line("fw_cfg signature ", sig);
    CHECK(20, sig == 0x554d4551);               /* "QEMU" */
    fw_cfg_select(0x05);
    line("fw_cfg cpus ", fw_cfg_read(2));
    fw_cfg_select(0x03);
    uint64_t ram = fw_cfg_read(4);
    ram |= (uint64_t)fw_cfg_read(4) << 32;
    line("fw_cfg ram ", ram);
    fw_cfg_select(0x19);
    uint32_t count = be32(fw_cfg_read(4));
    for (uint32_t i = 0; i < count; i++) {
        uint32_t size = be32(fw_cfg_read(4));
        uint32_t sel = fw_cfg_read(2);
        fw_cfg_read(2);
        char name[56];
        for (int k = 0; k < 56; k++) name[k] = (char)inb(0x511);
        const char *want = "opt/pykvm/greeting";
        int same = 1;
        for (int k = 0; want[k] || name[k]; k++) if (want[k] != name[k]) { same = 0; break; }
        if (same) {
            fw_cfg_select((uint16_t)((sel >> 8) | (sel << 8)));     /* select is big-endian */
            puts_("fw_cfg greeting ");
            for (uint32_t k = 0; k < size && k < 200; k++) outb(0xe9, inb(0x511));
            puts_("\n");
            uint32_t n = size < sizeof(dma_buf) ? size : sizeof(dma_buf);
            uint32_t status = fw_cfg_dma_read((uint16_t)((sel >> 8) | (sel << 8)), n);
            line("fw_cfg dma status ", status);
            CHECK(21, status == 0);
            puts_("fw_cfg dma greeting ");
            for (uint32_t k = 0; k < n; k++) outb(0xe9, (uint8_t)dma_buf[k]);
            puts_("\n");
            return;
        }
    }
}

uint32_t mb_main(uint32_t magic, struct mb_info *info)
{
    uint32_t cr0, eflags;
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    __asm__ volatile("pushfl; popl %0" : "=r"(eflags));
    line("magic ", magic);
    CHECK(1, magic == 0x2BADB002);
    CHECK(2, (cr0 & 1) && !(cr0 & 0x80000000));        /* protected mode, paging off (3.2) */
    CHECK(3, !(eflags & 0x200));                       /* interrupts off */
    line("flags ", info->flags);
    CHECK(4, (info->flags & 0x4d) == 0x4d);            /* mem, cmdline, mods, mmap */

    const char *cmdline = (const char *)info->cmdline;
    puts_("cmdline ");
    puts_(cmdline);
    puts_("\n");
    line("mem_lower ", info->mem_lower);
    line("mem_upper ", info->mem_upper);
    CHECK(5, info->mem_lower >= 512 && info->mem_lower <= 640);

    /* The memory map: entries of size 20 (not counting the size field); one available range
     * must start at 1 MiB, hold this kernel, and agree with mem_upper. */
    int holds_kernel = 0;
    for (uint32_t off = 0; off < info->mmap_length;) {
        struct mb_mmap *e = (struct mb_mmap *)(info->mmap_addr + off);
        puts_("mmap ");
        hex(e->base_addr);
        puts_(" ");
        hex(e->length);
        puts_(" ");
        hex(e->type);
        puts_("\n");
        CHECK(6, e->size == 20);
        if (e->type == 1 && e->base_addr == 0x100000) {
            holds_kernel = e->base_addr + e->length >= (uint32_t)_end;
            CHECK(7, e->length / 1024 == info->mem_upper);
        }
        off += e->size + 4;
    }
    CHECK(8, holds_kernel && (uint32_t)_start_image == 0x100000);

    uint32_t want_mods = word(cmdline, "mods", info->mods_count);
    line("mods ", info->mods_count);
    CHECK(9, info->mods_count == want_mods);
    struct mb_module *m = (struct mb_module *)info->mods_addr;
    for (uint32_t i = 0; i < info->mods_count; i++) {
        uint32_t sum = 0;
        for (uint8_t *p = (uint8_t *)m[i].mod_start; p < (uint8_t *)m[i].mod_end; p++)
            sum = sum * 31 + *p;
        puts_("module ");
        hex(m[i].mod_end - m[i].mod_start);
        puts_(" ");
        hex(sum);
        puts_(" ");
        puts_((const char *)m[i].string);
        puts_("\n");
        CHECK(10, (m[i].mod_start & 0xfff) == 0);                /* we asked: flag 0 */
        CHECK(11, m[i].mod_start >= (uint32_t)_end);              /* not on top of us */
    }
    fw_cfg_report();
    if (word(cmdline, "testdev", 0)) {
        outl(0xe0, 0x12345678);
        uint32_t lo = inw(0xe0), hi = inw(0xe2);
        line("testdev scratch ", (hi << 16) | lo);
        CHECK(12, ((hi << 16) | lo) == 0x12345678);
    }
    puts_(failed ? "mbcheck: FAILED\n" : "mbcheck: all checks passed\n");
    if (!failed && word(cmdline, "bochs", 0))
        for (const char *p = "Shutdown"; *p; p++)
            outb(0x8900, (uint8_t)*p);
    return failed ? 0x80 + failed : word(cmdline, "exit", 0);
}
