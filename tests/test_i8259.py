"""The i8259A pair: Linux's init sequence, EOI forms, triggering, spurious IRQs, and a fuzzer."""

from hypothesis import given, settings, strategies as st

from pykvm.bus import Bus
from pykvm.devices.i8259 import I8259Pair


def linux_init(pic: I8259Pair, bus: Bus, master_mask=0xFB, slave_mask=0xFF, aeoi=False) -> None:
    """arch/x86/kernel/i8259.c: init_8259A, byte for byte."""
    bus.write(0x21, 1, 0xFF)
    bus.write(0xA1, 1, 0xFF)
    bus.write(0x20, 1, 0x11)           # ICW1: edge, cascade, ICW4
    bus.write(0x21, 1, 0x30)           # ICW2: ISA_IRQ_VECTOR(0)
    bus.write(0x21, 1, 1 << 2)         # ICW3: slave on IR2
    bus.write(0x21, 1, 0x03 if aeoi else 0x01)
    bus.write(0xA0, 1, 0x11)
    bus.write(0xA1, 1, 0x38)
    bus.write(0xA1, 1, 2)              # ICW3: slave id 2
    bus.write(0xA1, 1, 0x01)
    bus.write(0x21, 1, master_mask)
    bus.write(0xA1, 1, slave_mask)


def make(**kw):
    changes = []
    pic = I8259Pair(on_intr_change=changes.append)
    bus = Bus("pio")
    pic.register_on(bus)
    linux_init(pic, bus, **kw)
    return pic, bus, changes


def mask_and_ack(bus: Bus, irq: int) -> None:
    """Linux's mask_and_ack_8259A EOI part: specific EOI, and the cascade for a slave IRQ."""
    if irq & 8:
        bus.write(0xA0, 1, 0x60 + (irq & 7))
        bus.write(0x20, 1, 0x62)
    else:
        bus.write(0x20, 1, 0x60 + irq)


def test_probe_reads_back_the_mask():
    pic, bus, _ = make()
    bus.write(0x21, 1, 0xA5)
    assert bus.read(0x21, 1) == 0xA5


def test_every_irq_is_delivered_at_0x30_plus_irq():
    for irq in [0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]:
        pic, bus, changes = make(master_mask=0, slave_mask=0)
        assert not pic.pending()
        pic.pin(irq).pulse()
        assert pic.pending() and changes[-1] is True
        assert pic.acknowledge() == 0x30 + irq
        assert not pic.pending()
        isr_m = (1 << 2) if irq >= 8 else (1 << irq)
        bus.write(0x20, 1, 0x0B)
        assert bus.read(0x20, 1) == isr_m
        mask_and_ack(bus, irq)
        assert bus.read(0x20, 1) == 0
        bus.write(0xA0, 1, 0x0B)
        assert bus.read(0xA0, 1) == 0
        assert pic.spurious == 0


def test_masked_irq_waits_for_unmask():
    pic, bus, _ = make(master_mask=0xFF)
    pic.pin(4).pulse()
    assert not pic.pending()
    bus.write(0x20, 1, 0x0A)
    assert bus.read(0x20, 1) & 0x10          # IRR shows the latched request
    bus.write(0x21, 1, 0xEF)
    assert pic.pending()
    assert pic.acknowledge() == 0x34


def test_priority_and_nesting():
    pic, bus, _ = make(master_mask=0, slave_mask=0)
    pic.pin(4).pulse()
    pic.pin(1).pulse()
    assert pic.acknowledge() == 0x31          # IR1 beats IR4
    assert not pic.pending()                  # IR4 is lower than the in-service IR1
    pic.pin(0).pulse()
    assert pic.pending()                      # IR0 nests above IR1
    assert pic.acknowledge() == 0x30
    bus.write(0x20, 1, 0x20)                  # non-specific EOI clears the highest: IR0
    assert not pic.pending()
    bus.write(0x20, 1, 0x20)                  # then IR1
    assert pic.acknowledge() == 0x34


def test_slave_irq_blocked_by_higher_master_in_service():
    pic, bus, _ = make(master_mask=0, slave_mask=0)
    pic.pin(1).pulse()
    assert pic.acknowledge() == 0x31
    pic.pin(12).pulse()                       # via IR2: lower than IR1
    assert not pic.pending()
    mask_and_ack(bus, 1)
    assert pic.acknowledge() == 0x3C


