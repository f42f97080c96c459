/* floor.c - the floor for bench/exit_cost.py: the least a VMM can do per port-I/O exit.
 *
 * One vCPU, one memory slot, a bare KVM_RUN loop in C: no device model, no dispatch, no
 * allocation. It loads the same guests the Python paths run - a firmware ELF (firmware/, e.g.
 * exit_storm, entered in real mode at its ELF entry, with the args block and the mode-switch
 * assist of pykvm/testing/firmware.py) or a 64 KiB real-mode BIOS blob (bench/realmode_loop.S,
 * entered at the reset vector F000:FFF0) - and times the exits from the first write to the storm
 * port to the write to the exit port.
 *
 *   floor elf  PATH CPL ITERATIONS STORM_PORT
 *   floor bios PATH 0   ITERATIONS STORM_PORT     (the iteration count is patched into the blob)
 *
 * Prints one line: "count=<storm writes> status=<exit status> ns=<first storm write to exit>".
 * Built by bench/exit_cost.py with the machine's gcc; errors go to stderr with exit status 2.
 */
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (16u << 20)
#define ARGS_ADDR 0x5000
#define ARGS_MAGIC 0x41464b50u
#define PORT_EXIT 0xf4
#define PORT_ASSIST 0xf8
#define BIOS_BASE 0xf0000u
#define BIOS_SIZE 0x10000u

static void die(const char *what)
{
    fprintf(stderr, "floor: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void fail(const char *msg)
{
    fprintf(stderr, "floor: %s\n", msg);
    exit(2);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        die(path);
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    void *buf = malloc(*len);
    if (!buf || fread(buf, 1, *len, f) != *len)
        die("read");
    fclose(f);
    return buf;
}

/* PT_LOAD segments to p_paddr, bounds-checked; returns the entry. */
static uint64_t load_elf(uint8_t *mem, const char *path)
{
    size_t len;
    uint8_t *d = read_file(path, &len);
    Elf64_Ehdr *eh = (Elf64_Ehdr *)d;
    if (len < sizeof(*eh) || memcmp(eh->e_ident, ELFMAG, SELFMAG) || eh->e_machine != EM_X86_64)
        fail("not an x86-64 ELF file");
    for (int i = 0; i < eh->e_phnum; i++) {
        Elf64_Phdr *ph = (Elf64_Phdr *)(d + eh->e_phoff + (size_t)i * eh->e_phentsize);
        if (ph->p_type != PT_LOAD || !ph->p_memsz)
            continue;
        if (ph->p_paddr + ph->p_memsz > MEM_SIZE || ph->p_offset + ph->p_filesz > len)
            fail("segment outside RAM or file");
        memcpy(mem + ph->p_paddr, d + ph->p_offset, ph->p_filesz);
        memset(mem + ph->p_paddr + ph->p_filesz, 0, ph->p_memsz - ph->p_filesz);
    }
    uint64_t entry = eh->e_entry;
    free(d);
    return entry;
}

int main(int argc, char **argv)
{
    if (argc != 6)
        fail("usage: floor elf|bios PATH CPL ITERATIONS STORM_PORT");
    int bios = !strcmp(argv[1], "bios");
    unsigned cpl = (unsigned)atoi(argv[3]);
    uint64_t iterations = strtoull(argv[4], NULL, 0);
    unsigned storm = (unsigned)strtoul(argv[5], NULL, 0);

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfeffd000ul) < 0)
        die("KVM_SET_TSS_ADDR");
    uint64_t idmap = 0xfeffc000ul;
    if (ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &idmap) < 0)
        die("KVM_SET_IDENTITY_MAP_ADDR");
    /* Backed as pykvm's MmapBackend does: private anonymous memory, huge pages advised. */
    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap");
    madvise(mem, MEM_SIZE, MADV_HUGEPAGE);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uint64_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap(vcpu)");

    unsigned cs, ip;
    if (bios) {
        size_t len;
        uint8_t *blob = read_file(argv[2], &len);
        if (len != BIOS_SIZE)
            fail("a BIOS blob must be exactly 64 KiB");
        uint32_t n32 = (uint32_t)iterations;
        memcpy(blob, &n32, 4); /* realmode_loop.S: the iteration count is the blob's first dword */
        memcpy(mem + BIOS_BASE, blob, len);
        free(blob);
        cs = 0xf000, ip = 0xfff0;
    } else {
        uint64_t entry = load_elf(mem, argv[2]);
        uint32_t hdr[4] = {ARGS_MAGIC, cpl == 0 ? 1u : 0u, 2, 0};
        uint64_t args[2] = {iterations, storm};
        memcpy(mem + ARGS_ADDR, hdr, sizeof(hdr));
        memcpy(mem + ARGS_ADDR + 16, args, sizeof(args));
        cs = (unsigned)(entry >> 4) & 0xf000, ip = (unsigned)entry & 0xffff;
    }

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    struct kvm_segment *segs[] = {&sregs.cs, &sregs.ds, &sregs.es, &sregs.fs, &sregs.gs, &sregs.ss};
    for (unsigned i = 0; i < 6; i++)
        segs[i]->selector = 0, segs[i]->base = 0;
    sregs.cs.selector = (uint16_t)cs;
    sregs.cs.base = (uint64_t)cs << 4;
    sregs.cr0 &= ~(1ull | (1ull << 31));
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = ip, .rsp = 0x7ff0, .rflags = 2};
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");

    uint64_t count = 0, t0 = 0, t1 = 0;
    uint32_t status = 0;
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            die("KVM_RUN");
        }
        if (run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "floor: unexpected exit reason %u\n", run->exit_reason);
            return 2;
        }
        uint8_t *data = (uint8_t *)run + run->io.data_offset;
        if (run->io.direction == KVM_EXIT_IO_IN) {
            memset(data, 0xff, (size_t)run->io.size * run->io.count);
            continue;
        }
        unsigned port = run->io.port;
        if (port == storm) {
            if (count++ == 0)
                t0 = now_ns();
        } else if (port == PORT_EXIT) {
            t1 = now_ns();
            memcpy(&status, data, run->io.size < 4 ? run->io.size : 4);
            break;
        } else if (port == PORT_ASSIST && data[0] == 1) {
            /* the firmware's mode-switch assist: EFER.LME|LMA and CR0.PG (firmware.py) */
            if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
                die("KVM_GET_SREGS");
            sregs.efer |= 0x500;
            sregs.cr0 |= 1ull << 31;
            if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
                die("KVM_SET_SREGS");
        }
    }
    printf("count=%llu status=%u ns=%llu\n", (unsigned long long)count, status,
           (unsigned long long)(count ? t1 - t0 : 0));
    return 0;
}
