"""Serial16550 unit tests: no KVM, just register pokes and a recording irq line.

The probe tests replay, access by access, what Linux's 8250 driver does (drivers/tty/serial/8250/
8250_port.c: autoconfig, autoconfig_16550a, size_fifo, serial8250_do_startup).
"""

from hypothesis import given, settings, strategies as st

from pykvm.devices.serial import Serial16550
from pykvm.irq import RecordingIrqLine

RX, IER, IIR, LCR, MCR, LSR, MSR, SCR = range(8)
FCR = IIR
DLL, DLM = 0, 1


def make(**kw):
    irq = RecordingIrqLine()
    sent = bytearray()
    uart = Serial16550(irq, sent.extend, **kw)
    return uart, irq, sent


def rd(uart, off):
    return uart.read(off, 1)


def wr(uart, off, value):
    uart.write(off, 1, value)


# --- Linux's probe, step by step -------------------------------------------------------------

def linux_autoconfig(u):
    """autoconfig(): returns the detected type name, or a failure reason."""
    scratch = rd(u, IER)
    wr(u, IER, 0)
    scratch2 = rd(u, IER) & 0x0F
    wr(u, IER, 0x0F)
    scratch3 = rd(u, IER) & 0x0F
    wr(u, IER, scratch)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "IER test failed"
    save_mcr = rd(u, MCR)
    save_lcr = rd(u, LCR)
    # The loopback test (skipped for COM1-4 with UPF_SKIP_TEST, but run for other ports).
    wr(u, MCR, 0x10 | 0x0A)
    status1 = rd(u, MSR) & 0xF0
    wr(u, MCR, save_mcr)
    if status1 != 0x90:
        return f"LOOP test failed ({status1:#x})"
    wr(u, LCR, 0xBF)
    wr(u, 2, 0)          # EFR, if any; FCR on a 16550A
    wr(u, LCR, 0)
    wr(u, FCR, 0x01)
    scratch = rd(u, IIR)
    kind = {0: "8250/16450", 1: "unknown", 2: "16550", 3: "16550A"}[scratch >> 6]
    if kind == "16550A":
        kind = linux_autoconfig_16550a(u)
    wr(u, LCR, save_lcr)
    # "Reset the UART": MCR, clear FIFOs, read RX, clear IER.
    wr(u, MCR, save_mcr)
    wr(u, FCR, 0x01)
    wr(u, FCR, 0x07)
    wr(u, FCR, 0)
    rd(u, RX)
    wr(u, IER, 0)
    return kind


def linux_size_fifo(u):
    old_lcr = rd(u, LCR)
    wr(u, LCR, 0)
    old_fcr = rd(u, FCR)
    old_mcr = rd(u, MCR)
    wr(u, FCR, 0x07)
    wr(u, MCR, 0x10)
    wr(u, LCR, 0x80)
    old_dl = rd(u, DLL) | rd(u, DLM) << 8
    wr(u, DLL, 1)
    wr(u, DLM, 0)
    wr(u, LCR, 0x03)
    for count in range(256):
        wr(u, RX, count)
    count = 0
    while rd(u, LSR) & 0x01 and count < 256:
        rd(u, RX)
        count += 1
    wr(u, FCR, old_fcr)
    wr(u, MCR, old_mcr)
    wr(u, LCR, 0x80)
    wr(u, DLL, old_dl & 0xFF)
    wr(u, DLM, old_dl >> 8)
    wr(u, LCR, old_lcr)
    return count


def linux_autoconfig_16550a(u):
    """The CONFIG_SERIAL_8250_16550A_VARIANTS probes: each must conclude 'plain 16550A'."""
    wr(u, LCR, 0x80)
    if rd(u, 2) == 0:
        return "EFRv1 16650"
    wr(u, LCR, 0xBF)
    if rd(u, 2) == 0:
        return "EFRv2"
    wr(u, LCR, 0)
    status1 = rd(u, MCR)
    wr(u, LCR, 0xE0)
    status2 = rd(u, 2)
    if not ((status2 ^ status1) & 0x10):
        wr(u, LCR, 0)
        wr(u, MCR, status1 ^ 0x10)
        wr(u, LCR, 0xE0)
        status2 = rd(u, 2)
        wr(u, LCR, 0)
        wr(u, MCR, status1)
        if (status2 ^ status1) & 0x10:
            return "NS16550A SuperIO"
    wr(u, LCR, 0)
    wr(u, FCR, 0x01 | 0x20)
    status1 = rd(u, IIR) >> 5
    wr(u, FCR, 0x01)
    wr(u, LCR, 0x80)
    wr(u, FCR, 0x01 | 0x20)
    status2 = rd(u, IIR) >> 5
    wr(u, FCR, 0x01)
    wr(u, LCR, 0)
    if status1 == 6 and status2 == 7:
        return "TI16750"
    iersave = rd(u, IER)
    wr(u, IER, iersave & ~0x40)
    if not rd(u, IER) & 0x40:
        wr(u, IER, iersave | 0x40)
        if rd(u, IER) & 0x40:
            return "XScale"
    wr(u, IER, iersave)
    if linux_size_fifo(u) == 64:
        return "U6 16550A"
    return "16550A"


