"""virtio-pci, modern (VIRTIO 1.2 section 4.1): a virtio device as a PCI function.

Unlike virtio-mmio, nothing needs announcing: the guest enumerates PCI, finds vendor 0x1af4 with
device ID 0x1040 + the virtio device type (4.1.2: 0x1041 net, 0x1042 block, 0x1043 console, 0x1044
entropy), revision 1 or more (a "modern" device; 0x1000-0x103f are the legacy/transitional IDs we
do not offer), and walks the capability list for *vendor-specific capabilities* (ID 0x09) that
say where in which BAR each register block lives (4.1.4):

    struct virtio_pci_cap {            config-space bytes
        u8 cap_vndr;  u8 cap_next;     0, 1   0x09, next pointer
        u8 cap_len;   u8 cfg_type;     2, 3   16 (20 for notify, 20 for pci_cfg); 1..5 below
        u8 bar;       u8 id;           4, 5   BAR index; 0 (only shared-memory caps use id)
        u8 padding[2];                 6, 7
        le32 offset;  le32 length;     8, 12  where in the BAR, how long
    };                                        notify adds le32 notify_off_multiplier at 16

    cfg_type 1 COMMON  BAR4 + 0x0000  feature bits, status, queue set-up (4.1.4.3, below)
    cfg_type 2 NOTIFY  BAR4 + 0x3000  a queue's kick address: offset + queue_notify_off * 4
    cfg_type 3 ISR     BAR4 + 0x1000  one byte, read-to-clear: bit 0 queue, bit 1 config change
    cfg_type 4 DEVICE  BAR4 + 0x2000  the device-specific configuration space
    cfg_type 5 PCI_CFG in config space: a window into the BAR through config accesses (4.1.4.9)

The BAR is 64-bit, 16 KiB, one page per block, as QEMU lays it out. Common configuration, with
each field accessed at its own width (4.1.3.1; the 64-bit ones may be accessed as 32-bit halves):

    0x00 le32 device_feature_select   0x14 u8   device_status      0x1e le16 queue_notify_off
    0x04 le32 device_feature          0x15 u8   config_generation  0x20 le64 queue_desc
    0x08 le32 driver_feature_select   0x16 le16 queue_select       0x28 le64 queue_driver (avail)
    0x0c le32 driver_feature          0x18 le16 queue_size         0x30 le64 queue_device (used)
    0x10 le16 config_msix_vector      0x1a le16 queue_msix_vector
    0x12 le16 num_queues              0x1c le16 queue_enable

How Linux brings one up (drivers/virtio/virtio_pci_modern_dev.c, vp_modern_probe; then virtio.c):
match the IDs, find the COMMON, NOTIFY, ISR (and DEVICE) capabilities, check each BAR/offset/length
fits, map them; write status 0 and wait for it to read 0; ACKNOWLEDGE, DRIVER; read device_feature
for selects 0 and 1, write driver_feature likewise, FEATURES_OK, read it back; try MSI-X (we have
none: it falls back to INTx with IRQF_SHARED); per queue: queue_select, read queue_size (0: no such
queue), write the three ring addresses, read queue_notify_off, queue_enable = 1; DRIVER_OK. A kick
is a 16-bit write of the queue index to notify + queue_notify_off * notify_off_multiplier; the
interrupt handler (vp_interrupt) reads the ISR, which clears it, and runs the queues if bit 0 is
set.

The status state machine, feature negotiation and the checks on queue set-up are the ones
virtio-mmio uses (`VirtioTransport`, device.py), so guest mistakes are counted the same way.

**Interrupts.** No MSI-X capability: config_msix_vector and queue_msix_vector read NO_VECTOR
(0xffff) and the device uses INTx#: the PCI line is asserted while the ISR is non-zero, and the
guest's ISR read lowers it. PCI INTx is level-triggered and shareable [PCI 2.2.6], so the 8259 input
it is routed to must be marked level-triggered in the ELCR, as a PC BIOS does: `attach_pci` calls
`machine.vm.set_level_triggered(irq)` (in-kernel PIC) or `machine.userirq.pic.set_level_triggered`
(Python PIC). An edge-triggered input would also work here, for the reason given in attach.py for
virtio-mmio (every ISR read drops the line, so each new batch is a new edge), but level is what
real hardware does and lets the line be shared.

Shortcuts, admitted: no MSI-X (one interrupt for config and all queues; fine for a one-vCPU
machine), no legacy or transitional interface, no VIRTIO_F_NOTIFICATION_DATA or RING_RESET (so
the 1.2 queue_notify_data/queue_reset fields are absent: the common block is 1.0's, 0x38 bytes),
and no shared-memory capabilities (cfg_type 8).
"""

from __future__ import annotations

