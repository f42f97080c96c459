"""The PC/AT's two cascaded Intel 8259A programmable interrupt controllers, and the PIIX ELCR.

Sources: Intel 8259A datasheet (order no. 231468-003, "8259A Programmable Interrupt Controller"),
cited below as [DS]; Intel 82371AB PIIX4 datasheet section 3.3.1 for the ELCR; Linux's
arch/x86/kernel/i8259.c for what a guest actually does.

The wiring (IBM PC/AT): the master at ports 0x20/0x21 takes IRQ 0-7, the slave at 0xa0/0xa1 takes
IRQ 8-15 and its INT output goes to the master's IR2 (the "cascade"). The master's INT goes to the
CPU's INTR pin. When the CPU takes the interrupt it runs two INTA cycles and the 8259A answers with an
8-bit vector (ICW2's base + the IR number); a slave request makes the master let the slave drive it.

Registers per chip [DS "Programming the 8259A"]:
- IRR (interrupt request register): which IR inputs are asking. Edge mode latches a rising edge
  until INTA; level mode follows the input.
- ISR (in-service register): which requests the CPU has acknowledged and not yet EOI'd. Set at INTA,
  cleared by an EOI command (or at once, in automatic-EOI mode).
- IMR (interrupt mask register): masked inputs never reach INT. Written by OCW1.
- the priority resolver: the highest-priority unmasked IRR bit wins if it has a higher priority than
  every ISR bit ("fully nested mode"). IR0 is highest; rotation moves the lowest-priority position.

Commands: writes to the even port with D4=1 are ICW1 (start initialisation, then ICW2, ICW3 if
cascaded, ICW4 if ICW1.IC4 follow at the odd port); with D4=0,D3=0 OCW2 (EOI and rotation); with
D4=0,D3=1 OCW3 (read IRR/ISR, poll, special mask mode). Odd-port writes outside initialisation are OCW1
(the mask). Even-port reads give IRR or ISR (OCW3 RR/RIS), odd-port reads give IMR.

How Linux drives it (init_8259A): mask everything, ICW1=0x11 (edge, cascade, ICW4 needed),
ICW2=0x30 (master) / 0x38 (slave), ICW3=0x04 / 0x02, ICW4=0x01 (8086 mode, normal EOI), restore the
masks. Each interrupt is then masked-and-acked with a specific EOI (OCW2 0x60+n; for the slave also
0x62 to the master). Before trusting an IRQ 7/15 it reads ISR (OCW3 0x0b) to tell a spurious one.
probe_8259A writes 0xa5 to the master's IMR and expects to read it back.

Shortcuts, admitted:
- 8086/8088 mode only. ICW4.uPM=0 (8080/8085 CALL-instruction mode) is accepted and logged in
  `unsupported`, and vectors are still given in 8086 form. Buffered mode and ICW3's slave id are stored
  and ignored: the cascade wiring is fixed as on the PC.
- The cascade input (master IR2) follows the slave's INT as a level, whatever LTIM says. On the real
  board it is edge-sensed like the other inputs; modelling it as a level loses no cascaded request and
  behaves the same for every guest we know (QEMU and KVM's in-kernel PIC get the same effect by
  re-raising on every slave update).
- An edge-triggered request stays in IRR after the input falls. [DS "Edge triggered mode"] says an IR
  that goes low before INTA gives a "default IR7" instead; devices here signal with a pulse (up and
  down at once), so following that to the letter would lose every ISA interrupt. A spurious IR7/IR15
  still happens when the request vanishes before INTA in level mode, or when the guest masks it (IMR)
  in between, which is what Linux's spurious-IRQ handling is for.

Thread-safety: devices on other threads (the serial input thread) drive pins, so every public entry
point takes one lock. `on_intr_change(level)` is called with the lock held: it must only record or
kick, not call back into the PIC.
"""

from __future__ import annotations

import threading
from typing import Callable

from pykvm.irq import IrqLine
from pykvm.devices.state import Stateful
from pykvm.x86 import layout

