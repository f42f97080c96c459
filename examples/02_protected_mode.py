"""02: 32-bit protected mode, set up by the VMM instead of by a boot loader.

    python examples/02_protected_mode.py

A real PC enters protected mode in software: load a GDT, set CR0.PE, far-jump to a 32-bit code
segment (Intel SDM Vol. 3A, 9.9). A VMM can simply *set* the end state with KVM_SET_SREGS: CR0.PE on
and the segment registers' hidden parts (base, limit, type, D/B bit) as if loaded from a GDT. The guest
then runs 32-bit code at once. It copies a string with `rep movsb` and writes it out with `rep outsb`.
On VT-x/AMD-V, KVM hands us a `rep outsb` as one exit carrying many bytes (count > 1) and pykvm's bus
loops over them; KVM-PVM hosts emulate it one byte, one exit, at a time.
"""

from pykvm.machine import Machine
from pykvm.devices.debugcon import DebugCon

MSG = b"Hello from 32-bit protected mode!\n"
SRC, DST, CODE_AT = 0x2000, 0x3000, 0x1000

CODE = bytes([
    0xbe, *SRC.to_bytes(4, "little"),         # mov esi, SRC
    0xbf, *DST.to_bytes(4, "little"),         # mov edi, DST
    0xb9, *len(MSG).to_bytes(4, "little"),    # mov ecx, len
    0xf3, 0xa4,                               # rep movsb        ; copy SRC -> DST (no exits: RAM)
    0xbe, *DST.to_bytes(4, "little"),         # mov esi, DST
    0xb9, *len(MSG).to_bytes(4, "little"),    # mov ecx, len
    0x66, 0xba, 0xe9, 0x00,                   # mov dx, 0xe9
    0xf3, 0x6e,                               # rep outsb        ; exits with count >= 1
    0xf4,                                     # hlt
])


def flat_segment(seg, selector: int, code: bool) -> None:
    """A 4 GiB flat segment, as loaded from a GDT descriptor (SDM Vol. 3A, 3.4.5)."""
    seg.base, seg.limit, seg.selector = 0, 0xffffffff, selector
    seg.type = 0xb if code else 0x3   # execute/read/accessed, or read/write/accessed
    seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g = 1, 0, 1, 1, 0, 1


with Machine(1 << 20, irqchip="none") as m:
    out = bytearray()
    m.add_pio(0xe9, 1, DebugCon(out.extend))
    m.mem.write(SRC, MSG)
    m.mem.write(CODE_AT, CODE)

    sregs = m.vcpu.get_sregs()
    flat_segment(sregs.cs, 0x08, code=True)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        flat_segment(seg, 0x10, code=False)
    sregs.cr0 |= 1                                  # CR0.PE: protected mode
    m.vcpu.set_sregs(sregs)
    regs = m.vcpu.get_regs()
    regs.rip, regs.rflags = CODE_AT, 0x2
    m.vcpu.set_regs(regs)

    stop = m.run(timeout=30)
    print(out.decode(), end="")
    print("stopped:", stop.reason, "| exits:", m.vcpu.exit_counts())
