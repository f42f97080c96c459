"""The legacy PC devices every x86 guest expects, wired onto a Machine.

    port   device                      irq
    0x3f8  16550A UART (COM1)          4
    0x60   i8042 keyboard controller   (1, unused: no keyboard)
    0x70   MC146818 CMOS/RTC           (8, unused: no periodic interrupts)
    0x80   POST code
    0xe9   debug console (Bochs/QEMU)
    0xf4   exit port (firmware test programs)

With the in-kernel irqchip, KVM itself answers the PIC (0x20, 0xa0, 0x4d0), PIT (0x40) and PC speaker
(0x61) ports and never exits to us for them.

Several vCPUs (Machine(cpus=N)): the i8042, RTC, POST, debug console and exit port take turns behind
the machine's device lock (pykvm/bus.py); the UART sits behind its own lock, shared with the
terminal's input. The C fast path runs on vCPU 0 only and reads the UART's registers without a lock:
it acts only in the polled-output state, and a guest changes that state (IER, LCR, MCR) under its
own port lock, never while another CPU is writing characters.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from .bus import LockedDevice, Window
from .console import ConsoleLog
from .devices.debugcon import DebugCon, ExitPort, PostCode
from .devices.i8042 import I8042
from .devices.rtc import CmosRtc
from .devices.serial import Serial16550
from .machine import Machine
from .stop import Stop, StopReason
from .x86 import layout


@dataclass
class PcDevices:
    serial: Serial16550
    serial_lock: threading.Lock
    i8042: I8042
    rtc: CmosRtc
    post: PostCode
    debugcon: DebugCon
    exit_port: ExitPort

    def feed_serial(self, data: bytes) -> None:
        """Input from the host (terminal, test) to the guest's COM1, from any thread."""
        with self.serial_lock:
            self.serial.feed(data)


def add_pc_devices(machine: Machine, console: ConsoleLog,
                   debug_out: Callable[[bytes], None] | None = None) -> PcDevices:
    """Create the legacy devices, register them on the machine's port bus, and return them."""
    lock = threading.Lock()
    serial = Serial16550(machine.irq_line(layout.IRQ_COM1), console.write)
    machine.add_pio(layout.PORT_COM1, 8, LockedDevice(serial, lock), "COM1 16550A")

    def reset() -> None:
        machine.request_stop(Stop(StopReason.RESET, message="the guest reset the machine (i8042 0xfe)"))

    i8042 = I8042(reset=reset)
    # Data at 0x60, status/command at 0x64; the ports between belong to others (0x61: PC speaker
    # and PIT channel 2 gate), so the two registers are claimed one by one.
    machine.add_pio(layout.PORT_I8042, 1, i8042, "i8042 data")
    machine.add_pio(layout.PORT_I8042 + 4, 1, Window(i8042, 4), "i8042 status")
    rtc = CmosRtc(machine.mem.size)
    machine.add_pio(layout.PORT_RTC, 2, rtc, "CMOS RTC")
    post = PostCode()
    machine.add_pio(layout.PORT_POST, 1, post, "POST")
    debugcon = DebugCon(debug_out or console.write)
    machine.add_pio(layout.PORT_DEBUG, 1, debugcon, "debugcon")
    exit_port = machine.add_exit_port(layout.PORT_EXIT, 1)
    if machine.fast is not None:
        # The C loop answers these ports itself while the models' state allows (pykvm.kvm.fastpath).
        # The UART's lock is not needed there: C only reads the registers, and a byte fed by the
        # terminal meanwhile changes LSR.DR atomically.
        machine.fast.bind_uart(layout.PORT_COM1, serial)
        machine.fast.bind_post(layout.PORT_POST, post)
        machine.fast.bind_debugcon(layout.PORT_DEBUG, debugcon)
    return PcDevices(serial, lock, i8042, rtc, post, debugcon, exit_port)
