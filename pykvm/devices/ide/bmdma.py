"""Bus-master IDE DMA: the PIIX's engine that moves a whole ATA DMA command's sectors to or from guest
memory, so the guest reads no data register at all.

Source: "Programming Interface for Bus Master IDE Controller", revision 1.0 (SFF-8038i, 1994), cited
as [BMIDE]; Intel 82371SB PIIX3 datasheet, 2.7 (the same registers at BMIBA, the I/O BAR at
config 20h, "BAR4"); Linux drivers/ata/libata-sff.c (ata_bmdma_*) for what the guest does.

Eight I/O ports per channel (primary at BAR4+0, secondary at BAR4+8) [BMIDE 2.1]:

    +0  command   bit 0 START (1: go, 0: stop), bit 3 direction (1: the bus master writes memory,
                  i.e. a device read); the rest reads 0
    +2  status    bit 0 ACTIVE (read only: set by START, cleared when the table is used up),
                  bit 1 ERROR and bit 2 INTERRUPT (write 1 to clear), bits 5-6 "drive 0/1 DMA
                  capable" (plain read/write bits for firmware), bit 7 simplex (0: both channels
                  may DMA at once)
    +4  PRD table address, 32 bits, dword aligned

The physical region descriptor (PRD) table [BMIDE 1.2]: 8-byte entries in guest memory, each a
32-bit buffer address and a 16-bit byte count (0 means 64 KiB; bit 0 must be 0), with bit 31 of the
second dword marking the last entry (EOT).

What libata does for one read (ata_bmdma_setup/start, ata_bmdma_port_intr): write the table
address, write the command register with the direction and START clear, write the ATA task file and
READ DMA, write START; on the interrupt read the status (INTERRUPT set means this channel), clear
START, read the ATA status, write the status back to clear INTERRUPT and ERROR. About twenty port
accesses per command, of up to hundreds of sectors; PIO costs an exit per sector, and status
reads and an interrupt per block. Writes are worse: KVM's emulator completes a `rep insw` in
batches of up to a page, but a `rep outsw` one word per exit (arch/x86/kvm/emulate.c, em_out:
count 1), so a PIO sector written is 256 exits. Measured in the AMD-V lane with PIO only: 612,141
port-I/O exits, and libata's PIO worker tripping soft-lockup warnings, a few MiB into a `dd`.
Word 59 of IDENTIFY (multiple mode off at power-on: libata never sets it, so PIO also takes an
interrupt per sector) is left as the ATA spec's default.

Shortcuts, admitted: the transfer happens at once, when both START is set and the drive has a
DMA command (in either order), so ACTIVE is never seen set by a guest that polls. A table shorter
than the command ends it with the drive's ABRT and the engine's ERROR (real hardware would leave the
device waiting); one longer leaves ACTIVE set beside INTERRUPT, as [BMIDE 3.1] describes. Tables
are read up to MAX_PRD entries (a guest's loop of entries ends there, with ERROR).
"""

from __future__ import annotations

from pykvm.devices.state import Stateful
from pykvm.memory import GuestMemoryError

CMD_START = 0x01
CMD_WRITE_MEMORY = 0x08           # "read/write control": 1 = device-to-memory
ST_ACTIVE = 0x01
ST_ERROR = 0x02
ST_INTERRUPT = 0x04
ST_DRIVE_CAPABLE = 0x60
PRD_EOT = 0x80000000
MAX_PRD = 8192                     # a 64 KiB table's worth of entries


