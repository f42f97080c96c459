"""Build pykvm's binding to the KVM API with cffi in API mode.

API mode compiles a small C extension against the system's own <linux/kvm.h> (Debian: linux-libc-dev),
so every ioctl number and struct layout below is checked by the C compiler against the kernel's
header: `#define KVM_RUN ...` takes the header's value; `...;` in a struct lets the compiler place
the fields we name and fill in the rest. Nothing here hand-copies a number that bakes in a size.

Run by setuptools at install time (setup.py: cffi_modules); `python csrc/build_ffi.py` builds in place.
"""

import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent


def _shared_structs() -> str:
    """struct pykvm_fast_uart and struct pykvm_fast, as csrc/fastpath.h defines them: the one
    definition, which the C loop compiles and Python reads through cffi. Array sizes named by a
    macro become `[...]`: cffi takes them from the compiler."""
    text = (HERE / "fastpath.h").read_text()
    start = text.index("struct pykvm_fast_uart {")
    end = text.index("};", text.index("struct pykvm_fast {")) + 2
    return re.sub(r"\[[A-Z_]+\]", "[...]", text[start:end])

ffibuilder = FFI()

ffibuilder.cdef(r"""
/* ---- ioctl numbers, straight from <linux/kvm.h> ---- */
#define KVM_API_VERSION ...
#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_GET_MSR_INDEX_LIST ...
#define KVM_CREATE_VCPU ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_CREATE_IRQCHIP ...
#define KVM_CREATE_PIT2 ...
#define KVM_IRQ_LINE ...
#define KVM_IRQFD ...
#define KVM_IOEVENTFD ...
#define KVM_SET_CLOCK ...
#define KVM_GET_CLOCK ...
#define KVM_ENABLE_CAP ...
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_GET_FPU ...
#define KVM_SET_FPU ...
#define KVM_GET_MSRS ...
#define KVM_SET_MSRS ...
#define KVM_SET_CPUID2 ...
#define KVM_GET_VCPU_EVENTS ...
#define KVM_SET_VCPU_EVENTS ...
#define KVM_INTERRUPT ...
#define KVM_TRANSLATE ...
#define KVM_GET_LAPIC ...
#define KVM_SET_LAPIC ...
#define KVM_SET_GSI_ROUTING ...
#define KVM_SET_GUEST_DEBUG ...
#define KVM_GET_XSAVE ...
#define KVM_GET_TSC_KHZ ...
#define KVM_ENOSYS ...
#define KVM_PIO_PAGE_OFFSET ...
#define KVM_GET_IRQCHIP ...
#define KVM_SET_IRQCHIP ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_SET_XSAVE ...
/* the rest of a vCPU's and a VM's state, for snapshots (pykvm/snapshot/) */
#define KVM_GET_XCRS ...
#define KVM_SET_XCRS ...
#define KVM_GET_DEBUGREGS ...
#define KVM_SET_DEBUGREGS ...
#define KVM_GET_MP_STATE ...
#define KVM_SET_MP_STATE ...
#define KVM_GET_PIT2 ...
#define KVM_SET_PIT2 ...
#define KVM_IRQCHIP_IOAPIC ...
#define KVM_CLOCK_TSC_STABLE ...
#define KVM_MAX_XCRS ...
#define KVM_MP_STATE_RUNNABLE ...
#define KVM_MP_STATE_HALTED ...
#define KVM_MP_STATE_UNINITIALIZED ...
#define KVM_MP_STATE_INIT_RECEIVED ...

/* ---- capabilities pykvm asks about ---- */
#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_HLT ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_SET_TSS_ADDR ...
#define KVM_CAP_EXT_CPUID ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_CAP_MAX_VCPUS ...
#define KVM_CAP_NR_MEMSLOTS ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_IRQFD ...
#define KVM_CAP_IOEVENTFD ...
#define KVM_CAP_SET_IDENTITY_MAP_ADDR ...
#define KVM_CAP_ADJUST_CLOCK ...
#define KVM_CAP_VCPU_EVENTS ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_SPLIT_IRQCHIP ...
#define KVM_CAP_IRQ_ROUTING ...
#define KVM_CAP_XSAVE ...
#define KVM_CAP_TSC_CONTROL ...
#define KVM_CAP_COALESCED_MMIO ...
#define KVM_CAP_READONLY_MEM ...
#define KVM_CAP_X2APIC_API ...
#define KVM_CAP_MP_STATE ...
#define KVM_CAP_PIT_STATE2 ...
#define KVM_CAP_DEBUGREGS ...
#define KVM_CAP_XCRS ...

/* ---- exit reasons ---- */
#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_NMI ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_IOAPIC_EOI ...
#define KVM_EXIT_X86_RDMSR ...
#define KVM_EXIT_X86_WRMSR ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...
#define KVM_INTERNAL_ERROR_EMULATION ...
#define KVM_INTERNAL_ERROR_SIMUL_EX ...
#define KVM_INTERNAL_ERROR_DELIVERY_EV ...
#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_SYSTEM_EVENT_CRASH ...

#define KVM_MEM_LOG_DIRTY_PAGES ...
#define KVM_MEM_READONLY ...
#define KVM_IRQFD_FLAG_DEASSIGN ...
#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_IOEVENTFD_FLAG_PIO ...
#define KVM_IOEVENTFD_FLAG_DEASSIGN ...
#define KVM_PIT_SPEAKER_DUMMY ...
#define KVM_VCPUEVENT_VALID_NMI_PENDING ...
#define KVM_VCPUEVENT_VALID_SIPI_VECTOR ...
#define KVM_VCPUEVENT_VALID_SHADOW ...
#define KVM_GUESTDBG_ENABLE ...
#define KVM_GUESTDBG_SINGLESTEP ...
#define KVM_GUESTDBG_USE_SW_BP ...
#define KVM_GUESTDBG_USE_HW_BP ...
#define KVM_GUESTDBG_INJECT_BP ...
#define KVM_GUESTDBG_BLOCKIRQ ...
#define KVM_CAP_SET_GUEST_DEBUG ...
#define KVM_CAP_GUEST_DEBUG_HW_BPS ...
#define KVM_CAP_GUEST_DEBUG_HW_WPS ...

/* ---- structures (named fields are checked against the header) ---- */
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx;
    uint64_t rsi, rdi, rsp, rbp;
    uint64_t r8,  r9,  r10, r11;
    uint64_t r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t  type;
    uint8_t  present, dpl, db, s, l, g, avl;
    uint8_t  unusable;
    uint8_t  padding;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    ...;
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    unsigned long long interrupt_bitmap[...];
};

struct kvm_fpu {
    uint8_t  fpr[8][16];
    uint16_t fcw;
    uint16_t fsw;
    uint8_t  ftwx;
    uint16_t last_opcode;
    uint64_t last_ip;
    uint64_t last_dp;
    uint8_t  xmm[16][16];
    uint32_t mxcsr;
    ...;
};

struct kvm_msr_entry {
    uint32_t index;
    uint64_t data;
    ...;
};

struct kvm_msrs {
    uint32_t nmsrs;
    struct kvm_msr_entry entries[];
    ...;
};

struct kvm_msr_list {
    uint32_t nmsrs;
    uint32_t indices[];
};

struct kvm_cpuid_entry2 {
    uint32_t function;
    uint32_t index;
    uint32_t flags;
    uint32_t eax;
    uint32_t ebx;
    uint32_t ecx;
    uint32_t edx;
    ...;
};

struct kvm_cpuid2 {
    uint32_t nent;
    struct kvm_cpuid_entry2 entries[];
    ...;
};

struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct kvm_irq_level {
    uint32_t irq;
    uint32_t level;
};

struct kvm_irqfd {
    uint32_t fd;
    uint32_t gsi;
    uint32_t flags;
    uint32_t resamplefd;
    ...;
};

struct kvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t  fd;
    uint32_t flags;
    ...;
};

struct kvm_pit_config {
    uint32_t flags;
    ...;
};

struct kvm_clock_data {
    uint64_t clock;
    uint32_t flags;
    ...;
};

struct kvm_enable_cap {
    uint32_t cap;
    uint32_t flags;
    unsigned long long args[4];
    ...;
};

struct kvm_interrupt {
    uint32_t irq;
};

struct kvm_translation {
    uint64_t linear_address;
    uint64_t physical_address;
    uint8_t  valid;
    uint8_t  writeable;
    uint8_t  usermode;
    ...;
};

struct kvm_vcpu_events {
    struct {
        uint8_t injected;
        uint8_t nr;
        uint8_t has_error_code;
        uint8_t pending;
        uint32_t error_code;
    } exception;
    struct {
        uint8_t injected;
        uint8_t nr;
        uint8_t soft;
        uint8_t shadow;
    } interrupt;
    struct {
        uint8_t injected;
        uint8_t pending;
        uint8_t masked;
        uint8_t pad;
    } nmi;
    uint32_t sipi_vector;
    uint32_t flags;
    ...;
};

struct kvm_xsave {
    uint32_t region[1024];
    ...;
};

struct kvm_pic_state {
    uint8_t last_irr, irr, imr, isr, priority_add, irq_base, read_reg_select, poll;
    uint8_t special_mask, init_state, auto_eoi, rotate_on_auto_eoi, special_fully_nested_mode;
    uint8_t init4, elcr, elcr_mask;
};

struct kvm_irqchip {
    uint32_t chip_id;
    uint32_t pad;
    union {
        char dummy[512];
        struct kvm_pic_state pic;
        uint64_t align;        /* the header's union also holds kvm_ioapic_state (u64 fields) */
    } chip;
};

struct kvm_lapic_state {
    char regs[...];
};

struct kvm_pit_state2 {
    uint32_t flags;
    ...;
};

struct kvm_debugregs {
    uint64_t db[4];
    uint64_t dr6;
    uint64_t dr7;
    uint64_t flags;
    ...;
};

struct kvm_xcr {
    uint32_t xcr;
    uint64_t value;
    ...;
};

struct kvm_xcrs {
    uint32_t nr_xcrs;
    uint32_t flags;
    struct kvm_xcr xcrs[...];
    ...;
};

struct kvm_mp_state {
    uint32_t mp_state;
};

struct kvm_guest_debug_arch {
    uint64_t debugreg[8];      /* DR0-DR3 addresses, DR6, DR7 (x86 asm/kvm.h) */
};

struct kvm_guest_debug {
    uint32_t control;
    struct kvm_guest_debug_arch arch;
    ...;
};

struct kvm_debug_exit_arch {   /* complete: it sits in kvm_run's anonymous union */
    uint32_t exception;
    uint32_t pad;
    uint64_t pc;
    uint64_t dr6;
    uint64_t dr7;
};

/* The shared page between KVM and the VMM, mmap'ed from the vCPU fd. The exit-specific part is a
   union in the header; we name the members pykvm reads. */
struct kvm_run {
    uint8_t  request_interrupt_window;
    uint8_t  immediate_exit;
    uint32_t exit_reason;
    uint8_t  ready_for_interrupt_injection;
    uint8_t  if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    union {
        struct { uint64_t hardware_exit_reason; } hw;
        struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } fail_entry;
        struct { uint32_t exception; uint32_t error_code; } ex;
        struct { struct kvm_debug_exit_arch arch; } debug;
        struct { uint8_t direction; uint8_t size; uint16_t port; uint32_t count;
                 uint64_t data_offset; } io;
        struct { uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write; } mmio;
        struct { uint32_t suberror; uint32_t ndata; uint64_t data[16]; } internal;
        struct { uint32_t type; uint32_t ndata; uint64_t data[16]; } system_event;
        struct { uint8_t error; uint8_t pad[7]; uint32_t reason; uint32_t index; uint64_t data; } msr;
        ...;
    };
    ...;
};

/* ---- helpers compiled with the module (csrc/kvm_helpers.h) ---- */
long pykvm_ioctl(int fd, unsigned long request, void *arg);
long pykvm_ioctl_int(int fd, unsigned long request, unsigned long arg);
struct pykvm_fast;
struct pykvm_vcpu {
    int fd;
    struct kvm_run *run;
    struct pykvm_fast *fast;
    uint64_t ticks_in_run;
    uint64_t runs;
    uint64_t exits[...];
};
uint64_t pykvm_rdtsc(void);
long pykvm_run(struct pykvm_vcpu *v);

/* csrc/fastpath.h: the C run loop and the device registers it shares with the Python models */
#define PYKVM_FAST_FLUSH ...
#define PYKVM_FAST_OUT_SIZE ...
struct pykvm_vblk;
""" + _shared_structs() + r"""
long pykvm_run_fast(struct pykvm_vcpu *v);
#define PYKVM_FAST_VBLK ...

/* csrc/guest_mem.h, csrc/virtio_blk_fast.h: virtio-blk requests served in C */
#define PYKVM_MEM_REGIONS ...
struct pykvm_mem_region { uint64_t gpa; uint64_t size; uint8_t *host; };
struct pykvm_guest_mem { uint32_t n; struct pykvm_mem_region r[...]; };
uint8_t *pykvm_mem_locate(const struct pykvm_guest_mem *m, uint64_t gpa, uint64_t size);
#define PYKVM_VBLK_NEED_PYTHON ...
#define PYKVM_VBLK_NEED_IRQ ...
#define PYKVM_VBLK_MAX_IOV ...
struct pykvm_vblk {
    uint8_t armed;
    uint64_t mmio_base, mmio_size;
    uint32_t qsize;
    uint64_t desc_addr, avail_addr, used_addr;
    uint16_t last_avail, next_used;
    uint32_t interrupt_status;
    uint8_t irq_level;
    int irqfd;
    int fd;
    uint64_t capacity;
    uint8_t readonly;
    uint8_t indirect;
    uint8_t flush_syncs;
    uint64_t max_request;
    uint64_t merge_max_bytes;
    uint32_t merge_max_buffers;
    struct pykvm_guest_mem mem;
    uint64_t requests, reads, writes, flushes, kicks, fallbacks, interrupts;
    uint32_t need;
    ...;
};
uint32_t pykvm_vblk_notify(struct pykvm_vblk *b);
/* constants the Python side checks against its own (tests/test_virtio_blk_fast.py) */
#define VIRTIO_BLK_T_IN ...
#define VIRTIO_BLK_T_OUT ...
#define VIRTIO_BLK_T_FLUSH ...
#define VIRTIO_BLK_T_GET_ID ...
#define VIRTIO_BLK_S_OK ...
#define VIRTIO_BLK_S_IOERR ...
#define VIRTIO_BLK_S_UNSUPP ...
#define VRING_DESC_F_NEXT ...
#define VRING_DESC_F_WRITE ...
#define VRING_DESC_F_INDIRECT ...
#define VRING_AVAIL_F_NO_INTERRUPT ...
#define VIRTIO_MMIO_QUEUE_NOTIFY ...
#define VIRTIO_MMIO_INTERRUPT_ACK ...
#define VIRTIO_MMIO_INT_VRING ...
/* ---- the host side of virtio-net: tap devices, <linux/if_tun.h> (pykvm/host/tap.py) ---- */
#define TUNSETIFF ...
#define TUNGETFEATURES ...
#define TUNSETVNETHDRSZ ...
#define IFF_TAP ...
#define IFF_NO_PI ...
#define IFF_VNET_HDR ...
#define IFNAMSIZ ...

void *pykvm_mmap_vcpu(int fd, size_t size);
int pykvm_munmap(void *addr, size_t size);
""")

ffibuilder.set_source(
    "pykvm._kvm_cffi",
    '#include "kvm_helpers.h"\n#include <linux/kvm_para.h>\n#include <linux/if_tun.h>\n'
    '#include <net/if.h>\n',
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    # In-place build for development: compile under build/ and drop the extension into pykvm/.
    # Replace it by renaming, never by writing over it: processes still running the old one have it
    # mapped, and rewriting a mapped library in place crashes them.
    import os
    import shutil
    root = HERE.parent
    built = pathlib.Path(ffibuilder.compile(tmpdir=str(root / "build" / "cffi"), verbose=False))
    target = root / "pykvm" / built.name
    shutil.copy(built, target.with_suffix(".tmp"))
    os.replace(target.with_suffix(".tmp"), target)