def test_linux_autoconfig_detects_16550a():
    u, irq, sent = make()
    assert linux_autoconfig(u) == "16550A"
    assert sent == b""               # the probe's loopback bytes never reach the host
    assert not irq.level             # IER cleared at the end: line quiet


def test_size_fifo_counts_sixteen():
    u, _, _ = make()
    assert linux_size_fifo(u) == 16
    assert u.overruns == 256 - 16


def test_linux_startup_thre_test_passes():
    """serial8250_do_startup: clear FIFOs, read LSR/RX/IIR/MSR, then the UART_BUG_THRE test."""
    u, irq, _ = make()
    wr(u, FCR, 0x01)
    wr(u, FCR, 0x07)
    wr(u, FCR, 0)
    for off in (LSR, RX, IIR, MSR):
        rd(u, off)
    assert rd(u, LSR) != 0xFF
    wr(u, LCR, 0x03)
    assert rd(u, LSR) & 0x20          # wait_for_xmitr(THRE)
    wr(u, IER, 0x02)
    iir1 = rd(u, IIR)
    wr(u, IER, 0)
    wr(u, IER, 0x02)
    iir = rd(u, IIR)
    wr(u, IER, 0)
    bug_thre = not (iir1 & 1) and (iir & 1)
    assert not bug_thre
    assert iir1 == 0x02 and iir == 0x02    # FIFOs were disabled: top bits 0
    # The UART_BUG_TXEN test: enabling THRI must interrupt at once.
    wr(u, IER, 0x02)
    lsr = rd(u, LSR)
    iir = rd(u, IIR)
    wr(u, IER, 0)
    assert not (lsr & 0x40 and iir & 0x01)


def test_scratch_register():
    u, _, _ = make()
    for v in (0xA5, 0x5A, 0x00, 0xFF):
        wr(u, SCR, v)
        assert rd(u, SCR) == v


def test_ier_keeps_only_low_nibble():
    u, _, _ = make()
    wr(u, IER, 0xFF)
    assert rd(u, IER) == 0x0F
    wr(u, IER, 0)
    assert rd(u, IER) == 0


def test_loopback_msr_mapping():
    u, _, _ = make()
    wr(u, MCR, 0x10 | 0x0A)           # LOOP | OUT2 | RTS
    assert rd(u, MSR) & 0xF0 == 0x90  # DCD | CTS
    wr(u, MCR, 0x10 | 0x05)           # LOOP | OUT1 | DTR
    assert rd(u, MSR) & 0xF0 == 0x60  # RI | DSR
    wr(u, MCR, 0x10)
    assert rd(u, MSR) & 0xF0 == 0x00
    wr(u, MCR, 0)
    assert rd(u, MSR) & 0xF0 == 0xB0  # back to the host lines: DCD | DSR | CTS


def test_msr_delta_bits_and_modem_interrupt():
    u, irq, _ = make()
    wr(u, MCR, 0x10 | 0x04)           # loopback, OUT1 -> RI on
    rd(u, MSR)                         # clear deltas
    wr(u, IER, 0x08)
    assert not irq.level
    wr(u, MCR, 0x10 | 0x02)           # RI off (trailing edge), CTS on
    assert irq.level
    assert rd(u, IIR) == 0x00
    msr = rd(u, MSR)
    assert msr & 0x0F == 0x01 | 0x04  # DCTS | TERI
    assert rd(u, MSR) & 0x0F == 0     # cleared by the read
    assert not irq.level


def test_loopback_transmit_comes_back():
    u, irq, sent = make()
    wr(u, MCR, 0x10)
    wr(u, RX, ord("x"))
    assert sent == b""
    assert rd(u, LSR) & 0x01
    assert rd(u, RX) == ord("x")
    assert not rd(u, LSR) & 0x01


