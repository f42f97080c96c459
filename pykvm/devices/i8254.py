"""The Intel 8254 programmable interval timer (PIT) at ports 0x40-0x43, and port 0x61.

Source: Intel 8254 datasheet (order no. 231164-005, "8254 Programmable Interval Timer"), cited as
[DS]; for port 0x61, Intel 82371AB PIIX4 datasheet 4.2.3 "NMI Status and Control Register" (the PC/AT's
"system control port B").

Three 16-bit down-counters share one 1.193182 MHz clock (the PC's 14.31818 MHz crystal / 12). On the PC
channel 0's OUT drives IRQ 0 (the system timer), channel 1 once paced DRAM refresh, channel 2's OUT
goes to the speaker and is readable at port 0x61 bit 5, with its GATE driven by port 0x61 bit 0.
Channels 0 and 1 have GATE tied high.

Ports: 0x40-0x42 are the channels' count registers, 0x43 the control word register (write only):

    control word  SC1 SC0 RW1 RW0 M2 M1 M0 BCD   [DS Figure 7]
    SC  = 11: read-back command; else the channel
    RW  = 00: counter latch command; 01 LSB only; 10 MSB only; 11 LSB then MSB
    M   = mode 0-5 (6 and 7 are aliases of 2 and 3)

Modes [DS "Mode Definitions"], with N the initial count (0 means 65536, or 10000 in BCD):
    0 interrupt on terminal count: OUT low, goes high after N clocks and stays high
    1 hardware retriggerable one-shot: a GATE rising edge starts it; OUT low for N clocks
    2 rate generator: OUT high, low for one clock every N clocks (period N)
    3 square wave: OUT high for ceil(N/2), low for floor(N/2) clocks
    4 software triggered strobe: OUT high, low for one clock after N clocks
    5 hardware triggered strobe: as 4, started by a GATE rising edge
GATE low suspends counting in modes 0, 2, 3, 4; in modes 2 and 3 it also forces OUT high, and the
rising edge reloads the counter.

**Time, not ticks.** Counting 1.19 million times a second in Python is out of the question, so a
channel only remembers when its count started (`start`, on the injectable monotonic `clock`) and
derives the counter and OUT from the elapsed clock count whenever asked. For IRQ 0 that means nobody
"fires" the interrupt: the run loop asks `next_irq_deadline()` when OUT will next rise, arms a host
timer to kick the vCPU then, and calls `poll(now)` before each KVM_RUN, which gives IRQ 0 an edge for
every rising OUT that has happened (periodic modes: once per period; several missed periods coalesce
into one edge, as they would in the 8259's IRR).

How Linux uses it: the i8253 clockevent (drivers/clocksource/i8253.c) runs channel 0 in mode 2 with
N = 1193182/HZ (control word 0x34), or one-shot in mode 4 (0x38) with a new count per event, and shuts
it down with mode 0 (0x30). TSC calibration (arch/x86/kernel/tsc.c, pit_calibrate_tsc and
quick_pit_calibrate) sets channel 2's GATE through port 0x61, programs mode 0 (0xb0) with a count, and
either polls port 0x61 bit 5 for OUT or reads the counter's MSB (two plain reads, LSB then MSB).

Shortcuts, admitted:
- A count is loaded the moment it is written. A real 8254 loads it on the next CLK falling edge (so
  mode 0's OUT rises N+1 clocks after the write, and NULL COUNT stays set for that clock), and in modes
  2 and 3 a count written while counting waits for the end of the current period. Here a new count
  restarts the channel at once. Linux writes the control word before a new periodic count anyway.
- Mode 3 with an odd N reads N-1, N-3, ... in both half-periods; the exact odd-count sequence
  [DS Mode 3] differs by one clock in when the counter reaches 0.
- Mode 1 and 5 on channels 0 and 1 never start (their GATE is tied high and never rises), as on a PC.
"""

from __future__ import annotations

import time
from typing import Callable

from pykvm.irq import IrqLine, NullIrqLine
from pykvm.devices.isa import ByteRegisters
from pykvm.devices.state import Stateful

PIT_HZ = 1_193_182

RW_LATCH = 0
RW_LSB = 1
RW_MSB = 2
RW_WORD = 3

STATUS_OUTPUT = 0x80
STATUS_NULL_COUNT = 0x40


