"""ACPI tables: how pykvm describes its PC to an ACPI operating system (ACPI 6.5).

An OS finds the tables in stages:

1. the **RSDP** (5.2.5), a 36-byte pointer: at layout.ACPI_TABLES (0xe0000), where a search of
   the BIOS area finds it, and also handed over directly (the zero page's `acpi_rsdp_addr`);
2. the **XSDT** (5.2.8): the 64-bit addresses of the other tables;
3. the **FADT** (5.2.9, signature "FACP"): fixed hardware - where the PM1a event/control
   registers, the PM timer and the reset register are (pykvm.devices.acpi_pm), the SCI's IRQ, the
   IA-PC boot flags (legacy devices, an i8042) - and pointers to the **FACS** (5.2.10) and the
   **DSDT** (5.2.11.1, AML byte code: the PCI host bridge and its interrupt routing, COM1, the RTC,
   the \\_S5 package that makes power-off possible, and the VM generation ID device with the GPE
   method that announces a new generation; pykvm.acpi.dsdt);
4. the **MADT** (5.2.12, signature "APIC"): one local APIC per vCPU, KVM's IOAPIC, interrupt
   source overrides, and the NMI wiring of LINT1.

**Which ACPI model.** ACPI offers two: the full fixed-hardware PC model (PM1 blocks, PM timer, SCI,
optional legacy devices) and the *hardware-reduced* model (5.2.9, HW_REDUCED_ACPI; no fixed
hardware, sleep and reset through FADT registers or GED devices), which Firecracker and
cloud-hypervisor use for their microVMs without legacy devices. pykvm is a PC: it has the 8259s
and the PIT (in KVM or in Python), the i8042, the CMOS RTC, PIIX IDE at the legacy ports, and its
guests rely on them. Hardware-reduced ACPI tells Linux there is no legacy hardware to expect
(it then skips the PIT, the i8042 and the RTC platform device), so it would fight the rest of the
machine; the full model matches what is there. Its price is small: three registers and a timer.

Build with `build(cpus, pci_irqs)`: one blob to write at layout.ACPI_TABLES, and the RSDP address.
The blob also holds, right after the RSDP, the 16 bytes of the VM generation ID (`vmgenid`): the
region is not RAM in the e820 map, so the OS leaves it alone, as the specification asks.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..devices import acpi_pm as pm
from ..x86 import layout
from .dsdt import SLP_TYP_S5, build_dsdt

# The table structs (tables.py) are construct definitions: loaded by the functions that build,
# so that a restored VM, whose tables are already in its RAM, does not pay for the import.

LAPIC_ENABLED = 1
IOAPIC_GSI_BASE = 0
KVM_IOAPIC_PINS = 24         # KVM's IOAPIC has 24 inputs (virt/kvm/ioapic.h, IOAPIC_NUM_PINS)
MAX_CPUS = 255               # 8-bit xAPIC ids, minus the IOAPIC's


@dataclass(frozen=True)
class AcpiTables:
    base: int                 # where `blob` goes in guest memory
    blob: bytes
    rsdp: int                 # the RSDP's guest-physical address
    addresses: dict[str, int]  # signature -> guest-physical address, for tests and logs
    vmgenid: int | None = None  # where the 16-byte VM generation ID goes (not a table)


def build_fadt(facs: int, dsdt: int) -> bytes:
    from . import tables as T
    port = layout.PORT_ACPI_PM
    pm1a_evt, pm1a_cnt, pm_tmr = port + pm.PM1_STS, port + pm.PM1_CNT, port + pm.PM_TMR
    gpe0 = port + pm.GPE0_STS
    gas0 = T.gas_io(0, 0)
    body = T.FADT_BODY.build(dict(
        firmware_ctrl=facs, dsdt=dsdt, reserved0=0,
        preferred_pm_profile=0,               # unspecified
        sci_int=layout.IRQ_SCI,
        smi_cmd=0, acpi_enable=0, acpi_disable=0, s4bios_req=0, pstate_cnt=0,
        pm1a_evt_blk=pm1a_evt, pm1b_evt_blk=0, pm1a_cnt_blk=pm1a_cnt, pm1b_cnt_blk=0,
        pm2_cnt_blk=0, pm_tmr_blk=pm_tmr, gpe0_blk=gpe0, gpe1_blk=0,
        pm1_evt_len=pm.PM1_EVT_LEN, pm1_cnt_len=pm.PM1_CNT_LEN, pm2_cnt_len=0,
        pm_tmr_len=pm.PM_TMR_LEN, gpe0_blk_len=pm.GPE0_BLK_LEN, gpe1_blk_len=0, gpe1_base=0,
        cst_cnt=0,
        p_lvl2_lat=101, p_lvl3_lat=1001,      # "C2/C3 not supported": idle is hlt (C1)
        flush_size=0, flush_stride=0, duty_offset=0, duty_width=0,
        day_alrm=0, mon_alrm=0, century=0x32,  # pykvm's CMOS keeps the century at index 0x32
        iapc_boot_arch=T.BOOT_LEGACY_DEVICES | T.BOOT_8042 | T.BOOT_VGA_NOT_PRESENT,
        reserved1=0,
        # No PWR_BUTTON flag: the power button is the fixed-hardware one in PM1 (PWRBTN_STS).
        flags=(T.FADT_WBINVD | T.FADT_PROC_C1 | T.FADT_SLP_BUTTON | T.FADT_TMR_VAL_EXT
               | T.FADT_RESET_REG_SUP),
        reset_reg=T.gas_io(port + pm.RESET, 8), reset_value=pm.RESET_VALUE,
        arm_boot_arch=0, minor_version=T.FADT_MINOR,
        x_firmware_ctrl=0,                    # 0: the 32-bit field above is the one to use
        x_dsdt=dsdt,
        x_pm1a_evt_blk=T.gas_io(pm1a_evt, 8 * pm.PM1_EVT_LEN, access=False), x_pm1b_evt_blk=gas0,
        x_pm1a_cnt_blk=T.gas_io(pm1a_cnt, 8 * pm.PM1_CNT_LEN, access=False), x_pm1b_cnt_blk=gas0,
        x_pm2_cnt_blk=gas0, x_pm_tmr_blk=T.gas_io(pm_tmr, 8 * pm.PM_TMR_LEN),
        # GPE0: status half, enable half, each register a byte to ACPICA (acpi_ev_create_gpe_block
        # makes 8-bit registers), so the access size says byte, as QEMU's FADT does
        x_gpe0_blk=T.gas_io(gpe0, 8 * pm.GPE0_BLK_LEN, access_bits=8), x_gpe1_blk=gas0,
        sleep_control_reg=gas0, sleep_status_reg=gas0,
        hypervisor_vendor_id=b"PYKVM\0\0\0",
    ))
    return T.finish(b"FACP", T.FADT_REVISION, body)


def build_madt(cpus: int, pci_gsis: list[int] = ()) -> bytes:
    """Local APIC i for vCPU i (APIC id = vCPU index, as KVM numbers them), the IOAPIC after them,
    and the interrupt routes that differ from the ISA default (edge, active high, IRQ n -> GSI n).

    KVM's default GSI routing wires GSI n to IOAPIC pin n for n < 24, the in-kernel PIT included
    (it raises GSI 0). A real PC wires the PIT to pin 2 and says so with an "IRQ0 -> GSI2" override;
    pykvm's PIT is on pin 0, so IRQ 0 needs no override. What does differ from the ISA default:
    the SCI (IRQ 9), level-triggered as ACPI requires (5.2.9: "active low, level" is the default for
    a shareable SCI; we keep it high, the polarity KVM ignores anyway), and the ISA IRQs given to
    PCI INTx, level-triggered, active low, as the DSDT's _PRT says."""
    from . import tables as T
    if not 1 <= cpus <= MAX_CPUS:
        raise ValueError(f"{cpus} CPUs cannot be described with 8-bit APIC ids")
    entries = [T.MADT_LAPIC.build(dict(processor_uid=i, apic_id=i, flags=LAPIC_ENABLED))
               for i in range(cpus)]
    entries.append(T.MADT_IOAPIC.build(dict(ioapic_id=cpus, address=layout.IOAPIC_BASE,
                                            gsi_base=IOAPIC_GSI_BASE)))
    entries.append(T.MADT_OVERRIDE.build(dict(source=layout.IRQ_SCI, gsi=layout.IRQ_SCI,
                                              flags=T.INTI_LEVEL | T.INTI_ACTIVE_HIGH)))
    for gsi in sorted(set(pci_gsis) - {layout.IRQ_SCI}):
        if gsi < 16:
            entries.append(T.MADT_OVERRIDE.build(dict(source=gsi, gsi=gsi,
                                                      flags=T.INTI_LEVEL | T.INTI_ACTIVE_LOW)))
    entries.append(T.MADT_LAPIC_NMI.build(dict(processor_uid=T.ALL_PROCESSORS,
                                               flags=T.INTI_CONFORMS, lint=1)))
    body = T.MADT_BODY.build(dict(lapic_address=layout.LAPIC_BASE, flags=T.MADT_PCAT_COMPAT))
    return T.finish(b"APIC", 5, body + b"".join(entries))


