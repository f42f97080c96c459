"""One ATA hard disk: its task-file registers and the PIO commands Linux's libata issues.

Source: ANSI INCITS 397-2005, "AT Attachment with Packet Interface - 7" (ATA/ATAPI-7), volume 1
(commands, IDENTIFY DEVICE data) and volume 2 (the PIO protocols), cited as [ATA7]. What libata reads
from IDENTIFY is in include/linux/ata.h (ata_id_* helpers).

Task-file registers (command block, offsets 1-6 from the channel's base; offset 7 is status/command):

    1 error (r) / features (w)     4 LBA mid (cylinder low)
    2 sector count                 5 LBA high (cylinder high)
    3 LBA low (sector number)      6 device: bit 6 LBA, bit 4 DEV (0 master, 1 slave), bits 3-0 LBA 27:24

48-bit commands (the ...EXT ones) need 16 bits of count and 48 of LBA through the same 8-bit
registers: each register is a two-byte FIFO, the previous write being the "high order byte" (HOB),
readable by setting the HOB bit of the device control register [ATA7 vol 1, 6.2 and 6.44].

Status: BSY 0x80, DRDY 0x40, DF 0x20, DSC 0x10 (seek complete, obsolete: set like every IDE model
does), DRQ 0x08 (the data register wants a transfer), ERR 0x01 (see the error register: ABRT 0x04
"command aborted", IDNF 0x10 "address not found", UNC 0x40 "uncorrectable data").

PIO data-in (IDENTIFY, READ SECTORS, READ MULTIPLE) [ATA7 vol 2, "PIO data-in command protocol"]: for
each DRQ block the device fills its buffer, sets DRQ and raises INTRQ; the host reads status (which
clears INTRQ) and 256 words per sector; after the last block DRQ drops and no interrupt follows.
PIO data-out (WRITE ...): DRQ is set without an interrupt for the first block; after each block the
device writes it and interrupts, with DRQ set again while blocks remain.
A block is one sector, or the SET MULTIPLE MODE count for the MULTIPLE commands.

Shortcuts, admitted:
- Infinitely fast media: BSY is never seen except during a software reset; the whole block is read
  from the backend when DRQ is set.
- DMA only through a bus-master controller (bmdma.py, `dma_capable`): READ/WRITE DMA (EXT) and
  multiword DMA modes 0-2 in IDENTIFY (words 49 bit 8, 63); no Ultra DMA (word 88 is 0). Without
  the engine IDENTIFY advertises no DMA and libata runs PIO.
- CHS addressing uses the default 16-head, 63-sector translation; INITIALIZE DEVICE PARAMETERS is
  accepted and ignored (libata sends it only to pre-ATA-4 drives).
- Host I/O errors become UNC (read) or ABRT (write) on the failing LBA, counted in `host_errors`.
"""

from __future__ import annotations

from pykvm.host.disk import SECTOR, BlockBackend, DiskError
from pykvm.devices.state import Stateful

# Status register.
BSY = 0x80
DRDY = 0x40
DF = 0x20
DSC = 0x10
DRQ = 0x08
ERR = 0x01
# Error register.
ABRT = 0x04
IDNF = 0x10
UNC = 0x40
# Device register.
DEV_LBA = 0x40
DEV_SLAVE = 0x10

MAX_MULTIPLE = 16
HEADS = 16
SECTORS_PER_TRACK = 63

