"""04: a device model of our own, on the port-I/O bus, and the exit tracer.

    python examples/04_devices_and_exits.py

A device model is a plain object with `read(offset, size)` and `write(offset, size, value)`; it knows
nothing of KVM. The Machine's bus maps a port range to it, and every `in`/`out` the guest makes there
becomes an exit that `handle_exit` hands to the device at an offset from its base. Here: a tiny
"multiplier" device at ports 0x500-0x503 (write A at +0, B at +1, read A*B at +2), driven by 16-bit
real-mode code, with `ExitTracer` printing each exit as it happens.
"""

from pykvm.devices.debugcon import DebugCon
from pykvm.machine import Machine
from pykvm.trace import ExitTracer
from pykvm.x86.cpu import setup_real_mode


class Multiplier:
    """Registers: +0 operand A (write), +1 operand B (write), +2 product (read, 16 bits)."""

    def __init__(self):
        self.a = self.b = 0

    def read(self, offset: int, size: int) -> int:
        return (self.a * self.b) & 0xffff if offset == 2 else 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.a = value & 0xff
        elif offset == 1:
            self.b = value & 0xff


CODE = bytes([
    0xba, 0x00, 0x05,      # mov dx, 0x500
    0xb0, 12, 0xee,        # mov al, 12 ; out dx, al      -> A = 12
    0x42,                  # inc dx
    0xb0, 11, 0xee,        # mov al, 11 ; out dx, al      -> B = 11
    0x42,                  # inc dx
    0xed,                  # in ax, dx                    -> AX = 132
    0xe6, 0xe9,            # out 0xe9, al                 -> debug console gets byte 132
    0xf4,                  # hlt
])

with Machine(1 << 20, irqchip="none") as m:
    out = bytearray()
    m.add_pio(0x500, 4, Multiplier(), "multiplier")
    m.add_pio(0xe9, 1, DebugCon(out.extend), "debugcon")
    m.trace = ExitTracer(m)                 # one line per exit, to stderr
    m.mem.write(0x1000, CODE)
    setup_real_mode(m.vcpu, 0x100, 0)
    stop = m.run(timeout=30)
    print(f"12 * 11 = {out[0]} (stopped: {stop.reason})")