# ICW1 [DS Figure 7 "Initialization Command Word Format"]
ICW1_IC4 = 0x01      # ICW4 will be written
ICW1_SNGL = 0x02     # single 8259A, no ICW3
ICW1_LTIM = 0x08     # level-triggered inputs
ICW1_INIT = 0x10     # D4=1 on the even port marks ICW1
# ICW4
ICW4_UPM = 0x01      # 8086/8088 mode
ICW4_AEOI = 0x02     # automatic end of interrupt
ICW4_SFNM = 0x10     # special fully nested mode
# OCW2 [DS Figure 8]: bits 7-5 are R, SL, EOI; bits 2-0 the level for the SL forms.
OCW2_ROTATE_AEOI_CLEAR = 0x00
OCW2_EOI = 0x20
OCW2_NOP = 0x40
OCW2_SPECIFIC_EOI = 0x60
OCW2_ROTATE_AEOI_SET = 0x80
OCW2_ROTATE_EOI = 0xA0
OCW2_SET_PRIORITY = 0xC0
OCW2_ROTATE_SPECIFIC_EOI = 0xE0
# OCW3
OCW3_MARK = 0x08     # D4=0, D3=1 on the even port marks OCW3
OCW3_RR = 0x02       # act on RIS
OCW3_RIS = 0x01      # read ISR (else IRR)
OCW3_POLL = 0x04
OCW3_ESMM = 0x40     # act on SMM
OCW3_SMM = 0x20      # special mask mode

CASCADE_IRQ = layout.IRQ_CASCADE
# PIIX ELCR: IRQ 0, 1, 2, 8 and 13 are wired edge-only; their bits are read-only 0 (PIIX4 3.3.1).
ELCR_MASK = (0xF8, 0xDE)


