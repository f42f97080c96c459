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
            Device (VGEN)                               // VM generation ID (pykvm.devices.vmgenid)
            {
                Name (_HID, "PYKVVGID")
                Name (_CID, "VM_GEN_COUNTER")
                Name (_DDN, "VM_GEN_COUNTER")
                Method (ADDR, 0, NotSerialized) { Return (Package () { GUID_ADDRESS, Zero }) }
            }
        }
        Scope (\\_GPE)
        {
            Method (_E00, 0, NotSerialized) { Notify (\\_SB.VGEN, 0x80) }   // GPE 0: new ID
        }
        Name (\\_S5, Package () { 5, 5, Zero, Zero })  // soft-off: SLP_TYP 5 in PM1a and PM1b
    }

Why these: Linux finds PCI through ACPI once ACPI is on (a PNP0A03 device with its windows in _CRS;
without one it does not scan bus 0 at all), takes PCI interrupt routes from _PRT instead of the MP
table, and offers `poweroff` through ACPI only when \\_S5 exists (drivers/acpi/sleep.c). COM1 and the
RTC are listed so the PNP layer knows who owns their ports and IRQs. VGEN and \\_GPE._E00 are the
VM generation ID device and the event that announces a new generation (`_vmgenid` says how).

_PRT entries name a GSI directly (Source = Zero): such interrupts are level-triggered, active-low
(6.2.13). KVM's IOAPIC ignores polarity (`level = 1` on KVM_IRQ_LINE always means asserted, per
the KVM API documentation), so the MADT's overrides say the same and everybody agrees.
"""

from __future__ import annotations

from ..x86 import layout
from . import aml

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


VMGENID_GPE = 0                 # the general-purpose event (GPE0 block bit) of a new generation
VMGENID_NOTIFY = 0x80           # the Notify value the spec gives for "the generation ID changed"


def _vmgenid(guid_address: int) -> tuple[bytes, bytes]:
    """The VM generation ID device and the GPE method that announces a new generation.

    Microsoft's "Virtual Machine Generation ID" specification (2012) defines the device: _CID
    "VM_Gen_Counter" (Linux 6.1's drivers/virt/vmgenid.c matches "VM_GEN_COUNTER" and "VMGENCTR",
    compared case-sensitively, so the upper-case form, as QEMU's hw/acpi/vmgenid.c also gives), an
    _HID of the VMM's choosing, and a method ADDR returning a Package of two integers, the low and
    high 32 bits of the guest-physical address of the 16-byte ID. When the ID changes, the VMM
    "generates an ACPI notification" 0x80 on the device: on a full-hardware ACPI PC that is a GPE,
    whose _Exx method executes the Notify (QEMU uses GPE 5 on its PIIX/ICH9 blocks; we have one
    event, GPE 0). Linux's driver then copies the new ID and calls add_vmfork_randomness(), which
    reseeds the CRNG at once (drivers/char/random.c)."""
    device = aml.device(
        "VGEN",
        aml.name("_HID", aml.string("PYKVVGID")),
        aml.name("_CID", aml.string("VM_GEN_COUNTER")),
        aml.name("_DDN", aml.string("VM_GEN_COUNTER")),
        aml.method("ADDR", aml.return_(aml.package(aml.integer(guid_address & 0xFFFFFFFF),
                                                   aml.integer(guid_address >> 32)))),
    )
    gpe = aml.scope("\\_GPE", aml.method(f"_E{VMGENID_GPE:02X}",
                                          aml.notify("\\_SB.VGEN", VMGENID_NOTIFY)))
    return device, gpe


def build_dsdt(pci_irqs: list[tuple[int, int, int]] = (), pci: bool = True,
               vmgenid: int | None = None) -> bytes:
    """The DSDT. `pci_irqs`: (slot, pin, gsi) for each PCI device interrupt (pin 1 = INTA).
    `vmgenid`: the guest-physical address of the VM generation ID, or None for no such device."""
    devices = []
    if pci:
        devices.append(_pci_host_bridge(list(pci_irqs)))
    devices.append(_isa_device("COM1", "PNP0501", layout.PORT_COM1, 8, layout.IRQ_COM1, 1))
    devices.append(_isa_device("RTC", "PNP0B00", layout.PORT_RTC, 2, layout.IRQ_RTC, None))
    gpe = b""
    if vmgenid is not None:
        device, gpe = _vmgenid(vmgenid)
        devices.append(device)
    body = aml.scope("\\_SB", *devices) + gpe
    # \_S5 (7.4.2.5): SLP_TYPa, SLP_TYPb, then two reserved values.
    from .tables import finish      # construct: loaded when tables are built, not on restore
    body += aml.name("\\_S5", aml.package(aml.integer(SLP_TYP_S5), aml.integer(SLP_TYP_S5),
                                          aml.integer(0), aml.integer(0)))
    return finish(b"DSDT", DSDT_REVISION, body)
