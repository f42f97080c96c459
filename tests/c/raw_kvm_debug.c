/* What this host's KVM does for a debugger, with no pykvm in the way: a few-byte real-mode guest
 * under KVM_SET_GUEST_DEBUG, and a guest's XSETBV. tests/test_raw_kvm_debug.py builds and runs it;
 * in the AMD-V lane it separates what QEMU's TCG does from what pykvm does (docs/kvm-pvm.md,
 * "Single-step and debug"; pykvm/lane/tcg.py). One "name value" line per result:
 *
 *   steps-real N            single steps (KVM_GUESTDBG_SINGLESTEP) over 11 real-mode instructions
 *   steps-real-blockirq N   the same with KVM_GUESTDBG_BLOCKIRQ (what pykvm's gdb stub asks for)
 *   steps-protected N       the same loop in 32-bit protected mode (flat segments, no paging)
 *   int3 exit|guest         a real-mode int3 with KVM_GUESTDBG_USE_SW_BP: a Debug exit, or the
 *                           guest's own IVT[3] handler ran
 *   dr0 exit|none           an execution breakpoint in DR0 (KVM_GUESTDBG_USE_HW_BP) in real mode
 *   xcr0 W K                the guest wrote XCR0 = W with XSETBV; KVM_GET_XCRS then says K
 *
 * Exit status 0 when every ioctl worked (whatever the results), 2 otherwise. */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#define CHECK(x, what) do { if ((x) < 0) { perror(what); exit(2); } } while (0)
#define MEM_SIZE 0x10000
#define CR4_OSXSAVE (1u << 18)

static int vcpu;
static struct kvm_run *run;
static uint8_t *mem;

/* Real mode at 0:rip, segments as after reset but based at 0 (SDM vol. 3A, 9.1.4). */
static void real_mode(uint64_t rip, uint64_t cr4) {
    struct kvm_sregs s;
    CHECK(ioctl(vcpu, KVM_GET_SREGS, &s), "KVM_GET_SREGS");
    struct kvm_segment code = { .limit = 0xffff, .type = 11, .present = 1, .s = 1 };
    struct kvm_segment data = code;
    data.type = 3;
    s.cs = code;
    s.ds = s.es = s.fs = s.gs = s.ss = data;
    s.cr0 &= ~1ull;                               /* CR0.PE off */
    s.cr4 = cr4;
    CHECK(ioctl(vcpu, KVM_SET_SREGS, &s), "KVM_SET_SREGS");
    struct kvm_regs r;
    memset(&r, 0, sizeof r);
    r.rip = rip;
    r.rflags = 2;                                 /* bit 1 is always 1 */
    r.rsp = 0x7000;
    CHECK(ioctl(vcpu, KVM_SET_REGS, &r), "KVM_SET_REGS");
}

static void guest_debug(uint32_t control, uint64_t dr0, uint64_t dr7) {
    struct kvm_guest_debug dbg;
    memset(&dbg, 0, sizeof dbg);
    dbg.control = control;
    dbg.arch.debugreg[0] = dr0;
    dbg.arch.debugreg[7] = dr7;
    CHECK(ioctl(vcpu, KVM_SET_GUEST_DEBUG, &dbg), "KVM_SET_GUEST_DEBUG");
}

/* KVM_RUN until an exit other than Debug (the loop's `out`); the Debug exits on the way. */
static int steps(void) {
    int n = 0;
    for (int i = 0; i < 1000; i++) {
        CHECK(ioctl(vcpu, KVM_RUN, 0), "KVM_RUN");
        if (run->exit_reason != KVM_EXIT_DEBUG)
            return n;
        n++;
    }
    return n;
}

/* mov cx,5; l: dec cx; jnz l; out 0x10,al: 1 + 5 * 2 = 11 instructions before the out exits.
 * (It ends with an out, not hlt: KVM completes a stepped hlt with a Debug exit of its own,
 * kvm_skip_emulated_instruction, and the guest would run on into zeroed memory.) */
static const uint8_t LOOP16[] = { 0xb9, 0x05, 0x00, 0x49, 0x75, 0xfd, 0xe6, 0x10 };
static const uint8_t LOOP32[] = { 0xb9, 0x05, 0x00, 0x00, 0x00, 0x49, 0x75, 0xfd, 0xe6, 0x10 };
/* int3; nop; out 0x10,al - and IVT[3] = 0000:1300, a hlt */
static const uint8_t INT3_16[] = { 0xcc, 0x90, 0xe6, 0x10 };
/* xor ecx,ecx; mov eax,3; xor edx,edx; xsetbv; hlt: XCR0 = x87|SSE (SDM vol. 1, 13.3) */
static const uint8_t XSETBV16[] = { 0x66, 0x31, 0xc9, 0x66, 0xb8, 0x03, 0, 0, 0, 0x66, 0x31, 0xd2,
                                    0x0f, 0x01, 0xd1, 0xf4 };

