"""QEMU's isa-debug-exit: a port whose write ends the VM with a status the shell sees.

Test suites written for QEMU (kvm-unit-tests, hobby OS CI) start it with
`-device isa-debug-exit,iobase=0xf4,iosize=0x04` and end a run by writing a value v to the port.
QEMU then exits its process with status `(v << 1) | 1` (hw/misc/debugexit.c): the low bit set keeps
every guest-chosen status apart from QEMU's own 0 ("the guest shut down normally"), so a test
harness maps "v = 0 passed" to exit status 1, and anything else to 3, 5, ... . The shell sees the
status modulo 256, as for any process.

pykvm does the same with `pykvm boot --debug-exit [PORT[,SIZE]]` (default 0xf4, 4 bytes): the
write stops the run loop with `Stop("debug-exit", status=(v << 1) | 1)` and `pykvm boot` exits
with that status. Any access width up to SIZE ends the VM, as in QEMU: v is the value written,
zero-extended. Reads return 0 (QEMU's region has no read handler, so it reads as zeros too).

The device only calls `on_exit(status)`; it knows nothing of the run loop.
"""

from __future__ import annotations

from typing import Callable

from pykvm.devices.state import Stateful

DEFAULT_PORT = 0xF4
DEFAULT_SIZE = 4


def exit_status(value: int) -> int:
    """The process exit status QEMU gives for a write of `value`: (value << 1) | 1."""
    return (value << 1) | 1


def parse_spec(text: str | None) -> tuple[int, int]:
    """`PORT[,SIZE]` as `--debug-exit` takes it (numbers in C notation: 0xf4, 244); None or ""
    means the defaults. Raises ValueError with a one-line message."""
    if not text:
        return DEFAULT_PORT, DEFAULT_SIZE
    port_text, _, size_text = text.partition(",")
    try:
        port = int(port_text, 0)
        size = int(size_text, 0) if size_text else DEFAULT_SIZE
    except ValueError:
        raise ValueError(f"--debug-exit {text!r}: expected PORT[,SIZE], e.g. 0xf4,4") from None
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"--debug-exit port {port:#x} is not an I/O port (0..0xffff)")
    if size not in (1, 2, 4):
        raise ValueError(f"--debug-exit size {size} must be 1, 2 or 4 bytes")
    if port + size > 0x10000:
        raise ValueError(f"--debug-exit {port:#x},{size} runs past the last I/O port 0xffff")
    return port, size


class IsaDebugExit(Stateful):
    """The isa-debug-exit port. `value` is the last value written (None before any write)."""

    STATE = ("value",)

    def __init__(self, on_exit: Callable[[int], None], size: int = DEFAULT_SIZE):
        self.on_exit = on_exit
        self.size = size
        self.value: int | None = None

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        # QEMU registers the region with the device's iosize and passes the written value through
        # unchanged, whatever the offset inside the region.
        self.value = value & ((1 << (8 * size)) - 1)
        self.on_exit(exit_status(self.value))
