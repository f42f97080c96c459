"""DebugCon, PostCode and ExitPort unit tests, including through a Bus at their PC ports."""

from pykvm.bus import Bus
from pykvm.devices.debugcon import DebugCon, ExitPort, PostCode
from pykvm.x86.layout import PORT_DEBUG, PORT_EXIT, PORT_POST


def test_debugcon_prints_bytes_and_reads_e9():
    out = bytearray()
    con = DebugCon(out.extend)
    for ch in b"ok\n":
        con.write(0, 1, ch)
    assert out == b"ok\n"
    assert con.bytes_out == 3
    assert con.read(0, 1) == 0xE9


def test_debugcon_wide_write_sends_low_byte_first():
    out = bytearray()
    con = DebugCon(out.extend)
    con.write(0, 4, int.from_bytes(b"PASS", "little"))
    con.write(0, 2, 0x0A21)
    assert out == b"PASS!\n"
    assert con.read(0, 2) == 0xE9E9


def test_post_code_remembers_last_and_counts():
    post = PostCode()
    assert post.read(0, 1) == 0
    post.write(0, 1, 0x12)
    post.write(0, 1, 0x34)
    assert post.code == 0x34 and post.writes == 2
    assert post.read(0, 1) == 0x34


def test_exit_port_records_status_and_calls_back():
    seen = []
    port = ExitPort(seen.append)
    assert port.exit_status is None
    port.write(0, 1, 0x2A)
    assert port.exit_status == 0x2A and seen == [0x2A]
    port.write(0, 4, 0xDEADBEEF)
    assert port.exit_status == 0xDEADBEEF and seen[-1] == 0xDEADBEEF
    assert port.writes == 2


def test_exit_port_without_callback():
    port = ExitPort()
    port.write(0, 2, 0x1234)
    assert port.exit_status == 0x1234


def test_on_a_bus_at_pc_ports():
    out = bytearray()
    statuses = []
    bus = Bus("pio")
    bus.register(PORT_DEBUG, 1, DebugCon(out.extend))
    post = PostCode()
    bus.register(PORT_POST, 1, post)
    bus.register(PORT_EXIT, 1, ExitPort(statuses.append))
    bus.write(PORT_DEBUG, 1, ord("A"))
    bus.write(PORT_POST, 1, 0x55)
    bus.write(PORT_EXIT, 1, 0)
    assert out == b"A" and post.code == 0x55 and statuses == [0]
    assert bus.read(PORT_DEBUG, 1) == 0xE9
    assert bus.unclaimed == 0


def test_rep_outsb_reaches_debugcon_as_one_string():
    """Bus.write_from hands a string to a device with write_string in one call."""
    got = []
    bus = Bus("pio")
    con = DebugCon(got.append)
    bus.register(0xE9, 1, con)
    bus.write_from(0xE9, 1, memoryview(b"hello, world"), 12)
    assert got == [b"hello, world"] and con.bytes_out == 12
    bus.write_from(0xE9, 2, memoryview(b"abcd"), 2)       # words: all bytes, in order
    assert b"".join(got[1:]) == b"abcd" and con.bytes_out == 16
