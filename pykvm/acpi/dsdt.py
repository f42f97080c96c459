"""The DSDT: the part of the machine description that is byte code rather than a fixed layout.

In ASL (what `iasl -d` prints back for the bytes built here), pykvm's DSDT is:

    DefinitionBlock ("", "DSDT", 2, "PYKVM ", "PYKVMPC ", 1)
    {
        Scope (\\_SB)
        {
            Device (PCI0)                               // the host bridge at 0xcf8/0xcfc
            {
                Name (_HID, EisaId ("PNP0A03"))         // PCI bus
                Name (_UID, Zero)
                Name (_BBN, Zero)                       // base bus number
                Name (_CRS, ResourceTemplate () {       // what the bridge decodes for its children
                    WordBusNumber (... 0x00, 0xFF ...)
                    IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08)
                    WordIO (... 0x0000, 0x0CF7 ...)
                    WordIO (... 0x0D00, 0xFFFF ...)
                    DWordMemory (... PCI_MMIO_BASE, PCI_MMIO_END - 1 ...)
                })
                Name (_PRT, Package () {                // PCI interrupt routing (6.2.13)
                    Package () { 0x0002FFFF, Zero, Zero, 0x0A },   // slot 2 INTA -> GSI 10
                    ...
                })
            }
            Device (COM1) { Name (_HID, EisaId ("PNP0501")) Name (_UID, One)
                            Name (_CRS, ResourceTemplate () { IO (0x3F8, 8) IRQNoFlags () {4} }) }
            Device (RTC)  { Name (_HID, EisaId ("PNP0B00"))
                            Name (_CRS, ResourceTemplate () { IO (0x70, 2) IRQNoFlags () {8} }) }
        }
        Name (\\_S5, Package () { 5, 5, Zero, Zero })  // soft-off: SLP_TYP 5 in PM1a and PM1b
    }

Why these: Linux finds PCI through ACPI once ACPI is on (a PNP0A03 device with its windows in _CRS;
without one it does not scan bus 0 at all), takes PCI interrupt routes from _PRT instead of the MP
table, and offers `poweroff` through ACPI only when \\_S5 exists (drivers/acpi/sleep.c). COM1 and the
RTC are listed so the PNP layer knows who owns their ports and IRQs.

_PRT entries name a GSI directly (Source = Zero): such interrupts are level-triggered, active-low
(6.2.13). KVM's IOAPIC ignores polarity (`level = 1` on KVM_IRQ_LINE always means asserted, per
the KVM API documentation), so the MADT's overrides say the same and everybody agrees.
"""

from __future__ import annotations

from ..x86 import layout
from . import aml
from .tables import finish

DSDT_REVISION = 2               # 64-bit integers in the AML
SLP_TYP_S5 = 5                  # the value \_S5 tells the OS to put in PM1_CNT.SLP_TYP


def _pci_host_bridge(pci_irqs: list[tuple[int, int, int]]) -> bytes:
    crs = aml.resource_template(
        aml.word_bus_numbers(0x00, 0xFF),
        aml.io_port(layout.PORT_PCI_CONFIG, 8),
        aml.word_io(0x0000, layout.PORT_PCI_CONFIG - 1),
        aml.word_io(layout.PORT_PCI_CONFIG + 8, 0xFFFF),
        aml.dword_memory(layout.PCI_MMIO_BASE, layout.PCI_MMIO_END - 1),
    )
    # _PRT (6.2.13): Package { Address (slot << 16 | 0xFFFF: any function), Pin (0 = INTA),
    # Source (Zero: a GSI, not a link device), SourceIndex (the GSI) }.
    routes = [aml.package(aml.integer((slot << 16) | 0xFFFF), aml.integer(pin - 1),
                          aml.integer(0), aml.integer(irq))
              for slot, pin, irq in sorted(pci_irqs)]
    return aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A03")),
        aml.name("_UID", aml.integer(0)),
        aml.name("_BBN", aml.integer(0)),
        aml.name("_CRS", crs),
        aml.name("_PRT", aml.package(*routes)),
    )


def _isa_device(path: str, hid: str, port: int, length: int, irq: int, uid: int | None) -> bytes:
    terms = [aml.name("_HID", aml.eisa_id(hid))]
    if uid is not None:
        terms.append(aml.name("_UID", aml.integer(uid)))
    terms.append(aml.name("_CRS", aml.resource_template(aml.io_port(port, length),
                                                         aml.irq_no_flags(irq))))
    return aml.device(path, *terms)


def build_dsdt(pci_irqs: list[tuple[int, int, int]] = (), pci: bool = True) -> bytes:
    """The DSDT. `pci_irqs`: (slot, pin, gsi) for each PCI device interrupt (pin 1 = INTA)."""
    devices = []
    if pci:
        devices.append(_pci_host_bridge(list(pci_irqs)))
    devices.append(_isa_device("COM1", "PNP0501", layout.PORT_COM1, 8, layout.IRQ_COM1, 1))
    devices.append(_isa_device("RTC", "PNP0B00", layout.PORT_RTC, 2, layout.IRQ_RTC, None))
    body = aml.scope("\\_SB", *devices)
    # \_S5 (7.4.2.5): SLP_TYPa, SLP_TYPb, then two reserved values.
    body += aml.name("\\_S5", aml.package(aml.integer(SLP_TYP_S5), aml.integer(SLP_TYP_S5),
                                          aml.integer(0), aml.integer(0)))
    return finish(b"DSDT", DSDT_REVISION, body)
