"""A PIIX-style IDE controller: two ATA channels at the legacy ports, and its PCI function.

Sources: [ATA7] as in ata.py (register and reset protocols, volume 2 chapter 9); Intel 82371SB
PIIX3 datasheet, section 2.6 (IDE configuration registers: IDETIM at 40h/42h with the IDE decode
enable bit 15); Linux drivers/ata/ata_piix.c and libata-sff.c for what the guest does.

    channel    command block        control block    IRQ
    primary    0x1f0-0x1f7          0x3f6            14
    secondary  0x170-0x177          0x376            15

Each channel has two device positions, master (device 0) and slave (device 1); both drives see every
write to the command block registers and the device register's DEV bit decides which one answers reads
and takes the command. The control block holds alternate status (read: status without clearing the
interrupt) and device control (write): nIEN (bit 1, mask INTRQ), SRST (bit 2, software reset of both
devices), HOB (bit 7, read the previous byte of the 48-bit register FIFOs).

**Absent drives.** With one drive on a channel, selecting the other reads 0 from every register,
status included, and ignores commands (what QEMU does, and close to [ATA7 vol 2, 9.16]: device 0
answers for an absent device 1 with status 00h). Linux's ata_devchk writes 55h/AAh to the count and LBA
low registers of each position and reads them back: it finds 0 and decides nobody is home. An empty
channel reads 0 everywhere too.

**Interrupts.** INTRQ is driven by the selected drive only, when it has an interrupt pending and nIEN
is clear; reading the status register (not alternate status) clears the pending interrupt. The line
level is recomputed after every access (kvmtool style) and goes to IRQ 14/15 through an IrqLine; the
PIC sees the rising edge as the ISA IDE interrupt.

**The PCI function** (`PiixIde`): 8086:7010 (82371SB PIIX3 IDE), class 01h/01h, programming interface
80h (bus-master capable, both channels in compatibility mode: legacy ports and IRQs). Given guest
memory, BAR4 holds the bus-master DMA engine (bmdma.py) and ata_piix uses multiword DMA; without it
there are no BARs and libata runs PIO only. ata_piix's prereset checks the IDE decode enable bits (config 41h and 43h
bit 7, the top bit of IDETIM) before touching a channel, so both are set. The timing registers
(40h-4Fh) are writable and otherwise ignored: timing does not exist here.

Shortcut, admitted: clearing a channel's decode enable bit does not unmap its ports.
"""

from __future__ import annotations

from pykvm.devices.ide.ata import BSY, DEV_SLAVE, AtaDrive
from pykvm.devices.pci.device import PciDevice
from pykvm.irq import IrqLine
from pykvm.devices.state import Stateful
from pykvm.x86 import layout

CTL_NIEN = 0x02
CTL_SRST = 0x04
CTL_HOB = 0x80
CMD_EXECUTE_DIAGNOSTIC = 0x90

PRIMARY = (layout.PORT_ATA0, layout.PORT_ATA0_CTRL)
SECONDARY = (layout.PORT_ATA1, layout.PORT_ATA1_CTRL)


