"""UserIrqChip on a real /dev/kvm with no in-kernel irqchip: a real-mode guest programs the PICs as
Linux does and the PIT in mode 2, then halts in a loop; the timer interrupt must arrive at vector
0x30 (KVM_INTERRUPT) and the handler's EOI must let the next one in. The loop below is the one the
Machine's irqchip="user" mode is to run (see pykvm/devices/userirq.py)."""

import threading
import time

from pykvm.devices.userirq import UserIrqChip
from pykvm.kvm import exits as E
from pykvm.machine import Machine, handle_exit
from pykvm.x86.cpu import setup_real_mode

from conftest import Recorder, needs_kvm


def out(port, value):
    return bytes([0xB0, value, 0xE6, port])            # mov al, value; out port, al


MAIN = (b"\xFA"                                         # cli
        + out(0x20, 0x11) + out(0x21, 0x30) + out(0x21, 0x04) + out(0x21, 0x01)
        + out(0xA0, 0x11) + out(0xA1, 0x38) + out(0xA1, 0x02) + out(0xA1, 0x01)
        + out(0x21, 0xFE) + out(0xA1, 0xFF)             # only IRQ 0
        + out(0x43, 0x34) + out(0x40, 0x9C) + out(0x40, 0x2E)   # mode 2, 11932: ~10 ms
        + b"\xFB"                                       # sti
        + b"\xF4\xEB\xFD")                              # l: hlt; jmp l
HANDLER = (b"\x50" + out(0xE9, ord("T")) + out(0x20, 0x20) + b"\x58\xCF")   # push ax ... iret


@needs_kvm
def test_pit_interrupts_reach_a_real_mode_guest_through_kvm_interrupt():
    with Machine(1 << 20, irqchip="none") as m:
        vcpu = m.vcpu
        vcpu.thread_id = threading.get_ident()
        chip = UserIrqChip(kick=vcpu.kick)
        chip.register_on(m.pio)
        rec = Recorder()
        m.add_pio(0xE9, 1, rec)
        m.mem.write(0x1000, MAIN)
        m.mem.write(0x1100, HANDLER)
        m.mem.write(0x30 * 4, (0x0100).to_bytes(2, "little") + (0x0100).to_bytes(2, "little"))
        setup_real_mode(vcpu, 0x100, 0)
        run = vcpu.kvm_run
        t0 = time.monotonic()
        halts = 0
        try:
            while rec.data.count(b"T") < 5 and time.monotonic() - t0 < 30:
                plan = chip.before_run(time.monotonic(),
                                       bool(run.ready_for_interrupt_injection and run.if_flag))
                if plan.vector is not None:
                    vcpu.interrupt(plan.vector)
                run.request_interrupt_window = int(plan.want_window)
                exit = vcpu.run()
                if isinstance(exit, E.Hlt):
                    halts += 1
                    assert run.if_flag, "the guest halted with interrupts off"
                    chip.wait_for_interrupt(1.0)
                elif not isinstance(exit, (E.IrqWindowOpen, E.Interrupted)):
                    assert handle_exit(m, exit) is None, exit
        finally:
            chip.close()
        elapsed = time.monotonic() - t0
        assert rec.data == b"TTTTT"
        assert halts >= 5
        assert chip.pic.spurious == 0
        # Five 10 ms periods: not much faster (no interrupt storm), not hugely slower.
        assert 0.04 < elapsed < 20


@needs_kvm
def test_machine_counts_the_guests_hlt_wait_apart_from_vmm_work():
    """With irqchip="user" the VMM waits out the guest's `hlt` itself (pykvm.dispatch._hlt); that
    time is the guest's idle time, which the in-kernel irqchip spends inside KVM_RUN, and it is
    counted as Stats.seconds_halted (bench/boot.py adds it to the guest's time)."""
    from pykvm.stop import Stop

    class Ticks:
        def __init__(self, machine):
            self.machine, self.n = machine, 0

        def read(self, offset, size):
            return 0

        def write(self, offset, size, value):
            self.n += 1
            if self.n == 5:
                self.machine.request_stop(Stop("exit", 0))

    with Machine(1 << 20, irqchip="user") as m:
        ticks = Ticks(m)
        m.add_pio(0xE9, 1, ticks)
        m.mem.write(0x1000, MAIN)
        m.mem.write(0x1100, HANDLER)
        m.mem.write(0x30 * 4, (0x0100).to_bytes(2, "little") + (0x0100).to_bytes(2, "little"))
        setup_real_mode(m.vcpu, 0x100, 0)
        stop = m.run(timeout=30)
        assert stop.reason == "exit" and ticks.n == 5
        # the guest spent its time between ticks in hlt: all of that was waited in the VMM
        assert 0 < m.stats.seconds_halted <= m.seconds_running
