"""The modern virtio-pci transport: identity and capabilities, Linux's virtio_pci_modern probe
through configuration mechanism #1 and the BAR the PciBus assigned, a virtio-blk round trip, the ISR and
INTx, guest mistakes, BAR moves, the PCI_CFG window, attach_pci, and BAR-register fuzzing."""

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pykvm.bus import Bus
from pykvm.devices.pci import PciBus
from pykvm.devices.pci.device import COMMAND, COMMAND_INTX_DISABLE, INTERRUPT_LINE
from pykvm.host.disk import DiskImage
from pykvm.irq import RecordingIrqLine
from pykvm.memory import GuestMemory
from pykvm.virtio import blk as B
from pykvm.virtio import pci as P
from pykvm.virtio.attach import PCI_IRQS, attach_pci
from pykvm.virtio.device import (STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER,
                                 STATUS_DRIVER_OK, STATUS_FEATURES_OK, VIRTIO_F_VERSION_1,
                                 VIRTIO_ID_BLOCK)
from pykvm.virtio.mock import PciBarRouter, PciConfigPorts, PciDriver
from pykvm.virtio.rng import VirtioRng
from pykvm.x86 import layout

from virtio_invariants import assert_recovers, assert_transport_sound

RAM = 1 << 20


class FakePic:
    def __init__(self):
        self.level_triggered = set()

    def set_level_triggered(self, irq, level=True):
        self.level_triggered.add(irq)


class FakeUserIrq:
    def __init__(self):
        self.pic = FakePic()


class FakeMachine:
    """What attach_pci needs of a Machine: RAM, buses, irq lines, a PIC whose ELCR it sets."""

    def __init__(self):
        self.mem = GuestMemory.for_test(RAM)
        self.mmio = Bus("mmio")
        self.pio = Bus("pio")
        self.lines = {}
        self.irqchip = "user"
        self.userirq = FakeUserIrq()
        self.pci = PciBus(mmio=self.mmio, pio=self.pio)
        self.pci.register_on(self.pio)

    def irq_line(self, gsi):
        return self.lines.setdefault(gsi, RecordingIrqLine())


def on_bus(device=None):
    """A device attached to a PCI bus on a fake machine, and a driver reaching it as a guest
    does."""
    m = FakeMachine()
    dev = device or VirtioRng()
    t = attach_pci(m, m.pci, dev).transport
    drv = PciDriver(PciConfigPorts(m.pio, t.slot), m.mmio, m.mem)
    return m, dev, t, drv


