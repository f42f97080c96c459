"""`VirtioDevice`: what every virtio device model has, whatever transport carries it.

A virtio device (VIRTIO 1.2 section 2) is a *device type* (1 net, 2 block, 3 console, 4 entropy,
...), a set of *feature bits* the device offers and the driver accepts a subset of, a small
device-specific *configuration space*, and a few *virtqueues*. How the driver reaches those - MMIO
registers (virtio-mmio), PCI capabilities (virtio-pci) - is the transport's business
(pykvm/virtio/mmio.py, pci.py). The transport calls:

    connect(mem, interrupt, needs_reset)  once, when it is built
    read_config / write_config           driver access to the configuration space
    accept_features(f) -> bool           at FEATURES_OK: may this driver's choice stand?
    activate()                           at DRIVER_OK: the queues are live
    notify(queue_index)                  the driver kicked a queue
    reset()                              status 0 written: back to power-on state

and the device calls back `interrupt(VIRTIO_INT_*)` when it has used buffers or a config change,
and `needs_reset()` when the guest broke a queue (DEVICE_NEEDS_RESET).

Locking: the vCPU thread drives the transport; a backend thread (network receive, console input)
may also touch the queues. Both go through `self.lock` (re-entrant), which the transports take
around every register access and the devices take in their own threads.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable, Sequence

from pykvm.memory import GuestMemory

from .queue import DescChain, VirtQueue

log = logging.getLogger("pykvm.virtio")

# Device types (5 Device Types).
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4

# Reserved feature bits (6 Reserved Feature Bits).
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_F_ACCESS_PLATFORM = 1 << 33
VIRTIO_F_RING_PACKED = 1 << 34

# Device status (2.1).
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

# Interrupt causes; the same two bits in virtio-mmio InterruptStatus and the virtio-pci ISR.
VIRTIO_INT_VRING = 1
VIRTIO_INT_CONFIG = 2


class VirtioDevice:
    """Base class of the device models. Subclasses set `device_id`, pass their queue sizes and
    feature bits, and override `config_bytes`, `process_queue` and, where needed, `on_activate`,
    `on_reset`, `write_config_bytes`, `accept_features`."""

    device_id = 0
    name = "virtio"

    def __init__(self, queue_sizes: Sequence[int], features: int = 0):
        self.queues = [VirtQueue(n) for n in queue_sizes]
        self.device_features = features | VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC
        self.driver_features = 0
        self.lock = threading.RLock()
        self.mem: GuestMemory | None = None
        self.active = False
        self.config_generation = 0
        self.errors: collections.Counter = collections.Counter()  # device-level guest mistakes
        self._interrupt: Callable[[int], None] = lambda cause: None
        self._needs_reset: Callable[[], None] = lambda: None

    # ---- called by the transport ----
    def connect(self, mem: GuestMemory, interrupt: Callable[[int], None],
                needs_reset: Callable[[], None]) -> None:
        self.mem = mem
        for q in self.queues:
            q.mem = mem
        self._interrupt = interrupt
        self._needs_reset = needs_reset

    def config_bytes(self) -> bytes:
        """The device-specific configuration space, little-endian, as the driver sees it now."""
        return b""

    def write_config_bytes(self, offset: int, data: bytes) -> None:
        """A driver write into the configuration space. Most fields are read-only."""
        self.guest_error("config write", f"{len(data)} bytes at {offset:#x} of read-only config")

    def read_config(self, offset: int, size: int) -> int:
        cfg = self.config_bytes()
        if offset < 0 or offset + size > len(cfg):
            self.guest_error("config read", f"{size} bytes at {offset:#x}, config is {len(cfg)}")
            return 0
        return int.from_bytes(cfg[offset:offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > len(self.config_bytes()):
            self.guest_error("config write", f"{size} bytes at {offset:#x} outside config")
            return
        self.write_config_bytes(offset, value.to_bytes(size, "little"))

    def accept_features(self, features: int) -> bool:
        """At FEATURES_OK: the transport already checked `features` is a subset of the offer."""
        return True

    def activate(self) -> None:
        """DRIVER_OK: negotiated features take effect and the queues go live."""
        indirect = bool(self.driver_features & VIRTIO_F_INDIRECT_DESC)
        for q in self.queues:
            q.indirect = indirect
        self.active = True
        self.on_activate()
        # A driver may kick (or fill a queue) before DRIVER_OK; the device must not use buffers
        # until now (2.1.2), so look at every live queue once.
        for i, q in enumerate(self.queues):
            if q.ready:
                self.notify(i)

    def notify(self, index: int) -> None:
        """The driver says queue `index` has new buffers."""
        if not 0 <= index < len(self.queues):
            self.guest_error("notify", f"queue {index} does not exist")
            return
        q = self.queues[index]
        with self.lock:
            if not self.active or not q.ready:
                return  # nothing to do yet: activate() looks again
            self.process_queue(index)
            if q.broken:
                self.needs_reset()

    def reset(self) -> None:
        self.active = False
        self.driver_features = 0
        for q in self.queues:
            q.reset()
            q.indirect = False
        self.on_reset()

    # ---- for subclasses ----
    def process_queue(self, index: int) -> None:
        """Consume what the driver made available in queue `index`."""

    def on_activate(self) -> None:
        pass

    def on_reset(self) -> None:
        pass

    def has_feature(self, bit: int) -> bool:
        return bool(self.driver_features & bit)

    def drain(self, index: int, handle: Callable[[DescChain], int]) -> None:
        """Pop every available chain of queue `index`, let `handle(chain) -> bytes written` serve
        it, return it in the used ring, and interrupt once if anything was used (malformed chains
        that pop() dropped included)."""
        q = self.queues[index]
        start = q.next_used
        while (chain := q.pop()) is not None:
            q.add_used(chain.head, handle(chain))
        if q.next_used != start:
            self.signal_used(q)

    def signal_used(self, queue: VirtQueue | int) -> None:
        """Interrupt the driver for newly used buffers in `queue` (unless it suppressed that)."""
        q = self.queues[queue] if isinstance(queue, int) else queue
        if q.needs_interrupt():
            self._interrupt(VIRTIO_INT_VRING)

    def config_changed(self) -> None:
        """The device changed its configuration space: a new generation and an interrupt."""
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        self._interrupt(VIRTIO_INT_CONFIG)

    def needs_reset(self) -> None:
        self.active = False
        self._needs_reset()

    def guest_error(self, kind: str, detail: str = "") -> None:
        self.errors[kind] += 1
        level = logging.WARNING if self.errors[kind] == 1 else logging.DEBUG
        log.log(level, "%s: %s %s", self.name, kind, detail)

    @property
    def queue_errors(self) -> int:
        return sum(q.errors for q in self.queues)
