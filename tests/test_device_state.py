"""Device state round trips (pykvm/devices/state.py): a device driven into a random state, saved,
encoded and decoded (pykvm/snapshot/codec.py) and restored into a freshly built twin, must hold the
same state and from then on behave exactly like the original under the same random accesses.

Every device model a snapshot keeps has a case here. No /dev/kvm is needed."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings, strategies as st

from pykvm.bus import Bus
from pykvm.devices.acpi_pm import AcpiPm
from pykvm.devices.debugcon import DebugCon, ExitPort, PostCode
from pykvm.devices.i8042 import I8042
from pykvm.devices.i8254 import I8254Pit, SystemControlPortB
from pykvm.devices.i8259 import I8259Pair
from pykvm.devices.ide import AtaDrive, IdeChannel, PiixIde
from pykvm.host.disk import MemoryDisk
from pykvm.devices.pci import PciBus, PciDevice
from pykvm.devices.rtc import CmosRtc
from pykvm.devices.serial import Serial16550
from pykvm.devices.state import StateError
from pykvm.devices.userirq import UserIrqChip
from pykvm.irq import RecordingIrqLine
from pykvm.memory import GuestMemory
from pykvm.snapshot import codec
from pykvm.virtio import VirtioBlk, VirtioConsole, VirtioMmio, VirtioPci, VirtioRng
from pykvm.virtio.mock import MmioDriver, PciDriver

SETTINGS = settings(max_examples=60, deadline=None)


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def through_file(state):
    """What a snapshot does with the dict: encode it, then decode it in the restoring process."""
    return codec.decode(codec.encode(state))


# An access: ("r" | "w", port index into the device's port list, size, value); "t": time passes.
def accesses(ports: int, sizes=(1,)):
    access = st.tuples(st.sampled_from("rw"), st.integers(0, ports - 1), st.sampled_from(sizes),
                       st.integers(0, 0xFFFFFFFF))
    return st.lists(st.one_of(access, st.tuples(st.just("t"), st.floats(0, 0.01))), max_size=60)


def drive(ports, ops, clock=None) -> list:
    """Apply `ops` to the (device, offset) pairs in `ports`; the values read, in order."""
    seen = []
    for op in ops:
        if op[0] == "t":
            if clock is not None:
                clock.t += op[1]
            continue
        kind, i, size, value = op
        device, offset = ports[i]
        if kind == "r":
            seen.append(device.read(offset, size))
        else:
            device.write(offset, size, value & ((1 << (8 * size)) - 1))
    return seen


def assert_same_state(x, y, where="state"):
    """Equal, except that floats (clock times moved between clock bases) may differ by 1 ns."""
    if isinstance(x, float) and isinstance(y, float):
        assert x == pytest.approx(y, abs=1e-9), where
    elif isinstance(x, dict) and isinstance(y, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            assert_same_state(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        assert len(x) == len(y), where
        for i, (p, q) in enumerate(zip(x, y)):
            assert_same_state(p, q, f"{where}[{i}]")
    else:
        assert x == y, where


def check_twin(make, ports_of, before, after, clock_of=None):
    """Build A, drive it with `before`, save; build B, restore; both must then agree on `after`."""
    a = make()
    drive(ports_of(a), before, clock_of(a) if clock_of else None)
    state = a.save_state()
    b = make()
    if clock_of is not None:
        clock_of(b).t = clock_of(a).t + 12345.0     # another process: another clock base
    b.restore_state(through_file(state))
    assert_same_state(b.save_state(), state)
    ca = clock_of(a) if clock_of else None
    cb = clock_of(b) if clock_of else None
    seen_a, seen_b = [], []
    for op in after:        # the same ops, in step, on both
        if op[0] == "t":
            if ca is not None:
                ca.t += op[1]
                cb.t += op[1]
            continue
        seen_a += drive(ports_of(a), [op])
        seen_b += drive(ports_of(b), [op])
    assert seen_a == seen_b
    return a, b


@SETTINGS
@given(accesses(8), accesses(8), st.binary(max_size=40))
def test_serial(before, after, fed):
    def make():
        s = Serial16550(RecordingIrqLine(), out=lambda b: None)
        return s
    a = make()
    a.feed(fed)
    drive([(a, i) for i in range(8)], before)
    b = make()
    b.restore_state(through_file(a.save_state()))
    assert b.save_state() == a.save_state() and b.irq.level == a.irq.level
    ra = drive([(a, i) for i in range(8)], after)
    rb = drive([(b, i) for i in range(8)], after)
    assert ra == rb and a.irq.level == b.irq.level


@SETTINGS
@given(accesses(2), accesses(2))
def test_i8042(before, after):
    def make():
        return I8042(reset=lambda: None, kbd_irq=RecordingIrqLine(), aux_irq=RecordingIrqLine())
    a, b = check_twin(make, lambda d: [(d, 0), (d, 4)], before, after)
    assert a.kbd_irq.level == b.kbd_irq.level


@SETTINGS
@given(accesses(20, (1, 2, 4)), accesses(20, (1, 2, 4)), st.booleans(), st.sets(st.integers(0, 15)))
def test_acpi_pm(before, after, pressed, gpes):
    """PM1 status/enable/control, the GPE0 block, the SCI level and the PM timer, which goes on
    counting from its saved value in a process whose clock reads something else entirely. The
    original may have had its power button pressed (PWRBTN_STS latched) and GPEs raised (a
    clone's new generation ID) before the save."""
    built = []

    def make():
        pm = AcpiPm(on_poweroff=lambda: None, on_reset=lambda: None, sci=RecordingIrqLine(),
                    clock=FakeClock())
        if not built:
            if pressed:
                pm.press_power_button()
            for n in gpes:
                pm.raise_gpe(n)
        built.append(pm)
        return pm
    a, b = check_twin(make, lambda d: [(d, offset) for offset in range(20)], before, after,
                      clock_of=lambda d: d.clock)
    assert a.sci.level == b.sci.level
    assert a.sleep_requests == b.sleep_requests


@SETTINGS
@given(accesses(2), accesses(2))
def test_rtc(before, after):
    def make():
        return CmosRtc(256 << 20, clock=FakeClock(1.7e9))
    # The RTC follows the host's wall clock across a restore: give both the same clock here.
    check_twin(make, lambda d: [(d, 0), (d, 1)], before, after)


@SETTINGS
@given(accesses(5), accesses(5))
def test_i8254_and_port61(before, after):
    class Pit:
        def __init__(self):
            self.clock = FakeClock()
            self.pit = I8254Pit(RecordingIrqLine(), clock=self.clock)
            self.port61 = SystemControlPortB(self.pit)

        def save_state(self):
            return {"pit": self.pit.save_state(), "port61": self.port61.save_state()}

        def restore_state(self, s):
            self.pit.restore_state(s["pit"])
            self.port61.restore_state(s["port61"])

    check_twin(Pit, lambda d: [(d.pit, i) for i in range(4)] + [(_NoRefresh(d.port61), 0)],
               before, after, clock_of=lambda d: d.clock)


class _NoRefresh:
    """Port 0x61 without bit 4, the refresh toggle: it free-runs with the host clock (every
    15 us), not from any state, so a restored PIT need not (and cannot) agree on it."""

    def __init__(self, port):
        self.port = port

    def read(self, offset, size):
        return self.port.read(offset, size) & ~0x10

    def write(self, offset, size, value):
        self.port.write(offset, size, value)


@SETTINGS
@given(accesses(6), accesses(6), st.lists(st.tuples(st.integers(0, 15), st.booleans()), max_size=20))
def test_i8259_pair(before, after, pins):
    def make():
        return I8259Pair()
    a = make()
    ports = lambda d: [(d.master, 0), (d.master, 1), (d.slave, 0), (d.slave, 1),  # noqa: E731
                       (d.elcr_device, 0), (d.elcr_device, 1)]
    drive(ports(a), before)
    for n, level in pins:
        a.pin(n).set_level(level)
    b = make()
    b.restore_state(through_file(a.save_state()))
    assert b.save_state() == a.save_state()
    assert [b.pin(n).level for n in range(16)] == [a.pin(n).level for n in range(16)]
    assert drive(ports(a), after) == drive(ports(b), after)
    assert a.pending() == b.pending()
    if a.pending():
        assert a.acknowledge() == b.acknowledge()


@SETTINGS
@given(accesses(10), accesses(10))
def test_user_irqchip(before, after):
    def make():
        chip = UserIrqChip(kick=None, clock=FakeClock())
        chip.bus = Bus("pio")
        chip.register_on(chip.bus)
        return chip
    ports = [0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x40, 0x41, 0x42, 0x43, 0x61]
    check_twin(make, lambda d: [(_Port(d.bus, p), 0) if p != 0x61 else (_NoRefresh(_Port(d.bus, p)), 0)
                                for p in ports], before, after, clock_of=lambda d: d.clock)


class _Port:
    def __init__(self, bus, port):
        self.bus, self.port = bus, port

    def read(self, offset, size):
        return self.bus.read(self.port + offset, 1)

    def write(self, offset, size, value):
        self.bus.write(self.port + offset, 1, value & 0xFF)


@SETTINGS
@given(accesses(3, (1, 2, 4)), st.integers(0, 255))
def test_debugcon_post_exit(ops, code):
    class Trio:
        def __init__(self):
            self.con, self.post, self.exit = DebugCon(lambda b: None), PostCode(), ExitPort()

        def save_state(self):
            return [self.con.save_state(), self.post.save_state(), self.exit.save_state()]

        def restore_state(self, s):
            for d, x in zip((self.con, self.post, self.exit), s):
                d.restore_state(x)
    a = Trio()
    drive([(a.con, 0), (a.post, 0), (a.exit, 0)], [op for op in ops if op[0] == "w"])
    b = Trio()
    b.restore_state(through_file(a.save_state()))
    assert (b.con.bytes_out, b.post.code, b.post.writes, b.exit.exit_status, b.exit.writes) == \
        (a.con.bytes_out, a.post.code, a.post.writes, a.exit.exit_status, a.exit.writes)


def _pci_machine(disk: bytes):
    """A PCI bus on port and MMIO buses, with a PIIX IDE function (a disk as primary master) and a
    plain device with an I/O and a memory BAR."""
    class M:
        pass
    m = M()
    m.pio, m.mmio = Bus("pio"), Bus("mmio")
    m.pci = PciBus(mmio=m.mmio, pio=m.pio)
    m.pci.register_on(m.pio)
    m.disk = MemoryDisk(len(disk), data=disk)
    m.ide = PiixIde(IdeChannel(RecordingIrqLine(), AtaDrive(m.disk)),
                    IdeChannel(RecordingIrqLine()))
    m.ide.register_on(m.pio)
    m.pci.add(m.ide)
    dev = PciDevice(0x1234, 0x1111, 0xFF0000, interrupt_pin=1)
    dev.add_bar(0, 256, "io")
    dev.add_bar(1, 4096, "mem32")
    m.pci.add(dev, irq=10, irq_line=RecordingIrqLine())
    m.dev = dev
    m.save_state = m.pci.save_state
    m.restore_state = m.pci.restore_state
    return m


# Ports: 0xcf8 address (dword), 0xcfc-0xcff data, the IDE command block and control port.
_PCI_PORTS = [(0xCF8, 4), (0xCFC, 4), (0xCFD, 1), (0xCFE, 2)] + [(0x1F0 + i, 1) for i in range(8)] \
    + [(0x3F6, 1), (0x1F0, 2)]


class _SizedPort:
    def __init__(self, bus, port, size):
        self.bus, self.port, self.size = bus, port, size

    def read(self, offset, size):
        return self.bus.read(self.port, self.size)

    def write(self, offset, size, value):
        self.bus.write(self.port, self.size, value & ((1 << (8 * self.size)) - 1))


def _pci_ops():
    # Config addresses that hit real functions (bus 0, slots 0-2) most of the time.
    address = st.builds(lambda slot, reg: 0x80000000 | slot << 11 | reg << 2,
                        st.integers(0, 2), st.integers(0, 63))
    op = st.one_of(
        st.tuples(st.just("w"), st.just(0), st.just(4), address),
        st.tuples(st.sampled_from("rw"), st.integers(1, len(_PCI_PORTS) - 1), st.just(1),
                  st.integers(0, 0xFFFFFFFF)))
    return st.lists(op, max_size=80)


@SETTINGS
@given(_pci_ops(), _pci_ops(), st.binary(min_size=16, max_size=16))
def test_pci_bus_ide(before, after, seed):
    disk = seed * (64 * 1024 // 16)
    a = _pci_machine(disk)
    ports = lambda m: [(_SizedPort(m.pio, p, s), 0) for p, s in _PCI_PORTS]  # noqa: E731
    drive(ports(a), before)
    state = a.save_state()
    b = _pci_machine(bytes(a.disk.buf))          # the same image, reattached
    b.restore_state(through_file(state))
    assert through_file(b.save_state()) == through_file(state)
    # BAR windows follow the restored configuration space.
    for i in (0, 1):
        addr = a.dev.bar_address(i)
        bus = a.pio if i == 0 else a.mmio
        assert b.dev.bar_address(i) == addr
        if addr is not None and bus.find(addr) is not None:
            assert (b.pio if i == 0 else b.mmio).find(addr) is not None
    assert drive(ports(a), after) == drive(ports(b), after)
    assert a.disk.buf == b.disk.buf


def _virtio_rig(kind: str, make_device, mem: GuestMemory):
    class Rig:
        pass
    r = Rig()
    r.mem = mem
    r.device = make_device()
    if kind == "mmio":
        r.t = VirtioMmio(r.device, mem, RecordingIrqLine())
    else:
        r.pio, r.mmio = Bus("pio"), Bus("mmio")
        r.pci = PciBus(mmio=r.mmio, pio=r.pio)
        r.pci.register_on(r.pio)
        r.t = VirtioPci(r.device, mem)
        r.pci.add(r.t, irq=11, irq_line=RecordingIrqLine())
    return r


def _counting_source(n: int) -> bytes:
    return bytes(range(n % 256)) * (n // 256) + bytes(range(n % 256))


DEVICES = {
    "rng": lambda: VirtioRng(source=lambda n: bytes(i & 0xFF for i in range(n))),
    "console": lambda: VirtioConsole(lambda b: None),
    "blk": lambda: VirtioBlk(MemoryDisk(64 * 1024)),
}


@pytest.mark.parametrize("kind", ["mmio", "pci"])
@pytest.mark.parametrize("name", sorted(DEVICES))
@SETTINGS
@given(before=st.lists(st.integers(1, 300), max_size=6), after=st.lists(st.integers(1, 300), max_size=6),
       size=st.sampled_from([4, 8, 16]))
def test_virtio_transport_and_queues(kind, name, before, after, size):
    """A driver sets the device up and uses its queues; the restored twin (same RAM, as a
    snapshot maps it) continues where the original stopped: same used entries, same bytes."""
    a = _virtio_rig(kind, DEVICES[name], GuestMemory.for_test(1 << 20))
    if kind == "mmio":
        drv = MmioDriver(a.t, a.mem)
    else:
        from pykvm.virtio.mock import PciConfigPorts
        drv = PciDriver(PciConfigPorts(a.pio, a.t.slot), a.mmio, a.mem)
    drv.init(queue_size=size)

    def use(driver, lengths):
        out = []
        for n in lengths:
            q = driver.queues[0]
            if name == "blk":       # a read of sector n % 16: a header, a data buffer, a status
                import struct
                head = q.add_chain([struct.pack("<IIQ", 0, 0, n % 16)], [512, 1])
            else:
                head = q.add_chain([], [n])
            driver.kick(0)
            used = q.take_used()
            out.append((head, used, [q.written(h) for h, _ in used]))
            driver.ack_interrupt()
        return out

    use(drv, before)
    state = a.t.save_state()
    mem_b = GuestMemory.for_test(1 << 20)
    mem_b.write(0, a.mem.read(0, 1 << 20))
    b = _virtio_rig(kind, DEVICES[name], mem_b)
    if name == "blk":
        b.device.disk.buf[:] = a.device.disk.buf
    b.t.restore_state(through_file(state))
    assert through_file(b.t.save_state()) == through_file(state)
    # The driver's own bookkeeping is copied with it, pointed at B's memory and transport.
    memo = {id(a.mem): mem_b, id(a.t): b.t}
    if kind == "pci":
        memo[id(a.pio)], memo[id(a.mmio)], memo[id(drv.P)] = b.pio, b.mmio, drv.P
    drv_b = copy.deepcopy(drv, memo)
    assert use(drv, after) == use(drv_b, after)


def test_state_that_does_not_fit_is_refused():
    s = Serial16550(RecordingIrqLine(), out=lambda b: None)
    state = s.save_state()
    del state["lcr"]
    with pytest.raises(StateError, match="lacks lcr"):
        Serial16550(RecordingIrqLine(), out=lambda b: None).restore_state(state)
    pci = _pci_machine(bytes(4096))
    st_ = pci.save_state()
    st_["_plugged"] = st_["_plugged"][:-1]
    with pytest.raises(StateError, match="items"):
        _pci_machine(bytes(4096)).restore_state(st_)


@SETTINGS
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text() | st.binary(),
                    lambda inner: st.lists(inner) | st.tuples(inner, inner)
                    | st.dictionaries(st.integers() | st.text(), inner), max_leaves=30))
def test_codec_round_trip(value):
    assert codec.decode(codec.encode(value)) == value


@SETTINGS
@given(st.binary(max_size=64))
def test_codec_rejects_garbage_with_codec_error(data):
    try:
        codec.decode(data)
    except codec.CodecError:
        pass
