"""Putting ACPI on a Machine: the PM registers on the port bus, the tables in guest memory.

    platform = install_acpi(machine, cpus=2, pci_irqs=[(slot, pin, irq), ...])
    load_linux(..., acpi_rsdp=platform.tables.rsdp)

The guest's power-off (PM1a_CNT with \\_S5's SLP_TYP and SLP_EN) becomes a "poweroff" stop with
status 0; its write of the reset value to the FADT's reset register becomes a "reset" stop.
`platform.vmgenid.new_generation()` gives a restored clone a new VM generation ID and raises the
GPE that tells the guest (pykvm.devices.vmgenid).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..devices.acpi_pm import SIZE, AcpiPm
from ..devices.vmgenid import VmGenId
from ..x86 import layout
from . import AcpiTables, SLP_TYP_S5, build, vmgenid_address
from .dsdt import VMGENID_GPE


@dataclass
class AcpiPlatform:
    tables: AcpiTables | None   # None for a restored VM: its tables are in its RAM already
    pm: AcpiPm
    vmgenid: VmGenId


def install_acpi(machine, *, cpus: int, pci_irqs: list[tuple[int, int, int]] = (),
                 pci: bool = True, write_tables: bool = True) -> AcpiPlatform:
    """The PM registers and the VM generation ID device on the machine, and (write_tables) the
    tables and a first generation ID in its RAM."""
    from ..stop import Stop, StopReason

    def poweroff() -> None:
        machine.request_stop(Stop(StopReason.POWEROFF, 0, "the guest powered off through ACPI "
                                                 "(PM1a_CNT: SLP_TYP S5, SLP_EN)"))

    def reset() -> None:
        machine.request_stop(Stop(StopReason.RESET, message="the guest reset the machine "
                                                   "(the FADT's reset register)"))

    # The SCI is level-triggered (the MADT says so for the IOAPIC; a PC BIOS sets the ELCR bit
    # for the 8259s): a plain held line, not an irqfd edge.
    pm = AcpiPm(on_poweroff=poweroff, on_reset=reset, sci=machine.irq_line(layout.IRQ_SCI),
                slp_typ_s5=SLP_TYP_S5)
    machine.add_pio(layout.PORT_ACPI_PM, SIZE, pm, "ACPI PM1a/PM timer/reset")
    from ..virtio.attach import set_level_triggered
    set_level_triggered(machine, layout.IRQ_SCI)
    tables = build(cpus=cpus, pci_irqs=pci_irqs, pci=pci) if write_tables else None
    vmgenid = VmGenId(machine.mem, tables.vmgenid if tables else vmgenid_address(),
                      notify=lambda: pm.raise_gpe(VMGENID_GPE))
    if tables is not None:
        machine.mem.write(tables.base, tables.blob)
        vmgenid.write_first()
    return AcpiPlatform(tables, pm, vmgenid)