VMGENID_SIZE = 16
RSDP_SIZE = 36                  # 5.2.5.3: the RSDP of revision 2 (tables.RSDP.sizeof())


def vmgenid_address(base: int = layout.ACPI_TABLES) -> int:
    """Where `build(base=...)` puts the VM generation ID: the first 16-byte boundary after the
    RSDP. 16-byte aligned, so it never straddles a page (the specification asks for 8-byte
    alignment within one page; Linux maps exactly these 16 bytes). A restored VM finds its ID
    here without building the tables again."""
    return base + -(-RSDP_SIZE // 16) * 16


def build(cpus: int = 1, pci_irqs: list[tuple[int, int, int]] = (), pci: bool = True,
          base: int = layout.ACPI_TABLES, vmgenid: bool = True) -> AcpiTables:
    """All tables, laid out from `base`: RSDP, the VM generation ID's 16 bytes (zeros here: the
    device writes them), FACS (64-byte aligned), DSDT, FADT, MADT, XSDT.
    `pci_irqs`: (slot, pin, gsi) per PCI device interrupt (pin 1 = INTA)."""
    from . import tables as T
    pci_irqs = list(pci_irqs)
    if any(irq == layout.IRQ_SCI for _, _, irq in pci_irqs):
        raise ValueError(f"IRQ {layout.IRQ_SCI} is the ACPI SCI; PCI devices cannot share it here")
    blob = bytearray()
    addresses: dict[str, int] = {}

    def place(name: str, data: bytes, align: int = 16) -> int:
        blob.extend(bytes(-len(blob) % align))
        addresses[name] = base + len(blob)
        blob.extend(data)
        return addresses[name]

    rsdp_len = T.RSDP.sizeof()
    assert rsdp_len == RSDP_SIZE
    blob.extend(bytes(rsdp_len))                # the RSDP goes first; filled in at the end
    genid = None
    if vmgenid:
        genid = vmgenid_address(base)
        blob.extend(bytes(genid - base - len(blob)))
        blob.extend(bytes(VMGENID_SIZE))
    facs = place("FACS", T.build_facs(), align=64)
    dsdt = place("DSDT", build_dsdt(pci_irqs, pci=pci, vmgenid=genid))
    fadt = place("FACP", build_fadt(facs, dsdt))
    madt = place("APIC", build_madt(cpus, [irq for _, _, irq in pci_irqs]))
    xsdt = place("XSDT", T.build_xsdt([fadt, madt]))
    blob[0:rsdp_len] = T.build_rsdp(xsdt)
    addresses["RSDP"] = base
    if base + len(blob) > layout.ACPI_TABLES_END and base == layout.ACPI_TABLES:
        raise ValueError(f"ACPI tables of {len(blob)} bytes do not fit below 1 MiB")
    return AcpiTables(base=base, blob=bytes(blob), rsdp=base, addresses=addresses, vmgenid=genid)


__all__ = ["AcpiTables", "build", "build_fadt", "build_madt", "build_dsdt", "SLP_TYP_S5",
           "vmgenid_address"]
