"""The virtio-mmio v2 transport: Linux's probe sequence, the status state machine, interrupts,
register fuzzing. A virtio-rng device stands in for any device."""

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pykvm.irq import RecordingIrqLine
from pykvm.memory import GuestMemory
from pykvm.virtio import mmio as R
from pykvm.virtio.device import (STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER,
                                 STATUS_DRIVER_OK, STATUS_FEATURES_OK, VIRTIO_F_INDIRECT_DESC,
                                 VIRTIO_F_VERSION_1, VIRTIO_ID_RNG, VirtioDevice)
from pykvm.virtio.mmio import VirtioMmio
from pykvm.virtio.mock import MmioDriver
from pykvm.virtio.rng import VirtioRng

from virtio_invariants import assert_recovers, assert_transport_sound

RAM = 256 * 1024


def setup(device=None):
    mem = GuestMemory.for_test(RAM)
    irq = RecordingIrqLine()
    dev = device or VirtioRng()
    t = VirtioMmio(dev, mem, irq)
    return mem, irq, dev, t, MmioDriver(t, mem)


def acknowledge(drv):
    """Steps 1-3 of driver initialisation (virtio 1.2, 3.1.1): reset, ACKNOWLEDGE, DRIVER; the
    tests below go on from there their own (wrong) way."""
    drv.w(R.STATUS, 0)
    drv.add_status(STATUS_ACKNOWLEDGE)
    drv.add_status(STATUS_DRIVER)


def test_identification_registers():
    mem, irq, dev, t, drv = setup()
    assert t.read(R.MAGIC_VALUE, 4) == 0x74726976
    assert t.read(R.VERSION, 4) == 2
    assert t.read(R.DEVICE_ID, 4) == VIRTIO_ID_RNG
    assert t.read(R.VENDOR_ID, 4) == R.VENDOR_PYKVM
    assert drv.device_features() & VIRTIO_F_VERSION_1


def test_linux_probe_sequence_and_request():
    mem, irq, dev, t, drv = setup()
    feats = drv.init()
    assert feats & VIRTIO_F_VERSION_1
    assert t.read(R.STATUS, 4) == (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
                                   | STATUS_DRIVER_OK)
    assert dev.active and dev.driver_features == feats
    t.write(R.QUEUE_SEL, 4, 0)
    assert t.read(R.QUEUE_READY, 4) == 1
    t.write(R.QUEUE_SEL, 4, 1)
    assert t.read(R.QUEUE_NUM_MAX, 4) == 0          # only one queue
    q = drv.queues[0]
    head = q.add_chain([], [32])
    assert not irq.level
    drv.kick(0)
    assert q.take_used() == [(head, 32)]
    assert irq.level and t.read(R.INTERRUPT_STATUS, 4) == 1
    assert drv.ack_interrupt() == 1
    assert not irq.level and irq.edges == 1
    assert t.errors == {} and dev.errors == {}


def test_features_not_offered_do_not_stick():
    mem, irq, dev, t, drv = setup()
    acknowledge(drv)
    assert not drv.set_features(VIRTIO_F_VERSION_1 | (1 << 40))
    assert t.errors["features not offered"] == 1
    assert not drv.set_features(VIRTIO_F_INDIRECT_DESC)       # legacy driver: no VERSION_1
    assert drv.set_features(VIRTIO_F_VERSION_1)


def test_driver_ok_without_features_ok_needs_reset():
    mem, irq, dev, t, drv = setup()
    acknowledge(drv)
    drv.add_status(STATUS_DRIVER_OK)
    st_ = t.read(R.STATUS, 4)
    assert st_ & STATUS_DEVICE_NEEDS_RESET and not st_ & STATUS_DRIVER_OK
    assert t.read(R.INTERRUPT_STATUS, 4) & 2 and irq.level     # config-change interrupt
    assert not dev.active
    drv.w(R.STATUS, 0)                                         # reset clears it all
    assert t.read(R.STATUS, 4) == 0 and not irq.level
    drv.init()
    assert dev.active


def test_clearing_a_status_bit_needs_reset():
    mem, irq, dev, t, drv = setup()
    drv.init()
    drv.w(R.STATUS, STATUS_ACKNOWLEDGE)
    assert t.read(R.STATUS, 4) & STATUS_DEVICE_NEEDS_RESET
    assert t.errors["status bit cleared"] == 1