int main(void) {
    int kvm = open("/dev/kvm", O_RDWR);
    CHECK(kvm, "/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    CHECK(vm, "KVM_CREATE_VM");
    mem = mmap(0, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) { perror("mmap"); return 2; }
    struct kvm_userspace_memory_region region = { .memory_size = MEM_SIZE,
                                                   .userspace_addr = (uint64_t)mem };
    CHECK(ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region), "KVM_SET_USER_MEMORY_REGION");
    vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    CHECK(vcpu, "KVM_CREATE_VCPU");
    int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    CHECK(size, "KVM_GET_VCPU_MMAP_SIZE");
    run = mmap(0, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) { perror("mmap kvm_run"); return 2; }

    /* The CPUID KVM supports, as any VMM gives it: XSETBV needs XSAVE in the guest's CPUID. */
    int nent = 256;
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof *cpuid + nent * sizeof(struct kvm_cpuid_entry2));
    cpuid->nent = nent;
    CHECK(ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid), "KVM_GET_SUPPORTED_CPUID");
    CHECK(ioctl(vcpu, KVM_SET_CPUID2, cpuid), "KVM_SET_CPUID2");

    uint32_t step = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
    memcpy(mem + 0x1000, LOOP16, sizeof LOOP16);
    real_mode(0x1000, 0);
    guest_debug(step, 0, 0);
    printf("steps-real %d\n", steps());

    real_mode(0x1000, 0);
    guest_debug(step | KVM_GUESTDBG_BLOCKIRQ, 0, 0);
    printf("steps-real-blockirq %d\n", steps());

    memcpy(mem + 0x1800, LOOP32, sizeof LOOP32);
    struct kvm_sregs s;
    CHECK(ioctl(vcpu, KVM_GET_SREGS, &s), "KVM_GET_SREGS");
    struct kvm_segment code = { .limit = 0xffffffff, .selector = 8, .type = 11, .present = 1,
                                .db = 1, .s = 1, .g = 1 };
    struct kvm_segment data = code;
    data.type = 3;
    data.selector = 16;
    s.cs = code;
    s.ds = s.es = s.fs = s.gs = s.ss = data;
    s.cr0 |= 1;                                   /* CR0.PE: protected mode, paging off */
    CHECK(ioctl(vcpu, KVM_SET_SREGS, &s), "KVM_SET_SREGS");
    struct kvm_regs r;
    memset(&r, 0, sizeof r);
    r.rip = 0x1800;
    r.rflags = 2;
    r.rsp = 0x7000;
    CHECK(ioctl(vcpu, KVM_SET_REGS, &r), "KVM_SET_REGS");
    guest_debug(step, 0, 0);
    printf("steps-protected %d\n", steps());

    memcpy(mem + 0x1280, INT3_16, sizeof INT3_16);
    mem[0x1300] = 0xf4;                           /* the guest's #BP handler: hlt */
    mem[12] = 0x00; mem[13] = 0x13; mem[14] = 0; mem[15] = 0;
    real_mode(0x1280, 0);
    guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP, 0, 0);
    CHECK(ioctl(vcpu, KVM_RUN, 0), "KVM_RUN");
    int bp_exit = run->exit_reason == KVM_EXIT_DEBUG && run->debug.arch.exception == 3;
    printf("int3 %s\n", bp_exit ? "exit" : run->exit_reason == KVM_EXIT_HLT ? "guest" : "other");

    real_mode(0x1281, 0);                         /* DR0 on the out at 0x1282; DR7.L0, execute */
    guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, 0x1282, 0x1);
    CHECK(ioctl(vcpu, KVM_RUN, 0), "KVM_RUN");
    printf("dr0 %s\n", run->exit_reason == KVM_EXIT_DEBUG ? "exit" : "none");
    guest_debug(0, 0, 0);

    memcpy(mem + 0x1400, XSETBV16, sizeof XSETBV16);
    real_mode(0x1400, CR4_OSXSAVE);
    CHECK(ioctl(vcpu, KVM_RUN, 0), "KVM_RUN");
    if (run->exit_reason != KVM_EXIT_HLT) {
        fprintf(stderr, "the XSETBV guest stopped with exit reason %u, not hlt\n",
                run->exit_reason);
        return 2;
    }
    struct kvm_xcrs xcrs;
    CHECK(ioctl(vcpu, KVM_GET_XCRS, &xcrs), "KVM_GET_XCRS");
    for (unsigned i = 0; i < xcrs.nr_xcrs; i++)
        if (xcrs.xcrs[i].xcr == 0)
            printf("xcr0 3 %llu\n", (unsigned long long)xcrs.xcrs[i].value);
    return 0;
}
