import pytest
from hypothesis import given, strategies as st

from pykvm.bus import Bus, BusOverlapError, LockedDevice, Window


class Reg:
    """A device with one byte register per offset, recording accesses."""

    def __init__(self, length):
        self.regs = bytearray(length)
        self.log = []

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        return self.regs[offset]

    def write(self, offset, size, value):
        self.log.append(("w", offset, size, value))
        self.regs[offset] = value & 0xff


def test_device_sees_offsets_from_its_base():
    bus = Bus("pio")
    dev = Reg(8)
    bus.register(0x3f8, 8, dev)
    bus.write(0x3fb, 1, 0x83)
    assert dev.log == [("w", 3, 1, 0x83)]
    assert bus.read(0x3fb, 1) == 0x83


def test_unclaimed_reads_all_ones_and_is_counted():
    bus = Bus("pio")
    bus.register(0x60, 1, Reg(1))
    assert bus.read(0x64, 1) == 0xff
    assert bus.read(0x64, 2) == 0xffff
    bus.write(0x64, 1, 0)
    assert bus.unclaimed == 3
    assert bus.unclaimed_log[0x64] == 3


@pytest.mark.parametrize("base,length", [(0x3f8, 1), (0x3f0, 9), (0x3ff, 4), (0x3f9, 2), (0x300, 0x200)])
def test_overlap_rejected(base, length):
    bus = Bus("pio")
    bus.register(0x3f8, 8, Reg(8), "serial")
    with pytest.raises(BusOverlapError, match="serial"):
        bus.register(base, length, Reg(length))


def test_adjacent_ranges_are_fine():
    bus = Bus("mmio")
    a, b = Reg(0x10), Reg(0x10)
    bus.register(0x1000, 0x10, a)
    bus.register(0x1010, 0x10, b)
    bus.write(0x100f, 1, 1)
    bus.write(0x1010, 1, 2)
    assert a.log == [("w", 0xf, 1, 1)] and b.log == [("w", 0, 1, 2)]


def test_string_io_is_looped_by_the_bus():
    bus = Bus("pio")
    dev = Reg(1)
    bus.register(0xe9, 1, dev)
    bus.write_from(0xe9, 1, memoryview(b"abc"), 3)
    assert [e[3] for e in dev.log] == [ord("a"), ord("b"), ord("c")]
    buf = bytearray(4)
    bus.read_into(0xe9, 2, memoryview(buf), 2)
    assert len(dev.log) == 5


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 20)), max_size=30),
       st.integers(0, 230))
def test_find_matches_a_linear_scan(ranges, probe):
    """Whatever got registered (overlaps refused), lookup agrees with the obvious scan."""
    bus = Bus("mmio")
    accepted = []
    for base, length in ranges:
        try:
            bus.register(base, length, (base, length))
        except BusOverlapError:
            assert any(b < base + length and base < b + n for b, n in accepted)
        else:
            assert not any(b < base + length and base < b + n for b, n in accepted)
            accepted.append((base, length))
    expected = [(b, n) for b, n in accepted if b <= probe < b + n]
    found = bus.find(probe)
    assert (found.device if found else None) == (expected[0] if expected else None)


def test_window_lands_at_its_offset_in_the_device():
    bus = Bus("pio")
    dev = Reg(8)
    bus.register(0x60, 1, dev)
    bus.register(0x64, 1, Window(dev, 4))
    bus.write(0x64, 1, 0xfe)
    assert dev.log == [("w", 4, 1, 0xfe)]


def test_locked_device_holds_the_lock_during_each_access():
    import threading
    lock = threading.Lock()

    class Probe(Reg):
        def read(self, offset, size):
            assert lock.locked()
            return super().read(offset, size)

    dev = Probe(8)
    bus = Bus("pio")
    bus.register(0x3f8, 8, LockedDevice(dev, lock))
    assert bus.read(0x3fd, 1) == 0 and not lock.locked()
