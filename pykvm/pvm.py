"""What a KVM-PVM host needs from a VMM: detection, kernel arguments, and completing emulation gaps.

KVM-PVM ("pagetable-based virtual machine", kernel module `kvm_pvm`) gives a /dev/kvm with the normal
API on machines that have no VT-x / AMD-V, typically because they are VMs themselves. Guest CPL3 runs
natively; guest CPL0 is executed instruction by instruction by KVM's x86 emulator (~0.5-1 us each).
Where that emulator has no entry for an instruction, KVM_RUN returns KVM_EXIT_INTERNAL_ERROR with
suberror KVM_INTERNAL_ERROR_EMULATION and RIP still at the instruction (/work/shared/HOST-KVM.md).

This module:

1. tells which kind of host this is: `host_kind()`, and what a user should expect: `host_notice()`;
2. lists the kernel arguments that steer a Linux guest around the gaps: `pvm_kernel_args()`;
3. completes a few gaps in the VMM: `complete_gap(machine, exit)`, registered in
   `machine.internal_error_handlers`. It reads RIP and the segment state, translates RIP with
   KVM_TRANSLATE, reads the instruction bytes from guest memory, decodes them with iced-x86 and does
   what the CPU would have done:

       int3                 RIP += 1, then inject #BP (a trap: the handler sees the next RIP)
       fwait / wait         a no-op (pending x87 exceptions are not modelled)
       ldmxcsr / vldmxcsr   MXCSR <- m32, through KVM_GET/SET_XSAVE (not KVM_GET/SET_FPU: see below)
       stmxcsr / vstmxcsr   m32 <- MXCSR
       clac / stac          RFLAGS.AC <- 0 / 1
       popcnt r, r/m        r <- number of set bits; ZF = (source == 0); OF SF AF CF PF <- 0

   Anything else is left alone (returns False) and `describe_gap()` names it for the VMM's error.

The work is split in two: pure functions over bytes and a register dict (`decode`, `effective_address`,
`linear_address`, `popcnt`, `complete_instruction`), testable with no /dev/kvm; and the KVM side
(`complete_gap`, `describe_gap`, `StuckVmcall`), which only reads the vCPU's state into such a dict
and writes the resulting `Completion` back.

Other things measured here: `fxsave` at CPL0 is not a gap but raises #UD in the guest; KVM_GET_FPU
does not report MXCSR (see _get_xsave); each completed gap costs ~130 us.

Shortcuts, admitted: segment limits and page permissions (a store to a read-only page) are not
checked; a pending unmasked x87 exception does not turn `fwait` into #MF; RFLAGS.TF single-stepping over
a completed instruction does not raise #DB; the VEX forms do not check XCR0. None of these matter to
a Linux kernel booting here.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Callable

import iced_x86 as iced

from .kvm._lib import lib as _lib

# ---------------------------------------------------------------------------------------------
# 1. Which host is this?
# ---------------------------------------------------------------------------------------------

KVM_PVM = "KVM-PVM"
INTEL_VTX = "Intel VT-x"
AMD_V = "AMD-V"
UNKNOWN = "unknown"


def _loaded_modules(sys_module: str, proc_modules: str) -> set[str]:
    names = set()
    try:
        names.update(os.listdir(sys_module))   # loaded modules and built-ins with parameters
    except OSError:
        pass
    try:
        with open(proc_modules) as f:            # absent in some containers
            names.update(line.split(" ", 1)[0] for line in f if line.strip())
    except OSError:
        pass
    return names


def _cpu_flags(cpuinfo: str) -> set[str]:
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return set(value.split())
    except OSError:
        pass
    return set()


def host_kind(sys_module: str = "/sys/module", cpuinfo: str = "/proc/cpuinfo",
              proc_modules: str = "/proc/modules") -> str:
    """What backs /dev/kvm here: "KVM-PVM", "Intel VT-x", "AMD-V" or "unknown".

    KVM has one vendor module at a time (kvm_intel, kvm_amd or kvm_pvm register the same
    kvm_x86_ops), so a loaded module answers first; kvm_pvm wins even on a CPU with vmx/svm, since
    it is then what /dev/kvm drives. Without any of them (KVM not loaded, or /sys hidden in a
    container) the CPU flags say what KVM *would* use. The paths are parameters for tests."""
    modules = _loaded_modules(sys_module, proc_modules)
    if "kvm_pvm" in modules:
        return KVM_PVM
    if "kvm_intel" in modules:
        return INTEL_VTX
    if "kvm_amd" in modules:
        return AMD_V
    flags = _cpu_flags(cpuinfo)
    if "vmx" in flags:
        return INTEL_VTX
    if "svm" in flags:
        return AMD_V
    return UNKNOWN


_PVM_NOTICE = (
    "This host's /dev/kvm is KVM-PVM (no VT-x/AMD-V): guest kernel code (CPL0) is emulated "
    "instruction by instruction, so a Linux boot takes tens of seconds to minutes to reach init; guest user "
    "mode cannot run (a syscall from CPL3 faults), so boots stop at the kernel's \"Run /init\". "
    "pykvm adds kernel arguments that hide CPU features the emulator lacks, and completes a few "
    "instructions it cannot emulate (int3, fwait, ldmxcsr/stmxcsr, clac/stac, popcnt).")


def host_notice(kind: str | None = None) -> str:
    """A paragraph for the CLI to print about what to expect on this host ("" where nothing is odd)."""
    kind = host_kind() if kind is None else kind
    return _PVM_NOTICE if kind == KVM_PVM else ""


# ---------------------------------------------------------------------------------------------
# 2. Kernel arguments for a Linux guest on a KVM-PVM host
# ---------------------------------------------------------------------------------------------

# KVM_SET_CPUID2 is ignored here: the guest's CPUID sees the host's features, and Linux patches
# instructions for them into itself (alternatives). We hide features with arguments instead.
# `clearcpuid=` takes X86_FEATURE_* numbers (word * 32 + bit, arch/x86/include/asm/cpufeatures.h);
# 6.1 takes only numbers, later kernels names too. Words 4, 6, 9 and 16 have kept their numbering.
# Each entry: (feature number, name, why).
_CLEARED_FEATURES: list[tuple[int, str, str]] = [
    # Proven necessary (HOST-KVM.md): without these a 6.1 kernel stops at the first use.
    # complete_gap handles both, but each completion costs ~130 us here (measured: a CPL0 loop of
    # 2000 popcnts, 129 us per iteration against 3.7 us with a mov in its place), the price of
    # some 30 emulated instructions: the kernel's own fallbacks are cheaper.
    (308, "smap", "clac/stac around every user access: not emulated; an exit per copy_from_user"),
    (151, "popcnt", "hweight*() is patched to popcnt: not emulated; __sw_hweight64 is ~20 "
                    "emulated instructions"),
    # Gaps seen here that the VMM does not complete.
    (141, "cx16", "SLUB's this_cpu_cmpxchg_double uses cmpxchg16b: not emulated"),
    # Pre-emptive: instructions KVM's emulator has no entry for, used by a kernel when present.
    (288, "fsgsbase", "rd/wr{fs,gs}base in the entry code and context switch"),
    (298, "invpcid", "invpcid in TLB flushes"),
    (534, "rdpid", "rdpid in the paranoid entry path (with fsgsbase) and getcpu"),
    (158, "rdrand", "rdrand at boot (rdrand self-test, random pool seeding)"),
    (306, "rdseed", "rdseed likewise"),
    (150, "movbe", "movbe in some crypto and checksum routines"),
    (197, "abm", "lzcnt/tzcnt in bitops when compiled for them"),
    # SIMD in the kernel (between kernel_fpu_begin/end): with these visible, a stock kernel picks
    # its SSSE3/SSE4/PCLMUL/AES routines (blake2s for the RNG, CRCs, crypto), whose SSE
    # instructions the emulator does not run (seen: `movd xmm15, ecx` in Debian 6.1 at boot).
    # Hidden, it uses the generic C versions.
    (137, "ssse3", "blake2s_compress_ssse3 and other SSSE3 routines: SSE at CPL0 is not emulated"),
    (147, "sse4_1", "SSE4.1 routines (crc, raid6)"),
    (148, "sse4_2", "crc32 instruction routines (crc32c-intel)"),
    (129, "pclmulqdq", "carry-less multiply CRC and GHASH routines"),
    (153, "aes", "AES-NI routines"),
    (291, "bmi1", "andn/bextr/tzcnt"),
    (296, "bmi2", "shlx/sarx/pdep/pext"),
    # Redundant with `noxsave` (clearing XSAVE clears what depends on it) but harmless; listed so
    # a kernel that ignores noxsave still keeps its FPU code on fxsave/fxrstor.
    (154, "xsave", "xsave/xrstor in FPU context switch: xrstor is not emulated"),
    (155, "osxsave", "follows xsave"),
    (156, "avx", "AVX crypto/raid code needs xsave-managed state"),
    (293, "avx2", "likewise"),
]

# (argument, why). Order is the order on the command line.
_KERNEL_ARGS: list[tuple[str, str]] = [
    ("noxsave", "FPU state via fxsave/fxrstor: xrstor is an emulation gap (0f ae /5)"),
    ("nosmap", "no clac/stac patched into user accesses (same as clearcpuid=308, by name)"),
    ("nofsgsbase", "keep CR4.FSGSBASE off: rd/wr{fs,gs}base are not emulated"),
    ("noinvpcid", "no invpcid instruction in TLB flushes"),
    ("nopcid", "no PCIDs in CR3: PVM shadows the guest's page tables, PCID buys nothing"),
    ("nokaslr", "kernel text at its link address: a gap's RIP reads straight against System.map; "
                "loading the payload decompressed already skips KASLR, this makes it explicit"),
]


def pvm_kernel_args() -> list[str]:
    """Kernel arguments a Linux guest needs on a KVM-PVM host (HOST-KVM.md: this set reached "Run
    /init" with a 6.1 kernel). Harmless on VT-x/AMD-V hosts, but slower there; add them only when
    `host_kind() == "KVM-PVM"`. Each one's reason is in _KERNEL_ARGS / _CLEARED_FEATURES."""
    cleared = ",".join(str(n) for n, _, _ in _CLEARED_FEATURES)
    return [arg for arg, _ in _KERNEL_ARGS] + [f"clearcpuid={cleared}"]


# ---------------------------------------------------------------------------------------------
# 3a. Decoding and operand addresses: pure functions, no KVM
# ---------------------------------------------------------------------------------------------

MAX_INSN = 15                 # the longest x86 instruction (SDM Vol. 2, 2.3.11)
PAGE = 0x1000

# RFLAGS bits (SDM Vol. 1, 3.4.3)
CF, PF, AF, ZF, SF, TF, OF = 1 << 0, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 8, 1 << 11
AC = 1 << 18                  # alignment check / SMAP override
# CR0 / CR4 bits that decide whether SSE state instructions fault (SDM Vol. 2, LDMXCSR)
CR0_EM, CR0_TS, CR0_MP = 1 << 2, 1 << 3, 1 << 1
CR4_OSFXSR = 1 << 9
CR4_OSXSAVE = 1 << 18
# Which MXCSR bits may be set: the CPU's MXCSR_MASK (bytes 28-31 of an FXSAVE/XSAVE image; SDM Vol. 1,
# 11.6.6), or 0xffff if we don't know it (every x86-64 CPU has DAZ). A value with other bits set
# makes ldmxcsr #GP(0) - and KVM_SET_XSAVE refuse it with EINVAL.
MXCSR_MASK = 0xffff

# Exception vectors (SDM Vol. 3A, 6.3.1)
BP, UD, NM, GP, PF_ = 3, 6, 7, 13, 14

GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

_R = iced.Register
_GPR_BY_REG = {getattr(_R, name.upper()): name for name in GPRS}
_SEG_BY_REG = {_R.ES: "es", _R.CS: "cs", _R.SS: "ss", _R.DS: "ds", _R.FS: "fs", _R.GS: "gs"}
_M = iced.Mnemonic
_FORMATTER = iced.Formatter(iced.FormatterSyntax.INTEL)


def decode(code: bytes, rip: int, bitness: int) -> iced.Instruction | None:
    """The instruction at the start of `code` (fetched at RIP `rip`, in a 16/32/64-bit code
    segment), or None if the bytes are not a whole valid instruction."""
    insn = iced.Decoder(bitness, code, ip=rip).decode()
    return None if insn.code == iced.Code.INVALID else insn


def format_instruction(insn: iced.Instruction) -> str:
    return _FORMATTER.format(insn)


def mnemonic(insn: iced.Instruction) -> str:
    return _FORMATTER.format_mnemonic(insn)


def _mask(bits: int) -> int:
    return (1 << bits) - 1


def _reg_value(regs: dict, reg: int) -> int:
    """A general-purpose register's value at its size (eax = low 32 bits of rax, ...)."""
    full = iced.RegisterExt.full_register(reg)
    if full not in _GPR_BY_REG:
        raise ValueError(f"register {reg} is not a general-purpose register")
    return regs[_GPR_BY_REG[full]] & _mask(8 * iced.RegisterExt.size(reg))


def _address_bits(insn: iced.Instruction) -> int:
    """The address size of the memory operand: that of its base or index register, or for a bare
    displacement the displacement's size as iced reports it (8 in 64-bit mode, 4 with a 0x67
    prefix or in 32-bit mode, 2 in 16-bit addressing)."""
    for reg in (insn.memory_base, insn.memory_index):
        if reg != _R.NONE:
            size = iced.RegisterExt.size(reg)
            return 8 * size
    return 8 * insn.memory_displ_size


def effective_address(insn: iced.Instruction, regs: dict) -> int:
    """The offset part of the (first) memory operand: base + index * scale + displacement, modulo
    the address size (SDM Vol. 1, 3.7.5). RIP-relative operands are relative to the *next*
    instruction; iced has added that already, given the `rip` passed to decode()."""
    if insn.is_ip_rel_memory_operand:
        return insn.ip_rel_memory_address
    bits = _address_bits(insn)
    ea = insn.memory_displacement
    if insn.memory_base != _R.NONE:
        ea += _reg_value(regs, insn.memory_base)
    if insn.memory_index != _R.NONE:
        ea += _reg_value(regs, insn.memory_index) * insn.memory_index_scale
    return ea & _mask(bits)


def linear_address(insn: iced.Instruction, regs: dict, bitness: int) -> int:
    """The linear address of the memory operand: segment base + effective address.

    In 64-bit mode the CPU ignores the bases of ES, CS, SS and DS and uses only FS's and GS's
    (SDM Vol. 3A, 3.4.4); `regs["fs_base"]` etc. hold the bases (KVM_GET_SREGS). Outside 64-bit
    mode linear addresses wrap at 4 GiB. Segment limits are not checked."""
    ea = effective_address(insn, regs)
    seg = _SEG_BY_REG.get(insn.memory_segment)
    if bitness == 64:
        base = regs.get(f"{seg}_base", 0) if seg in ("fs", "gs") else 0
        return (base + ea) & _mask(64)
    return (regs.get(f"{seg}_base", 0) + ea) & _mask(32)


def popcnt(value: int, bits: int, rflags: int) -> tuple[int, int]:
    """POPCNT's result and new RFLAGS (SDM Vol. 2B, POPCNT: "OF, SF, ZF, AF, CF, PF are all
    cleared. ZF is set if SRC = 0, otherwise ZF is cleared")."""
    value &= _mask(bits)
    rflags &= ~(OF | SF | ZF | AF | CF | PF)
    if value == 0:
        rflags |= ZF
    return value.bit_count(), rflags


class PageFault(Exception):
    """A linear address that does not translate: becomes #PF for the guest."""

    def __init__(self, linear: int, write: bool):
        super().__init__(f"{'write to' if write else 'read from'} unmapped {linear:#x}")
        self.linear = linear
        self.write = write


@dataclass
class Completion:
    """What completing one instruction does to the vCPU. The KVM side applies it in this order:
    `store` (which may still fault), GPRs and RFLAGS, MXCSR, RIP, then the exception."""

    mnemonic: str
    rip: int                                        # the new RIP
    regs: dict[str, int] = field(default_factory=dict)   # full 64-bit GPR values to write
    rflags: int | None = None
    mxcsr: int | None = None                        # a new MXCSR for the FPU state
    store: tuple[int, bytes] | None = None          # (linear address, bytes) to write
    exception: tuple[int, int | None] | None = None  # (vector, error code) to inject
    cr2: int | None = None                          # for #PF: the faulting linear address

    @property
    def counter_key(self) -> str:
        """The key in machine.stats.pvm_gaps: the mnemonic, plus the fault if one was raised
        instead of completing the instruction ("ldmxcsr #GP")."""
        if self.exception is None or self.exception[0] == BP:
            return self.mnemonic
        names = {UD: "#UD", NM: "#NM", GP: "#GP", PF_: "#PF"}
        return f"{self.mnemonic} {names.get(self.exception[0], self.exception[0])}"


def fault(name: str, rip: int, vector: int, error_code: int | None = None,
          cr2: int | None = None) -> Completion:
    """A fault instead of the instruction: RIP stays, the handler sees the faulting instruction."""
    return Completion(name, rip, exception=(vector, error_code), cr2=cr2)


def page_fault(name: str, rip: int, pf: PageFault, cpl: int = 0) -> Completion:
    # Error code (SDM Vol. 3A, 4.7): P=0 not present, W/R, U/S.
    code = (2 if pf.write else 0) | (4 if cpl == 3 else 0)
    return fault(name, rip, PF_, code, cr2=pf.linear)


_LDMXCSR = {_M.LDMXCSR, _M.VLDMXCSR}
_STMXCSR = {_M.STMXCSR, _M.VSTMXCSR}
_VEX = {_M.VLDMXCSR, _M.VSTMXCSR}
# What complete_instruction handles, for a quick check before reading more vCPU state.
SUPPORTED = {_M.INT3, _M.WAIT, _M.CLAC, _M.STAC, _M.POPCNT} | _LDMXCSR | _STMXCSR


def complete_instruction(insn: iced.Instruction, regs: dict, bitness: int,
                         read_linear: Callable[[int, int], bytes]) -> Completion | None:
    """Work out what the CPU would do for `insn`, or None for an instruction we don't complete.

    regs: "rax".."r15", "rip", "rflags", "cr0", "cr4", "cpl", segment bases "cs_base".."gs_base",
    and "mxcsr" (and optionally "mxcsr_mask") for ldmxcsr/stmxcsr. read_linear(linear, size)
    reads guest memory or raises PageFault."""
    m = insn.mnemonic
    name = mnemonic(insn)
    rip = regs["rip"]
    next_rip = (rip + insn.len) & _mask(bitness)
    rflags = regs["rflags"]

    if m == _M.INT3:
        # A trap: the #BP handler's saved RIP is the instruction after int3 (SDM Vol. 3A, 6.5).
        return Completion(name, next_rip, exception=(BP, None))
    if m == _M.WAIT:
        if regs["cr0"] & CR0_TS and regs["cr0"] & CR0_MP:
            return fault(name, rip, NM)
        return Completion(name, next_rip)
    if m in (_M.CLAC, _M.STAC):
        # Both #UD at CPL > 0, but gaps only happen at CPL0 (CPL3 runs natively).
        return Completion(name, next_rip, rflags=(rflags | AC) if m == _M.STAC else (rflags & ~AC))
    if m in _LDMXCSR or m in _STMXCSR:
        cr0, cr4 = regs["cr0"], regs["cr4"]
        if cr0 & CR0_EM or not cr4 & CR4_OSFXSR or (m in _VEX and not cr4 & CR4_OSXSAVE):
            return fault(name, rip, UD)
        if cr0 & CR0_TS:
            return fault(name, rip, NM)
        addr = linear_address(insn, regs, bitness)
        if m in _STMXCSR:
            stored = (regs["mxcsr"] & 0xffffffff).to_bytes(4, "little")
            return Completion(name, next_rip, store=(addr, stored))
        try:
            value = int.from_bytes(read_linear(addr, 4), "little")
        except PageFault as pf:
            return page_fault(name, rip, pf, regs.get("cpl", 0))
        if value & ~(regs.get("mxcsr_mask") or MXCSR_MASK):
            return fault(name, rip, GP, 0)
        return Completion(name, next_rip, mxcsr=value)
    if m == _M.POPCNT:
        dest = insn.op0_register
        bits = 8 * iced.RegisterExt.size(dest)
        if insn.op1_kind == iced.OpKind.REGISTER:
            src = _reg_value(regs, insn.op1_register)
        else:
            try:
                src = int.from_bytes(read_linear(linear_address(insn, regs, bitness), bits // 8), "little")
            except PageFault as pf:
                return page_fault(name, rip, pf, regs.get("cpl", 0))
        result, new_flags = popcnt(src, bits, rflags)
        full = _GPR_BY_REG[iced.RegisterExt.full_register(dest)]
        return Completion(name, next_rip, regs={full: write_gpr(regs[full], bits, result)},
                          rflags=new_flags)
    return None


def write_gpr(old: int, bits: int, value: int) -> int:
    """A register's full 64-bit value after writing `value` to its low `bits`: a 32-bit write
    zero-extends to 64 bits, 16- and 8-bit writes keep the rest (SDM Vol. 1, 3.4.1.1)."""
    if bits >= 32:
        return value & _mask(bits)
    return (old & ~_mask(bits)) | (value & _mask(bits))


# ---------------------------------------------------------------------------------------------
# 3b. The KVM side: read the vCPU, complete, write back
# ---------------------------------------------------------------------------------------------

def _bitness(sregs) -> int:
    """16, 32 or 64: the code segment's default size (SDM Vol. 3A, 5.2.1; EFER.LMA + CS.L = 64)."""
    if sregs.efer & (1 << 10) and sregs.cs.l:
        return 64
    if sregs.cr0 & 1 and sregs.cs.db:
        return 32
    return 16


def _cpu_regs(vcpu):
    """(kvm_regs, kvm_sregs, the register dict complete_instruction wants, bitness)."""
    r = vcpu.get_regs()
    s = vcpu.get_sregs()
    regs = {name: getattr(r, name) for name in GPRS}
    regs.update(rip=r.rip, rflags=r.rflags, cr0=s.cr0, cr4=s.cr4, cpl=s.cs.selector & 3)
    for seg in ("es", "cs", "ss", "ds", "fs", "gs"):
        regs[f"{seg}_base"] = getattr(s, seg).base
    return r, s, regs, _bitness(s)


def _pages(linear: int, size: int):
    """Split [linear, linear + size) at page boundaries: (linear, length) pieces."""
    while size > 0:
        n = min(size, PAGE - (linear & (PAGE - 1)))
        yield linear, n
        linear += n
        size -= n


def _translate_range(vcpu, mem, linear: int, size: int, write: bool) -> list[tuple[int, int]]:
    """Guest-physical (gpa, length) pieces for a linear range, translating each page separately
    (consecutive virtual pages need not be consecutive in guest-physical memory)."""
    out = []
    for lin, n in _pages(linear, size):
        gpa = vcpu.translate(lin)
        if gpa is None or not mem.contains(gpa, n):
            raise PageFault(lin, write)   # not RAM (MMIO) is treated alike: we cannot complete it
        out.append((gpa, n))
    return out


def read_linear(vcpu, mem, linear: int, size: int) -> bytes:
    """Read guest memory at a linear (virtual) address through the guest's page tables."""
    return b"".join(mem.read(gpa, n) for gpa, n in _translate_range(vcpu, mem, linear, size, False))


def write_linear(vcpu, mem, linear: int, data: bytes) -> None:
    pieces = _translate_range(vcpu, mem, linear, len(data), True)  # all pages first: no half writes
    off = 0
    for gpa, n in pieces:
        mem.write(gpa, data[off:off + n])
        off += n


def _exit_insn_bytes(exit) -> bytes:
    """The instruction bytes KVM itself put in the exit, if any (struct kvm_run.emulation_failure:
    data[0] = flags, bit 0 KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES; then insn_size (one
    byte) and insn_bytes[15] fill data[1] and data[2])."""
    if len(exit.data) < 3 or not exit.data[0] & 1:
        return b""
    raw = exit.data[1].to_bytes(8, "little") + exit.data[2].to_bytes(8, "little")
    return raw[1:1 + min(raw[0], MAX_INSN)]


def _fetch(vcpu, mem, regs: dict, bitness: int, exit) -> bytes:
    """Up to 15 bytes at CS:RIP, stopping at the first page that does not translate. Falls back to
    the bytes in the exit when guest memory cannot be read (e.g. code in a ROM/MMIO region)."""
    rip_linear = (regs["cs_base"] + regs["rip"]) & _mask(64 if bitness == 64 else 32)
    code = b""
    for lin, n in _pages(rip_linear, MAX_INSN):
        gpa = vcpu.translate(lin)
        if gpa is None or not mem.contains(gpa, n):
            break
        code += mem.read(gpa, n)
    return code or _exit_insn_bytes(exit)


@dataclass
class _Gap:
    regs: dict
    bitness: int
    code: bytes
    insn: iced.Instruction | None
    kregs: object
    sregs: object


def _read_gap(machine, exit) -> _Gap:
    kregs, sregs, regs, bitness = _cpu_regs(machine.vcpu)
    code = _fetch(machine.vcpu, machine.mem, regs, bitness, exit)
    return _Gap(regs, bitness, code, decode(code, regs["rip"], bitness) if code else None, kregs, sregs)


_EMULATION_SUBERROR: int | None = None


def _is_emulation_failure(exit) -> bool:
    global _EMULATION_SUBERROR
    if _EMULATION_SUBERROR is None:   # imported late: the pure half of this module needs no binding
        from .kvm._lib import lib
        _EMULATION_SUBERROR = lib.KVM_INTERNAL_ERROR_EMULATION
    return exit.suberror == _EMULATION_SUBERROR


def complete_gap(machine, exit) -> bool:
    """An `internal_error_handlers` entry: complete an instruction KVM-PVM's emulator could not,
    and return True so the run loop goes on; False leaves the exit to the next handler (or to the
    VMM's error message: see describe_gap)."""
    if not _is_emulation_failure(exit):
        return False
    gap = _read_gap(machine, exit)
    if gap.insn is None or gap.insn.mnemonic not in SUPPORTED:
        return False
    vcpu, mem = machine.vcpu, machine.mem
    xsave = None
    if gap.insn.mnemonic in _LDMXCSR or gap.insn.mnemonic in _STMXCSR:
        xsave = _get_xsave(vcpu)
        gap.regs["mxcsr"], gap.regs["mxcsr_mask"] = struct.unpack_from("<II", xsave, _XSAVE_MXCSR)
    done = complete_instruction(gap.insn, gap.regs, gap.bitness,
                                lambda lin, n: read_linear(vcpu, mem, lin, n))
    if done is None:
        return False
    if done.store is not None:
        try:
            write_linear(vcpu, mem, *done.store)
        except PageFault as pf:
            done = page_fault(done.mnemonic, gap.regs["rip"], pf, gap.regs["cpl"])
    _apply(vcpu, gap, done, xsave)
    machine.stats.pvm_gaps[done.counter_key] += 1
    return True


def _apply(vcpu, gap: _Gap, done: Completion, xsave: bytearray | None) -> None:
    r = gap.kregs
    for name, value in done.regs.items():
        setattr(r, name, value)
    if done.rflags is not None:
        r.rflags = done.rflags
    r.rip = done.rip
    vcpu.set_regs(r)
    if done.mxcsr is not None:
        struct.pack_into("<I", xsave, _XSAVE_MXCSR, done.mxcsr)
        # KVM takes MXCSR from the image only if XSTATE_BV says SSE (or FP/YMM) state is present;
        # a fresh vCPU's image has XSTATE_BV = 0 ("all in init state", XMM registers zero, which
        # the image we got holds), so mark SSE present.
        bv, = struct.unpack_from("<Q", xsave, _XSAVE_XSTATE_BV)
        struct.pack_into("<Q", xsave, _XSAVE_XSTATE_BV, bv | _XFEATURE_SSE)
        _set_xsave(vcpu, xsave)
    if done.cr2 is not None:
        # Without KVM_CAP_EXCEPTION_PAYLOAD, userspace sets CR2 itself before injecting #PF.
        gap.sregs.cr2 = done.cr2
        vcpu.set_sregs(gap.sregs)
    if done.exception is not None:
        vcpu.inject_exception(*done.exception)


# ---- MXCSR lives in the XSAVE image ----
#
# KVM_GET_FPU/KVM_SET_FPU look like the place for MXCSR (struct kvm_fpu has an `mxcsr` field) but
# KVM's x86 code never copies it (arch/x86/kvm/x86.c kvm_arch_vcpu_ioctl_get_fpu/set_fpu move the
# x87 registers, control/status words and XMM registers only). Measured here: KVM_GET_FPU reports
# mxcsr 0 on a fresh vCPU whose guest reads 0x1f80 with stmxcsr, and after KVM_SET_FPU with
# mxcsr=0x9fc0 the guest still reads 0x1f80. KVM_GET/SET_XSAVE carry the whole XSAVE image, whose
# legacy area has MXCSR at byte 24 and MXCSR_MASK at 28 (SDM Vol. 1, 13.4.1), XSTATE_BV at 512.
_XSAVE_MXCSR = 24
_XSAVE_XSTATE_BV = 512
_XFEATURE_SSE = 1 << 1


def _get_xsave(vcpu) -> bytearray:
    """The vCPU's XSAVE image (KVM_GET_XSAVE). MXCSR lives there: KVM_GET_FPU/KVM_SET_FPU never
    copy struct kvm_fpu's mxcsr field (seen here, and so in upstream kvm_arch_vcpu_ioctl_get_fpu)."""
    return bytearray(vcpu.get_xsave())


def _set_xsave(vcpu, buf: bytearray) -> None:
    vcpu.set_xsave(bytes(buf))


def describe_gap(machine, exit) -> str:
    """One line for the VMM's error message: where the guest stopped and on what instruction."""
    if not _is_emulation_failure(exit):
        return (f"KVM internal error, suberror {exit.suberror}, data "
                + " ".join(f"{d:#x}" for d in exit.data))
    gap = _read_gap(machine, exit)
    where = f"RIP {gap.regs['rip']:#x} ({gap.bitness}-bit, CPL{gap.regs['cpl']})"
    if gap.insn is None:
        shown = gap.code.hex(" ") or "(unreadable)"
        return f"KVM could not emulate the instruction at {where}: {shown} (undecodable)"
    return (f"KVM could not emulate the instruction at {where}: {gap.code[:gap.insn.len].hex(' ')}"
            f" = {format_instruction(gap.insn)}")


# ---------------------------------------------------------------------------------------------
# 4. The vmcall that never exits
# ---------------------------------------------------------------------------------------------

# include/uapi/linux/kvm_para.h: hypercalls return -KVM_ENOSYS for an unknown number.
KVM_ENOSYS = _lib.KVM_ENOSYS


class StuckVmcall:
    """Unsticks a guest spinning on `vmcall`.

    On KVM-PVM a `vmcall` at CPL0 neither completes nor exits, whatever the hypercall number (seen
    here with 9 = KVM_HC_CLOCK_PAIRING, which Linux's ptp_kvm driver makes at boot, 5 =
    KVM_HC_KICK_CPU and 0x1234): KVM_RUN stays in the kernel, and a kick after 1 s and again after
    2 s finds RIP still on the vmcall and RAX unchanged. The run loop only sees it if something
    kicks the vCPU (Vcpu.kick) periodically; on each resulting Interrupted exit call
    `check(machine)`. If RIP is on a vmcall/vmmcall at two checks in a row, the call is completed
    as an unknown hypercall: RAX = -KVM_ENOSYS, RIP past the instruction (what KVM answers for a
    hypercall it doesn't know; ptp_kvm then gives up and Linux goes on). The heuristic can only
    misfire on a guest that issues the same vmcall again just as each of two kicks lands, and a
    vmcall never returns on this host anyway. pykvm.machine has no hook for Interrupted exits yet;
    until it has, test kernels leave CONFIG_PTP_1588_CLOCK_KVM out (ours does)."""

    def __init__(self):
        self._last_rip: int | None = None

    def check(self, machine) -> bool:
        vcpu = machine.vcpu
        kregs, _sregs, regs, bitness = _cpu_regs(vcpu)
        code = _fetch(vcpu, machine.mem, regs, bitness, _NoExit)
        insn = decode(code, regs["rip"], bitness) if code else None
        if insn is None or insn.mnemonic not in (_M.VMCALL, _M.VMMCALL):
            self._last_rip = None
            return False
        if self._last_rip != regs["rip"]:
            self._last_rip = regs["rip"]
            return False
        self._last_rip = None
        kregs.rax = -KVM_ENOSYS & _mask(64)
        kregs.rip = (regs["rip"] + insn.len) & _mask(bitness)
        vcpu.set_regs(kregs)
        machine.stats.pvm_gaps[mnemonic(insn)] += 1
        return True


class _NoExit:
    data: tuple = ()
