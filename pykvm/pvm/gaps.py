"""The KVM side of completing emulation gaps: read the vCPU's state into the register dict
pykvm/pvm/instructions.py works on, complete, write the `Completion` back; name a gap we cannot
complete (`describe_gap`); unstick a guest spinning on `vmcall` (`StuckVmcall`).
"""

from __future__ import annotations

import struct
import weakref
from dataclasses import dataclass

import iced_x86 as iced

from .instructions import (GPRS, MAX_INSN, PAGE, SUPPORTED, _LDMXCSR, _M, _STMXCSR, Completion,
                           PageFault, _mask, complete_instruction, decode, format_instruction,
                           mnemonic, page_fault)


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


def _is_emulation_failure(exit) -> bool:
    # Vcpu decodes the suberror (KVM_INTERNAL_ERROR_EMULATION) into this flag (pykvm.kvm.exits).
    return exit.emulation


def complete_gap(machine, exit) -> bool:
    """An `internal_error_handlers` entry: complete an instruction KVM-PVM's emulator could not,
    and return True so the run loop goes on; False leaves the exit to the next handler (or to the
    VMM's error message: see describe_gap)."""
    if not _is_emulation_failure(exit):
        return False
    gap = _read_gap(machine, exit)
    vcpu, mem = machine.vcpu, machine.mem
    if gap.insn is None or gap.insn.mnemonic not in SUPPORTED:
        return _retry_once(machine, gap)
    _retried.pop(vcpu, None)
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


# ---- code rewritten between KVM's fetch and ours ----
#
# Another vCPU can rewrite an instruction between KVM's failed emulation of it and our read of it.
# Linux patches live kernel text that way for static keys, static calls and ftrace: text_poke_bp
# (arch/x86/kernel/alternative.c) writes int3 over the first byte, syncs every CPU with an IPI,
# writes the new tail, syncs, writes the new first byte, syncs. A CPU that meets the int3 meanwhile
# traps to poke_int3_handler, which emulates the new instruction. Here KVM-PVM's emulator stops on
# that int3 and exits; by the time we read RIP the patch can be finished and the bytes are the new,
# ordinary instruction - injecting #BP then would be wrong (poke_int3_handler no longer knows the
# address and the kernel dies of "int3"). Seen once in a two-vCPU boot of Debian's cloud kernel just
# after "IPI shorthand broadcast: enabled" (a static key flipped): KVM failed at a jump label whose
# bytes were by then `66 90`, a 2-byte nop.
#
# A CPU running this code would execute either the int3 or the new instruction, so running the new
# one is right: re-enter the guest once with nothing changed. A real gap fails again on the same
# RIP and bytes, and is reported then. The record is per vCPU (each vCPU thread completes its own
# gaps) and is cleared by every completed gap.

_retried: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # vCPU -> (RIP, bytes)


def _retry_once(machine, gap: _Gap) -> bool:
    """True (re-enter the guest unchanged) the first time KVM fails at this RIP on these bytes."""
    seen = (gap.regs["rip"], gap.code)
    if _retried.get(machine.vcpu) == seen:
        return False
    _retried[machine.vcpu] = seen
    machine.stats.pvm_gaps["retried"] += 1
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


# ---- the vmcall that never exits ----

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
    vmcall never returns on this host anyway. LinuxVM registers `check` in
    `Machine.interrupted_handlers` and sets `Machine.watchdog_period` to kick once a second; test
    kernels leave CONFIG_PTP_1588_CLOCK_KVM out all the same (ours does): no vmcall, no wait."""

    def __init__(self):
        # vCPU index -> the vmcall RIP seen at its last check: each vCPU thread checks its own
        # vCPU (Machine.vcpu), so with several vCPUs each keeps its own record.
        self._last_rip: dict[int, int] = {}

    def check(self, machine) -> bool:
        vcpu = machine.vcpu
        key = getattr(vcpu, "index", 0)
        kregs, _sregs, regs, bitness = _cpu_regs(vcpu)
        code = _fetch(vcpu, machine.mem, regs, bitness, _NoExit)
        insn = decode(code, regs["rip"], bitness) if code else None
        if insn is None or insn.mnemonic not in (_M.VMCALL, _M.VMMCALL):
            self._last_rip.pop(key, None)
            return False
        if self._last_rip.get(key) != regs["rip"]:
            self._last_rip[key] = regs["rip"]
            return False
        del self._last_rip[key]
        # include/uapi/linux/kvm_para.h: hypercalls return -KVM_ENOSYS for an unknown number.
        # (Imported here: this module loads without the compiled binding.)
        from ..kvm.headers import KVM_ENOSYS
        kregs.rax = -KVM_ENOSYS & _mask(64)
        kregs.rip = (regs["rip"] + insn.len) & _mask(bitness)
        vcpu.set_regs(kregs)
        machine.stats.pvm_gaps[mnemonic(insn)] += 1
        return True


class _NoExit:
    data: tuple = ()
