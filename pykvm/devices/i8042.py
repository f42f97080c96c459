"""The PC keyboard controller (Intel 8042, "i8042"), at ports 0x60 (data) and 0x64 (status/command).

On a real PC the 8042 is a small microcontroller between the CPU and the PS/2 keyboard and mouse
("AUX"). The CPU talks to it through two ports (Intel 8042 / IBM PC AT Technical Reference, "Keyboard
Controller"):

- 0x64 read: the *status register*. Bit 0 OBF: the output buffer holds a byte for the CPU. Bit 1 IBF:
  the controller has not yet taken the CPU's last byte. Bit 2 SYS: the system flag (from the command
  byte, set after a successful self-test). Bit 3 A2: the last CPU write went to 0x64 (a command) rather
  than 0x60. Bit 4: keyboard not inhibited. Bit 5: the output byte came from the AUX device. Bit 6
  time-out, bit 7 parity error.
- 0x64 write: a controller *command*. Some take a parameter byte, written next to 0x60; some answer a
  byte in the output buffer, read from 0x60.
- 0x60 read: the output buffer. 0x60 write: a command parameter, or else a byte for the keyboard.

The controller's RAM byte 0 is the *command byte* (Linux: CTR): bit 0 keyboard interrupt (IRQ 1)
enable, bit 1 AUX interrupt (IRQ 12) enable, bit 2 system flag, bit 4 keyboard interface disabled,
bit 5 AUX interface disabled, bit 6 scancode translation.

What pykvm needs from it is modest: Linux's i8042 driver (drivers/input/serio/i8042.c) must finish its
probe quickly, and the guest must be able to reboot the PC the traditional way, by pulsing the CPU reset
line through the controller's output port (command 0xfe; Linux's reboot=k, the default fallback).

Linux's probe, and what we answer: i8042_flush() reads 0x60 while OBF is set and gives up on the
controller after 16 bytes, so the status register must not float at 0xff (an absent controller makes the
probe spin tens of thousands of times); self-test 0xaa answers 0x55; the command byte is read (0x20)
twice until two reads agree, and written back (0x60); the AUX loopback command 0xd3 echoes its
parameter as AUX data (status bit 5 set, or Linux calls it an "auxerr"); 0xa7/0xa8 must set/clear the
AUX-disable bit of the command byte; 0xa9/0xab (interface tests) answer 0 (no error).

Shortcuts, admitted:
- No keyboard and no mouse are attached. A byte the guest sends to either device is answered at once
  with 0xfe (PS/2 "resend"), which Linux's libps2 treats as a NAK: atkbd/psmouse give up after their
  retries instead of waiting for a timeout. A real controller would report a transmit time-out instead.
- The controller is infinitely fast: IBF is never set, so `i8042_wait_write` never spins.
- A real 8042 has a one-byte output buffer. Responses queue here (up to 16 bytes, Linux's
  I8042_BUFFER_SIZE) and are presented one at a time through OBF.
- The A20 gate (output port bit 1) is stored and reported, but guest memory is not wrapped at 1 MiB when
  it is off; no guest pykvm runs depends on A20 masking.
- The AUX loopback (0xd3) raises IRQ 12 only if the VMM passes `aux_irq`. Without it Linux's "AUX IRQ
  test" waits 250 ms (sleeping, not spinning) and then decides there is no AUX port; `i8042.noaux` on
  the kernel command line skips that.

Offsets 1-3 (ports 0x61-0x63) are not the 8042's. The device is registered with length 5 so that one
object serves both 0x60 and 0x64; accesses in between read 0xff and are counted in `stray_accesses`.
(Port 0x61, the PC's "port B" with the PIT channel 2 gate and speaker, belongs to another device;
a VMM that wants one registers the 8042 as two 1-byte ranges through a small adapter instead.)
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from pykvm.irq import IrqLine
from pykvm.devices.isa import ByteRegisters
from pykvm.devices.state import Stateful

DATA = 0      # port 0x60
COMMAND = 4   # port 0x64 (status on read)

# Status register.
STR_OBF = 0x01
STR_IBF = 0x02
STR_SYS = 0x04
STR_CMD = 0x08       # A2: the last write was a command
STR_UNLOCKED = 0x10  # keyboard not inhibited by the keylock
STR_AUXDATA = 0x20
STR_TIMEOUT = 0x40
STR_PARITY = 0x80

# Command byte (controller RAM byte 0).
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYS = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40

# Output port (read with 0xd0, written with 0xd1).
OUT_RESET = 0x01     # the CPU reset line, active low: writing 0 here resets the machine
OUT_A20 = 0x02

# Controller commands.
CMD_READ_RAM = 0x20        # 0x20-0x3f: read RAM byte n (0x20 = the command byte)
CMD_WRITE_RAM = 0x60       # 0x60-0x7f: write RAM byte n, parameter follows on 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPUT = 0xD0
CMD_WRITE_OUTPUT = 0xD1
CMD_WRITE_KBD_OBUF = 0xD2  # the parameter comes back as if the keyboard had sent it
CMD_WRITE_AUX_OBUF = 0xD3  # the parameter comes back as if the mouse had sent it (Linux: AUX_LOOP)
CMD_WRITE_AUX = 0xD4       # the parameter goes to the mouse
CMD_PULSE = 0xF0           # 0xf0-0xff: pulse output port bits 0-3 low where the command's bit is 0

SELF_TEST_OK = 0x55
INTERFACE_OK = 0x00
PS2_RESEND = 0xFE

_TAKES_PARAMETER = {CMD_WRITE_OUTPUT, CMD_WRITE_KBD_OBUF, CMD_WRITE_AUX_OBUF, CMD_WRITE_AUX}
OUTPUT_QUEUE_MAX = 16


class I8042(ByteRegisters, Stateful):
    """An 8042 keyboard controller with nothing plugged in.

    `reset()` is called when the guest pulses the CPU reset line (command 0xfe, any 0xf0-0xfe pulse with
    bit 0 clear, or an output-port write with bit 0 clear). Public attributes: `ctr` (the command byte),
    `ram` (the 32 bytes of controller RAM, `ram[0]` is `ctr`), `output_port`, `resets`,
    `unknown_commands`, `stray_accesses`, `dropped` (responses lost to a full output queue).
    """

    STATE = ("ram", "output_port", "_obuf", "_last_read", "_pending", "_last_was_command",
             "resets", "unknown_commands", "stray_accesses", "dropped")

    def __init__(self, reset: Callable[[], None], kbd_irq: IrqLine | None = None,
                 aux_irq: IrqLine | None = None):
        self.reset = reset
        self.kbd_irq = kbd_irq
        self.aux_irq = aux_irq
        # What a BIOS leaves behind: both interrupts on, system flag set (POST passed), translation on.
        self.ram = bytearray(32)
        self.ram[0] = CTR_KBDINT | CTR_AUXINT | CTR_SYS | CTR_XLATE
        self.output_port = OUT_RESET | OUT_A20
        self._obuf: deque[tuple[int, bool]] = deque()   # (byte, came from AUX)
        self._last_read = 0
        self._pending: int | None = None   # a command waiting for its parameter byte on port 0x60
        self._last_was_command = False
        self.resets = 0
        self.unknown_commands = 0
        self.stray_accesses = 0
        self.dropped = 0

    @property
    def ctr(self) -> int:
        return self.ram[0]

    @ctr.setter
    def ctr(self, value: int) -> None:
        self.ram[0] = value & 0xFF

    # The device contract, read(offset, size) and write(offset, size, value), comes from
    # ByteRegisters (pykvm/devices/isa.py): wide accesses are split into byte cycles.


    # --- registers -------------------------------------------------------------------------------

    def status(self) -> int:
        value = STR_UNLOCKED
        if self.ctr & CTR_SYS:
            value |= STR_SYS
        if self._last_was_command:
            value |= STR_CMD
        if self._obuf:
            value |= STR_OBF
            if self._obuf[0][1]:
                value |= STR_AUXDATA
        return value

    def _read_byte(self, offset: int) -> int:
        if offset == COMMAND:
            return self.status()
        if offset == DATA:
            if self._obuf:
                self._last_read = self._obuf.popleft()[0]
                self._update_irq()
            # An empty output buffer still reads its last byte, as on the chip.
            return self._last_read
        self.stray_accesses += 1
        return 0xFF

    def _write_byte(self, offset: int, value: int) -> None:
        if offset == COMMAND:
            self._last_was_command = True
            self._pending = None
            self._command(value)
        elif offset == DATA:
            self._last_was_command = False
            pending, self._pending = self._pending, None
            if pending is None:
                self._to_device(aux=False)
            else:
                self._parameter(pending, value)
        else:
            self.stray_accesses += 1
            return
        self._update_irq()

    def _command(self, cmd: int) -> None:
        if CMD_READ_RAM <= cmd < CMD_READ_RAM + 32:
            self._queue(self.ram[cmd & 0x1F])
        elif CMD_WRITE_RAM <= cmd < CMD_WRITE_RAM + 32 or cmd in _TAKES_PARAMETER:
            self._pending = cmd
        elif cmd == CMD_AUX_DISABLE:
            self.ctr |= CTR_AUXDIS
        elif cmd == CMD_AUX_ENABLE:
            self.ctr &= ~CTR_AUXDIS
        elif cmd in (CMD_AUX_TEST, CMD_KBD_TEST):
            self._queue(INTERFACE_OK)
        elif cmd == CMD_SELF_TEST:
            self.ctr |= CTR_SYS
            self._queue(SELF_TEST_OK)
        elif cmd == CMD_KBD_DISABLE:
            self.ctr |= CTR_KBDDIS
        elif cmd == CMD_KBD_ENABLE:
            self.ctr &= ~CTR_KBDDIS
        elif cmd == CMD_READ_OUTPUT:
            self._queue(self.output_port)
        elif cmd >= CMD_PULSE:
            # Bits 0-3 of the command select output-port lines to pulse low for ~6 us; 0 = pulse.
            # Only bit 0, the CPU reset line, does anything on a PC. 0xfe is the classic reboot.
            if not cmd & OUT_RESET:
                self._reset()
        else:
            self.unknown_commands += 1

    def _parameter(self, cmd: int, value: int) -> None:
        if CMD_WRITE_RAM <= cmd < CMD_WRITE_RAM + 32:
            self.ram[cmd & 0x1F] = value
        elif cmd == CMD_WRITE_OUTPUT:
            self.output_port = value
            if not value & OUT_RESET:
                self._reset()
                self.output_port |= OUT_RESET   # the machine came back up
        elif cmd == CMD_WRITE_KBD_OBUF:
            self._queue(value)
        elif cmd == CMD_WRITE_AUX_OBUF:
            self._queue(value, aux=True)
        elif cmd == CMD_WRITE_AUX:
            self._to_device(aux=True)

    def _to_device(self, aux: bool) -> None:
        # Nothing is plugged in: answer "resend" so the guest's PS/2 layer gives up fast.
        self._queue(PS2_RESEND, aux=aux)

    def _reset(self) -> None:
        self.resets += 1
        self.reset()

    def _queue(self, byte: int, aux: bool = False) -> None:
        if len(self._obuf) >= OUTPUT_QUEUE_MAX:
            self.dropped += 1
            return
        self._obuf.append((byte & 0xFF, aux))

    def after_restore(self) -> None:
        self._update_irq()       # the lines are optional objects, so their level is recomputed

    def _update_irq(self) -> None:
        # The 8042 raises IRQ 1 (or 12) while its output buffer is full and the command byte enables it.
        head_aux = self._obuf[0][1] if self._obuf else None
        if self.kbd_irq is not None:
            self.kbd_irq.set_level(head_aux is False and bool(self.ctr & CTR_KBDINT))
        if self.aux_irq is not None:
            self.aux_irq.set_level(head_aux is True and bool(self.ctr & CTR_AUXINT))
