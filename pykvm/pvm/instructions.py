"""Completing an instruction KVM-PVM's emulator could not: pure functions over the instruction's
bytes and a register dict (`decode`, `effective_address`, `linear_address`, `popcnt`,
`complete_instruction`), tested with no /dev/kvm. The result is a `Completion` that the KVM side
(pykvm/pvm/gaps.py) writes back to the vCPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import iced_x86 as iced

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
