"""A 16550A UART, the PC's serial port (COM1 at 0x3f8, IRQ 4), modelled after the TI/NS PC16550D.

Eight byte-wide registers sit at offsets 0-7; what offsets 0 and 1 mean depends on LCR bit 7, the
*divisor latch access bit* (DLAB) (PC16550D datasheet, Table II "Summary of Registers"):

    offset  DLAB=0 read   DLAB=0 write   DLAB=1
    0       RBR receive   THR transmit   DLL divisor latch, low byte
    1       IER interrupt enable         DLM divisor latch, high byte
    2       IIR interrupt id  FCR FIFO control   (same with DLAB=1)
    3       LCR line control
    4       MCR modem control
    5       LSR line status
    6       MSR modem status
    7       SCR scratch

How Linux's 8250 driver decides this is a 16550A (drivers/tty/serial/8250/8250_port.c, autoconfig()):
IER must keep exactly the four bits written to it (0x00 and 0x0f read back); in loopback mode with
MCR = LOOP|OUT2|RTS the top of MSR must read DCD|CTS (0x90); after FCR = 0x01 the top two IIR bits must
be 11 ("FIFOs enabled"). With the 16550A variant probes enabled (autoconfig_16550a) it also reads the
IIR under LCR = 0x80, 0xbf and 0xe0 and needs it non-zero, with bit 4 clear (no NatSemi EXCR1) and
bit 5 clear (no 64-byte TI16750 FIFO); it checks IER bit 6 stays 0 (no XScale UUE); and it counts the
receive FIFO through loopback (size_fifo): 16. serial8250_do_startup then checks that enabling the THRE
interrupt in IER raises it, that reading IIR clears it, and that disabling and re-enabling IER raises
it again; a UART that fails gets UART_BUG_THRE and a polling timer.

Shortcuts, admitted:
- The transmitter is infinitely fast: a THR write goes straight to `out`, so THRE and TEMT are always
  set and the transmit FIFO is always empty. Baud rate, word length, parity and stop bits are stored
  (LCR, DLL/DLM) and otherwise ignored.
- The receiver has no notion of character time. A real 16550 in FIFO mode raises "character timeout"
  (IIR 0x0c) only after four character times without FIFO activity while data sits below the trigger
  level; we treat that timeout as already elapsed, so data below the trigger level is reported as a
  timeout at once and data at or above it as "received data available" (IIR 0x04). Guests never stall
  waiting for a timer we do not have.
- Input is flow-controlled on the host side. `feed` may be handed a whole paste at once; bytes that do
  not fit the 16-byte FIFO wait in a host-side backlog (`backlog`, up to `rx_backlog` bytes, as if the
  wire held them back, which is what QEMU's chardev does with serial_can_receive) and move into the
  FIFO as the guest reads RBR. Only when the backlog is full too is a byte lost as an overrun (LSR.OE).
  With `rx_backlog=0` the receiver behaves exactly like the chip: the 17th unread byte overruns.
- Parity, framing and break errors never happen (no wire), so LSR bits 2-4 and 7 stay 0; only overrun
  (OE) can be set.
- On a PC board the UART's INTR pin reaches the PIC only while MCR.OUT2 is set. We do not gate the line
  on OUT2 (neither do QEMU, kvmtool or vm-superio); Linux always sets OUT2 when it uses the interrupt.

Interrupts follow kvmtool's serial8250_update_irq: after every access the line level is recomputed from
register state ("is any enabled condition pending?"), and IrqLine forwards only changes.

The hot path (THR write, LSR read while interrupts are off) can be answered by pykvm's C run loop
(csrc/fastpath.h, pykvm/kvm/fastpath.py). The four registers it needs - `ier`, `lcr`, `mcr`, `lsr` - are
shared registers: with the fast path on they live in the C loop's struct, so the model below is still
the only owner of the UART's state.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from pykvm.devices.shared import SharesRegisters
from pykvm.devices.state import Stateful
from pykvm.irq import IrqLine
from pykvm.devices.isa import ByteRegisters

# Register offsets (DLAB=0 meaning first).
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7
NUM_REGS = 8

# IER: which conditions may interrupt (datasheet 8.6). Bits 4-7 are always 0 on a 16550.
IER_ERBFI = 0x01   # received data available (and character timeout)
IER_ETBEI = 0x02   # transmitter holding register empty
IER_ELSI = 0x04    # receiver line status
IER_EDSSI = 0x08   # modem status
IER_MASK = 0x0F

# IIR: bit 0 = 0 means "an interrupt is pending"; bits 1-3 say which, in priority order (Table IV).
IIR_NO_INT = 0x01
IIR_MSI = 0x00      # modem status: lowest priority; cleared by reading MSR
IIR_THRI = 0x02     # THR empty: cleared by reading IIR (when it is the source) or writing THR
IIR_RDI = 0x04      # received data at or above the trigger level: cleared when it drops below
IIR_CTI = 0x0C      # character timeout (FIFO mode only): cleared by reading RBR
IIR_RLSI = 0x06     # receiver line status: highest priority; cleared by reading LSR
IIR_FIFO_ENABLED = 0xC0   # both top bits set when FCR0 = 1: "this is a 16550A, its FIFO works"

# FCR (write-only; shares offset 2 with IIR).
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_DMA_MODE = 0x08
FCR_TRIGGER_MASK = 0xC0
RX_TRIGGER_LEVELS = (1, 4, 8, 14)   # FCR bits 7:6 = 00, 01, 10, 11

LCR_DLAB = 0x80

# MCR: bits 0-4; bits 5-7 read 0 on a 16550.
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

# LSR.
LSR_DR = 0x01      # data ready: at least one byte in RBR / rx FIFO
LSR_OE = 0x02      # overrun error: a byte arrived with nowhere to go; cleared by reading LSR
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20    # THR (or tx FIFO) empty
LSR_TEMT = 0x40    # THR and transmit shift register both empty
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

# MSR: bits 4-7 are the modem input lines, bits 0-3 record changes since the last MSR read.
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04    # trailing edge of RI: RI went from on to off
MSR_DDCD = 0x08
MSR_DELTAS = 0x0F
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_LINES = 0xF0

# What the host "wire" presents by default: a terminal that is present and ready (as QEMU and
# kvmtool do), so a guest using hardware flow control (CRTSCTS) is not blocked forever.
DEFAULT_MODEM_LINES = MSR_DCD | MSR_DSR | MSR_CTS

RX_FIFO_SIZE = 16
DEFAULT_RX_BACKLOG = 4096


def _loopback_lines(mcr: int) -> int:
    """Loopback mode wires the modem outputs to the inputs (datasheet 8.7, MCR bit 4):
    DTR -> DSR, RTS -> CTS, OUT1 -> RI, OUT2 -> DCD."""
    lines = 0
    if mcr & MCR_DTR:
        lines |= MSR_DSR
    if mcr & MCR_RTS:
        lines |= MSR_CTS
    if mcr & MCR_OUT1:
        lines |= MSR_RI
    if mcr & MCR_OUT2:
        lines |= MSR_DCD
    return lines


class Serial16550(ByteRegisters, SharesRegisters, Stateful):
    """A 16550A UART. `out(bytes)` receives what the guest transmits; `feed(bytes)` is what it receives.

    Public state (plain attributes, see the module docstring): the registers, `rx` (the receive FIFO,
    a deque of ints), `backlog` (host input waiting for FIFO room), and the counters `bytes_out`,
    `bytes_in` (bytes fed outside loopback), `overruns` (bytes lost because FIFO and backlog were
    full), `rx_dropped` (bytes fed while in loopback mode, when the serial input pin is disconnected),
    `bad_accesses` (accesses outside offsets 0-7).
    """

    # Registers the C fast path reads (pykvm/devices/shared.py).
    SHARED = (("ier", "ier"), ("lcr", "lcr"), ("mcr", "mcr"), ("lsr", "lsr"))
    # What a snapshot keeps (pykvm/devices/state.py).
    STATE = ("ier", "lcr", "mcr", "lsr", "modem_lines", "msr", "scr", "dll", "dlm", "fcr",
             "thr_ipending", "rbr", "rx", "backlog", "bytes_out", "bytes_in", "overruns",
             "rx_dropped", "bad_accesses", "irq")

    def __init__(self, irq: IrqLine, out: Callable[[bytes], None],
                 rx_backlog: int = DEFAULT_RX_BACKLOG):
        self.irq = irq
        self.out = out
        # Power-on values from the datasheet's reset table (Table V); the divisor is undefined after
        # reset, we start at 12 (9600 baud from the PC's 1.8432 MHz crystal).
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.lsr = LSR_THRE | LSR_TEMT
        self.modem_lines = DEFAULT_MODEM_LINES   # the host side of the modem input pins
        self.msr = self.modem_lines
        self.scr = 0
        self.dll = 0x0C
        self.dlm = 0x00
        self.fcr = 0                 # FCR as last programmed (bits 0, 3, 6, 7); write-only on the chip
        self.thr_ipending = False    # the THRE interrupt is latched (see _write_ier, _read_iir)
        self.rbr = 0                 # last byte taken from the receiver: what reading an empty RBR gives
        self.rx: deque[int] = deque()
        self.backlog: deque[int] = deque()
        self.rx_backlog = rx_backlog
        self.bytes_out = 0
        self.bytes_in = 0
        self.overruns = 0
        self.rx_dropped = 0
        self.bad_accesses = 0

    # The device contract, read(offset, size) and write(offset, size, value), comes from
    # ByteRegisters (pykvm/devices/isa.py): wide accesses are split into byte cycles.


    # --- the host side ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes arriving on the serial input: into the FIFO, else the backlog, else an overrun."""
        if self.mcr & MCR_LOOP:
            # In loopback the serial input pin is disconnected from the receiver (datasheet 8.7).
            self.rx_dropped += len(data)
            return
        self.bytes_in += len(data)
        for byte in data:
            if self.backlog or len(self.rx) >= self._rx_capacity():
                if len(self.backlog) < self.rx_backlog:
                    self.backlog.append(byte)
                    continue
            self._receive(byte)
        self._update_irq()

    @property
    def rx_room(self) -> int:
        """How many bytes `feed` can take now without an overrun (0 in loopback mode)."""
        if self.mcr & MCR_LOOP:
            return 0
        return (max(self._rx_capacity() - len(self.rx), 0)
                + max(self.rx_backlog - len(self.backlog), 0))

    def set_modem_lines(self, lines: int) -> None:
        """Drive the modem input pins from the host: an MSR-style mask of CTS, DSR, RI, DCD."""
        self.modem_lines = lines & MSR_LINES
        self._update_msr()
        self._update_irq()

    # --- receiver ----------------------------------------------------------------------------------

    def _fifo_enabled(self) -> bool:
        return bool(self.fcr & FCR_ENABLE)

    def _rx_capacity(self) -> int:
        # Without FIFOs (16450 mode) the receiver is the single RBR byte.
        return RX_FIFO_SIZE if self._fifo_enabled() else 1

    def _receive(self, byte: int) -> None:
        """One character completed in the receive shift register."""
        if len(self.rx) < self._rx_capacity():
            self.rx.append(byte)
        else:
            # Overrun (LSR bit 1). In FIFO mode the new character is lost and the FIFO keeps its
            # contents; in 16450 mode the new character overwrites the one in RBR (unless older
            # host input is still waiting: then the newest byte is the one lost, to keep order).
            self.lsr |= LSR_OE
            self.overruns += 1
            if not self._fifo_enabled() and not self.backlog:
                self.rx[-1] = byte
        self.lsr |= LSR_DR

    def _pull_backlog(self) -> None:
        """Move waiting host input into the FIFO while it has room (not in loopback: SIN is cut)."""
        if self.mcr & MCR_LOOP:
            return
        capacity = self._rx_capacity()
        while self.backlog and len(self.rx) < capacity:
            self.rx.append(self.backlog.popleft())
        if self.rx:
            self.lsr |= LSR_DR

    def _read_rbr(self) -> int:
        if self.rx:
            self.rbr = self.rx.popleft()
            self._pull_backlog()
        if not self.rx:
            self.lsr &= ~LSR_DR
        return self.rbr

    # --- registers -----------------------------------------------------------------------------------

    def _read_byte(self, offset: int) -> int:
        if not 0 <= offset < NUM_REGS:
            self.bad_accesses += 1
            return 0xFF
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                return self.dll
            value = self._read_rbr()
        elif offset == IER_DLM:
            return self.dlm if dlab else self.ier
        elif offset == IIR_FCR:
            value = self._read_iir()
        elif offset == LCR:
            return self.lcr
        elif offset == MCR:
            return self.mcr
        elif offset == LSR:
            value = self.lsr
            self.lsr &= ~LSR_ERRORS           # reading LSR clears the error bits (datasheet 8.4)
        elif offset == MSR:
            value = self.msr
            self.msr &= ~MSR_DELTAS           # reading MSR clears the delta bits
        else:
            return self.scr
        self._update_irq()
        return value

    def _write_byte(self, offset: int, value: int) -> None:
        if not 0 <= offset < NUM_REGS:
            self.bad_accesses += 1
            return
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self.dll = value
                return
            self._write_thr(value)
        elif offset == IER_DLM:
            if dlab:
                self.dlm = value
                return
            self._write_ier(value)
        elif offset == IIR_FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self.lcr = value
            return
        elif offset == MCR:
            self.mcr = value & MCR_MASK
            self._update_msr()
            self._pull_backlog()
        elif offset == SCR:
            self.scr = value
            return
        else:
            # LSR and MSR are read-only here; the datasheet reserves LSR writes for factory testing.
            return
        self._update_irq()

    def _write_thr(self, value: int) -> None:
        if self.mcr & MCR_LOOP:
            # Loopback: the transmitter output is wired to the receiver input, nothing leaves.
            self._receive(value)
        else:
            self.out(bytes((value,)))
            self.bytes_out += 1
        # Writing THR clears a THRE interrupt; our transmitter empties THR at once, which raises it
        # again (what a real 16550 does one character time later).
        self.thr_ipending = True

    def _write_ier(self, value: int) -> None:
        old = self.ier
        self.ier = value & IER_MASK
        # Enabling ETBEI while THR is empty raises the THRE interrupt even if an IIR read had
        # cleared it. The datasheet does not say so, but 16550s behave this way and both Linux
        # (serial8250_do_startup's UART_BUG_THRE test, __start_tx) and Windows rely on it. Like QEMU
        # and Bochs we re-arm on the rising edge of ETBEI.
        if (self.ier & ~old) & IER_ETBEI and self.lsr & LSR_THRE:
            self.thr_ipending = True
        elif not self.ier & IER_ETBEI:
            self.thr_ipending = False

    def _write_fcr(self, value: int) -> None:
        # Changing FCR0 clears both FIFOs (datasheet 8.5: "Resetting FCR0 will clear all bytes in
        # both FIFOs"); the other bits are only programmed while FCR0 is 1.
        if (value ^ self.fcr) & FCR_ENABLE:
            self._clear_rx()
        if value & FCR_ENABLE:
            if value & FCR_CLEAR_RX:
                self._clear_rx()
            # FCR_CLEAR_TX: our transmit FIFO is always empty already. Bit 5 (a TI16750's 64-byte
            # FIFO) does not exist on a 16550A and is ignored, so IIR bit 5 never sets.
            self.fcr = value & (FCR_ENABLE | FCR_DMA_MODE | FCR_TRIGGER_MASK)
        else:
            self.fcr = 0
        # Host input still "on the wire" arrives in the emptied FIFO.
        self._pull_backlog()

    def _clear_rx(self) -> None:
        # Clears the FIFO contents, not the shift register or the LSR error bits.
        self.rx.clear()
        self.lsr &= ~LSR_DR

    def _interrupt_id(self) -> int:
        """The highest-priority pending, enabled interrupt as IIR bits 0-3 (Table IV)."""
        ier = self.ier
        if ier & IER_ELSI and self.lsr & LSR_ERRORS:
            return IIR_RLSI
        if ier & IER_ERBFI and self.rx:
            if not self._fifo_enabled():
                return IIR_RDI
            trigger = RX_TRIGGER_LEVELS[self.fcr >> 6]
            return IIR_RDI if len(self.rx) >= trigger else IIR_CTI
        if ier & IER_ETBEI and self.thr_ipending:
            return IIR_THRI
        if ier & IER_EDSSI and self.msr & MSR_DELTAS:
            return IIR_MSI
        return IIR_NO_INT

    def _read_iir(self) -> int:
        ident = self._interrupt_id()
        if ident == IIR_THRI:
            # Reading IIR clears a THRE interrupt, but only when it is the one reported.
            self.thr_ipending = False
        return ident | (IIR_FIFO_ENABLED if self._fifo_enabled() else 0)

    def _update_msr(self) -> None:
        """Recompute MSR's line bits from the pins (or from MCR in loopback) and latch the deltas."""
        lines = _loopback_lines(self.mcr) if self.mcr & MCR_LOOP else self.modem_lines
        old = self.msr & MSR_LINES
        changed = old ^ lines
        deltas = 0
        if changed & MSR_CTS:
            deltas |= MSR_DCTS
        if changed & MSR_DSR:
            deltas |= MSR_DDSR
        if old & MSR_RI and not lines & MSR_RI:
            deltas |= MSR_TERI
        if changed & MSR_DCD:
            deltas |= MSR_DDCD
        self.msr = lines | (self.msr & MSR_DELTAS) | deltas

    def _update_irq(self) -> None:
        self.irq.set_level(self._interrupt_id() != IIR_NO_INT)
