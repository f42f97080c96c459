"""The 8254 PIT and port 0x61, on a fake clock: Linux's uses, the datasheet's latch and read-back
rules, and a fuzzer checked against an independent reference for the counter value."""

from hypothesis import given, settings, strategies as st

from pykvm.bus import Bus
from pykvm.devices.i8254 import PIT_HZ, I8254Pit, SystemControlPortB
from pykvm.irq import RecordingIrqLine


class FakeClock:
    """Time in whole PIT clocks, read in the middle of a clock so float rounding cannot move it
    across an edge. Tests may also set `t` directly."""

    def __init__(self):
        self.base = 1000.0
        self.t = self.base + 0.5 / PIT_HZ

    def __call__(self):
        return self.t

    def advance_clocks(self, n):
        self.t += n / PIT_HZ


def make():
    clock = FakeClock()
    irq = RecordingIrqLine()
    pit = I8254Pit(irq, clock)
    bus = Bus("pio")
    bus.register(0x40, 4, pit)
    bus.register(0x61, 1, SystemControlPortB(pit))
    return pit, bus, irq, clock


def program_channel2(bus, control: int, count: int):
    """Gate channel 2 on (port 0x61 bit 0), write its control word, then the count LSB, MSB."""
    bus.write(0x61, 1, 0x01)
    bus.write(0x43, 1, control)
    bus.write(0x42, 1, count & 0xFF)
    bus.write(0x42, 1, count >> 8)


def read_word(bus, port):
    lo = bus.read(port, 1)
    return lo | bus.read(port, 1) << 8


def test_linux_periodic_mode2_gives_one_edge_per_period():
    pit, bus, irq, clock = make()
    latch = (PIT_HZ + 500) // 1000          # HZ=1000
    bus.write(0x43, 1, 0x34)
    bus.write(0x40, 1, latch & 0xFF)
    bus.write(0x40, 1, latch >> 8)
    start = clock.t
    assert pit.next_irq_deadline() == start + latch / PIT_HZ
    pit.poll(clock.t)
    assert irq.edges == 0
    clock.advance_clocks(latch - 2)
    pit.poll(clock.t)
    assert irq.edges == 0
    clock.t = pit.next_irq_deadline() + 1e-7
    pit.poll(clock.t)
    assert irq.edges == 1 and irq.level is False
    assert abs(pit.next_irq_deadline() - (start + 2 * latch / PIT_HZ)) < 1e-9
    clock.t = start + (10.5 * latch) / PIT_HZ   # missed periods coalesce into one edge
    pit.poll(clock.t)
    assert irq.edges == 2
    assert pit.next_irq_deadline() > clock.t


def test_linux_oneshot_mode4_fires_once():
    pit, bus, irq, clock = make()
    bus.write(0x43, 1, 0x38)
    bus.write(0x40, 1, 100)
    bus.write(0x40, 1, 0)
    clock.advance_clocks(100)
    pit.poll(clock.t)
    assert irq.edges == 0                    # OUT is in its one-clock low strobe
    clock.advance_clocks(1)
    pit.poll(clock.t)
    assert irq.edges == 1
    assert pit.next_irq_deadline() is None
    clock.advance_clocks(100000)
    pit.poll(clock.t)
    assert irq.edges == 1
    bus.write(0x40, 1, 50)                   # next event: a new count rearms
    bus.write(0x40, 1, 0)
    assert pit.next_irq_deadline() is not None
    clock.advance_clocks(51)
    pit.poll(clock.t)
    assert irq.edges == 2


def test_mode0_irq_level_rises_at_terminal_count():
    pit, bus, irq, clock = make()
    bus.write(0x43, 1, 0x30)
    bus.write(0x40, 1, 10)
    bus.write(0x40, 1, 0)
    pit.poll(clock.t)
    assert irq.level is False
    clock.advance_clocks(10)
    pit.poll(clock.t)
    assert irq.level is True and irq.edges == 1
    bus.write(0x43, 1, 0x30)                 # a new control word drops OUT
    pit.poll(clock.t)
    assert irq.level is False


def test_tsc_calibration_channel2_through_port_61():
    """pit_calibrate_tsc: gate high, speaker off, mode 0 on channel 2, wait for port 0x61 bit 5."""
    pit, bus, irq, clock = make()
    bus.write(0x61, 1, (bus.read(0x61, 1) & ~0x02) | 0x01)
    bus.write(0x43, 1, 0xB0)
    latch = PIT_HZ // (1000 // 10)          # 10 ms
    bus.write(0x42, 1, latch & 0xFF)
    bus.write(0x42, 1, latch >> 8)
    assert bus.read(0x61, 1) & 0x20 == 0
    clock.advance_clocks(latch - 1)
    assert bus.read(0x61, 1) & 0x20 == 0
    clock.advance_clocks(1)
    assert bus.read(0x61, 1) & 0x21 == 0x21
    assert irq.edges == 0                     # channel 2 is not IRQ 0


def test_quick_pit_calibrate_msb_counts_down():
    pit, bus, _, clock = make()
    program_channel2(bus, 0xB0, 0xFFFF)         # mode 0, LSB then MSB
    for i in range(5):
        bus.read(0x42, 1)                     # LSB
        assert bus.read(0x42, 1) == 0xFF - i  # MSB
        clock.advance_clocks(256)


def test_gate_low_holds_mode0_count():
    pit, bus, _, clock = make()
    program_channel2(bus, 0xB0, 4096)
    clock.advance_clocks(96)
    bus.write(0x61, 1, 0x00)                  # gate low: counting suspended
    clock.advance_clocks(5000)
    assert read_word(bus, 0x42) == 4000
    bus.write(0x61, 1, 0x01)
    clock.advance_clocks(1000)
    assert read_word(bus, 0x42) == 3000


