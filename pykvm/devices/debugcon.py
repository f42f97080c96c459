"""Three one-port devices that firmware and test programs use to talk to the VMM.

- `DebugCon`, port 0xe9: the Bochs/QEMU "debug console". Every byte written is printed; no UART set-up,
  no status polling, one exit per character. Reading the port returns 0xe9, which is how Bochs lets a
  guest check that the port is there (SeaBIOS and Linux's earlyprintk don't care).
- `PostCode`, port 0x80: the POST diagnostic port. A PC BIOS writes a progress code here at each
  stage of power-on self test, and an ISA "POST card" shows it on two hex digits. Linux also writes
  here as a short I/O delay (`outb %al, $0x80`, io_delay=0x80, the default), so the write count grows
  during a boot; the last code is what you want when a firmware hangs.
- `ExitPort`, port 0xf4: how pykvm's firmware test programs end. Writing a value records it as the exit
  status and calls `on_exit(status)`; the VMM stops the run loop there. (QEMU's isa-debug-exit does the
  same but makes the process exit with `(value << 1) | 1`; we keep the value as written.)

None of these raise interrupts.
"""

from __future__ import annotations

from collections.abc import Callable

from pykvm.devices.shared import SharesRegisters
from pykvm.devices.state import Stateful

DEBUGCON_READBACK = 0xE9
_BYTE = [bytes((b,)) for b in range(256)]


class DebugCon(Stateful):
    """Port 0xe9. Bytes written go to `out(bytes)`; `bytes_out` counts them.

    A wide write (`outw`, `outl`) sends all its bytes in order, low byte first, as QEMU's
    isa-debugcon does (strictly the bytes above the first belong to ports 0xea..., which nothing
    decodes; printing them is the more useful reading).
    """

    STATE = ("bytes_out",)

    def __init__(self, out: Callable[[bytes], None]):
        self.out = out
        self.bytes_out = 0

    def read(self, offset: int, size: int) -> int:
        # Every byte of a wide read is the readback value, as in QEMU's isa-debugcon.
        return int.from_bytes(bytes((DEBUGCON_READBACK,)) * size, "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if size == 1:
            self.out(_BYTE[value & 0xFF])     # the common case, without building a bytes object
        else:
            self.out((value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        self.bytes_out += size

    def write_string(self, offset: int, size: int, data: memoryview) -> bool:
        """`rep outs`: the whole string at once (pykvm.bus.Bus.write_from); every width prints
        all its bytes in order, as write() does, so the items need not be split."""
        self.out(bytes(data))
        self.bytes_out += len(data)
        return True


class PostCode(SharesRegisters, Stateful):
    """Port 0x80. `code` is the last POST code written (0 before any); `writes` counts writes.

    Both may live in the C fast path's struct (pykvm/kvm/fastpath.py), which then answers the port."""

    SHARED = (("code", "post_last"), ("writes", "post_writes"))
    STATE = ("code", "writes")

    def __init__(self) -> None:
        self.code = 0
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        return self.code

    def write(self, offset: int, size: int, value: int) -> None:
        self.code = value & 0xFF
        self.writes += 1


class ExitPort(Stateful):
    """Port 0xf4. `exit_status` is None until the guest writes; then the value written (any width).

    `on_exit(status)` is called on every write; `writes` counts them.
    """

    STATE = ("exit_status", "writes")

    def __init__(self, on_exit: Callable[[int], None] | None = None):
        self.on_exit = on_exit
        self.exit_status: int | None = None
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        return 0   # write-only; nothing meaningful to read back

    def write(self, offset: int, size: int, value: int) -> None:
        self.exit_status = value & ((1 << (8 * size)) - 1)
        self.writes += 1
        if self.on_exit is not None:
            self.on_exit(self.exit_status)
