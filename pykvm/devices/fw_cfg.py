"""QEMU's firmware configuration device (fw_cfg): named blobs a guest reads through two ports.

The spec is QEMU's docs/specs/fw_cfg.rst (section names quoted below); the constants are the ones
in Linux's include/uapi/linux/qemu_fw_cfg.h (tests/test_testdevs.py checks them against the
installed header). On x86 ("Register Locations"):

    0x510  selector register, 16-bit, little-endian: picks an item and rewinds its data offset to 0
    0x511  data register, 8-bit: each read returns the next byte of the item, then 0x00 past the end
    0x514  DMA address register, 64-bit big-endian (0x514 high half, 0x518 low half); writing the low
           half starts a transfer described by a FWCfgDmaAccess in guest RAM ("Guest-side DMA
           Interface"); reading it returns "QEMU CFG"

Items ("Firmware Configuration Items"): the signature "QEMU" (key 0x00), the feature bitmap FW_CFG_ID
(0x01: bit 0 traditional interface, bit 1 DMA), RAM size, CPU counts, and the file directory
(0x19): a big-endian count, then 64-byte entries {be32 size, be16 select, u16 reserved,
char name[56]} naming the "file" items at keys 0x20 and up. Users add files as QEMU's
`-fw_cfg name=opt/x,file=PATH` (or `string=TEXT`) does ("Externally Provided Items"); names outside
`opt/` are QEMU's own namespace, so pykvm refuses them.

Writes through the data register are ignored, as in QEMU since v2.4 ("Data Register"); DMA writes
are refused with the error bit, since every item pykvm offers is read-only to the guest (QEMU: "All
externally provided fw_cfg items are read-only"). Arch-local keys (0x8000 and up: QEMU's x86 e820
and ACPI tables) are not offered: selecting one reads as an empty item.

The device reads and writes guest RAM for DMA through `mem` (anything with read(gpa, n) and
write(gpa, data), e.g. pykvm.memory.GuestMemory): it knows nothing of KVM.
"""

from __future__ import annotations

import struct

from pykvm.devices.state import Stateful
from pykvm.memory import GuestMemoryError

PORT_BASE = 0x510           # selector; data at +1; DMA address at +4 (high) and +8 (low)
PORT_SPAN = 12

# include/uapi/linux/qemu_fw_cfg.h
FW_CFG_SIGNATURE = 0x00
FW_CFG_ID = 0x01
FW_CFG_UUID = 0x02
FW_CFG_RAM_SIZE = 0x03
FW_CFG_NOGRAPHIC = 0x04
FW_CFG_NB_CPUS = 0x05
FW_CFG_BOOT_MENU = 0x0E
FW_CFG_MAX_CPUS = 0x0F
FW_CFG_FILE_DIR = 0x19
FW_CFG_FILE_FIRST = 0x20
FW_CFG_WRITE_CHANNEL = 0x4000
FW_CFG_ARCH_LOCAL = 0x8000
FW_CFG_MAX_FILE_PATH = 56
FW_CFG_VERSION = 0x01
FW_CFG_VERSION_DMA = 0x02
FW_CFG_DMA_CTL_ERROR = 0x01
FW_CFG_DMA_CTL_READ = 0x02
FW_CFG_DMA_CTL_SKIP = 0x04
FW_CFG_DMA_CTL_SELECT = 0x08
FW_CFG_DMA_CTL_WRITE = 0x10
FW_CFG_DMA_SIGNATURE = 0x51454D5520434647     # "QEMU CFG", read from the DMA address register

_FILE_ENTRY = struct.Struct(">IHH56s")        # struct fw_cfg_file, 64 bytes
_DMA_ACCESS = struct.Struct(">IIQ")           # struct fw_cfg_dma_access: control, length, address


class FwCfgError(ValueError):
    """A file item the user asked for cannot be added (bad name, duplicate); one line."""


def check_name(name: str) -> None:
    """Raise FwCfgError unless `name` is a file name a user may add."""
    if not name.startswith("opt/"):
        raise FwCfgError(f"fw_cfg name {name!r} must start with opt/ (other names belong to "
                         "QEMU; see docs/specs/fw_cfg.rst)")
    if len(name.encode("ascii", "replace")) >= FW_CFG_MAX_FILE_PATH:
        raise FwCfgError(f"fw_cfg name {name!r} is longer than "
                         f"{FW_CFG_MAX_FILE_PATH - 1} characters")


