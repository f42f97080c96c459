"""QEMU's pc-testdev: the ports kvm-unit-tests use to check the CPU's I/O and interrupt paths.

QEMU's `-device pc-testdev` (hw/misc/pc-testdev.c) claims:

    port 0xe0, 4 bytes     a 32-bit scratch register: any-width `in`/`out` at offset o reads or
                           writes bytes o.. of it (kvm-unit-tests' emulator test checks that
                           `outl`/`inw` and string I/O land on the right bytes)
    port 0xe4, 4 bytes     "flush page": QEMU mprotect()s the page whose address is written, to
                           exercise KVM's MMU notifiers. Our model counts the writes and does
                           nothing else: it has no way to (and no need to) remap host memory.
    port 0xe8, 4 bytes     the same scratch register, decoded one byte at a time (pykvm claims
                           only 0xe8: 0xe9 is the debug console)
    port 0x2000, 24 bytes  IRQ lines: writing v at offset n drives ISA/IOAPIC input n to (v != 0)
    MMIO 0xff000000, 64 KiB  a scratch RAM-like buffer reached through MMIO exits

Each piece is a device object on its own offsets, registered by `add_pc_testdev` (pykvm.testdevs).
"""

from __future__ import annotations

from typing import Callable, Sequence

from pykvm.devices.state import Stateful
from pykvm.irq import IrqLine

PORT_SCRATCH = 0xE0
PORT_FLUSH = 0xE4
PORT_SCRATCH_BYTES = 0xE8
PORT_IRQ = 0x2000
IRQ_LINES = 24
IOMEM_BASE = 0xFF000000
IOMEM_SIZE = 0x10000


class Scratch32(Stateful):
    """The 32-bit scratch register (shared by the 0xe0 and 0xe8 windows)."""

    STATE = ("data",)

    def __init__(self) -> None:
        self.data = 0

    def read(self, offset: int, size: int) -> int:
        shift = 8 * (offset & 3)
        return (self.data >> shift) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        shift = 8 * (offset & 3)
        mask = (((1 << (8 * size)) - 1) << shift) & 0xFFFFFFFF
        self.data = (self.data & ~mask) | ((value << shift) & mask)


class FlushPage(Stateful):
    """Port 0xe4: records the page addresses written (see the module docstring)."""

    STATE = ("pages",)

    def __init__(self) -> None:
        self.pages: list[int] = []

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.pages.append(value & ~0xFFF)


class IrqLines(Stateful):
    """Port 0x2000 + n: drive interrupt line n. `line(n)` gives the IrqLine for input n; lines
    are made on first use, so a testdev on a machine without that input costs nothing until a
    guest touches it."""

    def __init__(self, line: Callable[[int], IrqLine] | Sequence[IrqLine]):
        self._line = line if callable(line) else line.__getitem__
        self._lines: dict[int, IrqLine] = {}

    def save_state(self) -> dict:
        """The level of each line the guest has driven (the lines themselves are wiring)."""
        return {"levels": {n: line.level for n, line in self._lines.items()}}

    def restore_state(self, state: dict) -> None:
        # Levels come back silently, as pykvm.devices.state does for IrqLine attributes: the
        # interrupt controller's own saved state already holds what these lines did to it.
        for n, level in state.get("levels", {}).items():
            line = self._lines.get(int(n))
            if line is None:
                line = self._lines[int(n)] = self._line(int(n))
            line.level = bool(level)

    def read(self, offset: int, size: int) -> int:
        return 0xFF if size == 1 else (1 << (8 * size)) - 1   # write-only in QEMU

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):         # QEMU accepts byte writes only; a wide one is bytes in a row
            n = offset + i
            if n < IRQ_LINES:
                line = self._lines.get(n)
                if line is None:
                    line = self._lines[n] = self._line(n)
                line.set_level(bool((value >> (8 * i)) & 0xFF))


class IoMem(Stateful):
    """The 64 KiB MMIO scratch buffer at 0xff000000."""

    STATE = ("buf",)

    def __init__(self, size: int = IOMEM_SIZE):
        self.buf = bytearray(size)

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.buf[offset:offset + size].ljust(size, b"\0"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        end = min(offset + size, len(self.buf))
        self.buf[offset:end] = value.to_bytes(size, "little")[:end - offset]
