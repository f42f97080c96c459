"""Putting a vCPU into the state a guest expects at its first instruction.

A PC's CPU starts in *real mode* (16-bit, segment:offset addressing, no protection). A firmware or
boot loader then switches to *protected mode* (CR0.PE, a GDT), turns on *paging* (CR3, CR0.PG) and,
for 64-bit code, *long mode* (CR4.PAE, EFER.LME, then CR0.PG makes EFER.LMA true) - Intel SDM
Vol. 3A, 9.8 "Initializing IA-32e mode". A VMM can skip that walk: it writes the GDT and page tables
into guest memory itself and sets the control registers with KVM_SET_SREGS, so a Linux kernel starts
directly at its 64-bit entry point (Documentation/arch/x86/boot.rst, "64-bit BOOT PROTOCOL").
"""

from __future__ import annotations

import struct

from . import layout

# CR0 bits (SDM Vol. 3A, 2.5)
CR0_PE = 1 << 0    # protection enable
CR0_MP = 1 << 1
CR0_ET = 1 << 4    # extension type: always 1 on modern CPUs
CR0_NE = 1 << 5    # native x87 error reporting
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_PG = 1 << 31   # paging
# CR4 bits
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
CR4_OSXSAVE = 1 << 18  # XSAVE/XRSTOR and XGETBV/XSETBV usable (SDM Vol. 1, 13.3)
# EFER (MSR 0xc0000080) bits
EFER_SCE = 1 << 0
EFER_LME = 1 << 8  # long mode enable
EFER_LMA = 1 << 10  # long mode active (set by the CPU when paging turns on with LME)
EFER_NXE = 1 << 11

# MSRs (SDM Vol. 4)
MSR_IA32_TSC = 0x10
MSR_IA32_MISC_ENABLE = 0x1a0
MISC_ENABLE_FAST_STRING = 1 << 0
MSR_MTRR_DEF_TYPE = 0x2ff
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_STAR = 0xc0000081
MSR_LSTAR = 0xc0000082
MSR_CSTAR = 0xc0000083
MSR_SYSCALL_MASK = 0xc0000084
MSR_KERNEL_GS_BASE = 0xc0000102

# The boot GDT pykvm writes at layout.BOOT_GDT. Selector = index * 8.
GDT_NULL, GDT_CODE64, GDT_DATA, GDT_TSS = 0, 1, 2, 3
SEL_CODE64 = GDT_CODE64 * 8   # 0x08
SEL_DATA = GDT_DATA * 8       # 0x10
SEL_TSS = GDT_TSS * 8         # 0x18


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Pack a segment descriptor (SDM Vol. 3A, 3.4.5, Figure 3-8).

    `flags` is the 12 bits above the base/limit: access byte (P, DPL, S, type) in bits 0-7 and
    G/D/L/AVL in bits 12-15 (so 0xa09b = present ring-0 code, 64-bit, 4 KiB granularity)."""
    return (((base & 0xff000000) << (56 - 24)) | ((flags & 0x0000f0ff) << 40)
            | ((limit & 0x000f0000) << (48 - 16)) | ((base & 0x00ffffff) << 16)
            | (limit & 0x0000ffff))


BOOT_GDT = [
    gdt_entry(0, 0, 0),                 # null descriptor
    gdt_entry(0xa09b, 0, 0xfffff),      # 64-bit code: P, DPL0, S, execute/read, accessed; G, L
    gdt_entry(0xc093, 0, 0xfffff),      # data: P, DPL0, S, read/write, accessed; G, D/B
    gdt_entry(0x808b, 0, 0xfffff),      # TSS: P, 64-bit busy TSS (KVM requires a usable TR)
]


def segment_from_gdt(entry: int, selector: int) -> dict:
    """The hidden part of a segment register as the CPU caches it after loading `selector`:
    what KVM_SET_SREGS wants (struct kvm_segment)."""
    base = ((entry >> 16) & 0xffffff) | (((entry >> 56) & 0xff) << 24)
    limit = (entry & 0xffff) | (((entry >> 48) & 0xf) << 16)
    g = (entry >> 55) & 1
    return {
        "base": base,
        "limit": (limit << 12) | 0xfff if g else limit,
        "selector": selector,
        "type": (entry >> 40) & 0xf,
        "present": (entry >> 47) & 1,
        "dpl": (entry >> 45) & 3,
        "db": (entry >> 54) & 1,
        "s": (entry >> 44) & 1,
        "l": (entry >> 53) & 1,
        "g": g,
        "avl": (entry >> 52) & 1,
        "unusable": 0,
    }


def _set_segment(seg, values: dict) -> None:
    for k, v in values.items():
        setattr(seg, k, v)


def setup_real_mode(vcpu, cs_selector: int, ip: int, sp: int = 0) -> None:
    """Real mode at cs_selector:ip, as after a reset but with CS pointing where we loaded code.

    In real mode a segment's base is selector * 16 (SDM Vol. 3A, 20.1.1)."""
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        seg.selector = 0
        seg.base = 0
    sregs.cs.selector = cs_selector
    sregs.cs.base = cs_selector << 4
    sregs.cr0 &= ~(CR0_PE | CR0_PG)
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = ip
    regs.rsp = sp
    regs.rflags = 0x2   # bit 1 is reserved and always 1
    vcpu.set_regs(regs)