CMD_READ_SECTORS = (0x20, 0x21)
CMD_READ_SECTORS_EXT = 0x24
CMD_READ_MULTIPLE_EXT = 0x29
CMD_WRITE_SECTORS = (0x30, 0x31)
CMD_WRITE_SECTORS_EXT = 0x34
CMD_WRITE_MULTIPLE_EXT = 0x39
CMD_READ_DMA = (0xC8, 0xC9)
CMD_READ_DMA_EXT = 0x25
CMD_WRITE_DMA = (0xCA, 0xCB)
CMD_WRITE_DMA_EXT = 0x35
CMD_READ_VERIFY = (0x40, 0x41)
CMD_READ_VERIFY_EXT = 0x42
CMD_EXECUTE_DIAGNOSTIC = 0x90
CMD_INIT_DEVICE_PARAMS = 0x91
CMD_IDENTIFY_PACKET = 0xA1
CMD_READ_MULTIPLE = 0xC4
CMD_WRITE_MULTIPLE = 0xC5
CMD_SET_MULTIPLE = 0xC6
CMD_CHECK_POWER_MODE = 0xE5
CMD_FLUSH_CACHE = 0xE7
CMD_FLUSH_CACHE_EXT = 0xEA
CMD_IDENTIFY = 0xEC
CMD_SET_FEATURES = 0xEF
CMD_POWER_NO_DATA = (0xE0, 0xE1, 0xE2, 0xE3, 0xE6)   # standby/idle (immediate), sleep
CMD_SEEK = 0x70

# SET FEATURES subcommands (features register) [ATA7 vol 1, 6.49].
SF_ENABLE_WCACHE = 0x02
SF_SET_XFER_MODE = 0x03
SF_DISABLE_READ_AHEAD = 0x55
SF_DISABLE_REVERTING = 0x66
SF_DISABLE_WCACHE = 0x82
SF_ENABLE_READ_AHEAD = 0xAA
SF_ENABLE_REVERTING = 0xCC


def _ata_string(text: str, length: int) -> bytes:
    """IDENTIFY strings: space-padded ASCII, two characters per word, the first in the high byte."""
    raw = text.encode("ascii", "replace")[:length].ljust(length, b" ")
    out = bytearray(length)
    out[0::2] = raw[1::2]
    out[1::2] = raw[0::2]
    return bytes(out)


