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


# ---- the same table read by byte offsets from the MP specification 1.4 (chapter 4), with
# struct.unpack_from and nothing from pykvm.x86.mptable: an independent oracle for the layout ----

import struct as _st  # noqa: E402

ENTRY_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}     # Table 4-3: processor 20 bytes, the rest 8


def spec_read(blob: bytes, gpa: int):
    """(floating pointer fields, header fields, entries) as the spec lays them out."""
    sig, table_ptr, length, rev, _cksum, f1 = _st.unpack_from("<4sIBBBB", blob, 0)  # 4.1
    assert sig == b"_MP_" and length == 1                  # length in 16-byte paragraphs
    table = blob[table_ptr - gpa:]
    (hsig, base_len, hrev, _hck, oem, product, oem_ptr, oem_size, count, lapic,
     ext_len, _ext_ck) = _st.unpack_from("<4sHBB8s12sIHHIHB", table, 0)              # 4.2
    assert hsig == b"PCMP"
    entries, pos = [], 44                                   # the base header is 44 bytes
    for _ in range(count):
        kind = table[pos]
        size = ENTRY_SIZES[kind]
        raw = table[pos:pos + size]
        if kind == 0:                                       # 4.3.1 processor
            _, apic_id, ver, flags, sig_, feat = _st.unpack_from("<BBBBII", raw)
            entries.append(("cpu", apic_id, flags))
        elif kind == 1:                                     # 4.3.2 bus
            entries.append(("bus", raw[1], raw[2:8]))
        elif kind == 2:                                     # 4.3.3 I/O APIC
            _, apic_id, ver, flags, addr = _st.unpack_from("<BBBBI", raw)
            entries.append(("ioapic", apic_id, flags, addr))
        else:                                               # 4.3.4 / 4.3.5 interrupts
            _, itype, flags, bus, bus_irq, dest, pin = _st.unpack_from("<BBHBBBB", raw)
            entries.append(("io" if kind == 3 else "local", itype, flags, bus, bus_irq, dest, pin))
        pos += size
    return (table_ptr, rev, f1), (base_len, hrev, lapic, ext_len), table[:base_len], entries, pos


def test_table_by_the_spec_offsets():
    gpa, blob = mptable.build(cpus=2, pci_irqs=[(3, 1, 11), (4, 2, 10)])
    (table_ptr, rev, f1), (base_len, hrev, lapic, ext_len), table, entries, end = \
        spec_read(blob, gpa)
    assert sum(blob[:16]) & 0xFF == 0 and sum(table) & 0xFF == 0        # both checksums
    assert rev == hrev == 4 and f1 == 0                   # 1.4; feature byte 1 = 0: a table follows
    assert end == base_len and ext_len == 0 and lapic == layout.LAPIC_BASE
    cpus = [e for e in entries if e[0] == "cpu"]
    assert [c[1] for c in cpus] == [0, 1]
    assert [c[2] & 3 for c in cpus] == [3, 1]               # EN on both, BP on the first only
    buses = {e[1]: e[2] for e in entries if e[0] == "bus"}
    assert sorted(buses.values()) == [b"ISA   ", b"PCI   "]
    isa = next(b for b, name in buses.items() if name == b"ISA   ")
    pci = next(b for b, name in buses.items() if name == b"PCI   ")
    (ioapic,) = [e for e in entries if e[0] == "ioapic"]
    assert ioapic[2] & 1 and ioapic[3] == layout.IOAPIC_BASE
    io = [e for e in entries if e[0] == "io"]
    # ISA IRQs 0-15 but the cascade and the PCI-owned lines, each on the same IOAPIC pin,
    # polarity and trigger "conform to the bus" (flags 0)
    isa_routes = {e[4]: e[6] for e in io if e[3] == isa}
    assert isa_routes == {i: i for i in range(16) if i not in (2, 10, 11)}
    assert all(e[2] == 0 and e[1] == 0 and e[5] == ioapic[1] for e in io if e[3] == isa)
    # PCI: source IRQ = device << 2 | (INTx - 1) (appendix D.3); polarity bits 0-1 = 01 (active
    # high, as KVM's IOAPIC expects a raised line), trigger bits 2-3 = 11 (level)
    pci_routes = {e[4]: (e[6], e[2] & 3, (e[2] >> 2) & 3) for e in io if e[3] == pci}
    assert pci_routes == {3 << 2 | 0: (11, 1, 3), 4 << 2 | 1: (10, 1, 3)}
    local = [e for e in entries if e[0] == "local"]
    assert [(e[1], e[6]) for e in local] == [(3, 0), (1, 1)]   # ExtINT on LINT0, NMI on LINT1