def direct(device=None):
    """The transport alone: config space and BAR reached directly, BAR placed by hand."""
    mem = GuestMemory.for_test(RAM)
    dev = device or VirtioRng()
    t = P.VirtioPci(dev, mem)
    t.irq = RecordingIrqLine()
    t.program_bar(P.BAR_INDEX, 0xE000_0000)
    t.config_write(COMMAND, 2, 0x2)
    return mem, dev, t, PciDriver(t, PciBarRouter(t), mem)


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes((i * 7 + i // 512) & 0xFF for i in range(64 * 512)))
    return p


def test_identity_and_capabilities(image):
    with DiskImage(image) as disk:
        t = P.VirtioPci(B.VirtioBlk(disk), GuestMemory.for_test(RAM))
        assert (t.get16(0x00), t.get16(0x02), t.config[0x08]) == (0x1AF4, 0x1042, 1)
        assert int.from_bytes(t.config[0x09:0x0C], "little") == 0x018000
        assert (t.get16(0x2C), t.get16(0x2E), t.config[0x3D]) == (0x1AF4, VIRTIO_ID_BLOCK, 1)
        assert t.bars[4].kind == "mem64" and t.bars[4].size == 0x4000
        drv = PciDriver(t, PciBarRouter(t), t.mem)
        drv.find_capabilities()
        caps = drv.caps
        assert sorted(caps) == [1, 2, 3, 4, 5]
        assert {k: (c["bar"], c["offset"], c["length"]) for k, c in caps.items() if k != 5} == {
            1: (4, 0x0000, 0x38), 2: (4, 0x3000, 4), 3: (4, 0x1000, 1), 4: (4, 0x2000, 64)}
        assert caps[2]["multiplier"] == 4 and caps[2]["len"] == 20 and caps[1]["len"] == 16
        assert caps[5]["len"] == 20
    rng = P.VirtioPci(VirtioRng(), GuestMemory.for_test(RAM))
    assert rng.get16(0x02) == 0x1044
    assert int.from_bytes(rng.config[0x09:0x0C], "little") == 0x00FF00
    drv = PciDriver(rng, PciBarRouter(rng), rng.mem)
    drv.find_capabilities()
    assert P.VIRTIO_PCI_CAP_DEVICE_CFG not in drv.caps      # no config space, no DEVICE cap


def test_linux_probe_through_config_ports_and_blk_round_trip(image):
    original = image.read_bytes()
    with DiskImage(image) as disk:
        m, dev, t, drv = on_bus(B.VirtioBlk(disk))
        assert t.slot == 1 and t.config[INTERRUPT_LINE] == PCI_IRQS[0] == 11
        assert m.userirq.pic.level_triggered == {11}
        drv.probe()
        assert drv.bar_sizes == {4: 0x4000}
        base = drv.bar_address(4)
        assert base == t.bar_address(4) and layout.PCI_MMIO_BASE <= base < layout.PCI_MMIO_END
        feats = drv.init()
        assert feats & VIRTIO_F_VERSION_1 and feats & B.VIRTIO_BLK_F_FLUSH
        assert drv.status == (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
                              | STATUS_DRIVER_OK)
        assert dev.active and dev.driver_features == feats
        assert drv.config(0, 4) | drv.config(4, 4) << 32 == 64           # capacity in sectors
        assert drv.notify_addrs == {0: base + 0x3000}
        irq = m.lines[11]
        q = drv.queues[0]

        def submit(readable, writable):
            head = q.add_chain(readable, writable)
            drv.kick(0)
            [(h, n)] = q.take_used()
            assert h == head
            return head, n

        head, n = submit([struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 3)], [1024, 1])
        assert n == 1025 and q.written(head) == original[3 * 512:5 * 512] + b"\0"
        assert irq.level and t.get16(0x06) & 0x08                # INTx and the status bit
        assert drv.ack_interrupt() == 1                           # ISR: queue interrupt
        assert not irq.level and not t.get16(0x06) & 0x08
        assert drv.ack_interrupt() == 0                           # read-to-clear
        payload = os.urandom(512)
        head, n = submit([struct.pack("<IIQ", B.VIRTIO_BLK_T_OUT, 0, 9), payload], [1])
        assert q.written(head) == b"\0"
        head, n = submit([struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, 9)], [512, 1])
        assert q.written(head) == payload + b"\0"
        assert t.errors == {} and dev.errors == {} and m.mmio.unclaimed == 0
    assert image.read_bytes()[9 * 512:10 * 512] == payload


def test_interrupt_disable_and_config_change():
    mem, dev, t, drv = direct()
    drv.init()
    t.config_write(COMMAND, 2, t.command | COMMAND_INTX_DISABLE)
    dev.config_changed()
    assert not t.irq.level and t.get16(0x06) & 0x08           # pending, but masked
    t.config_write(COMMAND, 2, t.command & ~COMMAND_INTX_DISABLE)
    assert t.irq.level
    assert drv.r(P.CONFIG_GENERATION, 1) == 1
    assert drv.ack_interrupt() == 2 and not t.irq.level


