"""PCI: configuration mechanism #1, a 440FX host bridge, and the `PciDevice` base class.

Source: PCI Local Bus Specification, Revision 3.0.

Using it (what a machine and a device model need to know):

    pci = PciBus(mmio=machine.mmio, pio=machine.pio,          # BAR windows follow the guest
                 on_bar_change=None,                           # or f(device, bar, old, new)
                 on_reset=lambda: ...)                         # port 0xcf9 bit 2
    pci.register_on(machine.pio)                               # ports 0xcf8-0xcff
    pci.add(my_device, irq=5, irq_line=machine.irq_line(5))    # slot auto-assigned (1..31)

A device model subclasses `PciDevice`:

    class MyDevice(PciDevice):
        def __init__(self):
            super().__init__(vendor_id=0x1af4, device_id=0x1041, class_code=0x020000,
                             subsystem_vendor_id=0x1af4, subsystem_id=1, interrupt_pin=1)
            self.add_bar(4, 0x4000, "mem64")                   # or "mem32", "io"
            off = self.add_capability(0x09, body, wmask=None)  # vendor capability; returns offset
        def bar_read(self, index, offset, size) -> int: ...    # offset inside the BAR
        def bar_write(self, index, offset, size, value): ...
        def config_written(self, offset, size): ...            # optional: side effects
    device.set_irq(True / False)                               # INTx (level, as PCI is)
    device.bar_address(i)                                      # None while not decoding

Config space: `config` (bytearray of 256), `wmask` (guest-writable bits), `w1cmask` (write-1-to-clear).
BAR sizing, the command register's decode bits and the capability list need no code in the subclass.
"""

from pykvm.devices.pci.bus import ConfigMechanism1, HostBridge, PciBus
from pykvm.devices.pci.device import Bar, PciDevice

__all__ = ["Bar", "ConfigMechanism1", "HostBridge", "PciBus", "PciDevice"]
