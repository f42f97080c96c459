"""The ACPI PM registers (pykvm.devices.acpi_pm), driven at offsets as a bus would, no /dev/kvm."""

import threading

from hypothesis import given, strategies as st

from pykvm.devices import acpi_pm as pm
from pykvm.irq import RecordingIrqLine


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def make(**kw):
    events = []
    sci = RecordingIrqLine()
    clock = Clock()
    dev = pm.AcpiPm(on_poweroff=lambda: events.append("poweroff"),
                    on_reset=lambda: events.append("reset"), sci=sci, clock=clock, **kw)
    return dev, events, sci, clock


def slp(typ, enable=True):
    return (typ << pm.SLP_TYP_SHIFT) | (pm.SLP_EN if enable else 0) | pm.SCI_EN


def test_linux_poweroff_sequence():
    """acpi_hw_legacy_sleep: clear WAK_STS, write SLP_TYP, then SLP_TYP|SLP_EN."""
    dev, events, _, _ = make()
    dev.write(pm.PM1_STS, 2, pm.WAK_STS)
    ctl = dev.read(pm.PM1_CNT, 2)
    assert ctl & pm.SCI_EN                        # always in ACPI mode (SMI_CMD is 0)
    dev.write(pm.PM1_CNT, 2, slp(5, enable=False))
    assert events == []
    assert dev.read(pm.PM1_CNT, 2) == slp(5, enable=False)
    dev.write(pm.PM1_CNT, 2, slp(5))
    assert events == ["poweroff"]
    assert not dev.read(pm.PM1_CNT, 2) & pm.SLP_EN     # SLP_EN is write-only


def test_other_sleep_types_do_not_power_off():
    dev, events, _, _ = make()
    for typ in (0, 1, 3, 4, 7):
        dev.write(pm.PM1_CNT, 2, slp(typ))
    assert events == [] and dev.sleep_requests == [0, 1, 3, 4, 7]


def test_s5_type_comes_from_the_dsdt_value():
    dev, events, _, _ = make(slp_typ_s5=0)
    dev.write(pm.PM1_CNT, 2, slp(5))
    assert events == []
    dev.write(pm.PM1_CNT, 2, slp(0))
    assert events == ["poweroff"]


@given(st.integers(0, 0xFFFF), st.sampled_from([1, 2]))
def test_control_written_bytewise_or_wordwise_acts_the_same(value, size):
    """ACPICA writes PM1_CNT as a word; a guest may use two byte writes. SLP_EN is in the high
    byte, so a byte split powers off when (and only when) the high byte arrives with it set."""
    dev, events, _, _ = make()
    if size == 2:
        dev.write(pm.PM1_CNT, 2, value)
    else:
        dev.write(pm.PM1_CNT, 1, value & 0xFF)
        dev.write(pm.PM1_CNT + 1, 1, value >> 8)
    expect = value & pm.SLP_EN and (value & pm.SLP_TYP_MASK) >> pm.SLP_TYP_SHIFT == 5
    assert events == (["poweroff"] if expect else [])
    assert dev.read(pm.PM1_CNT, 2) == (value & ~pm.SLP_EN & 0xFFFF) | pm.SCI_EN


def test_reset_register():
    dev, events, _, _ = make()
    dev.write(pm.RESET, 1, 0x01)
    assert events == [] and dev.ignored_writes == 1
    dev.write(pm.RESET, 1, pm.RESET_VALUE)
    assert events == ["reset"]
    assert dev.read(pm.RESET, 1) == 0


def test_pm_timer_counts_at_3_579545_mhz_and_wraps_at_32_bits():
    dev, _, _, clock = make()
    start = dev.read(pm.PM_TMR, 4)
    clock.t += 1.0
    assert dev.read(pm.PM_TMR, 4) - start == pm.PM_TIMER_HZ
    clock.t += (1 << 32) / pm.PM_TIMER_HZ          # one full turn of the 32-bit counter
    assert abs(dev.read(pm.PM_TMR, 4) - (start + pm.PM_TIMER_HZ)) <= 1
    dev.write(pm.PM_TMR, 4, 0)                      # read-only: ignored
    assert dev.read(pm.PM_TMR, 4) != 0
    # a 4-byte read equals its bytes read one by one (at one instant)
    whole = dev.read(pm.PM_TMR, 4)
    assert whole == sum(dev.read(pm.PM_TMR + i, 1) << (8 * i) for i in range(4))