from pykvm.devices.pci import PciDevice
from pykvm.devices.pci.device import CAP_ID_VENDOR
from pykvm.memory import GuestMemory

from .device import (STATUS_DRIVER_OK, VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET,
                     VIRTIO_ID_RNG, VirtioDevice, VirtioTransport)

VIRTIO_PCI_VENDOR = 0x1AF4          # Red Hat, Inc. (virtio's PCI vendor ID, 4.1.2)
VIRTIO_PCI_DEVICE_BASE = 0x1040     # modern device ID = 0x1040 + virtio device type
VIRTIO_PCI_REVISION = 1             # "MUST have Revision ID 1 or higher" for non-transitional

# cfg_type of struct virtio_pci_cap (4.1.4).
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

NO_VECTOR = 0xFFFF                  # VIRTIO_MSI_NO_VECTOR

# Class codes by device type (base class << 16 | subclass << 8 | prog-if). QEMU uses 0x010000
# (SCSI) for block; 0x018000 "other mass storage" says what it is. Neither matters to Linux,
# which matches virtio devices by vendor/device ID.
CLASS_CODES = {
    VIRTIO_ID_NET: 0x020000,        # network, Ethernet
    VIRTIO_ID_BLOCK: 0x018000,      # mass storage, other
    VIRTIO_ID_CONSOLE: 0x078000,    # simple communication, other
    VIRTIO_ID_RNG: 0x00FF00,        # what QEMU uses (PCI_CLASS_OTHERS as a 16-bit class id)
}
CLASS_OTHER = 0xFF0000              # "device does not fit any defined class"

# The BAR and its four blocks.
BAR_INDEX = 4
BAR_SIZE = 0x4000
COMMON_OFFSET, COMMON_SIZE = 0x0000, 0x38
ISR_OFFSET, ISR_SIZE = 0x1000, 1
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
NOTIFY_OFF_MULTIPLIER = 4          # queue i kicks at NOTIFY_OFFSET + 4 * i
BLOCK_SIZE = 0x1000

# Common configuration fields (4.1.4.3): offset -> (width, name).
DEVICE_FEATURE_SELECT = 0x00
DEVICE_FEATURE = 0x04
DRIVER_FEATURE_SELECT = 0x08
DRIVER_FEATURE = 0x0C
CONFIG_MSIX_VECTOR = 0x10
NUM_QUEUES = 0x12
DEVICE_STATUS = 0x14
CONFIG_GENERATION = 0x15
QUEUE_SELECT = 0x16
QUEUE_SIZE = 0x18
QUEUE_MSIX_VECTOR = 0x1A
QUEUE_ENABLE = 0x1C
QUEUE_NOTIFY_OFF = 0x1E
QUEUE_DESC = 0x20
QUEUE_DRIVER = 0x28
QUEUE_DEVICE = 0x30

_WIDTH = {DEVICE_FEATURE_SELECT: 4, DEVICE_FEATURE: 4, DRIVER_FEATURE_SELECT: 4,
          DRIVER_FEATURE: 4, CONFIG_MSIX_VECTOR: 2, NUM_QUEUES: 2, DEVICE_STATUS: 1,
          CONFIG_GENERATION: 1, QUEUE_SELECT: 2, QUEUE_SIZE: 2, QUEUE_MSIX_VECTOR: 2,
          QUEUE_ENABLE: 2, QUEUE_NOTIFY_OFF: 2}
_QUEUE_ADDR = {QUEUE_DESC: "desc_addr", QUEUE_DRIVER: "avail_addr", QUEUE_DEVICE: "used_addr"}
for _off in _QUEUE_ADDR:            # a 64-bit field: whole, or either 32-bit half
    _WIDTH[_off] = 8
    _WIDTH[_off + 4] = 4

# Offsets inside the PCI_CFG capability (struct virtio_pci_cfg_cap).
_CAP_BAR = 4
_CAP_OFFSET = 8
_CAP_LENGTH = 12
_CAP_DATA = 16