def _from_bcd(value: int) -> int:
    # Nibbles above 9 are not BCD; the chip would count through them oddly. We clamp each digit.
    return sum(min((value >> (4 * i)) & 0xF, 9) * 10 ** i for i in range(4))


def _to_bcd(value: int) -> int:
    return sum(((value // 10 ** i) % 10) << (4 * i) for i in range(4))


class _Channel(Stateful):
    # `start` is a time on the PIT's clock: I8254Pit saves it relative to the moment of saving.
    STATE = ("mode", "access", "bcd", "count", "gate", "start", "frozen", "n", "armed", "idle_out",
             "idle_value", "null_count", "latch", "status", "read_msb", "write_msb", "write_lsb",
             "edges")

    def __init__(self, index: int):
        self.index = index
        self.mode = 0
        self.access = RW_WORD
        self.bcd = False
        self.count = 0              # the initial count as written (BCD digits if bcd)
        self.gate = index != 2      # channels 0 and 1: tied high
        self.start: float | None = None    # clock time the current count started
        self.frozen: int | None = None     # elapsed clocks while GATE holds the count
        self.n = 0x10000            # the count in use, as a number of clocks
        self.armed = False          # modes 1/5: a count was written, waiting for a GATE trigger
        self.idle_out = False       # OUT while not counting (undefined at power-on: low, no IRQ 0)
        self.idle_value = 0         # what the counter reads while not counting
        self.null_count = True
        self.latch: list[int] = []  # latched count bytes still to be read
        self.status: int | None = None
        self.read_msb = False       # RW_WORD: the next unlatched read gives the MSB
        self.write_msb = False      # RW_WORD: the next write is the MSB
        self.write_lsb = 0
        self.edges = 0              # OUT rising edges already reported (channel 0 / IRQ 0)

    # --- derived state ---
    @property
    def modulus(self) -> int:
        return 10000 if self.bcd else 0x10000

    def _initial(self) -> int:
        n = _from_bcd(self.count) if self.bcd else self.count
        return n or self.modulus

    def elapsed(self, now: float) -> int | None:
        """Clocks counted since the count started; None while not counting."""
        if self.start is None:
            return None
        if self.frozen is not None:
            return self.frozen
        return max(int((now - self.start) * PIT_HZ + 1e-6), 0)

    def value(self, now: float) -> int:
        """The counting element, as a binary number in 0..modulus-1."""
        d = self.elapsed(now)
        if d is None:
            return self.idle_value % self.modulus
        n = self.n
        mode = self.mode
        if mode == 2:
            v = n - d % n
        elif mode == 3:
            half = (n + 1) // 2
            phase = d % n
            v = n - 2 * (phase if phase < half else phase - half) - (n & 1)
        else:
            v = n - d
        return v % self.modulus

    def out(self, now: float) -> bool:
        d = self.elapsed(now)
        if d is None:
            return self.idle_out
        n = self.n
        mode = self.mode
        if mode in (0, 1):
            return d >= n
        if mode in (2, 3) and not self.gate:
            return True
        if mode == 2:
            return d % n != n - 1
        if mode == 3:
            return d % n < (n + 1) // 2
        return d != n                       # modes 4, 5: one clock low at terminal count

    def rising_edges(self, now: float) -> int:
        """How many times OUT has risen since the count started (the IRQ 0 events)."""
        d = self.elapsed(now)
        if d is None:
            return 0
        n = self.n
        if self.mode in (0, 1):
            return 1 if d >= n else 0
        if self.mode in (2, 3):
            return d // n
        return 1 if d >= n + 1 else 0

    def edge_time(self, k: int) -> float | None:
        """Clock time of the k-th rising edge of OUT (k >= 1), or None if it never comes."""
        if self.start is None or self.frozen is not None:
            return None
        n = self.n
        if self.mode in (2, 3):
            clocks = k * n
        elif k == 1:
            clocks = n + 1 if self.mode in (4, 5) else n
        else:
            return None
        return self.start + clocks / PIT_HZ

    def status_byte(self, now: float) -> int:
        """[DS "Status Byte"]: OUTPUT, NULL COUNT, RW1 RW0, M2 M1 M0, BCD."""
        return ((STATUS_OUTPUT if self.out(now) else 0)
                | (STATUS_NULL_COUNT if self.null_count else 0)
                | self.access << 4 | self.mode << 1 | int(self.bcd))

    # --- programming ---
    def _freeze_value(self, now: float) -> None:
        self.idle_value = self.value(now)
        self.idle_out = self.out(now)

    def control(self, value: int, now: float) -> None:
        self._freeze_value(now)
        self.access = (value >> 4) & 3
        mode = (value >> 1) & 7
        self.mode = mode - 4 if mode >= 6 else mode
        self.bcd = bool(value & 1)
        # [DS, each mode]: after the control word OUT is low in mode 0 and high in the others;
        # counting waits for a count.
        self.idle_out = self.mode != 0
        self.start = None
        self.frozen = None
        self.armed = False
        self.null_count = True
        self.latch = []
        self.status = None
        self.read_msb = False
        self.write_msb = False
        self.edges = 0

    def load(self, count: int, now: float) -> None:
        self.count = count
        self.null_count = True
        self._freeze_value(now)
        if self.mode in (1, 5):
            self.armed = True               # waits for the next GATE rising edge
            return
        self._begin(now)

    def _begin(self, now: float) -> None:
        self.n = self._initial()
        self.start = now
        self.frozen = None if self.gate else 0
        self.null_count = False
        self.edges = 0

    def write_count_byte(self, byte: int, now: float) -> None:
        if self.access == RW_LSB:
            self.load(byte, now)
        elif self.access == RW_MSB:
            self.load(byte << 8, now)
        elif not self.write_msb:
            self.write_lsb = byte
            self.write_msb = True
            if self.mode == 0:
                # [DS Mode 0]: writing the first byte disables counting; OUT goes low at once.
                self._freeze_value(now)
                self.start = None
                self.idle_out = False
        else:
            self.write_msb = False
            self.load(self.write_lsb | byte << 8, now)

    def set_gate(self, level: bool, now: float) -> None:
        if level == self.gate:
            return
        if level:
            self.gate = True
            if self.mode in (1, 5):
                if self.armed or self.start is not None:
                    self._begin(now)        # trigger (and retrigger)
            elif self.start is not None:
                if self.mode in (2, 3):
                    self._begin(now)        # the rising edge reloads the counter
                else:
                    self.start = now - (self.frozen or 0) / PIT_HZ
                    self.frozen = None
        else:
            if self.mode in (0, 2, 3, 4) and self.start is not None and self.frozen is None:
                self.frozen = self.elapsed(now)
            self.gate = False

    def latch_count(self, now: float) -> None:
        # [DS "Counter Latch Command"]: a second latch before the first is read is ignored.
        if self.latch:
            return
        v = self.value(now)
        if self.bcd:
            v = _to_bcd(v)
        if self.access == RW_LSB:
            self.latch = [v & 0xFF]
        elif self.access == RW_MSB:
            self.latch = [v >> 8]
        else:
            self.latch = [v & 0xFF, v >> 8]

    def latch_status(self, now: float) -> None:
        if self.status is None:
            self.status = self.status_byte(now)

    def read_byte(self, now: float) -> int:
        # [DS "Read-Back Command"]: with both latched, the status comes first.
        if self.status is not None:
            value, self.status = self.status, None
            return value
        if self.latch:
            return self.latch.pop(0)
        v = self.value(now)
        if self.bcd:
            v = _to_bcd(v)
        if self.access == RW_LSB:
            return v & 0xFF
        if self.access == RW_MSB:
            return v >> 8
        self.read_msb = not self.read_msb
        return v >> 8 if not self.read_msb else v & 0xFF


class I8254Pit(ByteRegisters, Stateful):
    """The PIT: a bus device for ports 0x40-0x43 (offsets 0-3); `irq0` is driven by channel 0's OUT.

    Host side: `poll(now)` brings IRQ 0 up to date; `next_irq_deadline()` is the clock time of the
    next OUT rising edge on channel 0 (None: none is coming); `set_gate(channel, level)` and
    `output(channel)` for the port 0x61 wiring. `clock` (default time.monotonic) is the time base of
    all of them. Used from the vCPU thread only: no lock.
    """

    STATE = ("channels", "irq_edges", "bad_accesses", "irq0")

    def save_state(self) -> dict:
        # Counting times are kept relative to now: a restored PIT (a new process, another
        # monotonic clock) goes on counting from where it was, as if no time passed meanwhile.
        now = self.clock()
        state = super().save_state()
        for ch in state["channels"]:
            if ch["start"] is not None:
                ch["start"] -= now
        return state

    def restore_state(self, state: dict) -> None:
        super().restore_state(state)
        now = self.clock()
        for ch in self.channels:
            if ch.start is not None:
                ch.start += now

    def __init__(self, irq0: IrqLine | None = None, clock: Callable[[], float] = time.monotonic):
        self.irq0 = irq0 if irq0 is not None else NullIrqLine()
        self.clock = clock
        self.channels = tuple(_Channel(i) for i in range(3))
        self.irq_edges = 0          # IRQ 0 edges given to the PIC
        self.bad_accesses = 0

    # The device contract, read(offset, size) and write(offset, size, value), comes from
    # ByteRegisters (pykvm/devices/isa.py): wide accesses are split into byte cycles.

    def _read_byte(self, offset: int) -> int:
        if 0 <= offset < 3:
            return self.channels[offset].read_byte(self.clock())
        # The control word register cannot be read [DS Table 1: "No-Operation (3-State)"].
        self.bad_accesses += 1
        return 0xFF

    def _write_byte(self, offset: int, value: int) -> None:
        now = self.clock()
        if 0 <= offset < 3:
            self.channels[offset].write_count_byte(value, now)
        elif offset == 3:
            sc = value >> 6
            if sc == 3:
                # Read-back [DS Figure 10]: D5=0 latch count, D4=0 latch status, D3-D1 the channels.
                for ch in self.channels:
                    if value & (2 << ch.index):
                        if not value & 0x20:
                            ch.latch_count(now)
                        if not value & 0x10:
                            ch.latch_status(now)
            elif (value >> 4) & 3 == RW_LATCH:
                self.channels[sc].latch_count(now)
            else:
                self.channels[sc].control(value, now)
        else:
            self.bad_accesses += 1
            return
        self.poll(now)

    # --- host side ---
    def set_gate(self, channel: int, level: bool) -> None:
        now = self.clock()
        self.channels[channel].set_gate(bool(level), now)
        self.poll(now)

    def output(self, channel: int, now: float | None = None) -> bool:
        return self.channels[channel].out(self.clock() if now is None else now)

    def poll(self, now: float | None = None) -> None:
        """Bring the IRQ 0 line up to date with channel 0's OUT at `now`.

        Modes 0 and 1 leave the line at OUT's level (high after the terminal count). The other modes
        give a rising edge (a pulse) for each new OUT rising edge: the 8259 latches edges, and
        a pulse leaves the line low, ready for the next period."""
        if now is None:
            now = self.clock()
        ch = self.channels[0]
        if ch.mode in (0, 1):
            self.irq0.set_level(ch.out(now))
            if ch.rising_edges(now) > ch.edges:
                ch.edges = 1
                self.irq_edges += 1
            return
        self.irq0.set_level(False)
        edges = ch.rising_edges(now)
        if edges > ch.edges:
            ch.edges = edges
            self.irq0.pulse()
            self.irq_edges += 1

    def next_irq_deadline(self) -> float | None:
        """Clock time at which channel 0's OUT next rises (an IRQ 0 edge), or None."""
        ch = self.channels[0]
        return ch.edge_time(ch.edges + 1)


class SystemControlPortB(Stateful):
    """Port 0x61 (PIIX4 "NMI Status and Control", the AT's port B): one byte at offset 0.

        bit 0  timer 2 gate (rw)           bit 4  refresh cycle toggle (ro)
        bit 1  speaker data enable (rw)    bit 5  timer 2 OUT (ro)
        bit 2  PCI SERR# enable (rw)       bit 6  IOCHK# NMI source (ro, always 0 here)
        bit 3  IOCHK# enable (rw)          bit 7  SERR# NMI source (ro, always 0 here)

    The refresh toggle flips every 15 us on a PC (channel 1 in mode 2 with N=18); some old delay
    loops watch it, so it is derived from the clock the same way."""

    STATE = ("value",)

    def __init__(self, pit: I8254Pit):
        self.pit = pit
        self.value = 0

    def read(self, offset: int, size: int) -> int:
        now = self.pit.clock()
        refresh = int(now * PIT_HZ) // 18 & 1
        byte = (self.value & 0x0F) | refresh << 4 | int(self.pit.output(2, now)) << 5
        return byte

    def write(self, offset: int, size: int, value: int) -> None:
        if offset != 0:
            return
        self.value = value & 0x0F
        self.pit.set_gate(2, bool(value & 1))
