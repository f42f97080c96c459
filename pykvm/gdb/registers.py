"""Registers as gdb sees them: a target description (GDB manual, "Target Descriptions") and the
byte images of the `g`/`p` packets, read from and written to a vCPU (KVM_GET/SET_REGS, _SREGS,
_FPU).

gdb checks an x86 description for the feature `org.gnu.gdb.i386.core` with the general registers,
rip/eip, eflags, the six segment selectors and the x87 state, in that order (gdb's
i386_validate_tdesc_p); `org.gnu.gdb.i386.sse` adds xmm0-15 and mxcsr, and
`org.gnu.gdb.i386.segments` the fs/gs bases. What gdb does not know it still shows by name:
pykvm adds a feature `org.pykvm.x86.sys` with the control registers and EFER, so `p/x $cr3` and
`info registers cr0` work (QEMU offers the same set under its own feature name).

Register numbers are the order of the description; `g` sends them all in that order, each in
target (little-endian) byte order. Two architectures:
- "i386:x86-64": rax..r15, rip, eflags, ...; for any guest, real mode included (gdb then shows
  the low halves as they are: rip in real mode is the IP, and gdb's addresses are linear, as in
  QEMU's stub);
- "i386": eax..edi, eip, ...; for 32-bit guests (multiboot kernels), so gdb disassembles and
  unwinds 32-bit code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

GPR64 = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
GPR32 = ["eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp"]
# kvm_regs field for each i386 name
_GPR32_FIELD = {"eax": "rax", "ebx": "rbx", "ecx": "rcx", "edx": "rdx", "esi": "rsi",
                "edi": "rdi", "ebp": "rbp", "esp": "rsp"}
SEGMENTS = ["cs", "ss", "ds", "es", "fs", "gs"]
X87_CONTROL = ["fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"]
CONTROL = ["cr0", "cr2", "cr3", "cr4", "cr8", "efer"]

_VECTOR_TYPES = """
  <vector id="v4f" type="ieee_single" count="4"/>
  <vector id="v2d" type="ieee_double" count="2"/>
  <vector id="v16i8" type="int8" count="16"/>
  <vector id="v8i16" type="int16" count="8"/>
  <vector id="v4i32" type="int32" count="4"/>
  <vector id="v2i64" type="int64" count="2"/>
  <union id="vec128">
    <field name="v4_float" type="v4f"/>
    <field name="v2_double" type="v2d"/>
    <field name="v16_int8" type="v16i8"/>
    <field name="v8_int16" type="v8i16"/>
    <field name="v4_int32" type="v4i32"/>
    <field name="v2_int64" type="v2i64"/>
    <field name="uint128" type="uint128"/>
  </union>"""


@dataclass(frozen=True)
class Register:
    name: str
    bits: int
    type: str
    feature: str
    get: Callable[["RegisterFile"], int]
    set: Callable[["RegisterFile", int], None] | None = None    # None: writes are ignored

    @property
    def size(self) -> int:
        return self.bits // 8


class RegisterFile:
    """One snapshot of a vCPU's registers (regs, sregs, fpu), read lazily and written back on
    flush(). The gdb stub makes one per stop and drops it on resume."""

    def __init__(self, vcpu):
        self.vcpu = vcpu
        self._regs = self._sregs = self._fpu = None
        self._dirty: set[str] = set()

    @property
    def regs(self):
        if self._regs is None:
            self._regs = self.vcpu.get_regs()
        return self._regs

    @property
    def sregs(self):
        if self._sregs is None:
            self._sregs = self.vcpu.get_sregs()
        return self._sregs

    @property
    def fpu(self):
        if self._fpu is None:
            self._fpu = self.vcpu.get_fpu()
        return self._fpu

    def touch(self, part: str) -> None:
        self._dirty.add(part)

    def flush(self) -> None:
        if "regs" in self._dirty:
            self.vcpu.set_regs(self.regs)
        if "sregs" in self._dirty:
            self.vcpu.set_sregs(self.sregs)
        self._dirty.clear()

    @property
    def linear_pc(self) -> int:
        """Where the CPU fetches next: CS.base + RIP (the two differ in real mode)."""
        return (self.sregs.cs.base + self.regs.rip) & (
            0xFFFFFFFFFFFFFFFF if self.sregs.efer & (1 << 10) else 0xFFFFFFFF)


def _reg_field(name, mask=None):
    def get(rf):
        v = getattr(rf.regs, name)
        return v & mask if mask else v

    def set_(rf, value):
        old = getattr(rf.regs, name)
        setattr(rf.regs, name, (old & ~mask) | (value & mask) if mask else value)
        rf.touch("regs")
    return get, set_


def _sreg_field(name):
    def get(rf):
        return getattr(rf.sregs, name)

    def set_(rf, value):
        setattr(rf.sregs, name, value)
        rf.touch("sregs")
    return get, set_


def _segment(name):
    return lambda rf: getattr(rf.sregs, name).selector


def _base(name):
    def get(rf):
        return getattr(rf.sregs, name).base

    def set_(rf, value):
        getattr(rf.sregs, name).base = value
        rf.touch("sregs")
    return get, set_


def _st(i):
    return lambda rf: int.from_bytes(bytes(rf.fpu.fpr[i])[:10], "little")


def _ftag(rf):
    # KVM keeps the abridged tag (FXSAVE: one bit per register, 1 = valid); gdb wants the full
    # 16-bit tag word (2 bits per register: 00 valid, 11 empty). Valid registers are reported as
    # valid; the finer classes (zero, special) only matter to gdb's display.
    tag = 0
    for i in range(8):
        if not (rf.fpu.ftwx >> i) & 1:
            tag |= 3 << (2 * i)
    return tag


def _x87(name):
    f = {"fctrl": lambda rf: rf.fpu.fcw, "fstat": lambda rf: rf.fpu.fsw, "ftag": _ftag,
         "fiseg": lambda rf: 0, "fioff": lambda rf: rf.fpu.last_ip & 0xFFFFFFFF,
         "foseg": lambda rf: 0, "fooff": lambda rf: rf.fpu.last_dp & 0xFFFFFFFF,
         "fop": lambda rf: rf.fpu.last_opcode}
    return f[name]


def _xmm(i):
    return lambda rf: int.from_bytes(bytes(rf.fpu.xmm[i]), "little")


CORE = "org.gnu.gdb.i386.core"
SSE = "org.gnu.gdb.i386.sse"
SEGS = "org.gnu.gdb.i386.segments"
SYS = "org.pykvm.x86.sys"


def registers(arch: str) -> list[Register]:
    """The register list of `arch` ("i386:x86-64" or "i386"), in gdb's numbering."""
    wide = arch == "i386:x86-64"
    out = []
    if wide:
        for n in GPR64:
            out.append(Register(n, 64, "data_ptr" if n in ("rbp", "rsp") else "int64", CORE,
                                *_reg_field(n)))
        out.append(Register("rip", 64, "code_ptr", CORE, *_reg_field("rip")))
    else:
        for n in GPR32:
            out.append(Register(n, 32, "data_ptr" if n in ("ebp", "esp") else "int32", CORE,
                                *_reg_field(_GPR32_FIELD[n], 0xFFFFFFFF)))
        out.append(Register("eip", 32, "code_ptr", CORE, *_reg_field("rip", 0xFFFFFFFF)))
    out.append(Register("eflags", 32, "int32", CORE, *_reg_field("rflags", 0xFFFFFFFF)))
    for s in SEGMENTS:
        out.append(Register(s, 32, "int32", CORE, _segment(s)))
    for i in range(8):
        out.append(Register(f"st{i}", 80, "i387_ext", CORE, _st(i)))
    for n in X87_CONTROL:
        out.append(Register(n, 32, "int", CORE, _x87(n)))
    for i in range(16 if wide else 8):
        out.append(Register(f"xmm{i}", 128, "vec128", SSE, _xmm(i)))
    out.append(Register("mxcsr", 32, "int", SSE, lambda rf: rf.fpu.mxcsr))
    if wide:
        out.append(Register("fs_base", 64, "int64", SEGS, *_base("fs")))
        out.append(Register("gs_base", 64, "int64", SEGS, *_base("gs")))
    for n in CONTROL:
        out.append(Register(n, 64, "int64", SYS, *_sreg_field(n)))
    return out


def target_xml(arch: str) -> str:
    """The target description gdb reads with qXfer:features:read:target.xml."""
    regs = registers(arch)
    parts = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
             "<target>", f"  <architecture>{arch}</architecture>"]
    feature = None
    for r in regs:
        if r.feature != feature:
            if feature is not None:
                parts.append("  </feature>")
            feature = r.feature
            parts.append(f'  <feature name="{feature}">')
            if feature == SSE:
                parts.append(_VECTOR_TYPES)
        parts.append(f'    <reg name="{r.name}" bitsize="{r.bits}" type="{r.type}"/>')
    parts += ["  </feature>", "</target>"]
    return "\n".join(parts) + "\n"


def encode(reg: Register, rf: RegisterFile) -> str:
    return (reg.get(rf) & ((1 << reg.bits) - 1)).to_bytes(reg.size, "little").hex()


def decode(reg: Register, hex_value: str) -> int:
    return int.from_bytes(bytes.fromhex(hex_value), "little")


__all__ = ["Register", "RegisterFile", "registers", "target_xml", "encode", "decode"]
