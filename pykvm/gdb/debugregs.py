"""The x86 debug registers as gdb's Z1-Z4 packets use them (Intel SDM Vol. 3B, 18.2 "Debug
Registers").

DR0-DR3 hold four linear addresses; DR7 says, for each, whether it is enabled (L0-L3, bits 0, 2, 4,
6), what access it watches (R/W0-R/W3, two bits at 16 + 4i: 00 instruction execution, 01 data
writes, 11 data reads or writes; 10 is I/O, which gdb never asks for) and how many bytes (LEN0-LEN3,
two bits at 18 + 4i: 00 one, 01 two, 11 four, 10 eight; execution breakpoints use 00). GE (bit 9)
asks for exact data breakpoints. When one fires, DR6 bits 0-3 say which. KVM takes all of it with
KVM_GUESTDBG_USE_HW_BP in struct kvm_guest_debug_arch's debugreg[0..7].

gdb's kinds: 1 hardware breakpoint (hbreak), 2 write watchpoint (watch), 3 read watchpoint
(rwatch: x86 cannot watch reads alone, so R/W 11, as other x86 stubs do), 4 access (awatch).
"""

from __future__ import annotations

from dataclasses import dataclass

SLOTS = 4
_DR7_RW = {1: 0b00, 2: 0b01, 3: 0b11, 4: 0b11}
_DR7_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
DR7_GE = 1 << 9
WATCH_REPLY = {2: "watch", 3: "rwatch", 4: "awatch"}      # the stop reply's reason for each kind


@dataclass(frozen=True)
class HwPoint:
    kind: int                           # 1 execute, 2 write, 3 read, 4 access (gdb's Z kinds)
    addr: int
    length: int


def valid_point(kind: int, addr: int, length: int) -> bool:
    """Can the debug registers watch this? Data watches cover 1, 2, 4 or 8 aligned bytes."""
    if kind not in _DR7_RW:
        return False
    return kind == 1 or (length in _DR7_LEN and addr % length == 0)


def dr7_for(points: list[HwPoint | None]) -> int:
    """DR7 for up to four slots (None: unused)."""
    dr7 = 0
    for i, p in enumerate(points):
        if p is not None:
            length = 1 if p.kind == 1 else p.length
            dr7 |= (1 << (2 * i)) | (_DR7_RW[p.kind] << (16 + 4 * i)) \
                | (_DR7_LEN[length] << (18 + 4 * i))
    if dr7:
        dr7 |= DR7_GE
    return dr7
