"""The PC's real-time clock and CMOS memory (Motorola MC146818), at ports 0x70 (index) and 0x71 (data).

The MC146818 is a battery-backed clock with 64 bytes of RAM; PC chipsets extend it to 128. The CPU
writes a byte's index to port 0x70 and then reads or writes the byte at port 0x71. On a PC, bit 7 of
the index write is not an address bit at all: it is the chipset's NMI mask. We record it and otherwise
ignore it (pykvm raises no NMIs from here).

Layout (MC146818 datasheet, "Address Map"; the PC conventions after 0x0e from the IBM AT BIOS, QEMU
hw/i386/pc.c and SeaBIOS):

    0x00 seconds   0x01 seconds alarm   0x02 minutes   0x03 minutes alarm   0x04 hours
    0x05 hours alarm   0x06 day of week (1 = Sunday)   0x07 day of month   0x08 month   0x09 year
    0x0a register A: bit 7 UIP (update in progress), bits 6-4 DV (time base), bits 3-0 RS (rate)
    0x0b register B: bit 7 SET, 6 PIE, 5 AIE, 4 UIE, 3 SQWE, 2 DM (1 = binary, 0 = BCD),
                     1 24/12 (1 = 24-hour), 0 DSE (daylight saving)
    0x0c register C: interrupt flags (read-only, cleared by reading)
    0x0d register D: bit 7 VRT, "valid RAM and time" (the battery is fine)
    0x15/0x16 base memory in KiB (640)
    0x17/0x18 extended memory above 1 MiB in KiB, capped at 65535 (the AT's 16-bit field)
    0x30/0x31 the same again (the IBM AT keeps two copies)
    0x32 century
    0x34/0x35 memory between 16 MiB and 4 GiB in 64 KiB units (what SeaBIOS reads to build e820)
    0x5b-0x5d memory above 4 GiB in 64 KiB units (QEMU/SeaBIOS extension)

Time of day comes from the host clock (UTC, as Linux on x86 expects by default), shifted by whatever
the guest sets. Values are BCD or binary and 12- or 24-hour per register B, re-encoded on every read.

Shortcuts, admitted:
- No interrupts: the periodic (PIE), alarm (AIE) and update-ended (UIE) interrupts are not modelled, so
  register C always reads 0 and no IRQ 8 line is taken. Reading the time needs none of them (Linux's
  mc146818_get_time polls UIP); anything that sleeps until an RTC interrupt (an RTC alarm, `hwclock`
  waiting for the update-ended interrupt) waits until its own timeout.
- UIP is set for the last 244 us of every host second (the MC146818's "UIP to update" time at a
  32.768 kHz time base) so code that waits for an update edge sees one; the divider (DV) and rate (RS)
  bits are stored but time never stops or changes speed.
- Daylight saving (DSE) is ignored. The day of week always follows the date; a guest's own value is not
  kept. Switching DM or 24/12 re-encodes the current time at once (a real chip leaves the stored bytes
  alone until the next update).
- Writing a time register without SET changes that field at once; an impossible date (31 February) is
  a guest mistake: counted in `bad_time_writes` and the clock keeps its old value. Guests that set the
  clock properly (Linux's mc146818_set_time) set SET first, write all fields, then clear SET.
"""

from __future__ import annotations

import calendar
import math
import time
from typing import Callable

from pykvm.x86.layout import KiB, MiB, ram_regions
from pykvm.devices.isa import ByteRegisters
from pykvm.devices.state import Stateful

INDEX = 0   # port 0x70
DATA = 1    # port 0x71

SECONDS = 0x00
MINUTES = 0x02
HOURS = 0x04
DAY_OF_WEEK = 0x06
DAY_OF_MONTH = 0x07
MONTH = 0x08
YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
CENTURY = 0x32

REG_A_UIP = 0x80
REG_A_DEFAULT = 0x26   # DV = 010 (32.768 kHz time base running), RS = 0110 (1024 Hz)
REG_B_SET = 0x80
REG_B_DM_BINARY = 0x04
REG_B_24H = 0x02
REG_B_DEFAULT = REG_B_24H   # BCD, 24-hour: what PC BIOSes leave
REG_D_VRT = 0x80