def test_common_config_fields():
    mem, dev, t, drv = direct()
    drv.init()
    assert drv.r(P.NUM_QUEUES, 2) == 1
    drv.w(P.QUEUE_SELECT, 0, 2)
    q = drv.queues[0]
    assert drv.r(P.QUEUE_SIZE, 2) == q.size and drv.r(P.QUEUE_ENABLE, 2) == 1
    assert drv.r(P.QUEUE_DESC, 4) == q.desc_addr and drv.r(P.QUEUE_DEVICE + 4, 4) == 0
    assert drv.r(P.QUEUE_DRIVER, 8) == q.avail_addr
    assert drv.r(P.QUEUE_MSIX_VECTOR, 2) == P.NO_VECTOR
    drv.w(P.DRIVER_FEATURE_SELECT, 1, 4)
    assert drv.r(P.DRIVER_FEATURE, 4) == 1                  # VERSION_1 is bit 32
    drv.w(P.QUEUE_SELECT, 5, 2)
    assert drv.r(P.QUEUE_SIZE, 2) == 0 and drv.r(P.QUEUE_ENABLE, 2) == 0
    assert t.errors == {}


def test_guest_mistakes_are_counted_not_raised():
    mem, dev, t, drv = direct()
    drv.probe()
    drv.w(P.DEVICE_STATUS, 0, 1)
    drv.add_status(STATUS_ACKNOWLEDGE)
    drv.add_status(STATUS_DRIVER)
    drv.add_status(STATUS_DRIVER_OK)                        # before FEATURES_OK
    assert drv.status & STATUS_DEVICE_NEEDS_RESET and not dev.active
    assert t.irq.level and drv.ack_interrupt() == 2         # config-change interrupt
    assert t.errors["DRIVER_OK before FEATURES_OK"] == 1
    assert drv.r(P.DEVICE_STATUS, 4) == 0                   # wrong width
    drv.w(P.QUEUE_SELECT, 0, 4)
    drv.w(P.CONFIG_MSIX_VECTOR, 3, 2)
    drv.w(P.NUM_QUEUES, 7, 2)
    t.bar_write(4, P.ISR_OFFSET, 1, 1)
    t.bar_read(4, 0x3FF0, 4)
    assert t.errors["common config access"] == 2
    assert t.errors["MSI-X vector without MSI-X"] == 1
    assert t.errors["write to a read-only common config field"] == 1
    drv.queues.clear()
    drv.init()
    drv.w(P.QUEUE_SELECT, 0, 2)
    drv.w(P.QUEUE_ENABLE, 0, 2)                             # "MUST NOT write a 0"
    assert drv.r(P.QUEUE_ENABLE, 2) == 1
    drv.w(P.QUEUE_DESC, 0x1000, 4)                          # live queue: ignored
    assert drv.r(P.QUEUE_DESC, 4) == drv.queues[0].desc_addr
    t.bar_write(4, P.NOTIFY_OFFSET + 4, 2, 1)               # queue 1 does not exist
    t.bar_write(4, P.NOTIFY_OFFSET + 1, 1, 0)
    assert t.errors["notify"] == 2
    h = drv.queues[0].add_chain([], [8])
    drv.kick(0)
    assert drv.queues[0].take_used() == [(h, 8)]


def test_bad_queue_address_needs_reset():
    mem, dev, t, drv = direct()
    drv.probe()
    drv.w(P.DEVICE_STATUS, 0, 1)
    for bit in (STATUS_ACKNOWLEDGE, STATUS_DRIVER):
        drv.add_status(bit)
    assert drv.set_features(VIRTIO_F_VERSION_1)
    drv.w(P.QUEUE_SELECT, 0, 2)
    drv.w(P.QUEUE_DESC, RAM - 8, 8)                         # table runs past the end of RAM
    drv.w(P.QUEUE_ENABLE, 1, 2)
    assert drv.r(P.QUEUE_ENABLE, 2) == 0 and drv.status & STATUS_DEVICE_NEEDS_RESET


def test_guest_moves_the_bar():
    m, dev, t, drv = on_bus()
    drv.init()
    old = drv.bar_address(4)
    new = old + 0x10_0000
    cfg = drv.cfg
    cfg.write(0x04, 2, cfg.read(0x04, 2) & ~0x2)           # decode off while moving, as Linux does
    cfg.write(0x10 + 4 * 4, 4, new & 0xFFFFFFFF)
    cfg.write(0x14 + 4 * 4, 4, new >> 32)
    cfg.write(0x04, 2, cfg.read(0x04, 2) | 0x2)
    assert t.bar_address(4) == new and m.mmio.find(old) is None
    moved = PciDriver(cfg, m.mmio, m.mem, ram_start=drv.alloc.next)
    moved.probe()
    moved.init()
    h = moved.queues[0].add_chain([], [16])
    moved.kick(0)
    assert moved.queues[0].take_used() == [(h, 16)]
    assert moved.notify_addrs[0] == new + 0x3000