class AtaDrive(Stateful):
    """An ATA disk on a backend (pykvm.host.disk). The channel (controller.py) routes
    register accesses here; `irq_pending` is this drive's INTRQ request."""

    # The disk's contents are not device state: the VMM reattaches the same image.
    STATE = ("multiple", "write_cache", "read_ahead", "host_errors", "commands", "aborted",
             "irq_pending", "buf", "pos", "_xfer", "_ext", "hob", "regs", "device", "error",
             "status", "dma_capable", "mwdma_mode", "dma_request", "_dma_error")

    def __init__(self, backend: BlockBackend, serial: str = "PYKVM0000000001",
                 model: str = "PYKVM HARDDISK", firmware: str = "1.0"):
        self.backend = backend
        self.sectors = backend.size // SECTOR
        self.serial, self.model, self.firmware = serial, model, firmware
        self.multiple = 0
        self.write_cache = True
        self.read_ahead = True
        self.host_errors = 0
        self.commands = 0
        self.aborted = 0
        self.irq_pending = False
        self.buf = bytearray()
        self.pos = 0
        self._xfer: tuple[int, int, bool, int] | None = None   # lba, remaining, write, block
        self._ext = False
        self.hob = {r: 0 for r in range(1, 6)}
        self.regs = {r: 0 for r in range(1, 6)}
        self.device = 0
        self.error = 0
        self.status = 0
        # Bus-master DMA (bmdma.py): offered only when the controller has the engine. The
        # multiword DMA mode SET FEATURES selected (IDENTIFY word 63 reports it), or None.
        self.dma_capable = False
        self.mwdma_mode: int | None = None
        self.dma_request: tuple[int, int, bool] | None = None    # lba, count, to the disk
        self._dma_error = ABRT
        self.reset()

    # --- reset and signature ---
    def reset(self) -> None:
        """End of a reset or EXECUTE DEVICE DIAGNOSTIC: the ATA signature in the task file
        [ATA7 vol 2, 9.12 "Signature and persistence"]: count 01, LBA 01 00 00; error 01 (passed)."""
        self.regs.update({2: 1, 3: 1, 4: 0, 5: 0})
        self.hob.update({2: 0, 3: 0, 4: 0, 5: 0})
        self.error = 0x01
        self.device = 0
        self.status = DRDY | DSC
        self._xfer = None
        self.dma_request = None
        self.buf = bytearray()
        self.pos = 0
        self.irq_pending = False

    # --- task file ---
    def write_register(self, reg: int, value: int) -> None:
        if reg == 6:
            self.device = value
            return
        self.hob[reg] = self.regs[reg]
        self.regs[reg] = value

    def read_register(self, reg: int, hob: bool) -> int:
        if reg == 1:
            return self.hob[1] if hob else self.error     # the features FIFO is write-only
        if reg == 6:
            return self.device
        return self.hob[reg] if hob else self.regs[reg]

    def _lba_count(self, ext: bool) -> tuple[int, int] | None:
        r, h = self.regs, self.hob
        if ext:
            count = (h[2] << 8 | r[2]) or 65536
            lba = h[5] << 40 | h[4] << 32 | h[3] << 24 | r[5] << 16 | r[4] << 8 | r[3]
            return lba, count
        count = r[2] or 256
        if self.device & DEV_LBA:
            return (self.device & 0x0F) << 24 | r[5] << 16 | r[4] << 8 | r[3], count
        cylinder, head, sector = r[5] << 8 | r[4], self.device & 0x0F, r[3]
        if sector == 0 or sector > SECTORS_PER_TRACK:
            return None
        return (cylinder * HEADS + head) * SECTORS_PER_TRACK + sector - 1, count

    def _set_lba(self, lba: int, ext: bool) -> None:
        """Report `lba` in the task file (the first failing sector, after an error)."""
        if ext:
            self.hob.update({3: (lba >> 24) & 0xFF, 4: (lba >> 32) & 0xFF, 5: (lba >> 40) & 0xFF})
        else:
            self.device = (self.device & 0xF0) | ((lba >> 24) & 0x0F)
        self.regs.update({3: lba & 0xFF, 4: (lba >> 8) & 0xFF, 5: (lba >> 16) & 0xFF})

    # --- completion helpers ---
    def _interrupt(self) -> None:
        self.irq_pending = True

    def _complete(self) -> None:
        self.status = DRDY | DSC
        self.error = 0
        self._xfer = None
        self._interrupt()

    def _fail(self, error: int, lba: int | None = None, ext: bool = False) -> None:
        self.status = DRDY | DSC | ERR
        self.error = error
        self._xfer = None
        self.buf = bytearray()
        self.pos = 0
        if lba is not None:
            self._set_lba(lba, ext)
        if error & ABRT:
            self.aborted += 1
        self._interrupt()

    # --- commands ---
    def execute(self, cmd: int) -> None:
        self.commands += 1
        self.irq_pending = False
        if cmd in CMD_READ_SECTORS:
            self._start_rw(False, False, 1)
        elif cmd == CMD_READ_SECTORS_EXT:
            self._start_rw(True, False, 1)
        elif cmd in CMD_WRITE_SECTORS:
            self._start_rw(False, True, 1)
        elif cmd == CMD_WRITE_SECTORS_EXT:
            self._start_rw(True, True, 1)
        elif cmd in (CMD_READ_MULTIPLE, CMD_READ_MULTIPLE_EXT, CMD_WRITE_MULTIPLE,
                     CMD_WRITE_MULTIPLE_EXT):
            if not self.multiple:
                self._fail(ABRT)          # [ATA7 6.27]: ABRT if SET MULTIPLE has not enabled it
            else:
                self._start_rw(cmd in (CMD_READ_MULTIPLE_EXT, CMD_WRITE_MULTIPLE_EXT),
                               cmd in (CMD_WRITE_MULTIPLE, CMD_WRITE_MULTIPLE_EXT), self.multiple)
        elif self.dma_capable and (cmd in CMD_READ_DMA or cmd in CMD_WRITE_DMA
                                   or cmd in (CMD_READ_DMA_EXT, CMD_WRITE_DMA_EXT)):
            self._start_dma(cmd in (CMD_READ_DMA_EXT, CMD_WRITE_DMA_EXT),
                            cmd in CMD_WRITE_DMA or cmd == CMD_WRITE_DMA_EXT)
        elif cmd in CMD_READ_VERIFY or cmd == CMD_READ_VERIFY_EXT:
            ext = cmd == CMD_READ_VERIFY_EXT
            span = self._lba_count(ext)
            if span is None or span[0] + span[1] > self.sectors:
                self._fail(IDNF, min(span[0], self.sectors) if span else None, ext)
            else:
                self._complete()
        elif cmd == CMD_IDENTIFY:
            self._start_data_in(self.identify())
        elif cmd == CMD_SET_MULTIPLE:
            n = self.regs[2]
            if n and (n > MAX_MULTIPLE or n & (n - 1)):
                self._fail(ABRT)
            else:
                self.multiple = n
                self._complete()
        elif cmd in (CMD_FLUSH_CACHE, CMD_FLUSH_CACHE_EXT):
            try:
                self.backend.flush()
            except OSError:
                self.host_errors += 1
                self._fail(ABRT)
                return
            self._complete()
        elif cmd == CMD_SET_FEATURES:
            self._set_features()
        elif cmd == CMD_CHECK_POWER_MODE:
            self._complete()
            self.regs[2] = 0xFF           # active or idle
        elif cmd in CMD_POWER_NO_DATA or cmd == CMD_INIT_DEVICE_PARAMS or cmd == CMD_SEEK \
                or 0x10 <= cmd <= 0x1F:   # recalibrate
            self._complete()
        else:
            # Unknown, unsupported, packet-device (0xa0, 0xa1) and NOP: ABRT [ATA7 6.1].
            self._fail(ABRT)

    def _set_features(self) -> None:
        sub, count = self.regs[1], self.regs[2]
        if sub == SF_SET_XFER_MODE:
            # PIO default (00h, 01h) or flow-control PIO mode 0-4 (08h-0Ch); multiword DMA mode
            # 0-2 (20h-22h) with a bus-master controller; no Ultra DMA.
            if count in (0x00, 0x01) or 0x08 <= count <= 0x0C:
                self._complete()
            elif self.dma_capable and 0x20 <= count <= 0x22:
                self.mwdma_mode = count - 0x20
                self._complete()
            else:
                self._fail(ABRT)
            return
        if sub in (SF_ENABLE_WCACHE, SF_DISABLE_WCACHE):
            self.write_cache = sub == SF_ENABLE_WCACHE
        elif sub in (SF_ENABLE_READ_AHEAD, SF_DISABLE_READ_AHEAD):
            self.read_ahead = sub == SF_ENABLE_READ_AHEAD
        elif sub not in (SF_ENABLE_REVERTING, SF_DISABLE_REVERTING):
            self._fail(ABRT)
            return
        self._complete()

    def _checked_span(self, ext: bool, write: bool) -> tuple[int, int] | None:
        """(lba, count) of a read or write command, or None after failing it: IDNF for sectors
        that do not exist, ABRT for a write to a read-only disk."""
        span = self._lba_count(ext)
        if span is None:
            self._fail(IDNF)
            return None
        lba, count = span
        if lba + count > self.sectors:
            self._fail(IDNF, min(lba, self.sectors), ext)
            return None
        if write and self.backend.readonly:
            self._fail(ABRT, lba, ext)
            return None
        return span

    def _start_rw(self, ext: bool, write: bool, block: int) -> None:
        span = self._checked_span(ext, write)
        if span is None:
            return
        lba, count = span
        self._xfer = (lba, count, write, block)
        self._ext = ext
        if write:
            self._next_write_block(first=True)
        else:
            self._next_read_block()

    def _start_dma(self, ext: bool, to_disk: bool) -> None:
        """A DMA command: check it like PIO, then wait, DRQ set, for the bus master to move the
        data [ATA7 vol 2, "DMA command protocol"]. bmdma.BusMaster.kick() does the rest."""
        span = self._checked_span(ext, to_disk)
        if span is None:
            return
        lba, count = span
        self._ext = ext
        self.buf = bytearray()
        self.pos = 0
        self.dma_request = (lba, count, to_disk)
        self.status = DRDY | DSC | DRQ

    def dma_read(self) -> bytes | None:
        """The sectors of the pending DMA read, or None after a host I/O error (dma_end fails it)."""
        lba, count, _ = self.dma_request
        try:
            return self.backend.read(lba * SECTOR, count * SECTOR)
        except (DiskError, OSError):
            self.host_errors += 1
            self._dma_error = UNC
            return None

    def dma_write(self, data: bytes) -> bool:
        lba, count, _ = self.dma_request
        try:
            self.backend.write(lba * SECTOR, data[:count * SECTOR])
        except (DiskError, OSError):
            self.host_errors += 1
            self._dma_error = ABRT
            return False
        return True

    def dma_end(self, ok: bool) -> None:
        """The bus master is done with the pending command: complete it, or fail it (the host's
        error, or ABRT for a transfer the engine could not finish), and interrupt either way."""
        lba = self.dma_request[0] if self.dma_request else None
        self.dma_request = None
        if ok:
            self._complete()
        else:
            self._fail(self._dma_error, lba, self._ext)
        self._dma_error = ABRT

    def _start_data_in(self, data: bytes) -> None:
        self.buf = bytearray(data)
        self.pos = 0
        self.error = 0
        self.status = DRDY | DSC | DRQ
        self._interrupt()

    def _next_read_block(self) -> None:
        lba, remaining, _, block = self._xfer
        n = min(block, remaining)
        try:
            data = self.backend.read(lba * SECTOR, n * SECTOR)
        except (DiskError, OSError):
            self.host_errors += 1
            self._fail(UNC, lba, self._ext)
            return
        self._xfer = (lba + n, remaining - n, False, block)
        self._start_data_in(data)

    def _next_write_block(self, first: bool) -> None:
        lba, remaining, _, block = self._xfer
        self.buf = bytearray(min(block, remaining) * SECTOR)
        self.pos = 0
        self.status = DRDY | DSC | DRQ
        if not first:
            self._interrupt()

    # --- the data register ---
    def data_read(self, size: int) -> int | None:
        """`size` bytes from the DRQ buffer, or None if no data-in transfer is in progress."""
        if not self.status & DRQ or self._xfer is not None and self._xfer[2] \
                or self.dma_request is not None:
            return None
        chunk = self.buf[self.pos:self.pos + size]
        self.pos += size
        if self.pos >= len(self.buf):
            self._end_of_read_block()
        return int.from_bytes(chunk.ljust(size, b"\xff"), "little")

    def data_read_string(self, n: int) -> bytes | None:
        """`n` bytes of a data-in transfer at once (one `rep insw`), if they lie within the current
        DRQ block; None otherwise, and the caller goes word by word. Same effect as n/2 reads."""
        if not self.status & DRQ or self._xfer is not None and self._xfer[2] \
                or self.dma_request is not None or self.pos + n > len(self.buf):
            return None
        chunk = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        if self.pos >= len(self.buf):
            self._end_of_read_block()
        return chunk

    def _end_of_read_block(self) -> None:
        if self._xfer is not None and self._xfer[1] > 0:
            self._next_read_block()
        else:
            self._xfer = None
            self.status = DRDY | DSC

    def data_write(self, size: int, value: int) -> bool:
        """Take `size` bytes into the DRQ buffer; False if no data-out transfer is in progress."""
        if not self.status & DRQ or self._xfer is None or not self._xfer[2]:
            return False
        room = len(self.buf) - self.pos
        self.buf[self.pos:self.pos + min(size, room)] = value.to_bytes(size, "little")[:room]
        self.pos += size
        if self.pos >= len(self.buf):
            self._end_of_write_block()
        return True

    def data_write_string(self, data: bytes) -> bool:
        """A whole `rep outsw` at once, if it lies within the current DRQ block; False otherwise
        (nothing taken: the caller goes word by word). Same effect as len(data)/2 writes."""
        n = len(data)
        if not self.status & DRQ or self._xfer is None or not self._xfer[2] \
                or self.pos + n > len(self.buf):
            return False
        self.buf[self.pos:self.pos + n] = data
        self.pos += n
        if self.pos >= len(self.buf):
            self._end_of_write_block()
        return True

    def _end_of_write_block(self) -> None:
        lba, remaining, _, block = self._xfer
        n = len(self.buf) // SECTOR
        try:
            self.backend.write(lba * SECTOR, bytes(self.buf))
            if not self.write_cache:
                # Write cache disabled (SET FEATURES 82h): the drive reports a write complete only
                # once it is on the medium [ATA7 vol 1, 6.49.2], so each block is flushed.
                self.backend.flush()
        except (DiskError, OSError):
            self.host_errors += 1
            self._fail(ABRT, lba, self._ext)
            return
        self._xfer = (lba + n, remaining - n, True, block)
        if remaining - n > 0:
            self._next_write_block(first=False)
        else:
            self._complete()

    # --- IDENTIFY DEVICE [ATA7 vol 1, 6.17, Table 16] ---
    def identify(self) -> bytes:
        w = [0] * 256
        total = self.sectors
        cylinders = min(total // (HEADS * SECTORS_PER_TRACK), 16383)
        w[0] = 0x0040                         # ATA device, fixed (not removable)
        w[1] = cylinders
        w[3] = HEADS
        w[6] = SECTORS_PER_TRACK
        w[47] = 0x8000 | MAX_MULTIPLE         # 80h in the high byte, max sectors per DRQ block
        w[49] = (1 << 9) | (1 << 11)          # LBA; IORDY supported
        if self.dma_capable:
            w[49] |= 1 << 8                   # DMA supported (multiword, word 63)
        w[50] = 0x4000
        w[51] = 0x0200                        # PIO timing mode 2 (obsolete word, still read)
        w[53] = 0x0003                        # words 54-58 and 64-70 are valid; 88 is not
        w[54] = cylinders
        w[55] = HEADS
        w[56] = SECTORS_PER_TRACK
        chs = cylinders * HEADS * SECTORS_PER_TRACK
        w[57], w[58] = chs & 0xFFFF, chs >> 16
        w[59] = (0x0100 | self.multiple) if self.multiple else 0
        lba28 = min(total, 0x0FFFFFFF)
        w[60], w[61] = lba28 & 0xFFFF, lba28 >> 16
        if self.dma_capable:                  # multiword DMA modes 0-2; high byte: selected
            w[63] = 0x0007 | ((1 << (8 + self.mwdma_mode)) if self.mwdma_mode is not None else 0)
        w[64] = 0x0003                        # PIO modes 3 and 4
        w[65] = w[66] = w[67] = w[68] = 120   # cycle times, ns (PIO 4)
        w[80] = 0x00F0                        # ATA-4 .. ATA-7
        w[82] = (1 << 5) | (1 << 6)           # write cache, look-ahead
        w[83] = 0x4000 | (1 << 13) | (1 << 12) | (1 << 10)   # FLUSH CACHE EXT, FLUSH CACHE, LBA48
        w[84] = 0x4000
        w[85] = (self.write_cache << 5) | (self.read_ahead << 6)
        w[86] = (1 << 13) | (1 << 12) | (1 << 10)
        w[87] = 0x4000
        w[93] = 0x4000 | 0x2000 | 0x0001      # hardware reset result (device 0 passed)
        w[100], w[101], w[102], w[103] = (total & 0xFFFF, (total >> 16) & 0xFFFF,
                                          (total >> 32) & 0xFFFF, 0)
        w[106] = 0x4000                       # 512-byte logical = physical sectors
        w[217] = 1                            # non-rotating medium (libata marks it nonrot)
        data = bytearray()
        for word in w:
            data += word.to_bytes(2, "little")
        data[20:40] = _ata_string(self.serial, 20)
        data[46:54] = _ata_string(self.firmware, 8)
        data[54:94] = _ata_string(self.model, 40)
        # Word 255: signature A5h and a checksum making all 512 bytes sum to 0 mod 256 [ATA7 6.17.50].
        data[510] = 0xA5
        data[511] = (-sum(data[:511])) & 0xFF
        return bytes(data)
