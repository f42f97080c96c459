"""virtio-rng, the entropy device (VIRTIO 1.2 section 5.4): the simplest virtio device there is.

One queue (requestq). The driver (Linux drivers/char/hw_random/virtio-rng.c) posts device-writable
buffers; the device fills them with random bytes and returns them with the count it wrote. No
feature bits, no configuration space. The bytes come from the host kernel's CSPRNG (`os.urandom`,
i.e. getrandom(2)).

A guest may post a huge buffer; we fill at most `max_request` bytes of each (the spec lets the
device return fewer bytes than the buffer holds) so one request cannot make us allocate the guest's
whole RAM.
"""

from __future__ import annotations

import os
from typing import Callable

from .device import VIRTIO_ID_RNG, VirtioDevice
from .queue import ChainError, DescChain

QUEUE_SIZE = 64


class VirtioRng(VirtioDevice):
    device_id = VIRTIO_ID_RNG
    name = "virtio-rng"
    STATE = VirtioDevice.STATE + ("bytes_given",)

    def __init__(self, source: Callable[[int], bytes] = os.urandom, max_request: int = 64 * 1024):
        super().__init__([QUEUE_SIZE])
        self.source = source
        self.max_request = max_request
        self.bytes_given = 0

    def process_queue(self, index: int) -> None:
        self.drain(0, self._serve)

    def _serve(self, chain: DescChain) -> int:
        if chain.readable:
            self.guest_error("request", "device-readable buffer in an entropy request")
        n = min(chain.writable_len, self.max_request)
        try:
            chain.write(0, self.source(n))
        except ChainError:
            return 0  # counted by the queue; the buffer goes back empty
        self.bytes_given += n
        return n
