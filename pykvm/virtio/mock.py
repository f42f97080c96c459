"""A driver-side fake, so device models can be tested with no guest (like rust-vmm virtio-queue's
`MockSplitQueue`).

`MockQueue` lays out a split virtqueue in a `GuestMemory` the way a driver would, puts buffer chains
in the available ring and reads the used ring back. `MmioDriver` does what Linux's virtio_mmio does
to a device: the probe/init sequence, queue set-up, kicks and interrupt acknowledgement.

    mem = GuestMemory.for_test(1 << 20)
    dev = VirtioRng()
    t = VirtioMmio(dev, mem, RecordingIrqLine())
    drv = MmioDriver(t, mem)
    drv.init()                        # reset, ACK, DRIVER, features, FEATURES_OK, queues, DRIVER_OK
    head = drv.queues[0].add_chain([], [64])
    drv.kick(0)
    [(id, length)] = drv.queues[0].take_used()
"""

from __future__ import annotations

import struct

from pykvm.memory import GuestMemory

from . import mmio as R
from .device import (STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
                     VIRTIO_F_VERSION_1)
from .queue import (DESC_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                    VRING_AVAIL_F_NO_INTERRUPT, ring_sizes)


class GuestAllocator:
    """A bump allocator over guest RAM, for the fake driver's rings and buffers."""

    def __init__(self, mem: GuestMemory, start: int, end: int):
        self.mem = mem
        self.next = start
        self.end = end

    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise MemoryError("mock guest allocator exhausted")
        self.next = addr + size
        return addr


