"""`PciDevice`: one PCI function's 256-byte configuration space, BARs, INTx and capabilities.

Source: PCI Local Bus Specification, Revision 3.0 (cited as [PCI]): chapter 6 "Configuration Space",
Figure 6-1 (the type 00h header), 6.2.2 (command), 6.2.3 (status), 6.2.4 (interrupt line/pin),
6.2.5.1 (base address registers), 6.7 (capabilities list).

Type 00h header, byte offsets:

    00 vendor ID        02 device ID        04 command          06 status
    08 revision ID      09 class code (prog-if, subclass, base class: 3 bytes)
    0c cache line size  0d latency timer    0e header type      0f BIST
    10-27 BAR0-BAR5     28 CardBus CIS      2c subsystem vendor 2e subsystem ID
    30 expansion ROM    34 capabilities ptr 3c interrupt line   3d interrupt pin
    3e min grant        3f max latency      40-ff device specific (capabilities live here)

Every byte has a write mask (`wmask`: bits the guest may change) and a write-1-to-clear mask
(`w1cmask`, the status register's error bits). A config write lands through the masks; nothing else
about a register's behaviour needs code except the BARs and the command register, whose changes the
bus reports (`on_bar_change`) so the owner can move the device's address windows.

**BARs and sizing** [PCI 6.2.5.1]: a BAR's low bits are read-only type bits (memory: bit 0 = 0,
bits 2:1 = 00 32-bit / 10 64-bit, bit 3 prefetchable; I/O: bit 0 = 1); the address bits below the
BAR's size are read-only 0. So when software writes all ones and reads back, it sees ~(size-1) | type
bits and learns the size. That falls out of the write mask; no special case. A 64-bit BAR takes two
slots, the second holding the upper 32 address bits. I/O BARs decode 16 bits (x86 has 64 Ki ports):
the upper 16 bits are hardwired 0, which the spec allows and Linux expects (IO_SPACE_LIMIT).

A BAR is *mapped* when its decode enable bit (command bit 0 for I/O, bit 1 for memory) is set and its
address is non-zero and does not wrap past the end of its address space (the all-ones sizing pattern
never counts as an address).

Subclass hooks: `bar_read(index, offset, size)`, `bar_write(index, offset, size, value)` serve guest
accesses inside a mapped BAR (offset from the BAR's base); `config_written(offset, size)` runs after a
config write has landed (capability registers with side effects); `config_read` may be extended.
`set_irq(level)` asserts INTx (status bit 3, gated by command bit 10 "interrupt disable").
"""

from __future__ import annotations

from dataclasses import dataclass

from pykvm.irq import IrqLine, NullIrqLine
from pykvm.devices.state import Stateful

VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
CONFIG_SPACE_SIZE = 256
CAPS_START = 0x40

COMMAND_IO = 0x0001
COMMAND_MEMORY = 0x0002
COMMAND_MASTER = 0x0004
COMMAND_PARITY = 0x0040
COMMAND_SERR = 0x0100
COMMAND_INTX_DISABLE = 0x0400
COMMAND_WRITABLE = (COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_PARITY | COMMAND_SERR
                    | COMMAND_INTX_DISABLE)

STATUS_INTERRUPT = 0x0008
STATUS_CAP_LIST = 0x0010
STATUS_W1C = 0xF900      # parity, signalled/received aborts, SERR, detected parity [PCI 6.2.3]

BAR_IO = 0x1
BAR_MEM_64 = 0x4
BAR_MEM_PREFETCH = 0x8

HEADER_MULTIFUNCTION = 0x80

CAP_ID_PM = 0x01
CAP_ID_MSI = 0x05
CAP_ID_VENDOR = 0x09
CAP_ID_MSIX = 0x11


@dataclass
class Bar:
    """What the device declared for one BAR. `kind`: "mem32", "mem64" or "io"."""

    index: int
    size: int
    kind: str
    prefetchable: bool = False

    @property
    def is_io(self) -> bool:
        return self.kind == "io"


