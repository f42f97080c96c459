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

`VirtioTransport` (below) is the part both transports share: the status state machine, feature
negotiation and queue enabling, so virtio-mmio and virtio-pci differ only in their registers.

Locking: the vCPU thread drives the transport; a backend thread (network receive, console input)
may also touch the queues. Both go through `self.lock` (re-entrant), which the transports take
around every register access and the devices take in their own threads.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable, Sequence

from pykvm.devices.state import Stateful
from pykvm.guest_errors import count_guest_error
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


class VirtioDevice(Stateful):
    """Base class of the device models. Subclasses set `device_id`, pass their queue sizes and
    feature bits, and override `config_bytes`, `process_queue` and, where needed, `on_activate`,
    `on_reset`, `write_config_bytes`, `accept_features`."""

    device_id = 0
    name = "virtio"
    # Called (thread name, exception) if a thread the device runs dies (pykvm/workers.py); the
    # attach functions point it at the machine's worker_failed, which stops the VM.
    on_worker_error: Callable[[str, BaseException], None] | None = None
    # Negotiated features and the queues; subclasses add their own (STATE + (...)).
    STATE = ("driver_features", "active", "config_generation", "queues")

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

    # ---- the device's own life: LinuxVM calls these through the attachment (attach.py) ----
    def start(self) -> None:
        """Start what runs beside the vCPU (virtio-net: a thread moving frames from its tap).
        Most devices have nothing to start."""

    def close(self) -> None:
        """Release what the device holds on the host (threads, file descriptors)."""

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
        count_guest_error(self.errors, kind, log, self.name, detail)

    @property
    def queue_errors(self) -> int:
        return sum(q.errors for q in self.queues)


