"""virtio-mmio, version 2 (VIRTIO 1.2 section 4.2): a virtio device as a page of MMIO registers.

No bus enumeration: the VMM tells the guest where the page is and which interrupt it uses (for Linux,
`virtio_mmio.device=4K@0xd0000000:5` on the command line, see attach.py; on ARM, a device-tree node).
The driver then talks to these 32-bit registers (4.2.2, Table "MMIO Device Register Layout"):

    0x000 MagicValue "virt"    0x030 QueueSel           0x080/084 QueueDesc low/high
    0x004 Version 2            0x034 QueueNumMax        0x090/094 QueueDriver (avail) low/high
    0x008 DeviceID             0x038 QueueNum           0x0a0/0a4 QueueDevice (used) low/high
    0x00c VendorID             0x044 QueueReady         0x0ac SHMSel, 0x0b0-0x0bc SHM len/base
    0x010 DeviceFeatures       0x050 QueueNotify        0x0c0 QueueReset
    0x014 DeviceFeaturesSel    0x060 InterruptStatus    0x0fc ConfigGeneration
    0x020 DriverFeatures       0x064 InterruptACK       0x100+ device configuration space
    0x024 DriverFeaturesSel    0x070 Status

How Linux brings one up (drivers/virtio/virtio_mmio.c, virtio.c): check magic and version; write
Status 0 (reset); set ACKNOWLEDGE, then DRIVER; read both halves of DeviceFeatures; write its choice to
DriverFeatures; set FEATURES_OK and read Status back - if the bit did not stick the device refused
the features; per queue: QueueSel, check QueueReady is 0, read QueueNumMax, write QueueNum and the
three ring addresses, QueueReady = 1; finally set DRIVER_OK. Its interrupt handler reads
InterruptStatus, writes the same bits to InterruptACK, and runs the queues / config-change handler.

The interrupt line is level-triggered from our side: asserted while InterruptStatus != 0.

Guest mistakes (a non-32-bit access to a control register, a feature the device did not offer,
DRIVER_OK without FEATURES_OK, clearing a status bit, a queue with impossible addresses) are counted
in `errors`; the ones that leave the device unusable set DEVICE_NEEDS_RESET and raise a
configuration-change interrupt, as 2.1.2 asks. Writes the spec says a driver must not make
(features after FEATURES_OK, queue addresses while the queue is ready) are counted and ignored.
"""

from __future__ import annotations

from pykvm.irq import IrqLine
from pykvm.memory import GuestMemory

from .device import STATUS_DRIVER_OK, VirtioDevice, VirtioTransport

MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
QUEUE_RESET = 0x0C0
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

MMIO_MAGIC = 0x74726976      # "virt" in little-endian ASCII
MMIO_VERSION = 2             # 1 is the legacy (pre-1.0) layout, which we do not offer
VENDOR_PYKVM = 0x4D564B50    # "PKVM"
MMIO_SIZE = 0x1000

_QUEUE_ADDR = {
    QUEUE_DESC_LOW: ("desc_addr", 0), QUEUE_DESC_HIGH: ("desc_addr", 32),
    QUEUE_DRIVER_LOW: ("avail_addr", 0), QUEUE_DRIVER_HIGH: ("avail_addr", 32),
    QUEUE_DEVICE_LOW: ("used_addr", 0), QUEUE_DEVICE_HIGH: ("used_addr", 32),
}


class VirtioMmio(VirtioTransport):
    """The virtio-mmio v2 transport for one device: a bus device (read/write at offsets) that owns
    the registers, and drives `irq` from InterruptStatus. The status state machine and feature
    negotiation are `VirtioTransport`'s (device.py), shared with virtio-pci."""

    transport_name = "virtio-mmio"
    STATE = VirtioTransport.STATE + ("shm_sel", "irq")

    def __init__(self, device: VirtioDevice, mem: GuestMemory, irq: IrqLine):
        self.irq = irq
        self._init_transport(device, mem)

    def _reset_transport(self) -> None:
        super()._reset_transport()
        self.shm_sel = 0

    def _update_interrupt(self) -> None:
        self.irq.set_level(self.interrupt_status != 0)

    # ---- register access ----
    def read(self, offset: int, size: int) -> int:
        with self.device.lock:
            if offset >= CONFIG:
                return self.device.read_config(offset - CONFIG, size)
            if size != 4 or offset % 4:
                self._guest_error("register access size", f"{size} bytes at {offset:#x}")
                return 0
            return self._read_register(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        with self.device.lock:
            if offset == QUEUE_NOTIFY and size == 4:
                # The hot register, written once per batch of requests: straight to the device.
                # Without VIRTIO_F_NOTIFICATION_DATA the value is just the queue index.
                if self.status & STATUS_DRIVER_OK:
                    self.device.notify(value & 0xFFFF)
                return
            if offset >= CONFIG:
                self.device.write_config(offset - CONFIG, size, value)
                return
            if size != 4 or offset % 4:
                self._guest_error("register access size", f"{size} bytes at {offset:#x}")
                return
            self._write_register(offset, value & 0xFFFFFFFF)

    def _read_register(self, offset: int) -> int:
        d = self.device
        if offset == MAGIC_VALUE:
            return MMIO_MAGIC
        if offset == VERSION:
            return MMIO_VERSION
        if offset == DEVICE_ID:
            return d.device_id
        if offset == VENDOR_ID:
            return VENDOR_PYKVM
        if offset == DEVICE_FEATURES:
            return self._device_features_word()
        if offset == QUEUE_NUM_MAX:
            q = self._queue()
            return q.max_size if q else 0   # 0: "this queue does not exist"
        if offset == QUEUE_READY:
            q = self._queue()
            return int(bool(q and q.ready))
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH):
            return 0xFFFFFFFF   # no shared memory regions: length -1 (4.2.2)
        if offset == QUEUE_RESET:
            return 0
        if offset == CONFIG_GENERATION:
            return d.config_generation
        if offset in _QUEUE_ADDR:
            # Write-only in the spec; reading back what was written is harmless and handy.
            q = self._queue()
            if q is None:
                return 0
            attr, shift = _QUEUE_ADDR[offset]
            return (getattr(q, attr) >> shift) & 0xFFFFFFFF
        self._guest_error("read of a write-only or reserved register", f"{offset:#x}")
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        d = self.device
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_NUM:
            self._write_queue_size(value)
        elif offset in _QUEUE_ADDR:
            self._write_queue_addr(*_QUEUE_ADDR[offset], value)
        elif offset == QUEUE_READY:
            self._write_queue_ready(value)
        elif offset == QUEUE_NOTIFY:     # (write() takes the 32-bit ones itself)
            if self.status & STATUS_DRIVER_OK:
                d.notify(value & 0xFFFF)
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
            self._update_interrupt()
        elif offset == STATUS:
            self._write_status(value & 0xFF)
        elif offset == SHM_SEL:
            self.shm_sel = value
        elif offset == QUEUE_RESET:
            if value:
                self._guest_error("QueueReset without VIRTIO_F_RING_RESET")
        else:
            self._guest_error("write to a read-only or reserved register",
                              f"{offset:#x} = {value:#x}")
