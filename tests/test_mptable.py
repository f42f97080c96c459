"""The MP table pykvm gives Linux (Intel MultiProcessor Specification 1.4)."""

from pykvm.x86 import layout, mptable


def parse(blob: bytes):
    fp = mptable.FLOATING_POINTER.parse(blob[:16])
    table = blob[fp.table - mptable.MP_FLOATING:]
    header = mptable.TABLE_HEADER.parse(table)
    return fp, header, table[:header.length]


def walk(table: bytes, header) -> list[tuple[int, object]]:
    """(type, parsed entry) for each base-table entry, in order."""
    parsers = {0: mptable.PROCESSOR, 1: mptable.BUS, 2: mptable.IOAPIC, 3: mptable.IO_INTERRUPT,
               4: mptable.LOCAL_INTERRUPT}
    pos, out = mptable.TABLE_HEADER.sizeof(), []
    for _ in range(header.entry_count):
        parser = parsers[table[pos]]
        out.append((table[pos], parser.parse(table[pos:])))
        pos += parser.sizeof()
    assert pos == header.length
    return out


def test_checksums_and_pointers():
    gpa, blob = mptable.build(cpus=2)
    assert gpa == layout.EBDA_START and gpa % 16 == 0
    fp, header, table = parse(blob)
    assert sum(blob[:16]) % 256 == 0
    assert sum(table) % 256 == 0
    assert fp.table == gpa + 16 and fp.spec_rev == 4
    assert header.lapic_address == layout.LAPIC_BASE


def test_entries_describe_cpus_ioapic_and_isa_irqs():
    _, blob = mptable.build(cpus=2)
    _, header, table = parse(blob)
    entries = walk(table, header)
    kinds = [k for k, _ in entries]
    assert kinds.count(0) == 2 and kinds.count(2) == 1 and kinds.count(4) == 2
    cpus = [e for k, e in entries if k == 0]
    assert all(c.flags & 1 for c in cpus) and [c.flags & 2 for c in cpus] == [2, 0]  # one BSP
    isa = {e.bus_irq: e.pin for k, e in entries if k == 3}
    assert isa == {i: i for i in range(16) if i != 2}     # KVM routes GSI n to IOAPIC pin n


def test_pci_interrupts_are_level_triggered_routes():
    _, blob = mptable.build(cpus=1, pci_irqs=[(3, 1, 11)])
    _, header, table = parse(blob)
    entries = walk(table, header)
    assert any(k == 1 and e.bus_type == b"PCI   " for k, e in entries)
    pci = [e for k, e in entries if k == 3 and e.bus_id == mptable.PCI_BUS]
    assert len(pci) == 1 and pci[0].bus_irq == 3 << 2 and pci[0].pin == 11
    assert pci[0].flags == mptable.LEVEL_HIGH
    assert 11 not in {e.bus_irq for k, e in entries if k == 3 and e.bus_id == mptable.ISA_BUS}