# The GDT for a 32-bit protected-mode entry (multiboot), also at layout.BOOT_GDT.
GDT32_CODE, GDT32_DATA, GDT32_TSS = 1, 2, 3
BOOT_GDT32 = [
    gdt_entry(0, 0, 0),                 # null descriptor
    gdt_entry(0xc09b, 0, 0xfffff),      # 32-bit code: P, DPL0, S, execute/read, accessed; G, D
    gdt_entry(0xc093, 0, 0xfffff),      # data: P, DPL0, S, read/write, accessed; G, D/B
    gdt_entry(0x808b, 0, 0xfffff),      # TSS: P, 32-bit busy TSS (KVM wants a usable TR)
]


def _boot_tables(vcpu, mem, gdt_entries):
    """Write a GDT of `gdt_entries` and an empty IDT at their layout addresses; return the vCPU's
    sregs with GDTR and IDTR pointing there (the caller sets segments and modes, then set_sregs).
    An empty IDT (limit 0) makes any exception before the guest installs its own a triple fault."""
    gdt = b"".join(struct.pack("<Q", e) for e in gdt_entries)
    mem.write(layout.BOOT_GDT, gdt)
    mem.write_int(layout.BOOT_IDT, 8, 0)
    sregs = vcpu.get_sregs()
    sregs.gdt.base = layout.BOOT_GDT
    sregs.gdt.limit = len(gdt) - 1
    sregs.idt.base = layout.BOOT_IDT
    sregs.idt.limit = 0
    return sregs


def setup_protected_mode(vcpu, mem, *, entry: int, eax: int = 0, ebx: int = 0) -> None:
    """32-bit protected mode with paging off and flat 4 GiB segments, as the Multiboot
    specification's "Machine state" (0.6.96, section 3.2) asks: CS a 32-bit read/execute code
    segment with offset 0 and limit 0xffffffff, DS/ES/FS/GS/SS 32-bit read/write data segments
    likewise, CR0.PG clear and CR0.PE set, EFLAGS.VM and IF clear, EAX/EBX as the caller says.
    The spec lets GDTR and IDTR be invalid; we load a real flat GDT anyway (a kernel that reloads
    a selector before installing its own GDT then still works) and an empty IDT."""
    sregs = _boot_tables(vcpu, mem, BOOT_GDT32)
    _set_segment(sregs.cs, segment_from_gdt(BOOT_GDT32[GDT32_CODE], GDT32_CODE * 8))
    data = segment_from_gdt(BOOT_GDT32[GDT32_DATA], GDT32_DATA * 8)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _set_segment(seg, data)
    _set_segment(sregs.tr, segment_from_gdt(BOOT_GDT32[GDT32_TSS], GDT32_TSS * 8))
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET) & ~CR0_PG
    sregs.cr4 &= ~CR4_PAE
    sregs.efer &= ~(EFER_LME | EFER_LMA)
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = entry
    regs.rax = eax
    regs.rbx = ebx
    regs.rflags = 0x2          # IF and VM clear; bit 1 is reserved and always 1
    vcpu.set_regs(regs)