class IdeChannel(Stateful):
    """One ATA channel: bus device for the 8 command-block ports (offsets 0-7); `control` is the bus
    device for the control block port (offset 0). `drives` = [master, slave], None where absent."""

    STATE = ("selected", "devctl", "bad_accesses", "irq", "_present", "bus_master")

    @property
    def _present(self) -> tuple:
        """The drives attached (a restored channel has the same ones, rebuilt by the VMM)."""
        return tuple(d for d in self.drives if d is not None)

    def __init__(self, irq: IrqLine, master: AtaDrive | None = None,
                 slave: AtaDrive | None = None):
        self.irq = irq
        self.drives = [master, slave]
        self.selected = 0
        self.devctl = 0
        self.control = _ControlPort(self)
        self.bad_accesses = 0
        self.bus_master = None          # bmdma.BusMaster, when the controller has the DMA engine

    @property
    def drive(self) -> AtaDrive | None:
        return self.drives[self.selected]

    def register_on(self, bus, ports: tuple[int, int], name: str) -> None:
        bus.register(ports[0], 8, self, f"IDE {name}")
        bus.register(ports[1], 1, self.control, f"IDE {name} control")

    # --- command block ---
    def read(self, offset: int, size: int) -> int:
        drive = self.drive
        if offset == 0:
            value = drive.data_read(size) if drive is not None else None
            if value is None:
                self.bad_accesses += 1
                value = (1 << (8 * size)) - 1
            self._update_irq()
            return value
        if size != 1:
            # The task file is byte-wide: split like an ISA bus would.
            return sum(self.read(offset + i, 1) << (8 * i) for i in range(size) if offset + i < 8)
        if drive is None:
            return 0
        if offset == 7:
            value = drive.status
            drive.irq_pending = False        # reading status acknowledges INTRQ
            self._update_irq()
            return value
        if offset < 7:
            return drive.read_register(offset, bool(self.devctl & CTL_HOB))
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            drive = self.drive
            if drive is None or not drive.data_write(size, value):
                self.bad_accesses += 1
            self._update_irq()
            return
        if size != 1:
            for i in range(size):
                if offset + i < 8:
                    self.write(offset + i, 1, (value >> (8 * i)) & 0xFF)
            return
        if offset == 7:
            self._command(value)
        elif 1 <= offset <= 6:
            # A write to any command block register clears HOB [ATA7 vol 1, 6.2 "Device Control"].
            self.devctl &= ~CTL_HOB
            if offset == 6:
                self.selected = 1 if value & DEV_SLAVE else 0
            for drive in self.drives:
                if drive is not None:
                    drive.write_register(offset, value)
        self._update_irq()

    # --- string I/O on the data register (pykvm.bus: one `rep insw`/`rep outsw` per call) ---
    def read_string(self, offset: int, size: int, count: int, buf) -> bool:
        drive = self.drive
        if offset != 0 or drive is None:
            return False
        data = drive.data_read_string(size * count)
        if data is None:
            return False
        buf[:len(data)] = data
        self._update_irq()
        return True

    def write_string(self, offset: int, size: int, data) -> bool:
        drive = self.drive
        if offset != 0 or drive is None or not drive.data_write_string(bytes(data)):
            return False
        self._update_irq()
        return True

    def _command(self, cmd: int) -> None:
        if self.devctl & CTL_SRST:
            return                             # in reset: commands are not accepted
        if cmd == CMD_EXECUTE_DIAGNOSTIC:
            # Both devices run their diagnostics and post the signature; device 0 interrupts.
            if not any(self.drives):
                return
            for drive in self.drives:
                if drive is not None:
                    drive.reset()
            self.selected = 0
            first = self.drives[0] or self.drives[1]
            first.irq_pending = True
            return
        drive = self.drive
        if drive is not None:                  # commands to an absent device go nowhere
            drive.execute(cmd)
            if drive.dma_request is not None and self.bus_master is not None:
                self.bus_master.kick()         # START may already be set (any order will do)

    # --- control block ---
    def read_alt_status(self) -> int:
        drive = self.drive
        return 0 if drive is None else drive.status

    def write_devctl(self, value: int) -> None:
        was_reset = self.devctl & CTL_SRST
        self.devctl = value
        if value & CTL_SRST and not was_reset:
            for drive in self.drives:
                if drive is not None:
                    drive.status = BSY
                    drive.irq_pending = False
        elif was_reset and not value & CTL_SRST:
            # End of the software reset: signatures posted, device 0 selected, no interrupt.
            for drive in self.drives:
                if drive is not None:
                    drive.reset()
            self.selected = 0
        self._update_irq()

    def _update_irq(self) -> None:
        drive = self.drive
        self.irq.set_level(drive is not None and drive.irq_pending
                           and not self.devctl & CTL_NIEN)


class _ControlPort:
    def __init__(self, channel: IdeChannel):
        self.channel = channel

    def read(self, offset: int, size: int) -> int:
        return self.channel.read_alt_status()

    def write(self, offset: int, size: int, value: int) -> None:
        self.channel.write_devctl(value & 0xFF)


class PiixIde(PciDevice):
    """The PIIX3 IDE function with its two channels. `register_on(pio)` claims the legacy ports;
    add it to a PciBus (any slot) so Linux's ata_piix binds to it."""

    STATE = PciDevice.STATE + ("primary", "secondary")

    def __init__(self, primary: IdeChannel, secondary: IdeChannel, memory=None):
        super().__init__(0x8086, 0x7010, 0x010180)
        self.primary = primary
        self.secondary = secondary
        self.wmask[0x40:0x50] = b"\xff" * 16
        self.config[0x41] = 0x80               # IDETIM primary: IDE decode enable
        self.config[0x43] = 0x80               # IDETIM secondary: IDE decode enable
        if memory is not None:
            # The bus-master engine: 16 ports at BAR4 (BMIBA), 8 per channel (bmdma.py).
            from pykvm.devices.ide.bmdma import BusMaster
            self.add_bar(4, 16, "io")
            for channel in (primary, secondary):
                channel.bus_master = BusMaster(channel, memory)
                for drive in channel.drives:
                    if drive is not None:
                        drive.dma_capable = True

    def bar_read(self, index: int, offset: int, size: int) -> int:
        channel = self.primary if offset < 8 else self.secondary
        if index != 4 or channel.bus_master is None:
            return super().bar_read(index, offset, size)
        return channel.bus_master.read(offset % 8, size)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        channel = self.primary if offset < 8 else self.secondary
        if index == 4 and channel.bus_master is not None:
            channel.bus_master.write(offset % 8, size, value)

    def register_on(self, pio) -> None:
        self.primary.register_on(pio, PRIMARY, "primary")
        self.secondary.register_on(pio, SECONDARY, "secondary")