class MockQueue:
    """A driver's split virtqueue of `size` entries in `mem`, rings allocated from `alloc`."""

    def __init__(self, mem: GuestMemory, size: int, alloc: GuestAllocator):
        self.mem = mem
        self.size = size
        self.alloc = alloc
        dsz, asz, usz = ring_sizes(size)
        self.desc_addr = alloc.alloc(dsz, 16)
        self.avail_addr = alloc.alloc(asz, 2)
        self.used_addr = alloc.alloc(usz, 4)
        mem.fill(self.desc_addr, dsz)
        mem.fill(self.avail_addr, asz)
        mem.fill(self.used_addr, usz)
        self.avail_idx = 0
        self.last_used = 0
        self.next_free = 0          # descriptors are handed out round-robin, never reclaimed
        self.buffers: dict[int, list[tuple[int, int, bool]]] = {}   # head -> [(addr, len, write)]

    # ---- raw access, for fuzzing ----
    def set_desc(self, index: int, addr: int, length: int, flags: int, next_: int) -> None:
        self.mem.write(self.desc_addr + DESC_SIZE * index,
                       struct.pack("<QIHH", addr, length, flags, next_))

    def publish(self, head: int) -> None:
        """Put `head` in the next avail slot and bump avail.idx."""
        self.mem.write_int(self.avail_addr + 4 + 2 * (self.avail_idx % self.size), 2, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_int(self.avail_addr + 2, 2, self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.mem.write_int(self.avail_addr + 2, 2, self.avail_idx)

    def suppress_interrupts(self, on: bool = True) -> None:
        self.mem.write_int(self.avail_addr, 2, VRING_AVAIL_F_NO_INTERRUPT if on else 0)

    def _take_descs(self, n: int) -> list[int]:
        if n > self.size:
            raise ValueError("chain longer than the queue")
        out = [(self.next_free + i) % self.size for i in range(n)]
        self.next_free = (self.next_free + n) % self.size
        return out

    # ---- what a driver does ----
    def add_chain(self, readable: list[bytes], writable: list[int], *,
                  indirect: bool = False) -> int:
        """Copy each of `readable` into a new buffer, allocate buffers of the `writable` sizes,
        chain them (or put them in an indirect table) and make the chain available. Returns the
        head index."""
        segs: list[tuple[int, int, bool]] = []
        for data in readable:
            addr = self.alloc.alloc(max(len(data), 1))
            self.mem.write(addr, data)
            segs.append((addr, len(data), False))
        for n in writable:
            addr = self.alloc.alloc(max(n, 1))
            self.mem.fill(addr, n, 0xAA)   # garbage the device must overwrite
            segs.append((addr, n, True))
        return self.add_segments(segs, indirect=indirect)

    def add_segments(self, segs: list[tuple[int, int, bool]], *, indirect: bool = False) -> int:
        """Chain buffers already in guest memory: [(addr, len, device_writable)]."""
        if indirect:
            table = self.alloc.alloc(DESC_SIZE * len(segs), 16)
            for i, (addr, n, w) in enumerate(segs):
                flags = (VIRTQ_DESC_F_WRITE if w else 0) | (
                    VIRTQ_DESC_F_NEXT if i + 1 < len(segs) else 0)
                self.mem.write(table + DESC_SIZE * i, struct.pack("<QIHH", addr, n, flags, i + 1))
            [head] = self._take_descs(1)
            self.set_desc(head, table, DESC_SIZE * len(segs), VIRTQ_DESC_F_INDIRECT, 0)
        else:
            idx = self._take_descs(len(segs))
            head = idx[0]
            for i, (addr, n, w) in enumerate(segs):
                last = i + 1 == len(segs)
                flags = (VIRTQ_DESC_F_WRITE if w else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
                self.set_desc(idx[i], addr, n, flags, 0 if last else idx[i + 1])
        self.buffers[head] = segs
        self.publish(head)
        return head

    def used_idx(self) -> int:
        return self.mem.read_int(self.used_addr + 2, 2)

    def take_used(self) -> list[tuple[int, int]]:
        """New used-ring entries since the last call: [(head, bytes written)]."""
        out = []
        end = self.used_idx()
        while self.last_used != end:
            slot = self.used_addr + 4 + 8 * (self.last_used % self.size)
            out.append(struct.unpack("<II", self.mem.read(slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def written(self, head: int, n: int | None = None) -> bytes:
        """The first `n` bytes (default all) of the chain's device-writable buffers."""
        out = b"".join(self.mem.read(a, ln) for a, ln, w in self.buffers[head] if w)
        return out if n is None else out[:n]


class MmioDriver:
    """Linux's virtio_mmio driver, reduced to the register sequence, against a `VirtioMmio`."""

    def __init__(self, transport, mem: GuestMemory, ram_start: int = 0x1000,
                 ram_end: int | None = None):
        self.t = transport
        self.mem = mem
        self.alloc = GuestAllocator(mem, ram_start, ram_end or mem.regions[0].end)
        self.queues: dict[int, MockQueue] = {}
        self.features = 0

    def r(self, off: int, size: int = 4) -> int:
        return self.t.read(off, size)

    def w(self, off: int, value: int, size: int = 4) -> None:
        self.t.write(off, size, value)

    def add_status(self, bit: int) -> None:
        self.w(R.STATUS, self.r(R.STATUS) | bit)

    def device_features(self) -> int:
        self.w(R.DEVICE_FEATURES_SEL, 1)
        hi = self.r(R.DEVICE_FEATURES)
        self.w(R.DEVICE_FEATURES_SEL, 0)
        return (hi << 32) | self.r(R.DEVICE_FEATURES)

    def set_features(self, features: int) -> bool:
        """Write the driver's features, set FEATURES_OK, and say whether it stuck."""
        self.w(R.DRIVER_FEATURES_SEL, 1)
        self.w(R.DRIVER_FEATURES, features >> 32)
        self.w(R.DRIVER_FEATURES_SEL, 0)
        self.w(R.DRIVER_FEATURES, features & 0xFFFFFFFF)
        self.add_status(STATUS_FEATURES_OK)
        return bool(self.r(R.STATUS) & STATUS_FEATURES_OK)

    def setup_queue(self, index: int, size: int | None = None) -> MockQueue | None:
        self.w(R.QUEUE_SEL, index)
        assert self.r(R.QUEUE_READY) == 0, "queue already live"
        nmax = self.r(R.QUEUE_NUM_MAX)
        if nmax == 0:
            return None
        q = MockQueue(self.mem, size or nmax, self.alloc)
        self.w(R.QUEUE_NUM, q.size)
        for low, addr in ((R.QUEUE_DESC_LOW, q.desc_addr), (R.QUEUE_DRIVER_LOW, q.avail_addr),
                          (R.QUEUE_DEVICE_LOW, q.used_addr)):
            self.w(low, addr & 0xFFFFFFFF)
            self.w(low + 4, addr >> 32)
        self.w(R.QUEUE_READY, 1)
        self.queues[index] = q
        return q

    def init(self, want: int | None = None, queue_size: int | None = None) -> int:
        """The whole probe: returns the negotiated features. `want` defaults to everything."""
        assert self.r(R.MAGIC_VALUE) == R.MMIO_MAGIC
        assert self.r(R.VERSION) == 2
        assert self.r(R.DEVICE_ID) != 0
        self.w(R.STATUS, 0)
        assert self.r(R.STATUS) == 0
        self.add_status(STATUS_ACKNOWLEDGE)
        self.add_status(STATUS_DRIVER)
        offered = self.device_features()
        assert offered & VIRTIO_F_VERSION_1
        self.features = offered if want is None else (want | VIRTIO_F_VERSION_1) & offered
        if not self.set_features(self.features):
            raise RuntimeError("the device refused FEATURES_OK")
        i = 0
        while self.setup_queue(i, queue_size) is not None:
            i += 1
        self.add_status(STATUS_DRIVER_OK)
        return self.features

    def kick(self, index: int) -> None:
        self.w(R.QUEUE_NOTIFY, index)

    def ack_interrupt(self) -> int:
        """What Linux's vm_interrupt does: read InterruptStatus, acknowledge it, return it."""
        status = self.r(R.INTERRUPT_STATUS)
        if status:
            self.w(R.INTERRUPT_ACK, status)
        return status

    def config(self, offset: int, size: int) -> int:
        return self.r(R.CONFIG + offset, size)
