"""`PciBus`: PCI bus 0 behind configuration mechanism #1, with a host bridge at 00:00.0.

Source: PCI Local Bus Specification, Revision 3.0 (cited as [PCI]), 3.2.2.3.2 "Software Generation of
Configuration Transactions".

**Configuration mechanism #1.** Two I/O locations: CONFIG_ADDRESS at 0xcf8 (32 bits) and CONFIG_DATA
at 0xcfc-0xcff. Software writes

    bit 31      enable
    bits 23-16  bus number
    bits 15-11  device (slot) number
    bits 10-8   function number
    bits 7-2    dword register number (bits 1-0 read as 0)

to CONFIG_ADDRESS, then reads or writes CONFIG_DATA; a byte or word access at 0xcfc + n reaches
config byte (register & 0xfc) + n. Only a full dword access to 0xcf8 touches CONFIG_ADDRESS: "any other
types of accesses to this address (non-DWORD) have no effect on CONFIG_ADDRESS" [PCI 3.2.2.3.2]. A
read from a function that does not exist returns all ones (the master abort), which is how
enumeration finds empty slots: vendor ID 0xffff.

Linux's probe (arch/x86/pci/direct.c, pci_check_type1) writes 0x01 as a byte to 0xcfb, saves 0xcf8,
writes 0x80000000 and expects to read it back, then pci_sanity_check looks for a host bridge or an
Intel vendor ID on bus 0: our 440FX at 00:00.0 answers both.

Port 0xcf9 (a byte access inside the same dword, which config mechanism #1 leaves alone) is the PIIX
reset control register; a write with bit 2 (RST_CPU) set calls `on_reset`, which is how Linux's
`reboot=pci` resets the machine.

**Firmware duties.** There is no BIOS, so `PciBus.add` does what SeaBIOS would: assigns each BAR an
address (memory BARs upwards from layout.PCI_MMIO_BASE, page-aligned, I/O BARs from 0xc000), enables
decoding (command I/O and memory bits), and writes the device's ISA IRQ into its interrupt line
register. Linux keeps such assignments. The guest may move or disable BARs later; every change is
reported through `on_bar_change(device, bar_index, old_addr, new_addr)` (None = not decoding) and, if
the bus was given the machine's `mmio` and `pio` buses, the BAR's window is moved there too.

Shortcut, admitted: one bus (bus 0), no PCI-to-PCI bridges; no expansion ROMs (the ROM BAR reads 0).
"""

from __future__ import annotations

from typing import Callable

from pykvm.bus import BusOverlapError
from pykvm.devices.pci.device import HEADER_MULTIFUNCTION, HEADER_TYPE, INTERRUPT_LINE, \
    COMMAND, COMMAND_IO, COMMAND_MEMORY, PciDevice
from pykvm.irq import IrqLine
from pykvm.devices.state import Stateful
from pykvm.x86 import layout

PCI_IO_BASE = 0xC000
PCI_IO_END = 0x10000
CONFIG_ADDRESS_MASK = 0x80FFFFFC
RESET_CPU = 0x04

BarChange = Callable[[PciDevice, int, "int | None", "int | None"], None]


class HostBridge(PciDevice):
    """Intel 82441FX (440FX) PCI and memory controller: 8086:1237, host bridge class 0x060000.
    Its chipset registers (PAM, SMRAM, ...) are not modelled: Linux does not touch them."""

    def __init__(self):
        super().__init__(0x8086, 0x1237, 0x060000, revision=0x02)