class FwCfg(Stateful):
    """The fw_cfg device at offsets from PORT_BASE.

    ram_size, cpus: what FW_CFG_RAM_SIZE / FW_CFG_NB_CPUS / FW_CFG_MAX_CPUS report. mem: guest
    memory for the DMA interface (None: no DMA, and FW_CFG_ID says so).

    Snapshot state is where the guest is in its reading (selector, offset, a half-written DMA
    address); the items themselves are configuration the restoring VMM supplies again."""

    STATE = ("selector", "offset", "_dma_addr", "dma_transfers", "errors")

    def __init__(self, *, ram_size: int, cpus: int = 1, mem=None):
        self.mem = mem
        self._items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", FW_CFG_VERSION | (FW_CFG_VERSION_DMA if mem else 0)),
            FW_CFG_UUID: bytes(16),
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
            FW_CFG_NOGRAPHIC: struct.pack("<H", 1),
            FW_CFG_NB_CPUS: struct.pack("<H", cpus),
            FW_CFG_MAX_CPUS: struct.pack("<H", cpus),
            FW_CFG_BOOT_MENU: struct.pack("<H", 0),
        }
        self._files: list[tuple[str, int]] = []      # (name, key), in the order added
        self._items[FW_CFG_FILE_DIR] = self._directory()
        self.selector = FW_CFG_SIGNATURE
        self.offset = 0
        self._dma_addr = bytearray(8)                # big-endian, as the guest writes it
        self.dma_transfers = 0
        self.errors = 0                              # guest mistakes (bad DMA descriptors)

    # ---- the host side ----
    def add_file(self, name: str, data: bytes) -> int:
        """Add a read-only file item; returns its key. Names follow "Externally Provided Items"."""
        check_name(name)
        if any(n == name for n, _ in self._files):
            raise FwCfgError(f"fw_cfg name {name!r} given twice")
        key = FW_CFG_FILE_FIRST + len(self._files)
        self._items[key] = bytes(data)
        self._files.append((name, key))
        self._items[FW_CFG_FILE_DIR] = self._directory()
        return key

    def item(self, key: int) -> bytes:
        return self._items.get(key & ~FW_CFG_WRITE_CHANNEL, b"")

    def _directory(self) -> bytes:
        out = bytearray(struct.pack(">I", len(self._files)))
        for name, key in self._files:
            out += _FILE_ENTRY.pack(len(self._items[key]), key, 0, name.encode("ascii", "replace"))
        return bytes(out)

    # ---- registers ----
    def read(self, offset: int, size: int) -> int:
        if offset == 1:
            return int.from_bytes(self._next(size), "little")
        if 4 <= offset < PORT_SPAN:
            sig = FW_CFG_DMA_SIGNATURE.to_bytes(8, "big")[offset - 4:offset - 4 + size]
            return int.from_bytes(sig.ljust(size, b"\0"), "little")
        return 0                          # the selector is write-only

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.select(value & 0xFFFF)
        elif 4 <= offset < PORT_SPAN:
            # Byte-preserving: the guest writes the address big-endian (iowrite32be), so bytes in
            # port order are the register's bytes from the most significant one.
            data = value.to_bytes(size, "little")
            at = offset - 4
            self._dma_addr[at:at + size] = data[:8 - at]
            if at + size > 4:             # the low half was written: go
                address = int.from_bytes(self._dma_addr, "big")
                self._dma_addr[:] = bytes(8)       # "0 at startup and after an operation"
                self._dma(address)
        # offset 1: data writes are ignored (QEMU v2.4+)

    def select(self, key: int) -> None:
        self.selector = key
        self.offset = 0

    def _next(self, n: int) -> bytes:
        data = self.item(self.selector)[self.offset:self.offset + n]
        self.offset += n
        return data.ljust(n, b"\0")

    # ---- DMA ("Guest-side DMA Interface") ----
    def _dma(self, address: int) -> None:
        if self.mem is None:
            return
        self.dma_transfers += 1
        try:
            control, length, target = _DMA_ACCESS.unpack(self.mem.read(address, _DMA_ACCESS.size))
        except GuestMemoryError:
            self.errors += 1              # a descriptor outside RAM: nothing to report it in
            return
        if control & FW_CFG_DMA_CTL_SELECT:
            self.select(control >> 16)
        status = 0
        try:
            if control & FW_CFG_DMA_CTL_READ:
                self.mem.write(target, self._next(length))
            elif control & FW_CFG_DMA_CTL_WRITE:
                status = FW_CFG_DMA_CTL_ERROR     # every item is read-only to the guest
            elif control & FW_CFG_DMA_CTL_SKIP:
                self.offset += length
        except GuestMemoryError:
            status = FW_CFG_DMA_CTL_ERROR         # the buffer is not (all) RAM
        if status:
            self.errors += 1
        self.mem.write(address, struct.pack(">I", status))
