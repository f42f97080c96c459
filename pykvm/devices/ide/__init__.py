"""IDE: a PIIX3-style controller with ATA disks on PIO.

    from pykvm.devices.ide import AtaDrive, IdeChannel, PiixIde
    from pykvm.host.disk import DiskImage
    disk = AtaDrive(DiskImage("root.img", snapshot=True))
    primary = IdeChannel(machine.irq_line(14), master=disk)
    secondary = IdeChannel(machine.irq_line(15))
    ide = PiixIde(primary, secondary)
    ide.register_on(machine.pio)       # 0x1f0-0x1f7 + 0x3f6, 0x170-0x177 + 0x376
    pci.add(ide)                       # so ata_piix finds it; without PCI, libata's pata_legacy
                                       # (CONFIG_PATA_LEGACY) can drive the legacy ports alone

Files: ata.py (one drive: task file, commands, IDENTIFY), controller.py (channels, the PCI function).
The drive's storage is a pykvm.host.disk.BlockBackend (DiskImage, or MemoryDisk in tests).
"""

from pykvm.devices.ide.ata import AtaDrive
from pykvm.devices.ide.controller import IdeChannel, PiixIde

__all__ = ["AtaDrive", "IdeChannel", "PiixIde"]