def test_level_triggered_via_elcr_and_spurious_irq7():
    pic, bus, _ = make(master_mask=0, slave_mask=0)
    bus.write(0x4D0, 1, 0xFF)
    assert bus.read(0x4D0, 1) == 0xF8        # IRQ 0-2 cannot be level on a PIIX
    bus.write(0x4D1, 1, 0xFF)
    assert bus.read(0x4D1, 1) == 0xDE
    line = pic.pin(5)
    line.set_level(True)
    assert pic.pending()
    line.set_level(False)                     # the request vanishes before INTA
    assert not pic.pending()
    assert pic.acknowledge() == 0x37          # spurious IR7, ISR untouched
    assert pic.spurious == 1
    bus.write(0x20, 1, 0x0B)
    assert bus.read(0x20, 1) == 0
    # A level stays asserted: after EOI it is delivered again.
    line.set_level(True)
    assert pic.acknowledge() == 0x35
    mask_and_ack(bus, 5)
    assert pic.acknowledge() == 0x35


def test_host_sets_pci_irqs_level_triggered():
    pic, bus, _ = make(master_mask=0, slave_mask=0)
    pic.set_level_triggered(11)
    pic.set_level_triggered(0)                # IRQ 0 cannot be level on a PIIX
    assert bus.read(0x4D0, 2) == 0x0800
    line = pic.pin(11)
    line.set_level(True)
    assert pic.acknowledge() == 0x3B
    mask_and_ack(bus, 11)
    assert pic.acknowledge() == 0x3B          # still asserted: delivered again, no new edge


def test_slave_request_masked_before_inta_is_spurious():
    pic, bus, _ = make(master_mask=0, slave_mask=0)
    bus.write(0x4D1, 1, 0x08)                # IRQ 11 level
    pic.pin(11).set_level(True)
    assert pic.pending()
    bus.write(0xA1, 1, 0x08)                  # masked between INTR and INTA
    assert not pic.pending()                  # the cascade input follows the slave's INT
    assert pic.acknowledge() == 0x37
    for port in (0x20, 0xA0):
        bus.write(port, 1, 0x0B)
        assert bus.read(port, 1) == 0


def test_edge_needs_a_new_rising_edge_after_icw1():
    pic, bus, _ = make(master_mask=0)
    pic.pin(3).set_level(True)
    assert pic.acknowledge() == 0x33
    linux_init(pic, bus, master_mask=0)
    assert not pic.pending()                  # the line is still high, but no new edge
    pic.pin(3).set_level(False)
    pic.pin(3).set_level(True)
    assert pic.pending()


def test_auto_eoi_and_rotation():
    pic, bus, _ = make(master_mask=0, aeoi=True)
    pic.pin(6).pulse()
    assert pic.acknowledge() == 0x36
    bus.write(0x20, 1, 0x0B)
    assert bus.read(0x20, 1) == 0             # AEOI: nothing stays in service
    # Rotate in AEOI mode: the serviced level becomes the lowest priority.
    bus.write(0x20, 1, 0x80)
    pic.pin(3).pulse()
    assert pic.acknowledge() == 0x33
    pic.pin(3).pulse()
    pic.pin(5).pulse()
    assert pic.acknowledge() == 0x35          # after 3 comes 4, 5, ...: 5 beats 3 now


def test_set_priority_command():
    pic, bus, _ = make(master_mask=0)
    bus.write(0x20, 1, 0xC0 | 4)              # IR4 lowest, so IR5 highest
    pic.pin(0).pulse()
    pic.pin(5).pulse()
    assert pic.acknowledge() == 0x35


def test_special_mask_mode_lets_lower_priorities_in():
    pic, bus, _ = make(master_mask=0)
    pic.pin(1).pulse()
    assert pic.acknowledge() == 0x31
    pic.pin(6).pulse()
    assert not pic.pending()
    bus.write(0x21, 1, 0x02)                  # mask the in-service IR1
    bus.write(0x20, 1, 0x68)                  # OCW3: set special mask mode
    assert pic.pending()
    assert pic.acknowledge() == 0x36
    bus.write(0x20, 1, 0x48)                  # reset special mask mode
    assert not pic.pending()


def test_poll_mode():
    pic, bus, _ = make(master_mask=0)
    bus.write(0x20, 1, 0x0C)
    assert bus.read(0x20, 1) == 0             # nothing pending
    pic.pin(4).pulse()
    bus.write(0x20, 1, 0x0C)
    assert bus.read(0x21, 1) == 0x84          # either port answers a poll
    bus.write(0x20, 1, 0x0B)
    assert bus.read(0x20, 1) == 0x10          # the poll acknowledged IR4


