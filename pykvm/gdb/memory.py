"""Guest memory as gdb addresses it (m/M/X packets).

gdb speaks of linear (virtual) addresses: each page is translated through the current page tables
of the selected vCPU with KVM_TRANSLATE (paging off, CR0.PG = 0: linear is physical, truncated to
32 bits as the CPU does). `monitor phys on` or QEMU's `maintenance packet Qqemu.PhyMemMode:1` sets
`phys_mode`: addresses are then guest-physical. `early_translate` is a fallback for addresses the
current tables do not map yet - a kernel's own virtual addresses before it has switched to its
page tables (pykvm.gdb.linux_text_mapping), so `break start_kernel` can be planted at once.
"""

from __future__ import annotations

from collections.abc import Callable

CR0_PG = 1 << 31
PAGE = 0x1000


class LinearMemory:
    """Reads and writes of guest memory by linear address, for one vCPU's view at a time.

    `cpu` arguments are the stub's per-vCPU records (pykvm.gdb.vcpus.Cpu): the vCPU, and its
    register file if the stub has one cached (its sregs then say whether paging is on)."""

    def __init__(self, mem, early_translate: Callable[[int], int | None] | None = None):
        self.mem = mem
        self.early_translate = early_translate
        self.phys_mode = False

    def translate(self, cpu, addr: int) -> int | None:
        if self.phys_mode:
            return addr
        sregs = cpu.vcpu.get_sregs() if cpu.regs is None else cpu.regs.sregs
        if not sregs.cr0 & CR0_PG:
            return addr & 0xFFFFFFFF          # no paging: linear is physical
        try:
            phys = cpu.vcpu.translate(addr)
        except OSError:
            phys = None
        if phys is None and self.early_translate is not None:
            phys = self.early_translate(addr)
        return phys

    def _pieces(self, cpu, addr: int, length: int):
        """(physical address or None, length) for each page the range touches: contiguous in
        linear space is not contiguous in physical space."""
        while length > 0:
            n = min(length, PAGE - (addr & (PAGE - 1)))
            yield self.translate(cpu, addr), n
            addr += n
            length -= n

    def read(self, cpu, addr: int, length: int) -> bytes | None:
        out = bytearray()
        for phys, n in self._pieces(cpu, addr, length):
            if phys is None or not self.mem.contains(phys, n):
                return bytes(out) if out else None     # a short read, as gdb allows
            out += self.mem.read(phys, n)
        return bytes(out)

    def write(self, cpu, addr: int, data: bytes) -> bool:
        at = 0
        for phys, n in self._pieces(cpu, addr, len(data)):
            if phys is None or not self.mem.contains(phys, n):
                return False
            self.mem.write(phys, data[at:at + n])
            at += n
        return True