def _cap_body(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """struct virtio_pci_cap after cap_vndr and cap_next."""
    cap_len = 16 + len(extra)
    return (bytes([cap_len, cfg_type, BAR_INDEX, 0, 0, 0]) + offset.to_bytes(4, "little")
            + length.to_bytes(4, "little") + extra)


class VirtioPci(PciDevice, VirtioTransport):
    """The modern virtio-pci transport for one device: a `PciDevice` with one 64-bit memory BAR
    (BAR 4, 16 KiB) holding the common, ISR, device and notify blocks, and the capabilities that
    point at them. INTx follows the ISR. Add it to a `PciBus` (or use `attach_pci`)."""

    transport_name = "virtio-pci"
    STATE = PciDevice.STATE + VirtioTransport.STATE

    def __init__(self, device: VirtioDevice, mem: GuestMemory):
        dev_id = device.device_id
        PciDevice.__init__(self, VIRTIO_PCI_VENDOR, VIRTIO_PCI_DEVICE_BASE + dev_id,
                           CLASS_CODES.get(dev_id, CLASS_OTHER), revision=VIRTIO_PCI_REVISION,
                           subsystem_vendor_id=VIRTIO_PCI_VENDOR, subsystem_id=dev_id,
                           interrupt_pin=1)
        self.add_bar(BAR_INDEX, BAR_SIZE, "mem64")
        self.config_size = len(device.config_bytes())
        self.add_capability(CAP_ID_VENDOR, _cap_body(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET,
                                                     COMMON_SIZE))
        self.add_capability(CAP_ID_VENDOR, _cap_body(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, ISR_SIZE))
        self.add_capability(CAP_ID_VENDOR, _cap_body(
            VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET,
            NOTIFY_OFF_MULTIPLIER * max(len(device.queues), 1),
            NOTIFY_OFF_MULTIPLIER.to_bytes(4, "little")))
        if self.config_size:          # a device with no configuration space has no DEVICE cap
            self.add_capability(CAP_ID_VENDOR, _cap_body(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET,
                                                         self.config_size))
        # PCI_CFG: bar, offset and length writable; the data bytes are served by config_read/write.
        self.pci_cfg_cap = self.add_capability(
            CAP_ID_VENDOR, _cap_body(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, bytes(4)),
            wmask=bytes(2) + b"\xff" + bytes(3) + b"\xff" * 12)
        self._init_transport(device, mem)

    # ---- interrupts: INTx# follows the ISR ----
    def _update_interrupt(self) -> None:
        self.set_irq(self.interrupt_status != 0)

    # ---- the BAR ----
    def bar_read(self, index: int, offset: int, size: int) -> int:
        with self.device.lock:
            if COMMON_OFFSET <= offset < COMMON_OFFSET + BLOCK_SIZE:
                return self._common_read(offset - COMMON_OFFSET, size)
            if ISR_OFFSET <= offset < ISR_OFFSET + BLOCK_SIZE:
                return self._isr_read(offset - ISR_OFFSET, size)
            if DEVICE_OFFSET <= offset < DEVICE_OFFSET + BLOCK_SIZE:
                return self.device.read_config(offset - DEVICE_OFFSET, size)
            if NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + BLOCK_SIZE:
                return 0                      # the notify block is write-only
            self._guest_error("read outside the register blocks", f"{size} bytes at {offset:#x}")
            return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        with self.device.lock:
            if COMMON_OFFSET <= offset < COMMON_OFFSET + BLOCK_SIZE:
                self._common_write(offset - COMMON_OFFSET, size, value)
            elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + BLOCK_SIZE:
                self.device.write_config(offset - DEVICE_OFFSET, size, value)
            elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + BLOCK_SIZE:
                self._notify_write(offset - NOTIFY_OFFSET, size, value)
            else:
                self._guest_error("write to the ISR or outside the register blocks",
                                  f"{size} bytes at {offset:#x} = {value:#x}")

    def _isr_read(self, offset: int, size: int) -> int:
        if offset != 0:
            self._guest_error("ISR read", f"{size} bytes at ISR + {offset:#x}")
            return 0
        # 4.1.4.5.1: reading the ISR resets it to 0 and deasserts the interrupt.
        isr = self.interrupt_status
        self.interrupt_status = 0
        self._update_interrupt()
        return isr

    def _notify_write(self, offset: int, size: int, value: int) -> None:
        index, rest = divmod(offset, NOTIFY_OFF_MULTIPLIER)
        if rest or size not in (2, 4) or index >= len(self.device.queues):
            self._guest_error("notify", f"{size} bytes at notify + {offset:#x}")
            return
        # Without VIRTIO_F_NOTIFICATION_DATA the value is the queue index: the address says it too.
        if value & 0xFFFF != index:
            self._guest_error("notify value is not the queue of its address",
                              f"{value:#x} at queue {index}'s address")
        if self.status & STATUS_DRIVER_OK:
            self.device.notify(index)

    def notify_address(self, queue: int) -> int | None:
        """Guest-physical address a kick of `queue` is written to (None while the BAR is off)."""
        base = self.bar_address(BAR_INDEX)
        return None if base is None else base + NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * queue

    # ---- common configuration ----
    def _field(self, offset: int, size: int) -> bool:
        if _WIDTH.get(offset) == size or (size == 4 and _WIDTH.get(offset) == 8):
            return True
        self._guest_error("common config access", f"{size} bytes at {offset:#x}")
        return False

    def _common_read(self, offset: int, size: int) -> int:
        if not self._field(offset, size):
            return 0
        d = self.device
        q = self._queue()
        if offset == DEVICE_FEATURE_SELECT:
            return self.device_features_sel
        if offset == DEVICE_FEATURE:
            return self._device_features_word()
        if offset == DRIVER_FEATURE_SELECT:
            return self.driver_features_sel
        if offset == DRIVER_FEATURE:
            if self.driver_features_sel > 1:
                return 0
            return (self._driver_features >> (32 * self.driver_features_sel)) & 0xFFFFFFFF
        if offset in (CONFIG_MSIX_VECTOR, QUEUE_MSIX_VECTOR):
            return NO_VECTOR
        if offset == NUM_QUEUES:
            return len(d.queues)
        if offset == DEVICE_STATUS:
            return self.status
        if offset == CONFIG_GENERATION:
            return d.config_generation & 0xFF
        if offset == QUEUE_SELECT:
            return self.queue_sel
        if offset == QUEUE_SIZE:
            return q.size if q else 0          # 0: "this queue is unavailable"
        if offset == QUEUE_ENABLE:
            return int(bool(q and q.ready))
        if offset == QUEUE_NOTIFY_OFF:
            return self.queue_sel if q else 0  # queue i kicks at notify + i * multiplier
        base = offset & ~7
        value = getattr(q, _QUEUE_ADDR[base]) if q else 0
        shift = 8 * (offset - base)
        return (value >> shift) & ((1 << (8 * size)) - 1)

    def _common_write(self, offset: int, size: int, value: int) -> None:
        if not self._field(offset, size):
            return
        if offset == DEVICE_FEATURE_SELECT:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURE_SELECT:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURE:
            self._write_driver_features(value)
        elif offset in (CONFIG_MSIX_VECTOR, QUEUE_MSIX_VECTOR):
            # No MSI-X: the vector reads back NO_VECTOR, which tells the driver it did not stick.
            if value != NO_VECTOR:
                self._guest_error("MSI-X vector without MSI-X", f"{value:#x}")
        elif offset == DEVICE_STATUS:
            self._write_status(value & 0xFF)
        elif offset == QUEUE_SELECT:
            self.queue_sel = value
        elif offset == QUEUE_SIZE:
            self._write_queue_size(value)
        elif offset == QUEUE_ENABLE:
            if value == 1:
                self._write_queue_ready(1)
            else:   # 4.1.4.3.2: "The driver MUST NOT write a 0 to queue_enable."
                self._guest_error("queue_enable written with", f"{value:#x}")
        elif offset & ~7 in _QUEUE_ADDR:
            base = offset & ~7
            attr = _QUEUE_ADDR[base]
            if size == 8:
                self._write_queue_addr(attr, 0, value & 0xFFFFFFFF)
                self._write_queue_addr(attr, 32, value >> 32)
            else:
                self._write_queue_addr(attr, 8 * (offset - base), value)
        else:
            self._guest_error("write to a read-only common config field",
                              f"{offset:#x} = {value:#x}")

    # ---- the PCI configuration access capability (4.1.4.9) ----
    def _pci_cfg_window(self, count: bool = True) -> tuple[int, int] | None:
        """(BAR offset, length) the PCI_CFG capability selects, if it is a valid access. Reads of
        an unset window are not counted: anything dumping config space reads it."""
        c = self.pci_cfg_cap
        bar = self.config[c + _CAP_BAR]
        offset = self.get32(c + _CAP_OFFSET)
        length = self.get32(c + _CAP_LENGTH)
        if bar != BAR_INDEX or length not in (1, 2, 4) or offset % length \
                or offset + length > BAR_SIZE:
            if count:
                self._guest_error("PCI_CFG access",
                                  f"bar {bar} offset {offset:#x} length {length}")
            return None
        return offset, length

    def config_read(self, offset: int, size: int) -> int:
        data = self.pci_cfg_cap + _CAP_DATA
        if offset < data + 4 and offset + size > data:
            window = self._pci_cfg_window(count=False)
            if window is not None:
                bar_offset, length = window
                value = self.bar_read(BAR_INDEX, bar_offset, length)
                self.config[data:data + 4] = value.to_bytes(4, "little")
        return super().config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        data = self.pci_cfg_cap + _CAP_DATA
        if offset == data and size >= 1:
            window = self._pci_cfg_window()
            if window is not None:
                bar_offset, length = window
                if size < length:
                    self._guest_error("PCI_CFG write narrower than its length")
                else:
                    self.bar_write(BAR_INDEX, bar_offset, length,
                                   value & ((1 << (8 * length)) - 1))
            return
        super().config_write(offset, size, value)
