"""virtio-console with a single port (VIRTIO 1.2 section 5.3): Linux's `hvc0`.

Without VIRTIO_CONSOLE_F_MULTIPORT the device has exactly two queues: receiveq (0), where the driver
posts empty buffers for input, and transmitq (1), where it puts output. Linux's driver
(drivers/char/virtio_console.c) registers the port as hvc0; boot with `console=hvc0`.

Configuration space (5.3.4): le16 cols, le16 rows (with F_SIZE), le32 max_nr_ports (with
F_MULTIPORT), le32 emerg_wr (with F_EMERG_WRITE). We offer only EMERG_WRITE: a byte written to
`emerg_wr` is output at once, which works even before the queues are up.

Output goes to `output(bytes)`; input arrives by `feed(bytes)` from any thread (a terminal reader),
is kept until the guest has posted receive buffers, and is delivered under the device lock.
Shortcut, admitted: F_SIZE is not offered (the terminal's size is not forwarded), and input beyond
`max_pending` bytes waiting for the guest is dropped and counted rather than back-pressured.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Callable

from .device import VIRTIO_ID_CONSOLE, VirtioDevice
from .queue import ChainError, DescChain

VIRTIO_CONSOLE_F_SIZE = 1 << 0
VIRTIO_CONSOLE_F_MULTIPORT = 1 << 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 1 << 2

RX, TX = 0, 1
QUEUE_SIZE = 128
EMERG_WR = 8
MAX_TX_CHAIN = 1 << 20


class VirtioConsole(VirtioDevice):
    device_id = VIRTIO_ID_CONSOLE
    name = "virtio-console"
    STATE = VirtioDevice.STATE + ("_pending", "_pending_len", "dropped_input")

    def __init__(self, output: Callable[[bytes], None], max_pending: int = 1 << 20):
        super().__init__([QUEUE_SIZE, QUEUE_SIZE], VIRTIO_CONSOLE_F_EMERG_WRITE)
        self.output = output
        self.max_pending = max_pending
        self._pending: deque[bytes] = deque()
        self._pending_len = 0
        self.dropped_input = 0

    def config_bytes(self) -> bytes:
        return struct.pack("<HHII", 0, 0, 1, 0)

    def write_config_bytes(self, offset: int, data: bytes) -> None:
        if offset == EMERG_WR and len(data) == 4:
            self.output(data[:1])    # the low byte is the character (5.3.5.1)
        else:
            super().write_config_bytes(offset, data)

    # ---- input ----
    def feed(self, data: bytes) -> None:
        """Input for the guest, from any thread."""
        with self.lock:
            room = self.max_pending - self._pending_len
            if len(data) > room:
                self.dropped_input += len(data) - room
                data = data[:room]
            if data:
                self._pending.append(bytes(data))
                self._pending_len += len(data)
            self._deliver()

    def _deliver(self) -> None:
        q = self.queues[RX]
        if not self.active or not q.ready or not self._pending:
            return
        start = q.next_used
        while self._pending and (chain := q.pop()) is not None:
            n = min(chain.writable_len, self._pending_len)
            data = self._take(n)
            try:
                chain.write(0, data)
            except ChainError:
                n = 0       # counted by the queue; the input is lost with the bad buffer
            q.add_used(chain.head, n)
        if q.next_used != start:
            self.signal_used(q)

    def _take(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self._pending.popleft()
            need = n - len(out)
            if len(chunk) > need:
                self._pending.appendleft(chunk[need:])
                chunk = chunk[:need]
            out += chunk
        self._pending_len -= n
        return bytes(out)

    # ---- queues ----
    def process_queue(self, index: int) -> None:
        if index == RX:
            self._deliver()
        else:
            self.drain(TX, self._transmit)

    def _transmit(self, chain: DescChain) -> int:
        if chain.writable:
            self.guest_error("transmit", "device-writable buffer in a transmit chain")
        if chain.readable_len > MAX_TX_CHAIN:
            self.guest_error("transmit", f"{chain.readable_len}-byte chain")
            return 0
        try:
            data = chain.read()
        except ChainError:
            return 0
        if data:
            self.output(data)
        return 0

    def on_reset(self) -> None:
        pass  # input typed before the driver comes (back) stays pending