def test_pci_cfg_access_capability():
    mem, dev, t, drv = direct()
    drv.find_capabilities()
    c = drv.caps[P.VIRTIO_PCI_CAP_PCI_CFG]["at"]
    t.config_write(c + 4, 1, P.BAR_INDEX)
    t.config_write(c + 8, 4, P.COMMON_OFFSET + P.NUM_QUEUES)
    t.config_write(c + 12, 4, 2)
    assert t.config_read(c + 16, 4) & 0xFFFF == 1          # num_queues through config space
    t.config_write(c + 8, 4, P.DEVICE_STATUS)
    t.config_write(c + 12, 4, 1)
    t.config_write(c + 16, 1, STATUS_ACKNOWLEDGE)
    assert t.status == STATUS_ACKNOWLEDGE
    t.config_write(c + 12, 4, 3)                           # bad length
    t.config_write(c + 16, 4, 0)
    assert t.errors["PCI_CFG access"] == 1
    # A read through a bad window must not reach the BAR: the ISR is read-to-clear, so a pending
    # interrupt shows whether it did. The data field keeps what it held; the read is not counted
    # (anything dumping config space reads it).
    t.interrupt_status = 1
    t.config_write(c + 8, 4, P.ISR_OFFSET)
    t.config_write(c + 12, 4, 3)                           # bad length, at the ISR
    before = t.config_read(c + 16, 4)
    assert t.config_read(c + 16, 4) == before and t.interrupt_status == 1
    assert t.errors["PCI_CFG access"] == 1
    t.config_write(c + 12, 4, 1)                           # the same offset, a good length
    assert t.config_read(c + 16, 1) == 1 and t.interrupt_status == 0


def test_attach_pci_picks_distinct_irqs_and_sets_elcr():
    m = FakeMachine()
    ts = [attach_pci(m, m.pci, VirtioRng()).transport for _ in range(3)]
    assert [t.config[INTERRUPT_LINE] for t in ts] == [11, 10, 7]    # 9 is the ACPI SCI's
    assert m.userirq.pic.level_triggered == {7, 10, 11}
    assert [t.slot for t in ts] == [1, 2, 3]
    attached = attach_pci(m, m.pci, VirtioRng(), irq=5)
    assert attached.transport.config[INTERRUPT_LINE] == 5 and attached.irq == 5


def test_attach_pci_on_a_real_machine_sets_the_kernel_pic_elcr(kvm):
    from pykvm.kvm._lib import lib
    from pykvm.machine import Machine
    with Machine(32 * layout.MiB, kvm=kvm) as m:
        pci = PciBus(mmio=m.mmio, pio=m.pio)
        pci.register_on(m.pio)
        t = attach_pci(m, pci, VirtioRng()).transport
        elcr = m.vm.get_irqchip(lib.KVM_IRQCHIP_PIC_SLAVE).chip.pic.elcr
        assert elcr & (1 << (11 - 8))
        drv = PciDriver(PciConfigPorts(m.pio, t.slot), m.mmio, m.mem, ram_start=0x10_0000)
        drv.init()
        h = drv.queues[0].add_chain([], [8])
        drv.kick(0)                                         # drives KVM_IRQ_LINE 11 high
        assert drv.queues[0].take_used() == [(h, 8)] and t.irq.level
        assert drv.ack_interrupt() == 1 and not t.irq.level


# ---- fuzzing the BAR ----

