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

`PciDriver` does the same against a `VirtioPci`, the way Linux's virtio_pci modern driver does:
through configuration space (directly or through ports 0xcf8/0xcfc) and the BAR it finds there.
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


def _negotiate(drv, want: int | None) -> None:
    """Steps 2-6 of driver initialisation (virtio 1.2, 3.1.1), the same on every transport: ACK,
    DRIVER, read the offered features, accept `want` (all offered if None) plus VERSION_1, and
    FEATURES_OK, which the device must keep set."""
    drv.add_status(STATUS_ACKNOWLEDGE)
    drv.add_status(STATUS_DRIVER)
    offered = drv.device_features()
    assert offered & VIRTIO_F_VERSION_1
    drv.features = offered if want is None else (want | VIRTIO_F_VERSION_1) & offered
    if not drv.set_features(drv.features):
        raise RuntimeError("the device refused FEATURES_OK")


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
        _negotiate(self, want)
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


# ---- virtio-pci ----

class PciConfigPorts:
    """A function's configuration space reached the way a guest does: configuration mechanism #1
    (CONFIG_ADDRESS at 0xcf8, CONFIG_DATA at 0xcfc) on a port I/O bus."""

    def __init__(self, pio, slot: int, function: int = 0, bus: int = 0):
        self.pio = pio
        self.address = 0x80000000 | (bus << 16) | (slot << 11) | (function << 8)

    def read(self, offset: int, size: int) -> int:
        self.pio.write(0xCF8, 4, self.address | (offset & 0xFC))
        return self.pio.read(0xCFC + (offset & 3), size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.pio.write(0xCF8, 4, self.address | (offset & 0xFC))
        self.pio.write(0xCFC + (offset & 3), size, value)


class _DeviceConfig:
    """A PciDevice's configuration space reached directly (no bus in between)."""

    def __init__(self, device):
        self.device = device

    def read(self, offset: int, size: int) -> int:
        return self.device.config_read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.device.config_write(offset, size, value)


class PciBarRouter:
    """Guest-physical accesses routed to a PciDevice's mapped BARs, for tests without a machine
    bus (with one, pass the machine's MMIO `Bus` to PciDriver instead)."""

    def __init__(self, device):
        self.device = device

    def _find(self, addr: int, size: int) -> tuple[int, int] | None:
        for i, bar in enumerate(self.device.bars):
            base = self.device.bar_address(i)
            if bar is not None and base is not None and base <= addr \
                    and addr + size <= base + bar.size:
                return i, addr - base
        return None

    def read(self, addr: int, size: int) -> int:
        hit = self._find(addr, size)
        return self.device.bar_read(*hit, size) if hit else (1 << (8 * size)) - 1

    def write(self, addr: int, size: int, value: int) -> None:
        hit = self._find(addr, size)
        if hit:
            self.device.bar_write(*hit, size, value)


class PciDriver:
    """Linux's virtio_pci modern driver (virtio_pci_modern_dev.c, vp_modern_probe, and virtio.c's
    virtio_dev_probe), reduced to its config-space and BAR accesses.

    `config`: read/write(offset, size[, value]) of the function's configuration space (the
    `VirtioPci` itself, or `PciConfigPorts`). `mmio`: read/write(addr, size[, value]) by
    guest-physical address (the machine's MMIO bus, or `PciBarRouter(device)`).

        drv = PciDriver(PciConfigPorts(pio, slot), mmio_bus, mem)
        drv.probe()        # IDs, sizes the BARs, finds the capabilities, maps the blocks
        drv.init()         # reset, ACK, DRIVER, features, FEATURES_OK, queues, DRIVER_OK
        drv.kick(0); drv.ack_interrupt(); drv.config(0, 4)
    """

    def __init__(self, config, mmio, mem: GuestMemory, ram_start: int = 0x1000,
                 ram_end: int | None = None):
        from . import pci as P
        self.P = P
        self.cfg = _DeviceConfig(config) if hasattr(config, "config_read") else config
        self.mmio = mmio
        self.mem = mem
        self.alloc = GuestAllocator(mem, ram_start, ram_end or mem.regions[0].end)
        self.queues: dict[int, MockQueue] = {}
        self.notify_addrs: dict[int, int] = {}
        self.features = 0
        self.caps: dict[int, dict] = {}         # cfg_type -> {bar, offset, length, ...}
        self.bar_sizes: dict[int, int] = {}
        self.blocks: dict[int, int] = {}        # cfg_type -> guest-physical address

    # ---- enumeration ----
    def size_bars(self) -> None:
        """What the PCI core does to every BAR (drivers/pci/probe.c, __pci_read_base): decoding
        off, write all ones, read the size mask back, restore, decoding on again."""
        cmd = self.cfg.read(0x04, 2)
        self.cfg.write(0x04, 2, cmd & ~0x3)
        i = 0
        while i < 6:
            off = 0x10 + 4 * i
            orig = self.cfg.read(off, 4)
            self.cfg.write(off, 4, 0xFFFFFFFF)
            mask = self.cfg.read(off, 4)
            self.cfg.write(off, 4, orig)
            is64 = not orig & 1 and orig & 0x6 == 0x4
            if is64:
                orig_hi = self.cfg.read(off + 4, 4)
                self.cfg.write(off + 4, 4, 0xFFFFFFFF)
                mask |= self.cfg.read(off + 4, 4) << 32
                self.cfg.write(off + 4, 4, orig_hi)
            if mask and mask != 0xFFFFFFFF:
                bits = 64 if is64 else 32
                addr_mask = mask & ~(0x3 if orig & 1 else 0xF)
                self.bar_sizes[i] = (~addr_mask + 1) & ((1 << bits) - 1)
            i += 2 if is64 else 1
        self.cfg.write(0x04, 2, cmd)

    def bar_address(self, index: int) -> int:
        lo = self.cfg.read(0x10 + 4 * index, 4)
        addr = lo & ~0xF
        if lo & 0x6 == 0x4:
            addr |= self.cfg.read(0x14 + 4 * index, 4) << 32
        return addr

    def find_capabilities(self) -> None:
        """virtio_pci_find_capability for every cfg_type: the first vendor capability of each."""
        assert self.cfg.read(0x06, 2) & 0x10, "no capability list"
        ptr = self.cfg.read(0x34, 1) & 0xFC
        seen = 0
        while ptr and seen < 48:
            seen += 1
            if self.cfg.read(ptr, 1) == 0x09:
                cfg_type = self.cfg.read(ptr + 3, 1)
                cap = {"at": ptr, "len": self.cfg.read(ptr + 2, 1),
                       "bar": self.cfg.read(ptr + 4, 1),
                       "offset": self.cfg.read(ptr + 8, 4), "length": self.cfg.read(ptr + 12, 4)}
                if cfg_type == self.P.VIRTIO_PCI_CAP_NOTIFY_CFG:
                    cap["multiplier"] = self.cfg.read(ptr + 16, 4)
                if cfg_type not in self.caps and cap["bar"] < 6:
                    self.caps[cfg_type] = cap
            ptr = self.cfg.read(ptr + 1, 1) & 0xFC

    def probe(self) -> None:
        """vp_modern_probe: IDs, BAR sizes, capabilities, and each block mapped inside its BAR."""
        P = self.P
        assert self.cfg.read(0x00, 2) == P.VIRTIO_PCI_VENDOR
        device_id = self.cfg.read(0x02, 2)
        assert 0x1040 <= device_id <= 0x107F, f"not a modern virtio device: {device_id:#x}"
        assert self.cfg.read(0x08, 1) >= 1
        self.size_bars()
        self.find_capabilities()
        for t in (P.VIRTIO_PCI_CAP_COMMON_CFG, P.VIRTIO_PCI_CAP_NOTIFY_CFG,
                  P.VIRTIO_PCI_CAP_ISR_CFG):
            assert t in self.caps, f"missing capability type {t}"
        assert self.caps[P.VIRTIO_PCI_CAP_COMMON_CFG]["length"] >= 0x38
        for t, cap in self.caps.items():
            if t == P.VIRTIO_PCI_CAP_PCI_CFG:
                continue
            size = self.bar_sizes.get(cap["bar"], 0)
            assert cap["offset"] + cap["length"] <= size, f"cap {t} does not fit its BAR"
            self.blocks[t] = self.bar_address(cap["bar"]) + cap["offset"]
        assert self.cfg.read(0x04, 2) & 0x2, "memory decoding is off"

    # ---- the common configuration ----
    def r(self, off: int, size: int) -> int:
        return self.mmio.read(self.blocks[self.P.VIRTIO_PCI_CAP_COMMON_CFG] + off, size)

    def w(self, off: int, value: int, size: int) -> None:
        self.mmio.write(self.blocks[self.P.VIRTIO_PCI_CAP_COMMON_CFG] + off, size, value)

    @property
    def status(self) -> int:
        return self.r(self.P.DEVICE_STATUS, 1)

    def add_status(self, bit: int) -> None:
        self.w(self.P.DEVICE_STATUS, self.status | bit, 1)

    def device_features(self) -> int:
        P = self.P
        self.w(P.DEVICE_FEATURE_SELECT, 0, 4)
        lo = self.r(P.DEVICE_FEATURE, 4)
        self.w(P.DEVICE_FEATURE_SELECT, 1, 4)
        return (self.r(P.DEVICE_FEATURE, 4) << 32) | lo

    def set_features(self, features: int) -> bool:
        P = self.P
        self.w(P.DRIVER_FEATURE_SELECT, 0, 4)
        self.w(P.DRIVER_FEATURE, features & 0xFFFFFFFF, 4)
        self.w(P.DRIVER_FEATURE_SELECT, 1, 4)
        self.w(P.DRIVER_FEATURE, features >> 32, 4)
        self.add_status(STATUS_FEATURES_OK)
        return bool(self.status & STATUS_FEATURES_OK)

    def setup_queue(self, index: int, size: int | None = None) -> MockQueue | None:
        """vp_modern setup_vq: select, size, ring addresses (two 32-bit halves each, low first,
        as vp_iowrite64_twopart does), notify offset, enable."""
        P = self.P
        self.w(P.QUEUE_SELECT, index, 2)
        nmax = self.r(P.QUEUE_SIZE, 2)
        if nmax == 0:
            return None
        assert self.r(P.QUEUE_ENABLE, 2) == 0, "queue already live"
        q = MockQueue(self.mem, min(size or nmax, nmax), self.alloc)
        self.w(P.QUEUE_SIZE, q.size, 2)
        for off, addr in ((P.QUEUE_DESC, q.desc_addr), (P.QUEUE_DRIVER, q.avail_addr),
                          (P.QUEUE_DEVICE, q.used_addr)):
            self.w(off, addr & 0xFFFFFFFF, 4)
            self.w(off + 4, addr >> 32, 4)
        notify = self.caps[P.VIRTIO_PCI_CAP_NOTIFY_CFG]
        off = self.r(P.QUEUE_NOTIFY_OFF, 2) * notify["multiplier"]
        assert off + 2 <= notify["length"], "notify offset outside the notify capability"
        self.notify_addrs[index] = self.blocks[P.VIRTIO_PCI_CAP_NOTIFY_CFG] + off
        self.w(P.QUEUE_ENABLE, 1, 2)
        self.queues[index] = q
        return q

    def init(self, want: int | None = None, queue_size: int | None = None) -> int:
        """virtio_dev_probe + vp_find_vqs (INTx: there is no MSI-X): the negotiated features."""
        P = self.P
        if not self.blocks:
            self.probe()
        self.w(P.DEVICE_STATUS, 0, 1)
        assert self.status == 0
        _negotiate(self, want)
        assert self.r(P.CONFIG_MSIX_VECTOR, 2) == P.NO_VECTOR
        for i in range(self.r(P.NUM_QUEUES, 2)):
            self.setup_queue(i, queue_size)
        self.add_status(STATUS_DRIVER_OK)
        return self.features

    def kick(self, index: int) -> None:
        """vp_notify: the queue index, 16 bits, at the queue's notify address."""
        self.mmio.write(self.notify_addrs[index], 2, index)

    def ack_interrupt(self) -> int:
        """vp_interrupt: one byte read of the ISR, which clears it."""
        return self.mmio.read(self.blocks[self.P.VIRTIO_PCI_CAP_ISR_CFG], 1)

    def config(self, offset: int, size: int) -> int:
        return self.mmio.read(self.blocks[self.P.VIRTIO_PCI_CAP_DEVICE_CFG] + offset, size)