def test_fcr_e7_reports_16550a_fifo_bits():
    u, _, _ = make()
    assert rd(u, IIR) == 0x01          # FIFOs off: no top bits
    wr(u, FCR, 0xE7)
    assert rd(u, IIR) == 0xC1          # FIFOs on, no interrupt; bit 5 (64-byte FIFO) not set
    wr(u, FCR, 0x00)
    assert rd(u, IIR) == 0x01


def test_divisor_latch_round_trip_and_does_not_touch_ier():
    u, _, sent = make()
    wr(u, IER, 0x05)
    wr(u, LCR, 0x83)
    wr(u, DLL, 0x01)
    wr(u, DLM, 0x02)
    assert rd(u, DLL) == 0x01 and rd(u, DLM) == 0x02
    assert sent == b""                 # DLL write is not a transmit
    wr(u, LCR, 0x03)
    assert rd(u, IER) == 0x05
    wr(u, LCR, 0x80)
    assert (rd(u, DLL), rd(u, DLM)) == (0x01, 0x02)


def test_thr_write_goes_out():
    u, _, sent = make()
    for ch in b"hi\n":
        assert rd(u, LSR) & 0x60 == 0x60
        wr(u, RX, ch)
    assert sent == b"hi\n"
    assert u.bytes_out == 3


def test_thre_interrupt_on_ier_enable_and_cleared_by_iir_read():
    u, irq, _ = make()
    assert not irq.level
    wr(u, IER, 0x02)
    assert irq.level
    assert rd(u, IIR) == 0x02
    assert not irq.level
    assert rd(u, IIR) == 0x01          # cleared, stays cleared
    wr(u, IER, 0x02)                   # no rising edge: nothing new
    assert not irq.level
    wr(u, RX, 0x41)                    # a transmit re-arms it
    assert irq.level
    wr(u, IER, 0)
    assert not irq.level
    wr(u, IER, 0x02)                   # rising edge re-arms it
    assert irq.level
    assert irq.edges == 3


def test_iir_read_does_not_clear_thre_when_something_else_is_reported():
    u, irq, _ = make()
    wr(u, IER, 0x03)
    u.feed(b"a")
    assert rd(u, IIR) == 0x04          # rx data outranks THRE (FIFO off: no timeout id)
    rd(u, RX)
    assert irq.level
    assert rd(u, IIR) == 0x02          # THRE was still latched
    assert not irq.level


def test_rx_interrupt_on_feed_and_cleared_when_drained():
    u, irq, _ = make()
    wr(u, FCR, 0x01 | 0x40)            # FIFO on, trigger level 4
    wr(u, IER, 0x01)
    assert not irq.level
    u.feed(b"abc")
    assert irq.level
    assert rd(u, IIR) == 0xCC          # below trigger: character timeout
    u.feed(b"d")
    assert rd(u, IIR) == 0xC4          # at trigger: received data available
    got = bytearray()
    while rd(u, LSR) & 0x01:
        got.append(rd(u, RX))
    assert got == b"abcd"
    assert not irq.level
    assert rd(u, IIR) == 0xC1
    assert u.bytes_in == 4


def test_rx_fifo_overrun_sets_oe_and_line_status_interrupt():
    u, irq, _ = make(rx_backlog=0)     # the bare chip
    wr(u, FCR, 0x07)
    assert u.rx_room == 16
    u.feed(bytes(range(20)))
    assert u.overruns == 4 and u.rx_room == 0
    wr(u, IER, 0x04)
    assert irq.level
    assert rd(u, IIR) == 0xC6
    lsr = rd(u, LSR)
    assert lsr & 0x03 == 0x03          # DR | OE
    assert not irq.level               # LSR read cleared OE
    assert rd(u, LSR) & 0x02 == 0
    got = [rd(u, RX) for _ in range(16)]
    assert got == list(range(16))      # FIFO mode: the late bytes were the ones lost


def test_overrun_without_fifo_overwrites_rbr():
    u, _, _ = make(rx_backlog=0)
    u.feed(b"ab")
    assert rd(u, LSR) & 0x03 == 0x03
    assert rd(u, RX) == ord("b")
    assert u.overruns == 1