def setup_long_mode(vcpu, mem, *, entry: int, cr3: int, rsi: int = 0, rsp: int = layout.BOOT_STACK) -> None:
    """64-bit mode with paging on, as the Linux 64-bit boot protocol requires:

    "the kernel is loaded with a GDT that has __BOOT_CS (0x10) execute/read and __BOOT_DS (0x18)
    read/write" - the kernel reloads its own GDT at once, so any flat 64-bit code/data pair works -
    "paging enabled, identity map for the loaded kernel, zero page and command line; %rsi holds
    the zero page's address" (boot.rst, "64-bit BOOT PROTOCOL")."""
    sregs = _boot_tables(vcpu, mem, BOOT_GDT)
    code = segment_from_gdt(BOOT_GDT[GDT_CODE64], SEL_CODE64)
    data = segment_from_gdt(BOOT_GDT[GDT_DATA], SEL_DATA)
    _set_segment(sregs.cs, code)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _set_segment(seg, data)
    _set_segment(sregs.tr, segment_from_gdt(BOOT_GDT[GDT_TSS], SEL_TSS))

    sregs.cr3 = cr3
    sregs.cr4 |= CR4_PAE
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
    sregs.efer |= EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)

    regs = vcpu.get_regs()
    regs.rip = entry
    regs.rsi = rsi
    regs.rsp = rsp
    regs.rbp = rsp
    regs.rflags = 0x2
    vcpu.set_regs(regs)


def boot_msrs() -> dict[int, int]:
    """MSR values a kernel may assume a BIOS left behind (cf. Firecracker arch/x86_64/msr.rs)."""
    return {
        MSR_IA32_SYSENTER_CS: 0,
        MSR_IA32_SYSENTER_ESP: 0,
        MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0,
        MSR_CSTAR: 0,
        MSR_KERNEL_GS_BASE: 0,
        MSR_SYSCALL_MASK: 0,
        MSR_LSTAR: 0,
        MSR_IA32_TSC: 0,
        MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        # MTRRs enabled (bit 11), default memory type write-back (6): without this Linux may map
        # all of RAM uncached.
        MSR_MTRR_DEF_TYPE: (1 << 11) | 6,
    }


def setup_msrs(vcpu) -> None:
    """Set boot_msrs(), skipping any the host's KVM refuses (KVM-PVM supports fewer MSRs)."""
    for index, value in boot_msrs().items():
        try:
            vcpu.set_msrs({index: value})
        except OSError:
            pass


# CPUID leaf 1 ECX bit 31: "a hypervisor is present"; leaf 0x40000000 names it (KVMKVMKVM).
CPUID_1_ECX_HYPERVISOR = 1 << 31


def setup_cpuid(kvm, vcpu) -> None:
    """Give the guest the CPUID KVM supports, with pykvm's choices applied.

    KVM_GET_SUPPORTED_CPUID is already filtered to what KVM can virtualize; we add the hypervisor
    bit and give each vCPU its APIC ID: leaf 1 EBX[31:24] (the initial APIC id), leaves 0xB and
    0x1F EDX (the x2APIC id, SDM Vol. 2A CPUID), AMD's leaf 0x8000001E EAX (the extended APIC id).
    Linux compares them with the MADT's ids when it brings a CPU up. On KVM-PVM hosts the guest's
    CPUID instruction sees the host's values whatever we set here (see pykvm.pvm)."""
    cpuid = kvm.supported_cpuid()
    for i in range(cpuid.nent):
        e = cpuid.entries[i]
        if e.function == 1:
            e.ecx |= CPUID_1_ECX_HYPERVISOR
            e.ebx = (e.ebx & 0x00ffffff) | (vcpu.index << 24)
        elif e.function in (0xB, 0x1F):
            e.edx = vcpu.index
        elif e.function == 0x8000001E:
            e.eax = vcpu.index
    vcpu.set_cpuid(cpuid)
