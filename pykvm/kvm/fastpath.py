"""The C fast path's shared state, bound to pykvm's Python device models.

`csrc/fastpath.h` runs the KVM_RUN loop in C and answers, without entering the interpreter, the port
accesses that have no side effect beyond what it can do itself: the 16550A's polled transmit (LSR
read, THR write, with interrupts off), POST codes on port 0x80, debug-console bytes on 0xe9; and,
when one is bound, a virtio-blk disk's QueueNotify (an MMIO exit), whose requests C serves itself
(`bind_virtio_blk`; pykvm/virtio/blk_fast.py decides when, pykvm/kvm/vblk.py is its C struct).
Anything else comes back to Python as a typed exit, exactly as without the fast path.

The device models stay the owners of their state. A model that takes part keeps the registers the C
loop reads in a `struct pykvm_fast` block (its `shared` attribute points there instead of at a
Python namespace), so there is one copy of each register and the C side sees every change the model
makes. Console bytes the C side accepts collect in buffers that `drain()` hands to the same sinks the
models use, before any other exit is handled.

Switch it off (`Machine(..., fast_path=False)`, `pykvm boot --no-fast-path`) to watch every exit go
through Python, for teaching and for comparison.
"""

from __future__ import annotations

from collections.abc import Callable

from ._lib import ffi


class FastPath:
    def __init__(self) -> None:
        self.regs = ffi.new("struct pykvm_fast *")
        self.regs.enabled = 1
        self._uart_sink: Callable[[bytes], None] | None = None
        self._uart_device = None
        self._debug_sink: Callable[[bytes], None] | None = None
        self._debug_device = None
        self.virtio_blk = None      # pykvm.virtio.blk_fast.BlkFastPath

    # ---- binding devices ----
    def bind_uart(self, base: int, serial) -> None:
        """COM port at `base`: the Serial16550 moves ier/lcr/mcr/lsr into the shared block."""
        serial.share_registers(self.regs.uart)
        self.regs.uart.base = base
        self._uart_device = serial

    def bind_post(self, port: int, post) -> None:
        post.share_registers(self.regs)
        self.regs.post_port = port

    def bind_debugcon(self, port: int, debugcon) -> None:
        self.regs.debug_port = port
        self._debug_device = debugcon

    def bind_virtio_blk(self, fast) -> None:
        """A virtio-blk device's kicks (pykvm.virtio.blk_fast.BlkFastPath) served in C; one device
        per machine (the struct has one pointer): further ones stay in Python."""
        if self.virtio_blk is not None:
            raise ValueError("a virtio-blk device is bound to the C run loop already")
        self.virtio_blk = fast
        self.regs.vblk = fast.block

    def finish_virtio_blk(self) -> None:
        self.virtio_blk.finish()

    def close(self) -> None:
        """The machine is going away: stop the bound virtio-blk's polling thread, if it has one
        (csrc/virtio_blk_poll.h). Its owner may never close the device, and the device and its
        BlkFastPath refer to each other, so without this the thread would idle on until the
        garbage collector found the pair."""
        if self.virtio_blk is not None:
            self.virtio_blk.close()

    # ---- output ----
    def drain(self) -> None:
        """Hand the bytes the C loop accepted to the devices' own sinks."""
        regs = self.regs
        n = regs.uart_out_len
        if n:
            regs.uart_out_len = 0          # the C loop is not running: the bytes stay put
            self._hand_over(regs.uart_out, n, self._uart_device)
        n = regs.debug_out_len
        if n:
            regs.debug_out_len = 0
            self._hand_over(regs.debug_out, n, self._debug_device)

    @staticmethod
    def _hand_over(buf, n: int, device) -> None:
        device.out(ffi.buffer(buf, n)[:])
        device.bytes_out += n

    @property
    def handled(self) -> int:
        """Exits answered in C."""
        return self.regs.handled