class PciDevice(Stateful):
    """One PCI function (type 00h header). See the module docstring for the register model.

    Constructor: IDs and class code (24 bits: base class << 16 | subclass << 8 | prog-if),
    `interrupt_pin` (0 none, 1-4 INTA#-INTD#). Then `add_bar(...)` and `add_capability(...)` before
    the device is added to a PciBus. Attributes the bus sets: `pci_bus`, `slot`, `function`, `irq`.
    """

    # Configuration space holds all a function's programmable state (BARs, command, capabilities);
    # the masks and BAR sizes are fixed at construction.
    STATE = ("config", "_irq_level", "irq")

    def __init__(self, vendor_id: int, device_id: int, class_code: int, *, revision: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0, interrupt_pin: int = 0):
        self.config = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)
        self.w1cmask = bytearray(CONFIG_SPACE_SIZE)
        self.bars: list[Bar | None] = [None] * 6
        self.pci_bus = None
        self.slot: int | None = None
        self.function = 0
        self.irq: IrqLine = NullIrqLine()
        self._irq_level = False
        self._last_cap = None
        self._next_cap_offset = CAPS_START
        self.set16(VENDOR_ID, vendor_id)
        self.set16(DEVICE_ID, device_id)
        self.config[REVISION_ID] = revision
        self.config[CLASS_PROG:CLASS_PROG + 3] = class_code.to_bytes(3, "little")
        self.set16(SUBSYSTEM_VENDOR_ID, subsystem_vendor_id)
        self.set16(SUBSYSTEM_ID, subsystem_id)
        self.config[INTERRUPT_PIN] = interrupt_pin
        self._set_mask(COMMAND, 2, COMMAND_WRITABLE)
        self.w1cmask[STATUS:STATUS + 2] = STATUS_W1C.to_bytes(2, "little")
        self.wmask[CACHE_LINE_SIZE] = 0xFF
        self.wmask[LATENCY_TIMER] = 0xFF
        self.wmask[INTERRUPT_LINE] = 0xFF

    # --- building the device ---
    def set16(self, offset: int, value: int) -> None:
        self.config[offset:offset + 2] = value.to_bytes(2, "little")

    def set32(self, offset: int, value: int) -> None:
        self.config[offset:offset + 4] = value.to_bytes(4, "little")

    def get16(self, offset: int) -> int:
        return int.from_bytes(self.config[offset:offset + 2], "little")

    def get32(self, offset: int) -> int:
        return int.from_bytes(self.config[offset:offset + 4], "little")

    def _set_mask(self, offset: int, size: int, mask: int) -> None:
        self.wmask[offset:offset + size] = mask.to_bytes(size, "little")

    def add_bar(self, index: int, size: int, kind: str = "mem32", prefetchable: bool = False) -> Bar:
        """Declare BAR `index` (a 64-bit BAR also takes index + 1). Size: a power of two, at least
        16 bytes for memory and 4 for I/O (at most 256 for I/O [PCI 6.2.5.1])."""
        if kind not in ("mem32", "mem64", "io"):
            raise ValueError(f"unknown BAR kind {kind!r}")
        last = index + (1 if kind == "mem64" else 0)
        if not 0 <= index <= last < 6 or any(self.bars[i] for i in range(index, last + 1)):
            raise ValueError(f"BAR {index} ({kind}) does not fit")
        if size & (size - 1) or size < (4 if kind == "io" else 16) or (kind == "io" and size > 256) \
                or (kind != "mem64" and size > 1 << 31):
            raise ValueError(f"BAR size {size:#x} is not allowed for {kind}")
        bar = Bar(index, size, kind, prefetchable)
        offset = BAR0 + 4 * index
        if kind == "io":
            self.set32(offset, BAR_IO)
            self._set_mask(offset, 4, ~(size - 1) & 0xFFFC)
        else:
            flags = (BAR_MEM_64 if kind == "mem64" else 0) | (BAR_MEM_PREFETCH if prefetchable else 0)
            self.set32(offset, flags)
            mask = ~(size - 1) & ((1 << 64) - 1) & ~0xF
            self._set_mask(offset, 4, mask & 0xFFFFFFFF)
            if kind == "mem64":
                self._set_mask(offset + 4, 4, mask >> 32)
        self.bars[index] = bar
        return bar

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes | None = None) -> int:
        """Append a capability [PCI 6.7]: ID, next pointer, then `body`. Returns its offset.
        `wmask` (same length as body) says which body bits the guest may write."""
        length = 2 + len(body)
        offset = (self._next_cap_offset + 3) & ~3
        if offset + length > CONFIG_SPACE_SIZE:
            raise ValueError("no room left in configuration space for this capability")
        self.config[offset] = cap_id
        self.config[offset + 1] = 0
        self.config[offset + 2:offset + length] = body
        if wmask is not None:
            if len(wmask) != len(body):
                raise ValueError("capability wmask must be as long as its body")
            self.wmask[offset + 2:offset + length] = wmask
        if self._last_cap is None:
            self.config[CAPABILITY_LIST] = offset
        else:
            self.config[self._last_cap + 1] = offset
        self._last_cap = offset
        self._next_cap_offset = offset + length
        self.set16(STATUS, self.get16(STATUS) | STATUS_CAP_LIST)
        return offset

    def capabilities(self) -> list[tuple[int, int]]:
        """[(offset, cap_id), ...] following the list as a driver would."""
        out = []
        ptr = self.config[CAPABILITY_LIST] & 0xFC
        while ptr and len(out) < 48:
            out.append((ptr, self.config[ptr]))
            ptr = self.config[ptr + 1] & 0xFC
        return out

    # --- configuration space access (the PCI bus calls these) ---
    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        before = self._bar_addresses()
        for i in range(size):
            o = offset + i
            if o >= CONFIG_SPACE_SIZE:
                break
            byte = (value >> (8 * i)) & 0xFF
            wm, w1c = self.wmask[o], self.w1cmask[o]
            new = (self.config[o] & ~wm) | (byte & wm)
            new &= ~(byte & w1c)
            self.config[o] = new & 0xFF
        if offset < COMMAND + 2 and offset + size > COMMAND:
            self._update_irq()
        after = self._bar_addresses()
        if self.pci_bus is not None:
            for i, (old, new) in enumerate(zip(before, after)):
                if old != new:
                    self.pci_bus._bar_changed(self, i, old, new)
        self.config_written(offset, size)

    def after_restore(self) -> None:
        # The BARs may sit elsewhere than where the bus mapped them: map them where they are now.
        if self.pci_bus is not None:
            for i, bar in enumerate(self.bars):
                if bar is not None:
                    self.pci_bus._bar_changed(self, i, None, self.bar_address(i))

    def config_written(self, offset: int, size: int) -> None:
        """Hook: a config write at offset/size has landed."""

    # --- BARs ---
    @property
    def command(self) -> int:
        return self.get16(COMMAND)

    def bar_register(self, index: int) -> int:
        """The address programmed in BAR `index` (64 bits for mem64), type bits stripped."""
        bar = self.bars[index]
        if bar is None:
            return 0
        offset = BAR0 + 4 * index
        if bar.is_io:
            return self.get32(offset) & ~0x3
        value = self.get32(offset) & ~0xF
        if bar.kind == "mem64":
            value |= self.get32(offset + 4) << 32
        return value

    def bar_address(self, index: int) -> int | None:
        """Where BAR `index` decodes now, or None (decode disabled, zero or wrapping address)."""
        bar = self.bars[index]
        if bar is None:
            return None
        if not self.command & (COMMAND_IO if bar.is_io else COMMAND_MEMORY):
            return None
        addr = self.bar_register(index)
        limit = 1 << (16 if bar.is_io else 64 if bar.kind == "mem64" else 32)
        if addr == 0 or addr + bar.size >= limit:
            return None
        return addr

    def _bar_addresses(self) -> list[int | None]:
        return [self.bar_address(i) for i in range(6)]

    def program_bar(self, index: int, addr: int) -> None:
        """Firmware-style BAR assignment (as a BIOS would before the OS runs)."""
        bar = self.bars[index]
        offset = BAR0 + 4 * index
        if bar is None or addr & (bar.size - 1):
            raise ValueError(f"BAR {index}: cannot place at {addr:#x}")
        self.config_write(offset, 4, addr & 0xFFFFFFFF)
        if bar.kind == "mem64":
            self.config_write(offset + 4, 4, addr >> 32)

    def bar_read(self, index: int, offset: int, size: int) -> int:
        """Hook: a guest read inside BAR `index`."""
        return (1 << (8 * size)) - 1

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        """Hook: a guest write inside BAR `index`."""

    # --- INTx ---
    def set_irq(self, level: bool) -> None:
        """Assert or deassert this function's INTx pin (level-triggered, as PCI INTx is)."""
        self._irq_level = bool(level)
        status = self.get16(STATUS) & ~STATUS_INTERRUPT
        self.set16(STATUS, status | (STATUS_INTERRUPT if level else 0))
        self._update_irq()

    def _update_irq(self) -> None:
        # [PCI 6.2.2] command bit 10: the function may not assert INTx#; the status bit still shows it.
        self.irq.set_level(self._irq_level and not self.command & COMMAND_INTX_DISABLE)
