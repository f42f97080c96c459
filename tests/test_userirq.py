"""UserIrqChip: the injection decisions the run loop gets, without KVM."""

import threading
import time

from pykvm.bus import Bus
from pykvm.devices.i8254 import PIT_HZ
from pykvm.devices.userirq import UserIrqChip


def linux_init(pic, bus, master_mask=0xFB, slave_mask=0xFF):
    """init_8259A (arch/x86/kernel/i8259.c), as in test_i8259."""
    for port, value in ((0x21, 0xFF), (0xA1, 0xFF), (0x20, 0x11), (0x21, 0x30), (0x21, 0x04),
                        (0x21, 0x01), (0xA0, 0x11), (0xA1, 0x38), (0xA1, 0x02), (0xA1, 0x01),
                        (0x21, master_mask), (0xA1, slave_mask)):
        bus.write(port, 1, value)


class FakeClock:
    def __init__(self):
        self.t = 500.0

    def __call__(self):
        return self.t


def make(clock=None, kick=None):
    chip = UserIrqChip(kick=kick, clock=clock or FakeClock())
    bus = Bus("pio")
    chip.register_on(bus)
    linux_init(chip.pic, bus, master_mask=0xFA)   # IRQ 0 and the cascade unmasked
    return chip, bus


def linux_periodic(bus, hz=1000):
    latch = (PIT_HZ + hz // 2) // hz
    bus.write(0x43, 1, 0x34)
    bus.write(0x40, 1, latch & 0xFF)
    bus.write(0x40, 1, latch >> 8)
    return latch


def test_timer_interrupt_is_injected_as_vector_0x30_each_period():
    clock = FakeClock()
    chip, bus = make(clock)
    latch = linux_periodic(bus)
    plan = chip.before_run(clock.t, can_inject=True)
    assert plan.vector is None and not plan.want_window
    assert abs(plan.deadline - (clock.t + latch / PIT_HZ)) < 1e-9
    clock.t = plan.deadline + 1e-7
    plan = chip.before_run(clock.t, can_inject=True)
    assert plan.vector == 0x30
    # Not EOI'd yet: the next period's edge waits in IRR behind the in-service IRQ 0.
    clock.t = plan.deadline + 1e-7
    assert chip.before_run(clock.t, True).vector is None
    bus.write(0x20, 1, 0x60)                        # specific EOI, as Linux does
    assert chip.before_run(clock.t, True).vector == 0x30


def test_no_injection_without_window_and_no_ack():
    clock = FakeClock()
    chip, bus = make(clock)
    chip.irq_line(4).pulse()
    bus.write(0x21, 1, 0xE8)                        # unmask IRQ 4
    plan = chip.before_run(clock.t, can_inject=False)
    assert plan.vector is None and plan.want_window
    bus.write(0x20, 1, 0x0B)
    assert bus.read(0x20, 1) == 0                   # nothing acknowledged
    plan = chip.before_run(clock.t, can_inject=True)
    assert plan.vector == 0x34 and not plan.want_window


def test_second_request_keeps_the_window_requested():
    clock = FakeClock()
    chip, bus = make(clock)
    bus.write(0x21, 1, 0x00)
    bus.write(0x20, 1, 0x11)                        # reinit the master with AEOI
    for v in (0x30, 0x04, 0x03):
        bus.write(0x21, 1, v)
    chip.irq_line(3).pulse()
    chip.irq_line(4).pulse()
    plan = chip.before_run(clock.t, True)
    assert plan.vector == 0x33 and plan.want_window
    assert chip.before_run(clock.t, True).vector == 0x34


def test_hlt_wait_returns_at_the_timer_on_a_real_clock():
    chip, bus = make(clock=time.monotonic)
    bus.write(0x43, 1, 0x30)                        # mode 0, ~20 ms
    n = PIT_HZ // 50
    bus.write(0x40, 1, n & 0xFF)
    bus.write(0x40, 1, n >> 8)
    t0 = time.monotonic()
    assert chip.wait_for_interrupt(timeout=5) is True
    assert 0.015 < time.monotonic() - t0 < 2
    assert chip.before_run(time.monotonic(), True).vector == 0x30


def test_hlt_wait_wakes_on_another_threads_irq_and_kicks():
    kicks = []
    chip, bus = make(clock=time.monotonic, kick=lambda: kicks.append(1))
    bus.write(0x21, 1, 0xEF)                        # only IRQ 4
    chip.before_run(time.monotonic(), True)         # learn the vCPU thread
    threading.Timer(0.05, chip.irq_line(4).pulse).start()
    t0 = time.monotonic()
    assert chip.wait_for_interrupt(timeout=5) is True
    assert time.monotonic() - t0 < 2
    assert kicks, "an IRQ raised on another thread must kick the vCPU"
    chip.close()


def test_hlt_wait_timeout_and_wake():
    chip, bus = make(clock=time.monotonic)
    assert chip.wait_for_interrupt(timeout=0.02) is False
    threading.Timer(0.05, chip.wake).start()
    t0 = time.monotonic()
    assert chip.wait_for_interrupt() is False
    assert time.monotonic() - t0 < 2


def test_deadline_timer_kicks_the_vcpu():
    kicked = threading.Event()
    chip, bus = make(clock=time.monotonic, kick=kicked.set)
    linux_periodic(bus, hz=100)
    chip.before_run(time.monotonic(), True)
    assert kicked.wait(2)
    chip.close()
