"""The Bochs shutdown port, 0x8900: writing the string "Shutdown" powers the machine off.

Bochs' BIOS (and QEMU's PC machine until it dropped the old Bochs BIOS ports) watched port 0x8900
for the bytes S, h, u, t, d, o, w, n written one `outb` at a time; after the last one the
emulator powered off. APM-era and hobby kernels still use it as the cheapest "power off" on an
emulator. A byte that breaks the sequence starts the match again (it may itself be the "S" of a
new attempt). Reads return 0xff, as from an undecoded ISA port.
"""

from __future__ import annotations

from typing import Callable

from pykvm.devices.state import Stateful

PORT = 0x8900
MAGIC = b"Shutdown"


class BochsShutdown(Stateful):
    STATE = ("matched",)

    def __init__(self, on_shutdown: Callable[[], None]):
        self.on_shutdown = on_shutdown
        self.matched = 0          # how many bytes of MAGIC have been seen in order

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):             # a wide `out` is a run of byte cycles, low byte first
            self._byte((value >> (8 * i)) & 0xFF)

    def _byte(self, byte: int) -> None:
        if byte == MAGIC[self.matched]:
            self.matched += 1
        else:
            self.matched = 1 if byte == MAGIC[0] else 0
        if self.matched == len(MAGIC):
            self.matched = 0
            self.on_shutdown()