def test_special_fully_nested_mode():
    pic, bus, _ = make(master_mask=0, slave_mask=0)
    bus.write(0x20, 1, 0x11)
    for v in (0x30, 0x04, 0x11):              # ICW4 with SFNM
        bus.write(0x21, 1, v)
    pic.pin(12).pulse()
    assert pic.acknowledge() == 0x3C
    pic.pin(9).pulse()                        # higher than 12 on the slave
    assert pic.pending()
    assert pic.acknowledge() == 0x39


def test_intr_callback_follows_changes():
    pic, bus, changes = make(master_mask=0)
    pic.pin(0).pulse()
    pic.acknowledge()
    assert changes[-2:] == [True, False]


ops = st.one_of(
    st.tuples(st.just("pin"), st.integers(0, 15), st.booleans()),
    st.tuples(st.just("write"), st.sampled_from([0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1]),
              st.integers(0, 255)),
    st.tuples(st.just("read"), st.sampled_from([0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1]),
              st.just(0)),
    st.tuples(st.just("ack"), st.just(0), st.just(0)),
)


@settings(max_examples=400, deadline=None)
@given(st.booleans(), st.lists(ops, max_size=60))
def test_fuzz_never_impossible_state(init_first, seq):
    changes = []
    pic = I8259Pair(on_intr_change=changes.append)
    bus = Bus("pio")
    pic.register_on(bus)
    if init_first:
        linux_init(pic, bus, master_mask=0, slave_mask=0)
    # Which ISR bits may legitimately be set: those an INTA (or poll) put there since the last ICW1.
    acked = [0, 0]
    for op, a, b in seq:
        if op == "pin":
            pic.pin(a).set_level(b)
        elif op == "write":
            bus.write(a, 1, b)
            if a in (0x20, 0xA0) and b & 0x10:
                acked[a == 0xA0] = 0
        elif op == "read":
            was_poll = a < 0x4D0 and pic.chips[a >= 0xA0].poll
            v = bus.read(a, 1)
            assert 0 <= v <= 0xFF
            if was_poll and v & 0x80:
                assert v & 0x78 == 0
                acked[a >= 0xA0] |= 1 << (v & 7)
        else:
            was_pending = pic.pending()
            spurious = pic.spurious
            vector = pic.acknowledge()
            master, slave = pic.chips
            if not was_pending:
                assert pic.spurious == spurious + 1
                assert vector & 7 == 7
            if pic.spurious == spurious:
                if vector & 0xF8 == slave.vector_base and vector & 0xF8 != master.vector_base:
                    acked[1] |= 1 << (vector & 7)
                    acked[0] |= 1 << 2
                else:
                    acked[0] |= 1 << (vector & 7)
                    acked[1] |= 1 << (vector & 7)   # the bases may coincide: allow either
                    if master.vector_base == slave.vector_base:
                        acked[0] |= 1 << 2            # could have been a slave IRQ
                        acked[1] |= 0xFF
            else:
                acked[0] |= 1 << 2                    # spurious IRQ 15 leaves IR2 in service
        for i, c in enumerate(pic.chips):
            assert 0 <= c.irr <= 0xFF and 0 <= c.isr <= 0xFF and 0 <= c.imr <= 0xFF
            assert c.isr & ~acked[i] == 0, f"chip {i}: ISR {c.isr:#x} without an INTA"
            assert c.elcr & ~c.elcr_mask == 0
            assert 0 <= c.lowest_priority <= 7
        # INTR is what the callback last said, and true only if an acknowledge would deliver.
        assert pic.intr == (changes[-1] if changes else False)
        master = pic.chips[0]
        assert pic.intr == (master.best_request(bool(master.icw4 & 0x10)) is not None)


def test_highest_priority_request_matches_the_datasheets_order_exhaustively():
    """_highest finds the winner by rotating the request byte (one step, no loop); every request
    byte at every rotation gives the IR the 8259A's priority walk gives: from the IR after the
    lowest-priority one, round to it [DS "Rotation"]."""
    from pykvm.devices.i8259 import _Chip
    chip = _Chip(elcr_mask=0xF8)
    for lowest in range(8):
        chip.lowest_priority = lowest
        for bits in range(256):
            walk = next((irq for irq in ((lowest + 1 + p) & 7 for p in range(8))
                         if bits & (1 << irq)), None)
            assert chip._highest(bits) == walk, (lowest, bits)
