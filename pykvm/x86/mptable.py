"""The Intel MultiProcessor Specification table: how a PC without ACPI describes its CPUs and APICs.

Linux looks for an "MP floating pointer structure" in three places (arch/x86/kernel/mpparse.c,
find_smp_config): the first KiB of RAM, the last KiB below 640 KiB, and the BIOS ROM area
0xf0000-0xfffff. Without one it maps and checks every 16 bytes of those ranges (some 4,300
early_memremap calls, each a page-table update and a TLB flush: seconds when kernel code is emulated)
and then boots with no I/O APIC and a single CPU it "did not find". pykvm writes the structure at the
start of the EBDA (0x9fc00, the second place looked at), pointing to a configuration table right after
it that lists (MP spec 1.4, chapter 4):

- one processor per vCPU (local APIC id = vCPU index),
- an ISA bus, and a PCI bus when PCI devices need interrupt routes,
- the I/O APIC (KVM's in-kernel IOAPIC at 0xfec00000),
- one I/O interrupt entry per ISA IRQ 0-15, identity-mapped to IOAPIC pins 0-15 (KVM's default GSI
  routing sends GSI n to pin n), and one per PCI device INTx, level-triggered,
- the local interrupts: LINT0 as ExtINT (the 8259's output), LINT1 as NMI.

Only meaningful with KVM's in-kernel irqchip, which emulates the local APICs and the IOAPIC.
"""

from __future__ import annotations

from construct import Bytes, Const, Int8ul, Int16ul, Int32ul, Struct

from . import layout

MP_FLOATING = layout.EBDA_START          # 0x9fc00, 16-byte aligned as the spec requires
MP_TABLE = MP_FLOATING + 16
APIC_VERSION = 0x14                      # what KVM's local APIC reports (integrated APIC)
IOAPIC_VERSION = 0x11
IOAPIC_ID = 1                            # after the processors' APIC ids (vCPU 0 is 0)

# 4.1 MP Floating Pointer Structure (16 bytes)
FLOATING_POINTER = Struct(
    "signature" / Const(b"_MP_"),        # +0
    "table" / Int32ul,                   # +4   physical address of the configuration table
    "length" / Int8ul,                   # +8   in 16-byte units: 1
    "spec_rev" / Int8ul,                 # +9   4 = version 1.4
    "checksum" / Int8ul,                 # +10  all 16 bytes sum to 0
    "feature1" / Int8ul,                 # +11  0: a configuration table is present
    "feature2" / Int8ul,                 # +12  bit 7 IMCRP: 0, virtual wire mode
    "reserved" / Bytes(3),               # +13
)

# 4.2 MP Configuration Table Header (44 bytes)
TABLE_HEADER = Struct(
    "signature" / Const(b"PCMP"),        # +0
    "length" / Int16ul,                  # +4   header + entries
    "spec_rev" / Int8ul,                 # +6
    "checksum" / Int8ul,                 # +7
    "oem_id" / Bytes(8),                 # +8
    "product_id" / Bytes(12),            # +16
    "oem_table" / Int32ul,               # +28
    "oem_table_size" / Int16ul,          # +32
    "entry_count" / Int16ul,             # +34
    "lapic_address" / Int32ul,           # +36
    "ext_length" / Int16ul,              # +40
    "ext_checksum" / Int8ul,             # +42
    "reserved" / Int8ul,                 # +43
)

# 4.3 base table entries, identified by their first byte
PROCESSOR = Struct("type" / Const(0, Int8ul), "apic_id" / Int8ul, "apic_version" / Int8ul,
                   "flags" / Int8ul,          # bit 0 EN (usable), bit 1 BP (the boot processor)
                   "signature" / Int32ul, "features" / Int32ul, "reserved" / Bytes(8))
BUS = Struct("type" / Const(1, Int8ul), "bus_id" / Int8ul, "bus_type" / Bytes(6))
IOAPIC = Struct("type" / Const(2, Int8ul), "apic_id" / Int8ul, "version" / Int8ul,
                "flags" / Int8ul, "address" / Int32ul)
IO_INTERRUPT = Struct("type" / Const(3, Int8ul), "irq_type" / Int8ul, "flags" / Int16ul,
                      "bus_id" / Int8ul, "bus_irq" / Int8ul, "apic_id" / Int8ul, "pin" / Int8ul)