def test_bad_queue_address_needs_reset():
    mem, irq, dev, t, drv = setup()
    acknowledge(drv)
    assert drv.set_features(VIRTIO_F_VERSION_1)
    drv.w(R.QUEUE_SEL, 0)
    drv.w(R.QUEUE_NUM, 64)
    drv.w(R.QUEUE_DESC_LOW, 0)
    drv.w(R.QUEUE_DESC_HIGH, 1)      # 4 GiB: not RAM
    drv.w(R.QUEUE_DRIVER_LOW, 0x2000)
    drv.w(R.QUEUE_DEVICE_LOW, 0x3000)
    drv.w(R.QUEUE_READY, 1)
    assert t.read(R.QUEUE_READY, 4) == 0
    assert t.read(R.STATUS, 4) & STATUS_DEVICE_NEEDS_RESET


def test_queue_registers_locked_while_ready():
    mem, irq, dev, t, drv = setup()
    drv.init()
    q = dev.queues[0]
    addr = q.desc_addr
    drv.w(R.QUEUE_SEL, 0)
    drv.w(R.QUEUE_DESC_LOW, 0x4000)
    drv.w(R.QUEUE_NUM, 2)
    assert q.desc_addr == addr and q.size == 64
    assert t.errors["address of a missing or live queue"] == 1


def test_narrow_register_access_is_a_counted_guest_error():
    mem, irq, dev, t, drv = setup()
    assert t.read(R.MAGIC_VALUE, 1) == 0
    t.write(R.STATUS, 2, 1)
    assert t.read(R.STATUS, 4) == 0
    assert t.errors["register access size"] == 2


def test_notify_before_driver_ok_is_served_at_driver_ok():
    mem, irq, dev, t, drv = setup()
    acknowledge(drv)
    assert drv.set_features(VIRTIO_F_VERSION_1)
    q = drv.setup_queue(0)
    head = q.add_chain([], [8])
    drv.kick(0)
    assert q.take_used() == []
    drv.add_status(STATUS_DRIVER_OK)
    assert q.take_used() == [(head, 8)]


class ConfigDevice(VirtioDevice):
    device_id = 42

    def __init__(self):
        super().__init__([4])
        self.value = 0x11223344

    def config_bytes(self):
        return self.value.to_bytes(4, "little") + b"\x55\x66"


def test_config_space_and_generation():
    dev = ConfigDevice()
    mem, irq, dev, t, drv = setup(dev)
    drv.init()
    assert drv.config(0, 4) == 0x11223344
    assert drv.config(1, 2) == 0x2233
    assert drv.config(4, 1) == 0x55
    assert drv.config(6, 1) == 0 and dev.errors["config read"] == 1
    gen = t.read(R.CONFIG_GENERATION, 4)
    dev.value = 7
    dev.config_changed()
    assert t.read(R.CONFIG_GENERATION, 4) == gen + 1
    assert drv.ack_interrupt() == 2


registers = st.sampled_from([0x000, 0x004, 0x008, 0x00C, 0x010, 0x014, 0x020, 0x024, 0x030,
                             0x034, 0x038, 0x044, 0x050, 0x060, 0x064, 0x070, 0x080, 0x084,
                             0x090, 0x094, 0x0A0, 0x0A4, 0x0AC, 0x0B0, 0x0C0, 0x0FC, 0x100,
                             0x104, 0x3, 0x200, 0xFFC])
values = st.one_of(st.integers(0, 0xFF), st.sampled_from([0, 1, 2, 3, 0xF, 0x8000, 0xFFFFFFFF]),
                   st.integers(0, 0xFFFFFFFF))
ops = st.lists(st.tuples(st.booleans(), registers, st.sampled_from([1, 2, 4, 4, 4]), values),
               max_size=60)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, init_first=st.booleans())
def test_fuzz_register_writes(ops, init_first):
    mem, irq, dev, t, drv = setup()
    if init_first:
        drv.init()
        drv.queues[0].add_chain([], [16])
    for is_write, off, size, value in ops:
        if is_write:
            t.write(off, size, value & ((1 << (8 * size)) - 1))
        else:
            v = t.read(off, size)
            assert 0 <= v < 1 << (8 * size)
        assert_transport_sound(t, dev, mem, irq)
    assert_recovers(drv)


# ---- attach_mmio: a machine-like object, no KVM ----

import os
import time

from pykvm.bus import Bus
from pykvm.virtio.attach import VIRTIO_IRQS, attach_mmio, virtio_mmio_irq
from pykvm.x86 import layout