common = st.sampled_from(sorted(P._WIDTH))
offsets = st.one_of(
    common,
    st.sampled_from([P.ISR_OFFSET, P.ISR_OFFSET + 1, P.NOTIFY_OFFSET, P.NOTIFY_OFFSET + 2,
                     P.NOTIFY_OFFSET + 4, P.DEVICE_OFFSET, 0x38, 0xFFC, 0x3FFC]),
    st.integers(0, P.BAR_SIZE - 1))
values = st.one_of(st.integers(0, 0xFF), st.sampled_from([0, 1, 2, 3, 0xF, 0xFFFF, RAM - 2]),
                   st.integers(0, (1 << 64) - 1))
ops = st.lists(st.tuples(st.booleans(), offsets, st.sampled_from([1, 2, 4, 8]), values),
               max_size=60)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, init_first=st.booleans())
def test_fuzz_bar_writes(ops, init_first):
    mem, dev, t, drv = direct()
    if init_first:
        drv.init()
        drv.queues[0].add_chain([], [16])
    for is_write, off, size, value in ops:
        if is_write:
            t.bar_write(P.BAR_INDEX, off, size, value & ((1 << (8 * size)) - 1))
        else:
            v = t.bar_read(P.BAR_INDEX, off, size)
            assert 0 <= v < 1 << (8 * size)
        assert_transport_sound(t, dev, mem, t.irq)
    assert_recovers(drv)


# ---- the PCI_CFG window against the BAR itself: two transports, the same accesses ----

window_ops = st.lists(st.tuples(
    st.booleans(),                                               # write?
    st.one_of(st.just(P.BAR_INDEX), st.integers(0, 7)),          # bar field
    st.one_of(common, st.integers(0, P.BAR_SIZE + 8)),           # offset field
    st.sampled_from([0, 1, 2, 3, 4, 8]),                         # length field
    values), max_size=40)


def _window_valid(bar, offset, length):
    """VIRTIO 1.2 4.1.4.9.1: the driver MUST set length 1, 2 or 4, offset a multiple of length,
    and bar to a BAR the device has; we also require the access to fall inside the BAR."""
    return bar == P.BAR_INDEX and length in (1, 2, 4) and offset % length == 0 \
        and offset + length <= P.BAR_SIZE


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=window_ops, init_first=st.booleans())
def test_fuzz_pci_cfg_window_matches_the_bar(ops, init_first):
    """Every access through the PCI_CFG capability has exactly the effect of the same access to
    the BAR (on a twin transport); an invalid window has no effect at all and is counted."""
    mem_a, dev_a, a, drv_a = direct()
    mem_b, dev_b, b, drv_b = direct()
    drv_a.find_capabilities()
    c = drv_a.caps[P.VIRTIO_PCI_CAP_PCI_CFG]["at"]
    if init_first:
        drv_a.init()
        drv_b.init()
    bad = 0
    for is_write, bar, offset, length, value in ops:
        a.config_write(c + 4, 1, bar)
        a.config_write(c + 8, 4, offset & 0xFFFFFFFF)
        a.config_write(c + 12, 4, length)
        size = length if length in (1, 2, 4) else 4
        value &= (1 << (8 * size)) - 1
        valid = _window_valid(bar, offset, length)
        if is_write:
            a.config_write(c + 16, size, value)
            if valid:
                b.bar_write(P.BAR_INDEX, offset, length, value)
            else:
                bad += 1
        else:
            got = a.config_read(c + 16, size)
            if valid:
                assert got == b.bar_read(P.BAR_INDEX, offset, length), (offset, length)
        assert a.errors["PCI_CFG access"] == bad
        for off, n in ((P.COMMON_OFFSET + P.DEVICE_STATUS, 1), (P.COMMON_OFFSET + P.NUM_QUEUES, 2),
                       (P.COMMON_OFFSET + P.QUEUE_SELECT, 2), (P.COMMON_OFFSET + P.QUEUE_ENABLE, 2)):
            assert a.bar_read(P.BAR_INDEX, off, n) == b.bar_read(P.BAR_INDEX, off, n), off
        assert (a.status, a.interrupt_status) == (b.status, b.interrupt_status)
        assert_transport_sound(a, dev_a, mem_a, a.irq)