LOCAL_INTERRUPT = Struct("type" / Const(4, Int8ul), "irq_type" / Int8ul, "flags" / Int16ul,
                         "bus_id" / Int8ul, "bus_irq" / Int8ul, "apic_id" / Int8ul, "lint" / Int8ul)

INT, NMI, EXTINT = 0, 1, 3              # interrupt types (Table 4-10)
CONFORMS = 0x0                          # polarity and trigger "conform to the bus" (ISA: edge, high)
LEVEL_HIGH = 0x1 | (0x3 << 2)           # polarity active high (01), trigger level (11)
ISA_BUS, PCI_BUS = 0, 1
ALL_APICS = 0xff


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xff


def build(cpus: int = 1, pci_irqs: list[tuple[int, int, int]] = ()) -> tuple[int, bytes]:
    """The floating pointer and the configuration table: (address, bytes) to write at MP_FLOATING.

    `pci_irqs`: (slot, pin, irq) for each PCI device interrupt (pin 1 = INTA), routed level-triggered
    to IOAPIC pin `irq`."""
    entries = [PROCESSOR.build({"apic_id": i, "apic_version": APIC_VERSION,
                                "flags": 1 | (2 if i == 0 else 0),
                                "signature": 0x600, "features": 0x201,   # family 6; FPU, APIC
                                "reserved": bytes(8)}) for i in range(cpus)]
    entries.append(BUS.build({"bus_id": ISA_BUS, "bus_type": b"ISA   "}))
    if pci_irqs:
        entries.append(BUS.build({"bus_id": PCI_BUS, "bus_type": b"PCI   "}))
    entries.append(IOAPIC.build({"apic_id": IOAPIC_ID, "version": IOAPIC_VERSION, "flags": 1,
                                 "address": layout.IOAPIC_BASE}))
    pci_pins = {irq for _, _, irq in pci_irqs}
    for irq in range(16):
        if irq == 2 or irq in pci_pins:
            continue          # 2: the 8259 cascade, no device; PCI-owned lines are listed below
        entries.append(IO_INTERRUPT.build({"irq_type": INT, "flags": CONFORMS, "bus_id": ISA_BUS,
                                           "bus_irq": irq, "apic_id": IOAPIC_ID, "pin": irq}))
    for slot, pin, irq in pci_irqs:
        # A PCI source "IRQ" is (device number << 2) | (INTx - 1) (MP spec D.3).
        entries.append(IO_INTERRUPT.build({"irq_type": INT, "flags": LEVEL_HIGH, "bus_id": PCI_BUS,
                                           "bus_irq": (slot << 2) | (pin - 1),
                                           "apic_id": IOAPIC_ID, "pin": irq}))
    entries.append(LOCAL_INTERRUPT.build({"irq_type": EXTINT, "flags": CONFORMS, "bus_id": ISA_BUS,
                                          "bus_irq": 0, "apic_id": ALL_APICS, "lint": 0}))
    entries.append(LOCAL_INTERRUPT.build({"irq_type": NMI, "flags": CONFORMS, "bus_id": ISA_BUS,
                                          "bus_irq": 0, "apic_id": ALL_APICS, "lint": 1}))
    body = b"".join(entries)
    fields = {"length": TABLE_HEADER.sizeof() + len(body), "spec_rev": 4, "checksum": 0,
              "oem_id": b"PYKVM   ", "product_id": b"PYKVM PC    ", "oem_table": 0,
              "oem_table_size": 0, "entry_count": len(entries),
              "lapic_address": layout.LAPIC_BASE, "ext_length": 0, "ext_checksum": 0, "reserved": 0}
    table = TABLE_HEADER.build(fields) + body
    fields["checksum"] = _checksum(table)
    table = TABLE_HEADER.build(fields) + body

    fp = {"table": MP_TABLE, "length": 1, "spec_rev": 4, "checksum": 0, "feature1": 0,
          "feature2": 0, "reserved": bytes(3)}
    fp["checksum"] = _checksum(FLOATING_POINTER.build(fp))
    blob = FLOATING_POINTER.build(fp) + table
    if MP_FLOATING + len(blob) > 0xa0000:
        raise ValueError("the MP table does not fit below 640 KiB")
    return MP_FLOATING, blob
