"""The ACPI fixed-hardware power-management registers: how an ACPI OS powers a PC off or resets it.

ACPI 6.5 chapter 4.8 ("ACPI Hardware Model", fixed hardware) gives every full-ACPI PC a few
registers at I/O ports the FADT names (pykvm puts them at layout.PORT_ACPI_PM, 20 ports):

    offset  width  register        (ACPI 6.5 section)
    0       16     PM1a_STS        4.8.3.1.1  status bits, write 1 to clear
    2       16     PM1a_EN         4.8.3.1.2  which status bits raise the SCI
    4       16     PM1a_CNT        4.8.3.2.1  SCI_EN (bit 0), SLP_TYP (bits 10-12), SLP_EN (bit 13)
    8       32     PM_TMR          4.8.3.3    a free-running 3.579545 MHz counter, read-only
    12      8      RESET           4.8.3.6    the FADT's RESET_REG: writing RESET_VALUE resets
    16      16     GPE0_STS        4.8.4.1    general-purpose event status, write 1 to clear
    18      16     GPE0_EN         4.8.4.1    which GPE status bits raise the SCI

- **Power-off** (7.4.2.5 and 16.1.3.5): the OS reads SLP_TYP for S5 from the DSDT's \\_S5 package,
  then writes PM1a_CNT with that SLP_TYP and SLP_EN set. We call `on_poweroff()` then.
- **Reset**: the OS writes RESET_VALUE to the reset register (`on_reset()`).
- **PM timer**: Linux uses it as a clock source and to watch the TSC. It counts the host's
  monotonic clock scaled to 3.579545 MHz, 32 bits wide (the FADT sets TMR_VAL_EXT).
- **SCI**: the interrupt the PM1 status bits raise when enabled. The only event we ever latch is
  the power button (`press_power_button()`, PWRBTN_STS), so a host can ask an ACPI guest to shut
  down cleanly. TMR_STS (the timer's bit 31 toggling) is not modelled: Linux never enables it.
- **GPE0 block** (4.8.4.1, "General-Purpose Event Register Blocks"): 16 general-purpose events,
  a status half then an enable half (the FADT's GPE0_BLK_LEN is the whole block, 4 bytes). A
  host-side event calls `raise_gpe(n)`: status bit n latches, and the SCI rises if the OS
  enabled bit n. The OS's SCI handler (ACPICA's acpi_ev_gpe_detect) finds the bit, clears it, and
  runs the DSDT's `\\_GPE._Enn` method (edge: "_E"; the status was latched, not a held level),
  which is where AML turns a wire into a Notify() on a device (pykvm.devices.vmgenid uses GPE 0).

The device knows nothing of KVM: it gets `read(offset, size)`/`write(offset, size, value)` from a
bus, an irq line for the SCI, and two callbacks.

Several vCPUs: any of them can access these registers, so one lock serializes the accesses
(status/enable are read-modify-write and the SCI level is computed from both).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from ..irq import IrqLine, NullIrqLine
from .state import Stateful

SIZE = 20
PM1_STS, PM1_EN, PM1_CNT, PM_TMR, RESET, GPE0_STS, GPE0_EN = 0, 2, 4, 8, 12, 16, 18
PM1_EVT_LEN, PM1_CNT_LEN, PM_TMR_LEN, GPE0_BLK_LEN = 4, 2, 4, 4
GPE_COUNT = 8 * GPE0_BLK_LEN // 2         # one status and one enable bit per event

# PM1 status / enable bits (Tables 4.16 and 4.17)
TMR_STS = 1 << 0
PWRBTN_STS = 1 << 8
WAK_STS = 1 << 15
STATUS_BITS = TMR_STS | (1 << 4) | (1 << 5) | PWRBTN_STS | (1 << 9) | (1 << 10) | (1 << 14) | WAK_STS
PWRBTN_EN = 1 << 8
ENABLE_BITS = TMR_STS | (1 << 5) | PWRBTN_EN | (1 << 9) | (1 << 10)
# PM1 control bits (Table 4.18)
SCI_EN = 1 << 0
SLP_TYP_SHIFT, SLP_TYP_MASK = 10, 0x7 << 10
SLP_EN = 1 << 13                 # write-only: reads as 0

PM_TIMER_HZ = 3_579_545
RESET_VALUE = 0x06               # what the FADT tells the OS to write (the 0xcf9 habit: CPU + system reset)


class AcpiPm(Stateful):
    """PM1a event and control blocks, the PM timer and the reset register, at offsets 0-12.

    `slp_typ_s5`: the SLP_TYP value the DSDT's \\_S5 gives. `clock`: seconds, monotonic (tests
    pass a fake).

    Snapshots keep the registers and the SCI level, and the PM timer's count: a restored guest sees
    its clocksource go on from where it was saved, not jump to the new process's clock."""

    thread_safe = True      # its own lock (module docstring): a bus need not add one
    STATE = ("status", "enable", "control", "gpe_status", "gpe_enable", "sleep_requests",
             "ignored_writes", "sci")

    def __init__(self, *, on_poweroff: Callable[[], None], on_reset: Callable[[], None],
                 sci: IrqLine | None = None, slp_typ_s5: int = 5,
                 clock: Callable[[], float] = time.monotonic):
        self.on_poweroff = on_poweroff
        self.on_reset = on_reset
        self.sci = sci or NullIrqLine()
        self.slp_typ_s5 = slp_typ_s5
        self.clock = clock
        self._t0 = clock()
        self.status = 0
        self.enable = 0
        # SMI_CMD is 0 in the FADT: no firmware owns the hardware, the system is always in ACPI
        # mode, so SCI_EN reads as set from the start (4.8.3.2.1: "the OS must not change it").
        self.control = SCI_EN
        self.gpe_status = 0
        self.gpe_enable = 0
        self.sleep_requests: list[int] = []     # SLP_TYP values written with SLP_EN
        self.ignored_writes = 0                 # reset-register values other than RESET_VALUE
        self._lock = threading.Lock()

    # ---- registers ----
    def timer(self) -> int:
        return int((self.clock() - self._t0) * PM_TIMER_HZ) & 0xFFFFFFFF

    def _register_bytes(self) -> bytes:
        return (self.status.to_bytes(2, "little") + self.enable.to_bytes(2, "little")
                + self.control.to_bytes(2, "little") + bytes(2)
                + self.timer().to_bytes(4, "little") + bytes(4)
                + self.gpe_status.to_bytes(2, "little") + self.gpe_enable.to_bytes(2, "little"))

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            regs = self._register_bytes()
        return int.from_bytes(regs[offset:offset + size].ljust(size, b"\x00"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """Accesses may be any width at any offset (ACPICA uses 16-bit ones for PM1, 8-bit for the
        reset register): the write is split into the registers its bytes fall in."""
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        with self._lock:
            actions = []
            for reg, width in ((PM1_STS, 2), (PM1_EN, 2), (PM1_CNT, 2), (RESET, 1),
                               (GPE0_STS, 2), (GPE0_EN, 2)):
                lo, hi = max(offset, reg), min(offset + size, reg + width)
                if lo >= hi:
                    continue
                mask = value_part = 0
                for i in range(lo, hi):
                    mask |= 0xFF << (8 * (i - reg))
                    value_part |= data[i - offset] << (8 * (i - reg))
                actions.append(self._write_register(reg, mask, value_part))
            self._update_sci()
        for action in actions:         # callbacks outside the lock: they may stop the machine
            if action is not None:
                action()

    def _write_register(self, reg: int, mask: int, value: int) -> Callable[[], None] | None:
        if reg == PM1_STS:
            self.status &= ~(value & mask & STATUS_BITS)     # write 1 to clear
        elif reg == PM1_EN:
            self.enable = (self.enable & ~mask) | (value & mask & ENABLE_BITS)
        elif reg == PM1_CNT:
            written = (self.control & ~mask) | (value & mask)
            self.control = (written & ~SLP_EN) | SCI_EN
            if written & SLP_EN and mask & SLP_EN:
                slp_typ = (written & SLP_TYP_MASK) >> SLP_TYP_SHIFT
                self.sleep_requests.append(slp_typ)
                if slp_typ == self.slp_typ_s5:
                    return self.on_poweroff
                # Other sleep states (S1-S4) are not offered by the DSDT; a guest asking for one
                # anyway is ignored, as hardware without that state would.
        elif reg == GPE0_STS:
            self.gpe_status &= ~(value & mask)                # write 1 to clear
        elif reg == GPE0_EN:
            self.gpe_enable = (self.gpe_enable & ~mask) | (value & mask)
        elif reg == RESET:
            if value == RESET_VALUE:
                return self.on_reset
            self.ignored_writes += 1
        return None

    # ---- snapshots (pykvm/devices/state.py) ----
    def save_state(self) -> dict:
        with self._lock:
            return {**super().save_state(), "timer_seconds": self.clock() - self._t0}

    def restore_state(self, state: dict) -> None:
        with self._lock:
            super().restore_state(state)
            # The counter goes on from the saved count, on this process's clock.
            self._t0 = self.clock() - float(state.get("timer_seconds", 0.0))

    # ---- events from the host ----
    def press_power_button(self) -> None:
        """The fixed-hardware power button: PWRBTN_STS, and the SCI if the OS enabled it."""
        with self._lock:
            self.status |= PWRBTN_STS
            self._update_sci()

    def raise_gpe(self, n: int) -> None:
        """General-purpose event `n` happened: latch its status bit, and the SCI if enabled."""
        if not 0 <= n < GPE_COUNT:
            raise ValueError(f"GPE {n} is outside the GPE0 block (0-{GPE_COUNT - 1})")
        with self._lock:
            self.gpe_status |= 1 << n
            self._update_sci()

    def _update_sci(self) -> None:
        self.sci.set_level(bool(self.status & self.enable)
                           or bool(self.gpe_status & self.gpe_enable))