class _Chip(Stateful):
    """One 8259A. Bit n of each register is IR input n."""

    STATE = ("elcr", "pins", "irr", "isr", "imr", "vector_base", "icw_step", "icw1", "icw3", "icw4",
             "lowest_priority", "read_isr", "poll", "special_mask", "rotate_on_aeoi", "unsupported")

    def __init__(self, elcr_mask: int):
        self.elcr_mask = elcr_mask
        self.elcr = 0
        self.pins = 0              # current input levels
        self.irr = 0
        self.isr = 0
        self.imr = 0
        self.vector_base = 0
        self.icw_step = 0          # 0: operating; 2, 3, 4: which ICW the odd port expects next
        self.icw1 = 0
        self.icw3 = 0
        self.icw4 = 0
        self.lowest_priority = 7   # the IR with the lowest priority (rotation moves it)
        self.read_isr = False
        self.poll = False
        self.special_mask = False
        self.rotate_on_aeoi = False
        self.unsupported = 0

    # --- state the resolver needs ---
    @property
    def level_mask(self) -> int:
        """Inputs sensed by level: all of them with ICW1.LTIM, else those set in the ELCR."""
        return 0xFF if self.icw1 & ICW1_LTIM else self.elcr

    def _priority(self, irq: int) -> int:
        """0 is the highest priority; the IR after `lowest_priority` has it."""
        return (irq - self.lowest_priority - 1) & 7

    def _highest(self, bits: int) -> int | None:
        """The highest-priority IR among `bits`, or None.

        Priority runs from the IR after `lowest_priority` round to it. Rotating `bits` right by
        that first IR puts them in priority order from bit 0, so the answer is the lowest set bit
        of the rotated byte (`r & -r`), turned back into an IR: no loop over the eight levels,
        which with the user irqchip runs several times for every timer tick."""
        bits &= 0xFF
        if not bits:
            return None
        first = (self.lowest_priority + 1) & 7
        r = ((bits >> first) | (bits << (8 - first))) & 0xFF
        return (first + (r & -r).bit_length() - 1) & 7

    def best_request(self, cascade_sfnm: bool = False) -> int | None:
        """The IR that would be delivered now, or None [DS "Fully Nested Mode", "Special Mask Mode"]."""
        requests = self.irr & ~self.imr
        irq = self._highest(requests)
        if irq is None:
            return None
        blocking = self.isr
        if self.special_mask:
            # Special mask mode: a masked in-service level no longer inhibits lower priorities.
            blocking &= ~self.imr
        if cascade_sfnm:
            # Special fully nested mode (master): a higher-priority slave request may interrupt an
            # in-service slave interrupt, so the cascade's ISR bit does not block IR2 itself.
            blocking &= ~(1 << CASCADE_IRQ)
        in_service = self._highest(blocking)
        if in_service is not None and self._priority(in_service) <= self._priority(irq):
            return None
        return irq

    # --- inputs ---
    def set_pin(self, irq: int, level: bool) -> None:
        bit = 1 << irq
        was = self.pins & bit
        if level:
            self.pins |= bit
            if self.level_mask & bit or not was:
                self.irr |= bit          # level: follows; edge: latch the rising edge
        else:
            self.pins &= ~bit
            if self.level_mask & bit:
                self.irr &= ~bit         # a level request that vanishes is gone

    def resync_levels(self) -> None:
        """After a mode change, level-sensed IRR bits are whatever the pins say."""
        lm = self.level_mask
        self.irr = (self.irr & ~lm) | (self.pins & lm)

    # --- INTA ---
    def acknowledge(self, irq: int) -> None:
        bit = 1 << irq
        if not self.level_mask & bit:
            self.irr &= ~bit             # edge: the latch is consumed
        if self.icw4 & ICW4_AEOI:
            # Automatic EOI: ISR is cleared at the end of the second INTA [DS "AEOI Mode"].
            if self.rotate_on_aeoi:
                self.lowest_priority = irq
        else:
            self.isr |= bit
        self.resync_levels()

    # --- the register interface ---
    def read(self, port: int) -> int:
        if self.poll:
            return self.poll_read()
        if port == 0:
            return self.isr if self.read_isr else self.irr
        return self.imr

    def poll_read(self) -> int:
        """[DS "The Poll Command"]: the read acts as INTA; bit 7 says whether anything was pending."""
        self.poll = False
        irq = self.best_request()
        if irq is None:
            return 0
        self.acknowledge(irq)
        return 0x80 | irq

    def write(self, port: int, value: int) -> None:
        if port == 0:
            if value & ICW1_INIT:
                self._icw1(value)
            elif value & OCW3_MARK:
                self._ocw3(value)
            else:
                self._ocw2(value)
            return
        if self.icw_step == 2:
            self.vector_base = value & 0xF8
            self.icw_step = 3 if not self.icw1 & ICW1_SNGL else 4
            if self.icw_step == 4 and not self.icw1 & ICW1_IC4:
                self.icw_step = 0
        elif self.icw_step == 3:
            self.icw3 = value
            self.icw_step = 4 if self.icw1 & ICW1_IC4 else 0
        elif self.icw_step == 4:
            self.icw4 = value & 0x1F
            if not value & ICW4_UPM:
                self.unsupported += 1
            self.icw_step = 0
        else:
            self.imr = value                       # OCW1

    def _icw1(self, value: int) -> None:
        # [DS "Initialization Command Words"]: the edge sense circuit is reset (an input must go low
        # and high again), IMR cleared, IR7 lowest priority, special mask mode cleared, status read
        # set to IRR; without IC4 every ICW4 function is zero.
        self.icw1 = value
        self.icw_step = 2
        self.irr = 0
        self.isr = 0
        self.imr = 0
        self.icw4 = 0
        self.lowest_priority = 7
        self.special_mask = False
        self.read_isr = False
        self.poll = False
        self.rotate_on_aeoi = False
        self.resync_levels()
        if value & 0x04 or value & 0xE0:
            # ADI and A7-A5 only matter in 8080 mode.
            self.unsupported += 1

    def _ocw2(self, value: int) -> None:
        cmd = value & 0xE0
        level = value & 7
        if cmd in (OCW2_EOI, OCW2_ROTATE_EOI):
            irq = self._highest(self.isr)
            if irq is not None:
                self.isr &= ~(1 << irq)
                if cmd == OCW2_ROTATE_EOI:
                    self.lowest_priority = irq
        elif cmd in (OCW2_SPECIFIC_EOI, OCW2_ROTATE_SPECIFIC_EOI):
            self.isr &= ~(1 << level)
            if cmd == OCW2_ROTATE_SPECIFIC_EOI:
                self.lowest_priority = level
        elif cmd == OCW2_SET_PRIORITY:
            self.lowest_priority = level
        elif cmd == OCW2_ROTATE_AEOI_SET:
            self.rotate_on_aeoi = True
        elif cmd == OCW2_ROTATE_AEOI_CLEAR:
            self.rotate_on_aeoi = False
        # OCW2_NOP: nothing.

    def _ocw3(self, value: int) -> None:
        if value & OCW3_ESMM:
            self.special_mask = bool(value & OCW3_SMM)
        if value & OCW3_RR:
            self.read_isr = bool(value & OCW3_RIS)
        # Poll overrides the read register selection for the next read only [DS "The Poll Command"].
        self.poll = bool(value & OCW3_POLL)