def test_paste_longer_than_fifo_waits_in_backlog_in_order():
    u, irq, _ = make()
    wr(u, FCR, 0xC7)                   # FIFO on, trigger 14: what Linux programs
    wr(u, IER, 0x01)
    text = bytes(range(32, 127)) * 3
    u.feed(text)
    assert len(u.rx) == 16 and irq.level
    assert rd(u, IIR) == 0xC4
    got = bytearray()
    while rd(u, LSR) & 0x01:           # serial8250_rx_chars: read while DR
        got.append(rd(u, RX))
    assert got == text
    assert u.overruns == 0 and not rd(u, LSR) & 0x02
    assert not irq.level


def test_backlog_overflow_is_an_overrun():
    u, _, _ = make(rx_backlog=4)
    wr(u, FCR, 0x01)
    assert u.rx_room == 20
    u.feed(bytes(range(25)))
    assert u.overruns == 5 and u.rx_room == 0
    assert rd(u, LSR) & 0x02
    got = bytes(rd(u, RX) for _ in range(20))
    assert got == bytes(range(20))


def test_backlog_survives_fifo_clear_and_loopback():
    u, _, _ = make()
    wr(u, FCR, 0x01)
    u.feed(bytes(range(20)))
    wr(u, FCR, 0x07)                   # clears the 16 in the FIFO; the 4 waiting arrive
    assert [rd(u, RX) for _ in range(4)] == [16, 17, 18, 19]
    u.feed(bytes(range(40)))           # 16 in the FIFO, 24 waiting
    wr(u, MCR, 0x10)                   # loopback: the serial input is cut off
    wr(u, FCR, 0x07)
    assert not u.rx and len(u.backlog) == 24 and not rd(u, LSR) & 0x01
    wr(u, MCR, 0x00)                   # reconnected: the waiting input arrives
    assert [rd(u, RX) for _ in range(24)] == list(range(16, 40))
    assert not rd(u, LSR) & 0x01


def test_fcr_clear_rx():
    u, _, _ = make()
    wr(u, FCR, 0x01)
    u.feed(b"xyz")
    wr(u, FCR, 0x03)
    assert not rd(u, LSR) & 0x01


def test_feed_in_loopback_is_dropped():
    u, _, _ = make()
    wr(u, MCR, 0x10)
    u.feed(b"zz")
    assert u.rx_dropped == 2
    assert not rd(u, LSR) & 0x01


def test_wide_access_splits_into_bytes():
    u, _, _ = make()
    wr(u, SCR, 0x12)
    assert u.read(7, 2) == 0xFF12      # offset 8 is not ours
    u.write(3, 2, 0x0003)              # LCR = 3, MCR = 0
    assert rd(u, LCR) == 3


def test_irq_level_tracks_pending_conditions_exactly():
    # Guard against a model that never drives the line.
    u, irq, _ = make()
    wr(u, IER, 0x01)
    u.feed(b"q")
    assert irq.history == [True]
    rd(u, RX)
    assert irq.history == [True, False]


# --- fuzzing --------------------------------------------------------------------------------------

def expected_level(u):
    return bool(
        (u.ier & 0x04 and u.lsr & 0x1E)
        or (u.ier & 0x01 and u.lsr & 0x01)
        or (u.ier & 0x02 and u.thr_ipending)
        or (u.ier & 0x08 and u.msr & 0x0F))


ops = st.one_of(
    st.tuples(st.just("r"), st.integers(0, 7)),
    st.tuples(st.just("w"), st.integers(0, 7), st.integers(0, 255)),
    st.tuples(st.just("feed"), st.binary(max_size=24)),
    st.tuples(st.just("lines"), st.integers(0, 255)),
    st.tuples(st.just("iir")),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=80), st.sampled_from([0, 5, 4096]))
def test_fuzz_never_crashes_and_irq_matches_state(seq, backlog):
    u, irq, _ = make(rx_backlog=backlog)
    for op in seq:
        if op[0] == "r":
            assert 0 <= rd(u, op[1]) <= 255
        elif op[0] == "w":
            wr(u, op[1], op[2])
        elif op[0] == "feed":
            u.feed(op[1])
        elif op[0] == "lines":
            u.set_modem_lines(op[1])
        else:
            level = irq.level
            iir = rd(u, IIR)
            assert level == (not iir & 0x01)
            assert iir & 0x30 == 0
        assert irq.level == expected_level(u)
        assert len(u.rx) <= 16
        assert bool(u.lsr & 0x01) == bool(u.rx)
        assert len(u.backlog) <= backlog
        if u.backlog and not u.mcr & 0x10:
            assert len(u.rx) == (16 if u.fcr & 0x01 else 1)