class _BarWindow:
    """A bus device forwarding a mapped BAR's accesses to its PciDevice."""

    def __init__(self, device: PciDevice, index: int):
        self.device = device
        self.index = index

    def read(self, offset: int, size: int) -> int:
        return self.device.bar_read(self.index, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.device.bar_write(self.index, offset, size, value)


class ConfigMechanism1(Stateful):
    """Bus device for ports 0xcf8-0xcff (offsets 0-7)."""

    STATE = ("address",)

    def __init__(self, pci: "PciBus"):
        self.pci = pci
        self.address = 0

    def read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return self.address
        if offset >= 4:
            return self._data_read(offset - 4, size)
        if offset == 1 and size == 1:
            return self.pci.reset_control
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self.address = value & CONFIG_ADDRESS_MASK
        elif offset >= 4:
            self._data_write(offset - 4, size, value)
        elif offset == 1 and size == 1:
            self.pci._write_reset_control(value)

    def _target(self, n: int) -> tuple[PciDevice | None, int]:
        a = self.address
        if not a & 0x80000000:
            return None, 0
        bus, slot, fn = (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 7
        if bus != 0:
            return None, 0
        return self.pci.device_at(slot, fn), (a & 0xFC) + n

    def _data_read(self, n: int, size: int) -> int:
        if n + size > 4:                    # spills past 0xcff: split, the rest floats high
            return self._bytes_read(n, size)
        dev, reg = self._target(n)
        if dev is None:
            return (1 << (8 * size)) - 1
        return dev.config_read(reg, size)

    def _bytes_read(self, n: int, size: int) -> int:
        value = 0
        for i in range(size):
            b = self._data_read(n + i, 1) if n + i < 4 else 0xFF
            value |= b << (8 * i)
        return value

    def _data_write(self, n: int, size: int, value: int) -> None:
        if n + size > 4:
            for i in range(size):
                if n + i < 4:
                    self._data_write(n + i, 1, (value >> (8 * i)) & 0xFF)
            return
        dev, reg = self._target(n)
        if dev is not None:
            dev.config_write(reg, size, value)


class PciBus(Stateful):
    """PCI bus 0: slots 0-31 x functions 0-7, a host bridge in slot 0.

    `config_port` is the bus device to register at 0xcf8 (8 ports): `register_on(pio_bus)` does it.
    `add(device, slot=None, function=0, irq=None, irq_line=None)` plugs a function in and does the
    firmware's work (BARs, decoding, interrupt line). `device_at(slot, function)` looks one up.
    `on_bar_change(device, bar_index, old, new)` is called whenever a BAR starts, stops or moves
    decoding; with `mmio` / `pio` buses given, BAR windows are (un)registered on them as well.
    `on_reset()` is called for a CPU reset through port 0xcf9.
    """

    # Every function's state is saved with the bus, in slot order (the VMM that restores builds
    # the same bus, with the same functions in the same slots).
    STATE = ("reset_control", "bar_conflicts", "config_port", "_plugged")

    @property
    def _plugged(self) -> tuple:
        return tuple(self.devices())

    def __init__(self, *, mmio=None, pio=None, on_bar_change: BarChange | None = None,
                 on_reset: Callable[[], None] | None = None,
                 mmio_window: tuple[int, int] = (layout.PCI_MMIO_BASE, layout.PCI_MMIO_END),
                 io_window: tuple[int, int] = (PCI_IO_BASE, PCI_IO_END)):
        self.mmio = mmio
        self.pio = pio
        self.on_bar_change = on_bar_change
        self.on_reset = on_reset
        self.reset_control = 0
        self._mmio_next, self._mmio_end = mmio_window
        self._io_next, self._io_end = io_window
        self._functions: dict[tuple[int, int], PciDevice] = {}
        self._windows: dict[tuple[int, int], int] = {}   # (id(device), bar) -> registered base
        self.bar_conflicts = 0     # guest-programmed BARs that overlapped another range
        self.config_port = ConfigMechanism1(self)
        self.host_bridge = HostBridge()
        self.add(self.host_bridge, slot=0)

    def register_on(self, pio_bus) -> None:
        pio_bus.register(layout.PORT_PCI_CONFIG, 8, self.config_port, "PCI config")

    def device_at(self, slot: int, function: int = 0) -> PciDevice | None:
        return self._functions.get((slot, function))

    def devices(self) -> list[PciDevice]:
        return [self._functions[k] for k in sorted(self._functions)]

    def functions(self) -> list[tuple[int, int, PciDevice]]:
        """(slot, function, device) for everything plugged in, in bus order."""
        return [(slot, fn, self._functions[(slot, fn)]) for slot, fn in sorted(self._functions)]

    def add(self, device: PciDevice, slot: int | None = None, function: int = 0,
            irq: int | None = None, irq_line: IrqLine | None = None) -> int:
        """Plug in `device`; returns its slot. `irq`: the ISA IRQ its INTx is wired to (written to
        the interrupt line register); `irq_line`: the line set_irq drives."""
        if slot is None:
            slot = next((s for s in range(1, 32) if (s, 0) not in self._functions), None)
            if slot is None:
                raise ValueError("PCI bus 0 is full")
        if not 0 <= slot < 32 or not 0 <= function < 8 or (slot, function) in self._functions:
            raise ValueError(f"PCI slot {slot:02x}.{function} is taken or invalid")
        if function and (slot, 0) not in self._functions:
            raise ValueError("function 0 must be added before the other functions of a slot")
        self._functions[(slot, function)] = device
        device.pci_bus = self
        device.slot = slot
        device.function = function
        if function:
            f0 = self._functions[(slot, 0)]
            f0.config[HEADER_TYPE] |= HEADER_MULTIFUNCTION
        if irq_line is not None:
            device.irq = irq_line
        if irq is not None:
            device.config[INTERRUPT_LINE] = irq
        self._assign_bars(device)
        return slot

    def _assign_bars(self, device: PciDevice) -> None:
        enable = 0
        # Largest first keeps the natural alignment from wasting the window.
        for bar in sorted((b for b in device.bars if b is not None), key=lambda b: -b.size):
            if bar.is_io:
                addr = -(-self._io_next // bar.size) * bar.size
                if addr + bar.size > self._io_end:
                    raise ValueError("the PCI I/O window is full")
                self._io_next = addr + bar.size
                enable |= COMMAND_IO
            else:
                align = max(bar.size, 4096)
                addr = -(-self._mmio_next // align) * align
                if addr + bar.size > self._mmio_end:
                    raise ValueError("the PCI MMIO window is full")
                self._mmio_next = addr + max(bar.size, 4096)
                enable |= COMMAND_MEMORY
            device.program_bar(bar.index, addr)
        if enable:
            device.config_write(COMMAND, 2, device.command | enable)

    def _bar_changed(self, device: PciDevice, index: int, old: int | None,
                     new: int | None) -> None:
        bar = device.bars[index]
        target = self.pio if bar.is_io else self.mmio
        if target is not None:
            key = (id(device), index)
            mapped = self._windows.pop(key, None)
            if mapped is not None:
                target.unregister(mapped)
            if new is not None:
                try:
                    target.register(new, bar.size, _BarWindow(device, index),
                                    f"pci {device.slot:02x}.{device.function} "
                                    f"{type(device).__name__} BAR{index}")
                    self._windows[key] = new
                except BusOverlapError:
                    # The guest placed a BAR over something else (or it passes through such an
                    # address while being moved): a guest mistake. The BAR decodes nothing until
                    # it moves somewhere free.
                    self.bar_conflicts += 1
        if self.on_bar_change is not None:
            self.on_bar_change(device, index, old, new)

    def _write_reset_control(self, value: int) -> None:
        self.reset_control = value & 0x0E
        if value & RESET_CPU and self.on_reset is not None:
            self.on_reset()
