"""I8042 unit tests: Linux's probe (drivers/input/serio/i8042.c) replayed against the model, and reset."""

from hypothesis import given, settings, strategies as st

from pykvm.devices.i8042 import I8042
from pykvm.irq import RecordingIrqLine

DATA, CMD = 0, 4
OBF, AUXDATA = 0x01, 0x20
CTR_KBDINT, CTR_AUXINT, CTR_KBDDIS, CTR_AUXDIS = 0x01, 0x02, 0x10, 0x20


class Controller:
    """What Linux's i8042_command() does, with its timeouts turned into test failures."""

    def __init__(self, **kw):
        self.resets = 0
        self.kbd = RecordingIrqLine()
        self.aux = RecordingIrqLine()
        self.dev = I8042(self._reset, kbd_irq=self.kbd, aux_irq=self.aux, **kw)

    def _reset(self):
        self.resets += 1

    def status(self):
        return self.dev.read(CMD, 1)

    def flush(self):
        n = 0
        while self.status() & OBF and n < 16:
            self.dev.read(DATA, 1)
            n += 1
        return n

    def command(self, cmd, params=(), nreplies=0, aux_loop=False):
        assert not self.status() & 0x02, "IBF stuck: Linux would spin in i8042_wait_write"
        self.dev.write(CMD, 1, cmd)
        for p in params:
            assert not self.status() & 0x02
            self.dev.write(DATA, 1, p)
        out = []
        for _ in range(nreplies):
            st_ = self.status()
            assert st_ & OBF, "no reply: Linux would time out in i8042_wait_read"
            if aux_loop:
                assert st_ & AUXDATA, "auxerr"
            out.append(self.dev.read(DATA, 1))
        return out


def test_status_is_not_floating_bus():
    c = Controller()
    assert c.status() != 0xFF
    assert c.flush() == 0


def test_linux_probe_sequence():
    c = Controller()
    # i8042_controller_check + selftest
    assert c.flush() < 16
    assert c.command(0xAA, nreplies=1) == [0x55]
    # i8042_controller_init: read CTR until two reads agree, then write it back modified
    a = c.command(0x20, nreplies=1)[0]
    b = c.command(0x20, nreplies=1)[0]
    assert a == b
    ctr = (a & ~CTR_KBDINT) | CTR_KBDDIS
    c.command(0x60, [ctr])
    assert c.command(0x20, nreplies=1) == [ctr]
    # i8042_check_mux: three AUX loop bytes; a plain controller echoes all of them (no MUX)
    assert c.command(0xD3, [0xF0], 1, aux_loop=True) == [0xF0]
    assert c.command(0xD3, [0x56], 1, aux_loop=True) == [0x56]
    assert c.command(0xD3, [0xA4], 1, aux_loop=True) == [0xA4]
    # i8042_check_aux
    assert c.flush() == 0
    assert c.command(0xD3, [0x5A], 1, aux_loop=True) == [0x5A]
    assert c.command(0xA9, nreplies=1) == [0x00]
    c.command(0xA7)
    assert c.command(0x20, nreplies=1)[0] & CTR_AUXDIS
    c.command(0xA8)
    assert not c.command(0x20, nreplies=1)[0] & CTR_AUXDIS
    # AUX IRQ delivery test: enable AUX interrupts, loop a byte, IRQ 12 must rise
    ctr = c.command(0x20, nreplies=1)[0]
    c.command(0x60, [(ctr | CTR_AUXINT) & ~CTR_AUXDIS])
    edges = c.aux.edges
    c.dev.write(CMD, 1, 0xD3)
    c.dev.write(DATA, 1, 0xA5)
    assert c.aux.edges == edges + 1 and c.aux.level
    assert not c.kbd.level
    assert c.dev.read(DATA, 1) == 0xA5
    assert not c.aux.level
    # keyboard interface test, enable
    assert c.command(0xAB, nreplies=1) == [0x00]
    c.command(0xAE)
    assert not c.command(0x20, nreplies=1)[0] & CTR_KBDDIS
    assert c.resets == 0


def test_keyboard_bytes_are_nakked_fast():
    c = Controller()
    c.command(0x60, [CTR_KBDINT])
    c.dev.write(DATA, 1, 0xF2)          # atkbd: GETID
    assert c.kbd.level
    st_ = c.status()
    assert st_ & OBF and not st_ & AUXDATA
    assert c.dev.read(DATA, 1) == 0xFE
    assert not c.kbd.level
    c.command(0xD4, [0xFF])             # psmouse: reset, via "write to AUX device"
    assert c.status() & AUXDATA
    assert c.dev.read(DATA, 1) == 0xFE


def test_kbd_irq_gated_by_command_byte():
    c = Controller()
    c.command(0x60, [0])
    c.command(0xD2, [0x1C])
    assert c.status() & OBF and not c.kbd.level
    c.command(0x60, [CTR_KBDINT])       # the queued 0x1c is still at the head
    assert c.kbd.level
    assert c.dev.read(DATA, 1) == 0x1C
    assert not c.kbd.level


def test_fe_pulses_reset():
    c = Controller()
    c.dev.write(CMD, 1, 0xFE)
    assert c.resets == 1 and c.dev.resets == 1
    c.dev.write(CMD, 1, 0xFF)           # pulse nothing
    c.dev.write(CMD, 1, 0xFD)           # pulse bit 1 only (A20): no reset
    assert c.resets == 1


def test_output_port_write_with_reset_low_resets():
    c = Controller()
    assert c.command(0xD0, nreplies=1)[0] & 0x03 == 0x03
    c.command(0xD1, [0xDF])             # A20 on, reset high: nothing happens
    assert c.resets == 0
    c.command(0xD1, [0xDE])
    assert c.resets == 1


def test_ram_bytes():
    c = Controller()
    c.command(0x65, [0x42])
    assert c.command(0x25, nreplies=1) == [0x42]


def test_stray_offsets():
    c = Controller()
    assert c.dev.read(1, 1) == 0xFF
    c.dev.write(2, 1, 0)
    assert c.dev.stray_accesses == 2


def test_unknown_command_counted_not_fatal():
    c = Controller()
    c.dev.write(CMD, 1, 0xC8)
    assert c.dev.unknown_commands == 1
    assert c.status() != 0xFF


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["r", "w"]), st.integers(0, 4), st.integers(0, 255)),
                max_size=60))
def test_fuzz(seq):
    c = Controller()
    for kind, off, val in seq:
        if kind == "r":
            assert 0 <= c.dev.read(off, 1) <= 255
        else:
            c.dev.write(off, 1, val)
        st_ = c.status()
        assert st_ != 0xFF and not st_ & 0x02
        head_kbd = bool(st_ & OBF) and not st_ & AUXDATA
        head_aux = bool(st_ & OBF) and bool(st_ & AUXDATA)
        assert c.kbd.level == (head_kbd and bool(c.dev.ctr & CTR_KBDINT))
        assert c.aux.level == (head_aux and bool(c.dev.ctr & CTR_AUXINT))
    assert c.flush() <= 16