class BusMaster(Stateful):
    """One channel's DMA engine (IdeChannel.bus_master). `memory` is anything with the GuestMemory
    read/write methods; the device never sees KVM."""

    STATE = ("command", "status", "prd", "transfers", "errors")

    def __init__(self, channel, memory):
        self.channel = channel
        self.memory = memory
        self.command = 0
        self.status = 0
        self.prd = 0
        self.transfers = 0
        self.errors = 0           # guest mistakes: short or runaway tables, addresses outside RAM

    # --- the eight ports ---
    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(bytes(self._byte(offset + i) for i in range(size)), "little")

    def _byte(self, offset: int) -> int:
        if offset == 0:
            return self.command & (CMD_START | CMD_WRITE_MEMORY)
        if offset == 2:
            return self.status
        if 4 <= offset < 8:
            return (self.prd >> (8 * (offset - 4))) & 0xFF
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)

    def _write_byte(self, offset: int, value: int) -> None:
        if offset == 0:
            was = self.command & CMD_START
            self.command = value & (CMD_START | CMD_WRITE_MEMORY)
            if value & CMD_START and not was:
                self.status |= ST_ACTIVE
                self.kick()
            elif not value & CMD_START:
                self.status &= ~ST_ACTIVE          # stop: an unfinished transfer is abandoned
        elif offset == 2:
            cleared = value & (ST_ERROR | ST_INTERRUPT)              # write 1 to clear
            self.status = ((self.status & (ST_ACTIVE | ST_ERROR | ST_INTERRUPT) & ~cleared)
                           | (value & ST_DRIVE_CAPABLE))
        elif 4 <= offset < 8:
            shift = 8 * (offset - 4)
            self.prd = (self.prd & ~(0xFF << shift)) | (value << shift)
            self.prd &= 0xFFFFFFFC

    # --- the transfer ---
    def kick(self) -> None:
        """Run the transfer if both sides are ready: START set and a DMA command at the drive."""
        drive = self.channel.drive
        if not self.command & CMD_START or drive is None or drive.dma_request is None:
            return
        lba, count, to_disk = drive.dma_request
        need = count * 512
        try:
            regions, exhausted = self._regions(need)
        except GuestMemoryError:
            regions, exhausted = None, False
        covered = sum(n for _, n in regions) if regions else 0
        if regions is None or covered < need:
            self.errors += 1
            drive.dma_end(ok=False)
            self.status = (self.status & ~ST_ACTIVE) | ST_ERROR | ST_INTERRUPT
            self.channel._update_irq()
            return
        try:
            if to_disk:
                data = b"".join(self.memory.read(addr, n) for addr, n in _clip(regions, need))
                ok = drive.dma_write(data)
            else:
                data = drive.dma_read()
                ok = data is not None
                if ok:
                    pos = 0
                    for addr, n in _clip(regions, need):
                        self.memory.write(addr, data[pos:pos + n])
                        pos += n
        except GuestMemoryError:
            self.errors += 1
            drive.dma_end(ok=False)
            self.status = (self.status & ~ST_ACTIVE) | ST_ERROR | ST_INTERRUPT
            self.channel._update_irq()
            return
        self.transfers += 1
        drive.dma_end(ok=ok)
        # [BMIDE 3.1]: ACTIVE drops when the table is used up; a table with room left keeps it.
        self.status = (self.status & ~ST_ACTIVE) | ST_INTERRUPT | (0 if exhausted else ST_ACTIVE)
        self.channel._update_irq()

    def _regions(self, need: int) -> tuple[list[tuple[int, int]], bool]:
        """(address, length) pairs from the PRD table until `need` bytes or the EOT entry; and
        whether the table ended exactly there (EOT reached, no bytes to spare)."""
        out: list[tuple[int, int]] = []
        total = 0
        addr = self.prd
        for _ in range(MAX_PRD):
            entry = self.memory.read(addr, 8)
            base = int.from_bytes(entry[0:4], "little") & 0xFFFFFFFE
            flags = int.from_bytes(entry[4:8], "little")
            length = (flags & 0xFFFE) or 0x10000
            out.append((base, length))
            total += length
            addr += 8
            if flags & PRD_EOT:
                return out, total <= need
            if total >= need:
                return out, False
        return out, False


def _clip(regions: list[tuple[int, int]], need: int):
    """The regions cut to exactly `need` bytes."""
    for addr, n in regions:
        if need <= 0:
            return
        yield addr, min(n, need)
        need -= n
