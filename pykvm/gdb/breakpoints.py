"""Breakpoints and watchpoints as gdb asks for them (Z0-Z4 / z0-z4 packets).

Software breakpoints (Z0): the stub writes `int3` (0xcc, SDM Vol. 2A "INT n/INTO/INT3") at the
address while the guest runs and puts the saved byte back whenever it stops, so gdb always reads
the true code. Where the int3 is found when it runs is the vCPU side's business
(pykvm/gdb/vcpus.py): a `Debug` exit with exception 3 on VT-x/AMD-V, an emulation failure on
KVM-PVM at CPL0, nothing at all in real mode on KVM-PVM (the stub single-steps instead).

Hardware breakpoints and watchpoints (Z1-Z4): the CPU's debug registers, DR0-DR3 holding up to four
addresses and DR7 saying what each watches (pykvm/gdb/debugregs.py, SDM Vol. 3B, 18.2). x86 KVM
always offers the four (KVM_CAP_GUEST_DEBUG_HW_BPS is an arm64 capability and reads 0 on every x86
host; QEMU uses the four unconditionally too). On KVM-PVM, measured here, execution breakpoints fire
in CPL0 code (KVM's instruction emulator checks DR7 before each instruction) but a data watchpoint
never does, so Z2-Z4 are refused there (empty reply: gdb falls back to software watchpoints, which
single-step) with the reason said once.

Catchers: int3s the stub plants for itself on the first instruction of the guest's #BP and #DB
handlers, to see user-mode (CPL3) traps on KVM-PVM (pykvm/gdb/usertraps.py). They are planted and
lifted with the breakpoints, never shown to gdb.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from .debugregs import HwPoint, dr7_for, valid_point

INT3 = 0xCC


@dataclass
class SoftwareBreakpoint:
    addr: int                           # linear, as gdb gave it
    phys: int | None = None             # where the int3 is while planted
    saved: bytes = b""                  # the byte it replaced


@dataclass
class Catcher(SoftwareBreakpoint):
    vector: int = 0                     # whose handler it sits on: 1 (#DB) or 3 (#BP)


class Breakpoints:
    """The breakpoints gdb has set. `translate(addr)` gives the physical address to plant at (the
    first vCPU's page tables); `lock` is the stub's, held by whoever plants or edits."""

    def __init__(self, mem, translate: Callable[[int], int | None], lock: threading.Condition,
                 *, pvm: bool, log: Callable[[str], None]):
        self.mem = mem
        self.translate = translate
        self.lock = lock
        self.pvm = pvm
        self.log = log
        self.software: dict[int, SoftwareBreakpoint] = {}
        self.hardware: list[HwPoint | None] = [None] * 4      # DR0-DR3
        self.planted = False
        self.catchers: dict[int, Catcher] = {}               # by handler address
        self.catch_pending = False          # catchers wanted, but the guest has no IDT yet
        self._told_watch = False

    # ---- gdb's packets
    def packet(self, text: str) -> str:
        """`Z<kind>,<addr>,<length>[;cond]` inserts, `z...` removes; the reply for gdb."""
        kind, addr, length = text[1:].split(",", 2)
        addr = int(addr, 16)
        if kind in ("2", "3", "4") and self.pvm:
            if not self._told_watch:
                self._told_watch = True
                self.log("hardware watchpoints are not available on this KVM-PVM host (its "
                         "instruction emulator checks only execution breakpoints in DR7): gdb "
                         "falls back to software watchpoints, which single-step")
            return ""
        if kind != "0":
            return self._hardware(text[0] == "Z", int(kind), addr, int(length.split(";")[0], 16))
        with self.lock:
            if text[0] == "Z":
                self.software.setdefault(addr, SoftwareBreakpoint(addr))
            else:
                bp = self.software.pop(addr, None)
                if bp is not None and bp.phys is not None:
                    self._restore(bp)
        return "OK"

    def _hardware(self, insert: bool, kind: int, addr: int, length: int) -> str:
        if not valid_point(kind, addr, length):
            return "E22"                      # x86 watches 1, 2, 4 or 8 aligned bytes
        point = HwPoint(kind, addr, length if kind != 1 else 1)
        with self.lock:
            if insert:
                if point in self.hardware:
                    return "OK"
                free = [i for i, p in enumerate(self.hardware) if p is None]
                if not free:
                    return "E28"              # all debug registers in use (ENOSPC)
                self.hardware[free[0]] = point
            else:
                self.hardware = [None if p == point else p for p in self.hardware]
        return "OK"

    # ---- what the vCPU side asks
    def at(self, pc: int) -> bool:
        """Is there a software breakpoint at this linear address?"""
        return pc in self.software

    def planted_at(self, pc: int) -> bool:
        """Is one of our int3s in memory at this linear address right now?"""
        bp = self.software.get(pc)
        return bp is not None and bp.phys is not None

    def debugreg(self) -> tuple:
        """DR0-DR3, DR4-DR6 (unused here), DR7 for KVM_SET_GUEST_DEBUG; () with no hardware point."""
        if not any(self.hardware):
            return ()
        return tuple(p.addr if p else 0 for p in self.hardware) + (0, 0, 0, dr7_for(self.hardware))

    def hit_slot(self, dr6: int) -> HwPoint | None:
        """The hardware point whose DR6 status bit (B0-B3) is set, if it is one of ours."""
        return next((self.hardware[i] for i in range(4)
                     if dr6 & (1 << i) and self.hardware[i] is not None), None)

    # ---- catchers (call with the lock held)
    def catch(self, handlers: dict[int, int] | None) -> None:
        """Sit catchers on these handlers ({vector: address}; None: wanted, no IDT yet)."""
        if handlers is None:
            self.catch_pending = True
            return
        self.catch_pending = False
        wanted = {addr: vector for vector, addr in handlers.items()}
        if {a: c.vector for a, c in self.catchers.items()} == wanted:
            return
        self.uncatch()
        self.catchers = {addr: Catcher(addr, vector=v) for addr, v in wanted.items()}

    def uncatch(self) -> None:
        for c in self.catchers.values():
            if c.phys is not None:
                self._restore(c)
        self.catchers = {}
        self.catch_pending = False

    def catcher_at(self, pc: int) -> int | None:
        """The vector whose handler starts here, if our catcher is in memory at this address."""
        c = self.catchers.get(pc)
        return c.vector if c is not None and c.phys is not None else None

    def lift(self, pc: int) -> None:
        """Take the catcher at `pc` out of memory (plant() puts it back), to step over it."""
        c = self.catchers.get(pc)
        if c is not None and c.phys is not None:
            self._restore(c)

    # ---- int3s in guest memory (call with the lock held)
    def plant(self) -> None:
        """Write int3 at every breakpoint (and catcher) whose address is mapped now. A catcher on
        the address of a breakpoint of gdb's stays out: that int3 is there already."""
        catchers = [c for a, c in self.catchers.items() if a not in self.software]
        for bp in [*self.software.values(), *catchers]:
            if bp.phys is None:
                phys = self.translate(bp.addr)
                if phys is None or not self.mem.contains(phys, 1):
                    continue
                bp.saved = self.mem.read(phys, 1)
                self.mem.write(phys, bytes((INT3,)))
                bp.phys = phys
        self.planted = True

    def unplant(self) -> None:
        for bp in [*self.software.values(), *self.catchers.values()]:
            if bp.phys is not None:
                self._restore(bp)
        self.planted = False

    def _restore(self, bp: SoftwareBreakpoint) -> None:
        # Only if our int3 is still there: the guest may have rewritten that code meanwhile.
        if self.mem.read(bp.phys, 1) == bytes((INT3,)):
            self.mem.write(bp.phys, bp.saved)
        bp.phys = None

    def clear(self) -> None:
        """gdb went away: no int3 left behind, no debug registers set."""
        self.unplant()
        self.software.clear()
        self.catchers = {}
        self.catch_pending = False
        self.hardware = [None] * 4