class _PicPin(IrqLine):
    def __init__(self, pic: "I8259Pair", irq: int):
        super().__init__()
        self._pic = pic
        self.irq = irq

    def _raise_level(self, level: bool) -> None:
        self._pic._set_irq(self.irq, level)


class I8259Pair(Stateful):
    """Master + slave 8259A as wired on the PC/AT, plus the PIIX ELCR.

    Bus devices: `master` (2 ports at 0x20), `slave` (2 ports at 0xa0), `elcr_device` (2 ports at
    0x4d0). `register_on(bus)` puts all three on a port bus.

    CPU side: `pending()` is the INTR pin; `acknowledge()` is the INTA cycle and returns the vector;
    `on_intr_change(level)` (settable attribute) is called whenever INTR changes.
    Device side: `pin(n)` is the IrqLine for IRQ n (0-15).
    """

    # The pins' levels are the chips' `pins`; `intr` is the INTR output as last computed.
    STATE = ("chips", "intr", "spurious", "acknowledged", "ignored_irq2", "_pins")

    def __init__(self, on_intr_change: Callable[[bool], None] | None = None):
        self.chips = (_Chip(ELCR_MASK[0]), _Chip(ELCR_MASK[1]))
        self.on_intr_change = on_intr_change
        self.intr = False
        self.spurious = 0          # INTA cycles that found no request (vector IR7/IR15 given)
        self.acknowledged = 0
        self.ignored_irq2 = 0      # level changes on pin(2) while it is the cascade input
        self._lock = threading.RLock()
        self._pins = [_PicPin(self, n) for n in range(16)]
        self.master = _PicPorts(self, 0)
        self.slave = _PicPorts(self, 1)
        self.elcr_device = _ElcrPorts(self)

    def register_on(self, bus) -> None:
        bus.register(layout.PORT_PIC_MASTER, 2, self.master, "i8259 master")
        bus.register(layout.PORT_PIC_SLAVE, 2, self.slave, "i8259 slave")
        bus.register(layout.PORT_ELCR, 2, self.elcr_device, "ELCR")

    def pin(self, n: int) -> IrqLine:
        if not 0 <= n < 16:
            raise ValueError(f"the PIC pair has IRQ 0-15, not {n}")
        return self._pins[n]

    def set_level_triggered(self, n: int, level: bool = True) -> None:
        """Program the ELCR bit for IRQ n from the host, as firmware does for the IRQs it routes PCI
        INTx# to (PCI interrupts are level-triggered and shareable [PCI 2.2.6]). Linux without a
        PIRQ routing table never writes the ELCR itself. IRQ 0, 1, 2, 8 and 13 stay edge."""
        with self._lock:
            c = self.chips[n >> 3]
            bit = 1 << (n & 7)
            value = (c.elcr | bit) if level else (c.elcr & ~bit)
        self._write_elcr(n >> 3, value)

    # --- CPU side ---
    def pending(self) -> bool:
        with self._lock:
            return self.intr

    def acknowledge(self) -> int:
        """The two INTA cycles: the vector of the highest-priority request; IRR/ISR updated.

        With nothing to deliver (the request vanished or was masked after INTR rose) the 8259A still
        answers, with IR7 of the chip that was asked: the spurious interrupt [DS "Interrupt Sequence",
        step 4 note]."""
        with self._lock:
            master, slave = self.chips
            irq = master.best_request(bool(master.icw4 & ICW4_SFNM))
            if irq is None:
                self.spurious += 1
                vector = master.vector_base | 7
            elif irq == CASCADE_IRQ and not master.icw1 & ICW1_SNGL:
                master.acknowledge(irq)
                sirq = slave.best_request()
                if sirq is None:
                    # Master IR2 stays in service, as on the real board: Linux EOIs it for IRQ 15.
                    self.spurious += 1
                    vector = slave.vector_base | 7
                else:
                    slave.acknowledge(sirq)
                    vector = slave.vector_base | sirq
                    self.acknowledged += 1
            else:
                master.acknowledge(irq)
                vector = master.vector_base | irq
                self.acknowledged += 1
            self._update()
            return vector

    # --- internals ---
    def _set_irq(self, n: int, level: bool) -> None:
        with self._lock:
            if n == CASCADE_IRQ and self._cascaded():
                # IRQ 2 is the cascade on a PC: a device wired to it drives nothing (the AT moved
                # the XT's IRQ 2 to IRQ 9). Kept for single mode.
                self.ignored_irq2 += 1
                return
            self.chips[n >> 3].set_pin(n & 7, level)
            self._update()

    def _cascaded(self) -> bool:
        return not self.chips[0].icw1 & ICW1_SNGL

    def _update(self) -> None:
        master, slave = self.chips
        if self._cascaded():
            # The slave's INT output is the master's IR2 (as a level, see the module docstring).
            bit = 1 << CASCADE_IRQ
            if slave.best_request() is not None:
                master.pins |= bit
                master.irr |= bit
            else:
                master.pins &= ~bit
                master.irr &= ~bit
        intr = master.best_request(bool(master.icw4 & ICW4_SFNM)) is not None
        if intr != self.intr:
            self.intr = intr
            if self.on_intr_change is not None:
                self.on_intr_change(intr)

    def _read(self, chip: int, port: int) -> int:
        with self._lock:
            value = self.chips[chip].read(port)
            self._update()
            return value

    def _write(self, chip: int, port: int, value: int) -> None:
        with self._lock:
            self.chips[chip].write(port, value)
            self._update()

    def _read_elcr(self, chip: int) -> int:
        with self._lock:
            return self.chips[chip].elcr

    def _write_elcr(self, chip: int, value: int) -> None:
        with self._lock:
            c = self.chips[chip]
            c.elcr = value & c.elcr_mask
            c.resync_levels()
            self._update()

    def state(self) -> dict:
        """Registers of both chips, for tracing and tests."""
        with self._lock:
            return {name: dict(irr=c.irr, isr=c.isr, imr=c.imr, elcr=c.elcr, base=c.vector_base)
                    for name, c in zip(("master", "slave"), self.chips)}


class _PicPorts:
    """Ports 0 (command) and 1 (data) of one chip."""

    def __init__(self, pic: I8259Pair, chip: int):
        self._pic = pic
        self._chip = chip

    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            value |= self._pic._read(self._chip, (offset + i) & 1) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            self._pic._write(self._chip, (offset + i) & 1, (value >> (8 * i)) & 0xFF)


class _ElcrPorts:
    """0x4d0 (IRQ 0-7) and 0x4d1 (IRQ 8-15): bit set = level-triggered (PIIX4 3.3.1)."""

    def __init__(self, pic: I8259Pair):
        self._pic = pic

    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            if offset + i < 2:
                value |= self._pic._read_elcr(offset + i) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            if offset + i < 2:
                self._pic._write_elcr(offset + i, (value >> (8 * i)) & 0xFF)