def test_counter_latch_freezes_the_read_value():
    pit, bus, _, clock = make()
    bus.write(0x43, 1, 0x34)
    bus.write(0x40, 1, 0x00)
    bus.write(0x40, 1, 0x30)                  # 0x3000
    clock.advance_clocks(0x100)
    bus.write(0x43, 1, 0x00)                  # latch channel 0
    clock.advance_clocks(0x200)
    bus.write(0x43, 1, 0x00)                  # ignored: the first latch is unread
    assert read_word(bus, 0x40) == 0x3000 - 0x100
    assert read_word(bus, 0x40) == 0x3000 - 0x300   # unlatched again: live


def test_read_back_status_then_count():
    pit, bus, _, clock = make()
    bus.write(0x43, 1, 0xB6)                  # channel 2, lohi, mode 3, binary
    bus.write(0x43, 1, 0xC0 | 0x08)           # read-back channel 2 status+count before any count
    assert bus.read(0x42, 1) == 0x40 | 0x30 | 0x06 | 0x80   # NULL COUNT, RW=11, mode 3, OUT high
    bus.read(0x42, 1), bus.read(0x42, 1)
    bus.write(0x61, 1, 0x01)
    bus.write(0x42, 1, 100)
    bus.write(0x42, 1, 0)
    clock.advance_clocks(10)
    bus.write(0x43, 1, 0xC0 | 0x08)
    status = bus.read(0x42, 1)
    assert status & 0x40 == 0                 # count loaded
    assert read_word(bus, 0x42) == 80         # mode 3 counts by two
    # Status only (D5=1), then count only (D4=1).
    bus.write(0x43, 1, 0xE0 | 0x08)
    assert bus.read(0x42, 1) == status
    bus.write(0x43, 1, 0xD0 | 0x08)
    assert read_word(bus, 0x42) == 80


def test_bcd_counting():
    pit, bus, _, clock = make()
    bus.write(0x43, 1, 0x31)                  # channel 0, lohi, mode 0, BCD
    bus.write(0x40, 1, 0x34)
    bus.write(0x40, 1, 0x12)                  # 1234 decimal
    clock.advance_clocks(34)
    assert read_word(bus, 0x40) == 0x1200
    clock.advance_clocks(1200)
    assert read_word(bus, 0x40) == 0x0000
    clock.advance_clocks(1)
    assert read_word(bus, 0x40) == 0x9999     # BCD wraps at 10000


def test_lsb_and_msb_only_access():
    pit, bus, _, clock = make()
    bus.write(0x43, 1, 0x10)                  # channel 0, LSB only, mode 0
    bus.write(0x40, 1, 0x80)
    clock.advance_clocks(0x10)
    assert bus.read(0x40, 1) == 0x70
    bus.write(0x43, 1, 0x20)                  # MSB only
    bus.write(0x40, 1, 0x02)                  # 0x200
    clock.advance_clocks(0x100)
    assert bus.read(0x40, 1) == 0x01


def test_mode3_square_wave_output():
    pit, bus, _, clock = make()
    program_channel2(bus, 0xB6, 10)            # mode 3
    outs = []
    for _ in range(20):
        outs.append(pit.output(2))
        clock.advance_clocks(1)
    assert outs == ([True] * 5 + [False] * 5) * 2


# --- the fuzzer ---

def reference_value(mode, n, d):
    """Counter value after d clocks, straight from the datasheet's mode descriptions (binary)."""
    if mode in (0, 4):
        return (n - d) % 0x10000
    if mode == 2:
        return (n - d % n) % 0x10000
    return None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("ctl"), st.integers(0, 255)),
    st.tuples(st.just("cnt"), st.integers(0, 2), st.integers(0, 255)),
    st.tuples(st.just("rd"), st.integers(0, 3)),
    st.tuples(st.just("gate"), st.booleans()),
    st.tuples(st.just("time"), st.integers(0, 200000)),
    st.tuples(st.just("p61"), st.just(0)),
), max_size=50))
def test_fuzz_pit_state_stays_possible(seq):
    pit, bus, irq, clock = make()
    for op in seq:
        if op[0] == "ctl":
            bus.write(0x43, 1, op[1])
        elif op[0] == "cnt":
            bus.write(0x40 + op[1], 1, op[2])
        elif op[0] == "rd":
            assert 0 <= bus.read(0x40 + op[1], 1) <= 0xFF
        elif op[0] == "gate":
            bus.write(0x61, 1, int(op[1]))
        elif op[0] == "time":
            clock.advance_clocks(op[1])
        else:
            assert bus.read(0x61, 1) & 0xC0 == 0
        pit.poll(clock.t)
        d = pit.next_irq_deadline()
        assert d is None or d >= clock.t - 1e-6 or pit.channels[0].mode in (0, 1)
        for ch in pit.channels:
            v = ch.value(clock.t)
            assert 0 <= v < ch.modulus
            assert 0 <= ch.mode <= 5 and len(ch.latch) <= 2
            el = ch.elapsed(clock.t)
            if el is not None and not ch.bcd and ch.gate:
                ref = reference_value(ch.mode, ch.n, el)
                if ref is not None:
                    assert v == ref
    # After everything: a fresh latch and read of each channel follows the datasheet.
    for i, ch in enumerate(pit.channels):
        if ch.bcd or ch.access != 3 or ch.status is not None or ch.latch:
            continue
        expected = ch.value(clock.t)
        bus.write(0x43, 1, i << 6)
        clock.advance_clocks(1000)
        got = read_word(bus, 0x40 + i)
        assert got == expected