def test_power_button_raises_the_sci_only_when_enabled_and_status_clears_by_writing_one():
    dev, _, sci, _ = make()
    dev.press_power_button()
    assert dev.read(pm.PM1_STS, 2) & pm.PWRBTN_STS and sci.history == []
    dev.write(pm.PM1_EN, 2, pm.PWRBTN_EN)          # the OS enables the event: pending -> SCI
    assert sci.level and sci.history == [True]
    dev.write(pm.PM1_STS, 2, 0)                     # writing 0 clears nothing
    assert sci.level
    dev.write(pm.PM1_STS, 2, pm.PWRBTN_STS)         # the OS acknowledges
    assert not sci.level and sci.history == [True, False]
    assert dev.read(pm.PM1_STS, 2) == 0
    # the event block read as one dword: status low, enable high
    assert dev.read(pm.PM1_STS, 4) == pm.PWRBTN_EN << 16


def test_accesses_from_several_vcpu_threads_keep_the_sci_consistent():
    dev, _, sci, _ = make()
    dev.write(pm.PM1_EN, 2, pm.PWRBTN_EN)

    def press_and_ack():
        for _ in range(500):
            dev.press_power_button()
            dev.write(pm.PM1_STS, 2, pm.PWRBTN_STS)

    threads = [threading.Thread(target=press_and_ack) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # After the last acknowledgement the line is low, and it never went up twice in a row.
    assert not sci.level and dev.read(pm.PM1_STS, 2) == 0
    assert all(a != b for a, b in zip(sci.history, sci.history[1:]))


# ---- the GPE0 block (ACPI 6.5, 4.8.4.1) ----

def test_a_gpe_raises_the_sci_only_when_enabled_and_until_cleared():
    """ACPICA's edge-GPE sequence: the event latches status; the SCI fires once the OS enabled
    the bit; the handler clears the status (write 1) and the SCI drops."""
    dev, _, sci, _ = make()
    dev.raise_gpe(0)
    assert dev.read(pm.GPE0_STS, 2) == 0x0001 and not sci.level   # latched, not enabled
    dev.write(pm.GPE0_EN, 1, 0x01)                                  # ACPICA writes a byte
    assert sci.level and dev.read(pm.GPE0_EN, 2) == 0x0001
    dev.write(pm.GPE0_STS, 1, 0x01)
    assert dev.read(pm.GPE0_STS, 2) == 0 and not sci.level
    dev.raise_gpe(9)                                                # second status byte
    dev.write(pm.GPE0_EN + 1, 1, 0x02)
    assert dev.read(pm.GPE0_STS + 1, 1) == 0x02 and sci.level
    dev.write(pm.GPE0_EN + 1, 1, 0)                                 # disabled: line drops,
    assert not sci.level and dev.read(pm.GPE0_STS, 2) == 1 << 9    # status stays latched


def test_gpe_and_pm1_events_share_the_one_sci():
    dev, _, sci, _ = make()
    dev.write(pm.PM1_EN, 2, pm.PWRBTN_EN)
    dev.write(pm.GPE0_EN, 2, 0xFFFF)
    dev.press_power_button()
    dev.raise_gpe(3)
    dev.write(pm.PM1_STS, 2, pm.PWRBTN_STS)
    assert sci.level                                   # the GPE still holds it
    dev.write(pm.GPE0_STS, 2, 1 << 3)
    assert not sci.level


def test_gpe_numbers_outside_the_block_are_refused():
    dev, _, _, _ = make()
    for n in (-1, pm.GPE_COUNT):
        try:
            dev.raise_gpe(n)
        except ValueError:
            continue
        raise AssertionError(f"GPE {n} accepted")


@given(st.lists(st.tuples(st.sampled_from([pm.GPE0_STS, pm.GPE0_EN]), st.integers(0, 0xFFFF))),
       st.lists(st.integers(0, pm.GPE_COUNT - 1)))
def test_the_sci_is_always_status_and_enable(writes, raised):
    dev, _, sci, _ = make()
    for n in raised:
        dev.raise_gpe(n)
    for reg, value in writes:
        dev.write(reg, 2, value)
        assert sci.level == bool(dev.read(pm.GPE0_STS, 2) & dev.read(pm.GPE0_EN, 2))
