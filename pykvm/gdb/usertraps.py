"""Breakpoints and single-step in guest user mode (CPL3) on KVM-PVM hosts, without the guest's help.

On KVM-PVM a guest's CPL3 code runs natively, so its int3 (#BP) and its single-step trap (#DB, from
RFLAGS.TF) are delivered by the host straight into the guest's own IDT: KVM_RUN does not return,
whatever KVM_SET_GUEST_DEBUG asked for (docs/kvm-pvm.md). But the handler they land in runs at
CPL0, and CPL0 code is emulated there - and the emulator stops with an emulation failure on an
int3. So the stub plants one more int3, a "catcher", on the first instruction of the guest's #BP
and #DB handlers. When a CPL3 trap reaches one, KVM_RUN returns with RIP on the catcher and RSP on
the frame the CPU pushed while delivering it (Intel SDM Vol. 3A, 6.14.2 "64-Bit Mode Stack
Frame"; AMD APM Vol. 2, 8.9.3 "Interrupt Stack Frame"), lowest address first:

    RSP+0   RIP     #BP: the byte after the int3; #DB (single-step, a trap): the next instruction
    RSP+8   CS      its low two bits: the CPL the trap came from
    RSP+16  RFLAGS
    RSP+24  RSP
    RSP+32  SS      (#BP and #DB push no error code)

If the trap came from CPL3 and is the stub's own (an int3 it planted at RIP-1, or a step it asked
for), the stub undoes the delivery: RIP, RFLAGS, RSP from the frame, CS and SS loaded again from
the guest's GDT at the frame's selectors (KVM_SET_SREGS takes whole descriptors, SDM Vol. 3A,
3.4.5 "Segment Descriptors"). The vCPU is then exactly where the user code was, before its handler
ran a single instruction, and gdb sees the user-mode address. Any other trap is the guest's own: the
stub lifts that catcher, single-steps the handler's first instruction (at CPL0 a step is an exit),
puts the catcher back and lets the handler go on.

Limits: 64-bit guests only (the frame and the 16-byte IDT gates of long mode; a 32-bit guest at
CPL3 gets Ctrl-C only), an IDT in place (until the guest's `lidt`, the stub single-steps instead),
and with several vCPUs another one passing a lifted catcher at that moment is not caught.
GdbStub turns this on for x86-64 guests on KVM-PVM hosts (the firmware guests of
pykvm.testing.gdb); `pykvm boot` turns it off for Linux, whose userland cannot run on KVM-PVM
anyway and whose own int3s (text patching) would each cost a step over the catcher, and gives
multiboot kernels an i386 stub.
"""

from __future__ import annotations

import struct

EFER_LMA = 1 << 10
RFLAGS_TF = 1 << 8                      # the trap flag; KVM_GUESTDBG_SINGLESTEP sets it
DB_VECTOR, BP_VECTOR = 1, 3
_FRAME = struct.Struct("<5Q")           # RIP, CS, RFLAGS, RSP, SS


def gate_offset(gate: bytes) -> int | None:
    """The handler address of a 64-bit IDT gate (SDM Vol. 3A, 6.14.1, Figure 6-8: offset 15:0 in
    bytes 0-1, 31:16 in bytes 6-7, 63:32 in bytes 8-11; P, the present bit, is bit 7 of byte 5);
    None if the gate is not present."""
    low, _selector, _ist, attr, mid, high, _ = struct.unpack("<HHBBHII", gate)
    if not attr & 0x80:
        return None
    return low | (mid << 16) | (high << 32)


def load_segment(seg, selector: int, desc: int) -> None:
    """Fill a struct kvm_segment from a GDT code/data descriptor (SDM Vol. 3A, 3.4.5, Figure 3-8)."""
    limit = (desc & 0xFFFF) | (((desc >> 48) & 0xF) << 16)
    seg.g = (desc >> 55) & 1
    seg.limit = (limit << 12) | 0xFFF if seg.g else limit     # KVM wants it in bytes
    seg.base = ((desc >> 16) & 0xFFFFFF) | (((desc >> 56) & 0xFF) << 24)
    seg.selector = selector
    seg.type = (desc >> 40) & 0xF
    seg.s = (desc >> 44) & 1
    seg.dpl = (desc >> 45) & 3
    seg.present = (desc >> 47) & 1
    seg.avl = (desc >> 52) & 1
    seg.l = (desc >> 53) & 1
    seg.db = (desc >> 54) & 1
    seg.unusable = 0


class UserTraps:
    """Finds the guest's #BP/#DB handlers and unwinds a caught CPL3 trap (see the module
    docstring). `memory`: the stub's LinearMemory."""

    def __init__(self, memory):
        self.memory = memory

    def handlers(self, cpu) -> dict[int, int] | None:
        """{vector: handler address} for #DB and #BP, or None until the guest is in long mode with
        both gates present in its IDT and their handlers mapped."""
        sregs = cpu.vcpu.get_sregs()
        if not sregs.efer & EFER_LMA:
            return None
        found = {}
        for vector in (DB_VECTOR, BP_VECTOR):
            if sregs.idt.limit < vector * 16 + 15:
                return None
            gate = self.memory.read(cpu, sregs.idt.base + vector * 16, 16)
            addr = gate_offset(gate) if gate is not None and len(gate) == 16 else None
            if addr is None or self.memory.translate(cpu, addr) is None:
                return None
            found[vector] = addr
        return found

    def frame(self, cpu) -> tuple[int, int, int, int, int] | None:
        """The frame the CPU pushed on delivering the trap (at RSP, on the handler's first byte)."""
        data = self.memory.read(cpu, cpu.vcpu.get_regs().rsp, _FRAME.size)
        return _FRAME.unpack(data) if data is not None and len(data) == _FRAME.size else None

    def unwind(self, cpu, rip: int, cs: int, rflags: int, rsp: int, ss: int) -> bool:
        """Put the vCPU back in the context the trap interrupted (False if the GDT is unreadable)."""
        sregs = cpu.vcpu.get_sregs()
        descs = []
        for sel in (cs, ss):
            raw = self.memory.read(cpu, sregs.gdt.base + (sel & ~7), 8)
            if raw is None or len(raw) != 8 or (sel & ~7) + 7 > sregs.gdt.limit:
                return False
            descs.append(struct.unpack("<Q", raw)[0])
        load_segment(sregs.cs, cs, descs[0])
        load_segment(sregs.ss, ss, descs[1])
        regs = cpu.vcpu.get_regs()
        regs.rip, regs.rsp = rip, rsp
        # TF in the frame is KVM's single-step, not the guest's: KVM sets it again when asked.
        regs.rflags = rflags & ~RFLAGS_TF
        cpu.vcpu.set_sregs(sregs)
        cpu.vcpu.set_regs(regs)
        return True