class FakeVm:
    def __init__(self):
        self.ioeventfds = {}

    def ioeventfd(self, fd, addr, length, pio=False, datamatch=None, deassign=False):
        if deassign:
            del self.ioeventfds[(addr, datamatch)]
        else:
            self.ioeventfds[(addr, datamatch)] = fd


class FakeMachine:
    def __init__(self, vm=None):
        self.mem = GuestMemory.for_test(RAM)
        self.mmio = Bus("mmio")
        self.lines = {}
        self.vm = vm

    def irq_line(self, gsi):
        return self.lines.setdefault(gsi, RecordingIrqLine())

    edge_irq_line = irq_line


class BusPort:
    """The transport as the guest reaches it: through the machine's MMIO bus at an address."""

    def __init__(self, bus, base):
        self.bus, self.base = bus, base

    def read(self, off, size):
        return self.bus.read(self.base + off, size)

    def write(self, off, size, value):
        self.bus.write(self.base + off, size, value)


def test_attach_mmio_registers_and_announces():
    m = FakeMachine()
    args = [attach_mmio(m, VirtioRng(), i).kernel_arg for i in range(3)]
    assert args[0] == "virtio_mmio.device=4K@0xd0000000:5"
    assert args[2] == "virtio_mmio.device=4K@0xd0002000:7"
    assert virtio_mmio_irq(3) == 10 and layout.IRQ_RTC not in VIRTIO_IRQS
    assert layout.IRQ_SCI not in VIRTIO_IRQS       # the ACPI SCI's line
    with pytest.raises(ValueError):
        virtio_mmio_irq(len(VIRTIO_IRQS))
    base = layout.VIRTIO_MMIO_BASE + layout.VIRTIO_MMIO_SIZE
    drv = MmioDriver(BusPort(m.mmio, base), m.mem)
    drv.init()
    h = drv.queues[0].add_chain([], [16])
    drv.kick(0)
    assert drv.queues[0].take_used() == [(h, 16)]
    assert m.lines[6].level and not m.lines[5].level


def test_ioeventfd_notifier():
    vm = FakeVm()
    m = FakeMachine(vm)
    dev = VirtioRng()
    attached = attach_mmio(m, dev, 0, ioeventfd=True)
    t = m.mmio.find(layout.VIRTIO_MMIO_BASE).device
    assert t is attached.transport and attached.irq == 5
    assert set(vm.ioeventfds) == {(layout.VIRTIO_MMIO_BASE + R.QUEUE_NOTIFY, 0)}
    drv = MmioDriver(t, m.mem)
    drv.init()
    q = drv.queues[0]
    with dev.lock:
        h = q.add_chain([], [8])
    # What KVM does for a matching guest write: signal the eventfd, no exit.
    os.eventfd_write(vm.ioeventfds[(layout.VIRTIO_MMIO_BASE + R.QUEUE_NOTIFY, 0)], 1)
    deadline = time.time() + 5
    used = []
    while not used and time.time() < deadline:
        with dev.lock:
            used = q.take_used()
        time.sleep(0.01)
    assert used == [(h, 8)] and attached.notifier.kicks == 1
    attached.close()
    assert vm.ioeventfds == {} and attached.notifier is None


def test_attach_on_a_real_machine_with_ioeventfd(kvm):
    from pykvm.machine import Machine
    with Machine(32 * layout.MiB, kvm=kvm) as m:
        dev = VirtioRng()
        attached = attach_mmio(m, dev, 0, ioeventfd=True)
        assert attached.kernel_arg == "virtio_mmio.device=4K@0xd0000000:5"
        assert m.mmio.read(layout.VIRTIO_MMIO_BASE, 4) == R.MMIO_MAGIC
        assert len(attached.notifier.fds) == 1      # KVM_IOEVENTFD accepted the registration
        attached.close()


def test_corrupt_avail_index_sets_needs_reset():
    mem, irq, dev, t, drv = setup()
    drv.init()
    drv.queues[0].set_avail_idx(1000)          # more new buffers than the ring holds
    drv.kick(0)
    assert t.read(R.STATUS, 4) & STATUS_DEVICE_NEEDS_RESET
    assert drv.ack_interrupt() & 2 and dev.queue_errors == 1
    drv.kick(0)                                # ignored until the driver resets the device
    drv.queues.clear()
    drv.init()
    h = drv.queues[0].add_chain([], [4])
    drv.kick(0)
    assert drv.queues[0].take_used() == [(h, 4)]
