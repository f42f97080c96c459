"""Exit dispatch with made-up exits: no /dev/kvm needed."""

from types import SimpleNamespace

from pykvm.bus import Bus
from pykvm.kvm import exits as E
from pykvm.machine import Stats, Stop, handle_exit


class Port:
    def __init__(self):
        self.writes = []
        self.value = 0x5a

    def read(self, offset, size):
        return self.value

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))


def fake_machine():
    m = SimpleNamespace(pio=Bus("pio"), mmio=Bus("mmio"), stats=Stats(),
                        internal_error_handlers=[])
    return m


def test_out_reaches_the_device_at_its_offset():
    m = fake_machine()
    dev = Port()
    m.pio.register(0x3f8, 8, dev)
    assert handle_exit(m, E.IoOut(0x3f9, 1, 1, memoryview(b"\x0f"))) is None
    assert dev.writes == [(1, 1, 0x0f)]


def test_in_fills_the_exit_buffer():
    m = fake_machine()
    dev = Port()
    m.pio.register(0x60, 1, dev)
    buf = bytearray(2)
    handle_exit(m, E.IoIn(0x60, 2, 1, memoryview(buf)))
    assert buf == b"\x5a\x00"


def test_rep_outsb_is_split_into_single_writes():
    m = fake_machine()
    dev = Port()
    m.pio.register(0xe9, 1, dev)
    handle_exit(m, E.IoOut(0xe9, 1, 3, memoryview(b"abc")))
    assert [v for _, _, v in dev.writes] == [97, 98, 99]


def test_unclaimed_port_read_gives_ones_and_goes_on():
    m = fake_machine()
    buf = bytearray(1)
    assert handle_exit(m, E.IoIn(0x2f8, 1, 1, memoryview(buf))) is None
    assert buf == b"\xff" and m.pio.unclaimed == 1


def test_mmio_dispatch():
    m = fake_machine()
    dev = Port()
    m.mmio.register(0xd0000000, 0x1000, dev)
    handle_exit(m, E.MmioWrite(0xd0000070, memoryview((7).to_bytes(4, "little"))))
    assert dev.writes == [(0x70, 4, 7)]
    buf = bytearray(4)
    handle_exit(m, E.MmioRead(0xd0000000, memoryview(buf)))
    assert int.from_bytes(buf, "little") == 0x5a


def test_terminal_exits_stop_with_a_reason():
    m = fake_machine()
    assert handle_exit(m, E.Hlt()).reason == "halt"
    assert handle_exit(m, E.Shutdown()).reason == "shutdown"
    stop = handle_exit(m, E.FailEntry(0x21))
    assert stop.reason == "error" and "0x21" in stop.message


def test_interruptions_do_not_stop():
    m = fake_machine()
    assert handle_exit(m, E.Interrupted()) is None
    assert handle_exit(m, E.IrqWindowOpen()) is None


def test_internal_error_goes_to_handlers_first():
    m = fake_machine()
    seen = []
    m.internal_error_handlers.append(lambda mm, e: seen.append(e.suberror) or e.suberror == 1)
    assert handle_exit(m, E.InternalError(1, (0xcc,))) is None
    stop = handle_exit(m, E.InternalError(2, (0x0f, 0xae)))
    assert isinstance(stop, Stop) and stop.reason == "error" and "suberror 2" in stop.message
    assert seen == [1, 2]


def test_unknown_exit_is_counted_and_stops():
    m = fake_machine()
    stop = handle_exit(m, E.Unknown(99))
    assert stop.reason == "error" and m.stats.guest_errors["unhandled exit"] == 1