class VirtioTransport(Stateful):
    """What every transport shares, whatever its registers look like: the device status state
    machine (2.1, 3.1.1), feature negotiation (2.2), the selected queue's set-up and the interrupt
    status bits. virtio-mmio (mmio.py) and virtio-pci (pci.py) map their registers onto these.

    A subclass calls `_init_transport(device, mem)` and implements `_update_interrupt()` (drive its
    interrupt line from `interrupt_status`); `transport_name` names it in log lines.

    State: `status` (the device status byte), `interrupt_status` (VIRTIO_INT_* bits: mmio's
    InterruptStatus, pci's ISR), `device_features_sel`, `driver_features_sel`, `queue_sel`, and the
    driver's features staged until FEATURES_OK. Guest mistakes are counted in `errors`.
    """

    transport_name = "virtio"
    # A transport's state includes its device's (restored together, under one snapshot entry).
    STATE = ("status", "interrupt_status", "device_features_sel", "driver_features_sel",
             "queue_sel", "_driver_features", "device")

    def _init_transport(self, device: VirtioDevice, mem: GuestMemory) -> None:
        self.device = device
        self.mem = mem
        self.errors: collections.Counter = collections.Counter()
        self._reset_transport()
        device.connect(mem, self._interrupt, self._needs_reset)

    def _reset_transport(self) -> None:
        self.status = 0
        self.interrupt_status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self._driver_features = 0  # staged until FEATURES_OK

    # ---- interrupts ----
    def _update_interrupt(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _interrupt(self, cause: int) -> None:
        with self.device.lock:
            self.interrupt_status |= cause
            self._update_interrupt()

    def _needs_reset(self) -> None:
        with self.device.lock:
            if not self.status & STATUS_DEVICE_NEEDS_RESET:
                self.status |= STATUS_DEVICE_NEEDS_RESET
                self._interrupt(VIRTIO_INT_CONFIG)

    def _guest_error(self, kind: str, detail: str = "") -> None:
        count_guest_error(self.errors, kind, log, f"{self.transport_name} {self.device.name}",
                          detail)

    # ---- features ----
    def _device_features_word(self) -> int:
        """The 32 feature bits that device_features_sel selects (0 beyond bit 63)."""
        if self.device_features_sel > 1:
            return 0
        return (self.device.device_features >> (32 * self.device_features_sel)) & 0xFFFFFFFF

    def _write_driver_features(self, value: int) -> None:
        if self.status & STATUS_FEATURES_OK or not self.status & STATUS_DRIVER:
            self._guest_error("driver features written outside negotiation")
        elif self.driver_features_sel > 1:
            if value:
                self._guest_error("driver features beyond bit 63", f"{value:#x}")
        else:
            shift = 32 * self.driver_features_sel
            self._driver_features = ((self._driver_features & ~(0xFFFFFFFF << shift))
                                     | (value << shift))

    def _features_acceptable(self) -> bool:
        f = self._driver_features
        extra = f & ~self.device.device_features
        if extra:
            self._guest_error("features not offered", f"{extra:#x}")
            return False
        if not f & VIRTIO_F_VERSION_1:
            self._guest_error("legacy driver", "VIRTIO_F_VERSION_1 not accepted")
            return False
        if not self.device.accept_features(f):
            self._guest_error("features refused by the device", f"{f:#x}")
            return False
        return True

    # ---- queues ----
    def _queue(self) -> VirtQueue | None:
        qs = self.device.queues
        return qs[self.queue_sel] if self.queue_sel < len(qs) else None

    def _write_queue_size(self, value: int) -> None:
        q = self._queue()
        if q is None or q.ready:
            self._guest_error("queue size of a missing or live queue", f"queue {self.queue_sel}")
        else:
            q.size = value      # checked against max_size when the queue is enabled (q.check)

    def _write_queue_addr(self, attr: str, shift: int, value: int) -> None:
        """32 bits (at bit `shift`) of the selected queue's `attr`: desc_addr, avail_addr or
        used_addr. The driver writes them in halves; a live queue's addresses are fixed."""
        q = self._queue()
        if q is None or q.ready:
            self._guest_error("address of a missing or live queue", f"queue {self.queue_sel}")
        else:
            old = getattr(q, attr)
            setattr(q, attr, (old & ~(0xFFFFFFFF << shift)) | ((value & 0xFFFFFFFF) << shift))

    def _write_queue_ready(self, value: int) -> None:
        q = self._queue()
        if q is None:
            self._guest_error("QueueReady of a missing queue", f"queue {self.queue_sel}")
            return
        if not value:
            q.ready = False
            return
        if q.ready:
            return
        why = q.check(self.mem)
        if why:
            self._guest_error("bad queue", f"queue {self.queue_sel}: {why}")
            self._needs_reset()
            return
        q.ready = True
        if self.status & STATUS_DRIVER_OK and self.device.active:
            self.device.notify(self.queue_sel)

    # ---- device status ----
    def _write_status(self, value: int) -> None:
        if value == 0:
            self.device.reset()
            self._reset_transport()
            self._update_interrupt()
            return
        old = self.status & ~STATUS_DEVICE_NEEDS_RESET
        new = value & ~STATUS_DEVICE_NEEDS_RESET
        if old & ~new:
            self._guest_error("status bit cleared", f"{self.status:#x} -> {value:#x}")
            self._needs_reset()
            return
        added = new & ~old
        if added & STATUS_FAILED:
            log.info("%s %s: the driver gave up (FAILED)", self.transport_name, self.device.name)
        if added & (STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK) \
                and not new & STATUS_ACKNOWLEDGE:
            self._guest_error("status out of order", f"{value:#x} without ACKNOWLEDGE")
        if added & STATUS_FEATURES_OK:
            if not self._features_acceptable():
                new &= ~STATUS_FEATURES_OK   # the bit does not stick: the driver reads it back
        if added & STATUS_DRIVER_OK:
            if not new & STATUS_FEATURES_OK:
                self._guest_error("DRIVER_OK before FEATURES_OK")
                self._needs_reset()
                return
            if self.status & STATUS_DEVICE_NEEDS_RESET:
                self._guest_error("DRIVER_OK on a device that needs a reset")
                return
        self.status = new | (self.status & STATUS_DEVICE_NEEDS_RESET)
        if added & STATUS_FEATURES_OK and new & STATUS_FEATURES_OK:
            self.device.driver_features = self._driver_features
        if added & STATUS_DRIVER_OK:
            self.device.activate()
