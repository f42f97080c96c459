"""The VM generation ID device (pykvm.devices.vmgenid) on bytes-backed guest memory, no KVM, and
wired into the ACPI platform: the DSDT's ADDR names the bytes the device writes, and a new
generation raises GPE 0, which the guest enables."""

import pytest

from pykvm import acpi
from pykvm.acpi.dsdt import VMGENID_GPE
from pykvm.devices import acpi_pm as pm
from pykvm.devices.vmgenid import GUID_SIZE, VmGenId
from pykvm.irq import RecordingIrqLine
from pykvm.memory import GuestMemory
from pykvm.x86 import layout

GPA = layout.ACPI_TABLES + 0x30


def test_first_id_is_written_without_a_notification_and_each_clone_gets_a_new_one():
    mem = GuestMemory.for_test(1 << 20)
    notes = []
    dev = VmGenId(mem, GPA, notify=lambda: notes.append(1))
    first = dev.write_first()
    assert len(first) == GUID_SIZE and mem.read(GPA, GUID_SIZE) == first and notes == []
    seen = {first}
    for i in range(5):
        new = dev.new_generation()
        assert mem.read(GPA, GUID_SIZE) == new == dev.guid and new not in seen
        seen.add(new)
        assert len(notes) == i + 1 and dev.generations == i + 1
    assert mem.read(GPA - 1, 1) == b"\0" and mem.read(GPA + GUID_SIZE, 1) == b"\0"  # 16 bytes only


def test_a_new_generation_always_differs_even_from_a_repeating_entropy_source():
    """The driver reseeds only if the ID changed: a source that repeats itself is drawn again."""
    mem = GuestMemory.for_test(1 << 20)
    draws = iter([b"A" * 16, b"A" * 16, b"A" * 16, b"B" * 16])
    dev = VmGenId(mem, GPA, notify=lambda: None, entropy=lambda n: next(draws))
    dev.write_first()
    assert dev.new_generation() == b"B" * 16


@pytest.mark.parametrize("gpa", [GPA + 4, 0x1FFE, 4096 - 8])   # unaligned x2, across a page
def test_misplaced_ids_are_refused(gpa):
    mem = GuestMemory.for_test(1 << 20)
    with pytest.raises(ValueError):
        VmGenId(mem, gpa, notify=lambda: None)


def test_the_tables_place_the_id_where_the_dsdt_says_outside_ram_and_every_table():
    t = acpi.build(cpus=1)
    assert t.vmgenid % 16 == 0 and t.blob[t.vmgenid - t.base:][:GUID_SIZE] == bytes(GUID_SIZE)
    for name, addr in t.addresses.items():
        assert not addr <= t.vmgenid < addr + 36, name            # no table header overlaps it
    dsdt = t.blob[t.addresses["DSDT"] - t.base:]
    # ADDR's Package: DWordPrefix + the address (then Zero for the high half)
    assert b"ADDR" in dsdt and b"\x0c" + t.vmgenid.to_bytes(4, "little") + b"\x00" in dsdt
    assert acpi.build(cpus=1, vmgenid=False).vmgenid is None


def test_a_new_generation_raises_gpe0_and_the_sci_once_the_guest_enabled_it():
    mem = GuestMemory.for_test(1 << 20)
    sci = RecordingIrqLine()
    power = pm.AcpiPm(on_poweroff=lambda: None, on_reset=lambda: None, sci=sci)
    dev = VmGenId(mem, GPA, notify=lambda: power.raise_gpe(VMGENID_GPE))
    dev.write_first()
    power.write(pm.GPE0_EN, 1, 1 << VMGENID_GPE)      # what ACPICA does for a GPE with an _E00
    dev.new_generation()
    assert sci.level and power.read(pm.GPE0_STS, 2) == 1 << VMGENID_GPE
    power.write(pm.GPE0_STS, 1, 1 << VMGENID_GPE)     # the handler clears the edge GPE
    assert not sci.level
