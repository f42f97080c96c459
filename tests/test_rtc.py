"""CmosRtc unit tests with a fake clock."""

import calendar

import pytest
from hypothesis import given, settings, strategies as st

from pykvm.devices.rtc import CmosRtc

GiB, MiB = 1 << 30, 1 << 20

# 2024-02-29 13:45:07.5 UTC, a Thursday.
T0 = calendar.timegm((2024, 2, 29, 13, 45, 7)) + 0.5


class FakeClock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t


def make(mem=64 * MiB, t=T0):
    clock = FakeClock(t)
    return CmosRtc(mem, clock=clock), clock


def cmos(rtc, index):
    rtc.write(0, 1, index)
    return rtc.read(1, 1)


def set_cmos(rtc, index, value):
    rtc.write(0, 1, index)
    rtc.write(1, 1, value)


def read_time(rtc):
    return [cmos(rtc, i) for i in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32)]


def test_bcd_time_by_default():
    rtc, _ = make()
    assert cmos(rtc, 0x0B) == 0x02                      # BCD, 24-hour
    assert read_time(rtc) == [0x07, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]


def test_binary_time():
    rtc, _ = make()
    set_cmos(rtc, 0x0B, 0x06)
    assert read_time(rtc) == [7, 45, 13, 5, 29, 2, 24, 20]


@pytest.mark.parametrize("hour,bcd12", [(0, 0x12), (1, 0x01), (11, 0x11), (12, 0x92), (13, 0x81),
                                        (23, 0x91)])
def test_twelve_hour_mode(hour, bcd12):
    rtc, _ = make(t=calendar.timegm((2024, 1, 1, hour, 0, 0)))
    set_cmos(rtc, 0x0B, 0x00)
    assert cmos(rtc, 0x04) == bcd12


def test_time_advances_with_host_clock():
    rtc, clock = make()
    clock.t += 60
    assert cmos(rtc, 0x02) == 0x46


def test_uip_only_just_before_the_update():
    rtc, clock = make()
    assert not cmos(rtc, 0x0A) & 0x80
    clock.t = T0 + 0.4999                # .9999 into the second
    assert cmos(rtc, 0x0A) == 0x80 | 0x26
    clock.t = T0 + 0.5001                # just after the update
    assert cmos(rtc, 0x0A) == 0x26


def test_set_time_with_set_bit():
    rtc, clock = make()
    set_cmos(rtc, 0x0B, 0x82)            # SET, BCD, 24h
    for index, value in ((0x00, 0x30), (0x02, 0x15), (0x04, 0x08), (0x07, 0x31), (0x08, 0x12),
                         (0x09, 0x99), (0x32, 0x19)):
        set_cmos(rtc, index, value)
    clock.t += 100                       # time stands still while SET is 1
    assert cmos(rtc, 0x00) == 0x30
    set_cmos(rtc, 0x0B, 0x02)
    clock.t += 5
    assert read_time(rtc) == [0x35, 0x15, 0x08, 0x06, 0x31, 0x12, 0x99, 0x19]   # a Friday
    assert rtc.bad_time_writes == 0


def test_set_time_in_twelve_hour_binary_mode():
    rtc, _ = make()
    set_cmos(rtc, 0x0B, 0x80 | 0x04)     # SET, binary, 12-hour
    set_cmos(rtc, 0x04, 0x80 | 3)        # 3 PM
    set_cmos(rtc, 0x0B, 0x06)            # binary, 24-hour
    assert cmos(rtc, 0x04) == 15


def test_impossible_date_is_counted_and_ignored():
    rtc, _ = make()
    set_cmos(rtc, 0x0B, 0x82)
    set_cmos(rtc, 0x07, 0x31)            # 31 February
    set_cmos(rtc, 0x0B, 0x02)
    assert rtc.bad_time_writes == 1
    assert cmos(rtc, 0x07) == 0x29


def test_registers_c_d_and_plain_ram():
    rtc, _ = make()
    assert cmos(rtc, 0x0D) == 0x80
    assert cmos(rtc, 0x0C) == 0x00
    set_cmos(rtc, 0x0D, 0)
    assert cmos(rtc, 0x0D) == 0x80
    set_cmos(rtc, 0x40, 0xA5)
    assert cmos(rtc, 0x40) == 0xA5


def test_nmi_bit_is_not_an_address_bit():
    rtc, _ = make()
    set_cmos(rtc, 0x40, 0x5A)
    rtc.write(0, 1, 0x80 | 0x40)
    assert rtc.nmi_disabled
    assert rtc.read(1, 1) == 0x5A


def test_word_write_sets_index_then_data():
    rtc, _ = make()
    rtc.write(0, 2, 0x7741)              # index 0x41, data 0x77
    assert cmos(rtc, 0x41) == 0x77


def test_index_port_reads_ff():
    rtc, _ = make()
    assert rtc.read(0, 1) == 0xFF


def mem_bytes(rtc):
    return {
        "base": cmos(rtc, 0x15) | cmos(rtc, 0x16) << 8,
        "ext": cmos(rtc, 0x17) | cmos(rtc, 0x18) << 8,
        "ext2": cmos(rtc, 0x30) | cmos(rtc, 0x31) << 8,
        "above16m": cmos(rtc, 0x34) | cmos(rtc, 0x35) << 8,
        "above4g": cmos(rtc, 0x5B) | cmos(rtc, 0x5C) << 8 | cmos(rtc, 0x5D) << 16,
    }


@pytest.mark.parametrize("size,expect", [
    (512 * 1024, dict(base=512, ext=0, ext2=0, above16m=0, above4g=0)),
    (16 * MiB, dict(base=640, ext=15 * 1024, ext2=15 * 1024, above16m=0, above4g=0)),
    (32 * MiB, dict(base=640, ext=31 * 1024, ext2=31 * 1024, above16m=256, above4g=0)),
    (128 * MiB, dict(base=640, ext=0xFFFF, ext2=0xFFFF, above16m=112 * 16, above4g=0)),
    # 4 GiB: 3 GiB below the PCI hole, 1 GiB moved above 4 GiB.
    (4 * GiB, dict(base=640, ext=0xFFFF, ext2=0xFFFF, above16m=(3072 - 16) * 16, above4g=16384)),
    (8 * GiB, dict(base=640, ext=0xFFFF, ext2=0xFFFF, above16m=(3072 - 16) * 16, above4g=5 * 16384)),
])
def test_memory_size_bytes(size, expect):
    rtc, _ = make(mem=size)
    assert mem_bytes(rtc) == expect


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["r", "w"]), st.integers(0, 1), st.integers(0, 255)),
                max_size=60),
       st.floats(0, 4e9))
def test_fuzz(seq, t):
    rtc, _ = make(t=t)
    for kind, off, val in seq:
        if kind == "r":
            assert 0 <= rtc.read(off, 1) <= 255
        else:
            rtc.write(off, 1, val)
    assert 0 <= cmos(rtc, 0x0A) <= 255 and cmos(rtc, 0x0D) == 0x80