HOUR_PM = 0x80         # in 12-hour mode, bit 7 of the hours byte
UIP_SECONDS = 244e-6   # UIP rises this long before each update (MC146818 datasheet, tBUC)

CMOS_SIZE = 128
NMI_DISABLE = 0x80

# Memory-size bytes.
CMOS_BASE_MEM = 0x15
CMOS_EXT_MEM = 0x17
CMOS_EXT_MEM_COPY = 0x30
CMOS_MEM_ABOVE_16M = 0x34
CMOS_MEM_ABOVE_4G = 0x5B

_TIME_FIELDS = {SECONDS: "sec", MINUTES: "min", HOURS: "hour", DAY_OF_MONTH: "mday",
                MONTH: "mon", YEAR: "year", CENTURY: "year", DAY_OF_WEEK: "wday"}


def _memory_bytes(memory_size: int) -> dict[int, int]:
    """The CMOS memory-size fields as QEMU's pc_cmos_init writes them and SeaBIOS reads them."""
    regions = ram_regions(memory_size)
    below_4g = regions[0][1]
    above_4g = sum(length for _, length in regions[1:])
    fields = {}

    def put(index: int, value: int, nbytes: int) -> None:
        for i in range(nbytes):
            fields[index + i] = (value >> (8 * i)) & 0xFF

    put(CMOS_BASE_MEM, min(below_4g // KiB, 640), 2)
    extended = min(max(below_4g - 1 * MiB, 0) // KiB, 0xFFFF)
    put(CMOS_EXT_MEM, extended, 2)
    put(CMOS_EXT_MEM_COPY, extended, 2)
    put(CMOS_MEM_ABOVE_16M, min(max(below_4g - 16 * MiB, 0) // (64 * KiB), 0xFFFF), 2)
    put(CMOS_MEM_ABOVE_4G, min(above_4g // (64 * KiB), 0xFFFFFF), 3)
    return fields


def _valid(f: dict[str, int]) -> bool:
    return (1 <= f["year"] <= 9999 and 1 <= f["mon"] <= 12
            and 1 <= f["mday"] <= calendar.monthrange(f["year"], f["mon"])[1]
            and 0 <= f["hour"] < 24 and 0 <= f["min"] < 60 and 0 <= f["sec"] < 60)


class CmosRtc(ByteRegisters, Stateful):
    """MC146818 RTC + CMOS RAM. `clock()` returns POSIX seconds (default `time.time`).

    Public attributes: `cmos` (the 128 bytes; time registers in it are not used, time is computed on
    read), `index` (last index written, without the NMI bit), `nmi_disabled`, `offset` (guest time minus
    host time, seconds), `bad_time_writes`.
    """

    # `offset` is guest time minus host wall time: a restored RTC goes on from the host's clock,
    # as a PC's battery-backed clock does after the machine was switched off.
    STATE = ("cmos", "index", "nmi_disabled", "offset", "_frozen", "bad_time_writes")

    def __init__(self, memory_size: int, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.cmos = bytearray(CMOS_SIZE)
        self.cmos[REG_A] = REG_A_DEFAULT
        self.cmos[REG_B] = REG_B_DEFAULT
        self.cmos[REG_D] = REG_D_VRT
        for index, value in _memory_bytes(memory_size).items():
            self.cmos[index] = value
        self.index = 0
        self.nmi_disabled = False
        self.offset = 0.0
        self._frozen: dict[str, int] | None = None   # the time held while SET is 1
        self.bad_time_writes = 0

    # The device contract, read(offset, size) and write(offset, size, value), comes from
    # ByteRegisters (pykvm/devices/isa.py): wide accesses are split into byte cycles.


    # --- time ------------------------------------------------------------------------------------

    def _now(self) -> float:
        return self.clock() + self.offset

    def _fields(self) -> dict[str, int]:
        if self._frozen is not None:
            return dict(self._frozen)
        tm = time.gmtime(math.floor(self._now()))
        return {"sec": tm.tm_sec, "min": tm.tm_min, "hour": tm.tm_hour, "mday": tm.tm_mday,
                "mon": tm.tm_mon, "year": tm.tm_year}

    def _commit(self, f: dict[str, int]) -> bool:
        """Make `f` the current time. False (and nothing changes) if it is no valid date."""
        if not _valid(f):
            self.bad_time_writes += 1
            return False
        target = calendar.timegm((f["year"], f["mon"], f["mday"], f["hour"], f["min"], f["sec"]))
        self.offset = target - self.clock()
        return True

    def _binary(self) -> bool:
        return bool(self.cmos[REG_B] & REG_B_DM_BINARY)

    def _encode(self, value: int) -> int:
        return value if self._binary() else ((value // 10) << 4) | (value % 10)

    def _decode(self, value: int) -> int:
        return value if self._binary() else (value >> 4) * 10 + (value & 0x0F)

    def _read_time(self, index: int) -> int:
        f = self._fields()
        if index == HOURS:
            hour = f["hour"]
            if self.cmos[REG_B] & REG_B_24H:
                return self._encode(hour)
            return self._encode(hour % 12 or 12) | (HOUR_PM if hour >= 12 else 0)
        if index == DAY_OF_WEEK:
            # Python's weekday: Monday = 0. The MC146818 convention used by PCs: Sunday = 1.
            if not _valid(f):
                return self._encode(1)   # a half-written date while SET is 1
            wday = calendar.weekday(f["year"], f["mon"], f["mday"])
            return self._encode((wday + 1) % 7 + 1)
        if index == YEAR:
            return self._encode(f["year"] % 100)
        if index == CENTURY:
            return self._encode(f["year"] // 100 % 100)
        return self._encode(f[_TIME_FIELDS[index]])

    def _write_time(self, index: int, value: int) -> None:
        if index == DAY_OF_WEEK:
            return   # derived from the date (see the module docstring)
        f = self._fields()
        if index == HOURS and not self.cmos[REG_B] & REG_B_24H:
            hour = self._decode(value & ~HOUR_PM) % 12
            f["hour"] = hour + (12 if value & HOUR_PM else 0)
        elif index == YEAR:
            f["year"] = f["year"] // 100 * 100 + self._decode(value) % 100
        elif index == CENTURY:
            f["year"] = self._decode(value) * 100 + f["year"] % 100
        else:
            f[_TIME_FIELDS[index]] = self._decode(value)
        if self._frozen is not None:
            self._frozen = f        # checked when SET is cleared
        else:
            self._commit(f)

    def _update_in_progress(self) -> bool:
        if self._frozen is not None:
            return False   # SET aborts and inhibits update cycles
        now = self._now()
        return now - math.floor(now) >= 1.0 - UIP_SECONDS

    # --- registers -------------------------------------------------------------------------------

    def _read_byte(self, offset: int) -> int:
        if offset != DATA:
            return 0xFF   # the index port is write-only on a PC; QEMU reads it as 0xff too
        index = self.index
        if index in _TIME_FIELDS:
            return self._read_time(index)
        if index == REG_A:
            return (self.cmos[REG_A] & ~REG_A_UIP) | (REG_A_UIP if self._update_in_progress() else 0)
        if index == REG_C:
            return 0      # no interrupt flags: see the module docstring
        if index == REG_D:
            return REG_D_VRT
        return self.cmos[index]

    def _write_byte(self, offset: int, value: int) -> None:
        if offset == INDEX:
            self.nmi_disabled = bool(value & NMI_DISABLE)
            self.index = value & (CMOS_SIZE - 1)
            return
        if offset != DATA:
            return
        index = self.index
        if index in _TIME_FIELDS:
            self._write_time(index, value)
        elif index == REG_A:
            self.cmos[REG_A] = value & ~REG_A_UIP
        elif index == REG_B:
            self._write_reg_b(value)
        elif index in (REG_C, REG_D):
            pass          # read-only
        else:
            self.cmos[index] = value

    def _write_reg_b(self, value: int) -> None:
        was_set = self.cmos[REG_B] & REG_B_SET
        if value & REG_B_SET and not was_set:
            self._frozen = self._fields()     # time stops while the guest writes new values
        self.cmos[REG_B] = value
        if was_set and not value & REG_B_SET:
            frozen, self._frozen = self._frozen, None
            if frozen is not None:
                self._commit(frozen)
