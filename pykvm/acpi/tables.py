"""The fixed-layout ACPI tables, as construct structs with their byte offsets (ACPI 6.5, chapter 5.2).

Every table but the RSDP and FACS starts with the 36-byte System Description Table Header (5.2.6)
and must sum, over its `length` bytes, to 0 mod 256: `finish()` fills in length and checksum.
"""

from __future__ import annotations

from construct import Bytes, Const, Int8ul, Int16ul, Int32ul, Int64ul, Struct

OEM_ID = b"PYKVM "               # 6 bytes
OEM_TABLE_ID = b"PYKVMPC "       # 8 bytes
CREATOR_ID = b"PYKV"
REVISION = 1


def checksum(data: bytes) -> int:
    """The byte that makes `data` (with this byte in it as 0) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


# 5.2.6 System Description Table Header (36 bytes)
HEADER = Struct(
    "signature" / Bytes(4),          # +0   "FACP", "APIC", "DSDT", "XSDT", ...
    "length" / Int32ul,              # +4   the whole table, header included
    "revision" / Int8ul,             # +8
    "checksum" / Int8ul,             # +9
    "oem_id" / Bytes(6),             # +10
    "oem_table_id" / Bytes(8),       # +16
    "oem_revision" / Int32ul,        # +24
    "creator_id" / Bytes(4),         # +28
    "creator_revision" / Int32ul,    # +32
)


def finish(signature: bytes, revision: int, body: bytes) -> bytes:
    """Header + body, with length and checksum filled in (5.2.6)."""
    fields = dict(signature=signature, length=HEADER.sizeof() + len(body), revision=revision,
                  checksum=0, oem_id=OEM_ID, oem_table_id=OEM_TABLE_ID, oem_revision=REVISION,
                  creator_id=CREATOR_ID, creator_revision=REVISION)
    table = HEADER.build(fields) + body
    fields["checksum"] = checksum(table)
    return HEADER.build(fields) + body


# 5.2.5.3 Root System Description Pointer (36 bytes for revision 2, ACPI 2.0+)
RSDP = Struct(
    "signature" / Const(b"RSD PTR "),  # +0
    "checksum" / Int8ul,             # +8   over the first 20 bytes (the ACPI 1.0 part)
    "oem_id" / Bytes(6),             # +9
    "revision" / Int8ul,             # +15  2: the fields below exist
    "rsdt_address" / Int32ul,        # +16  0: no RSDT, the XSDT is used
    "length" / Int32ul,              # +20  36
    "xsdt_address" / Int64ul,        # +24
    "extended_checksum" / Int8ul,    # +32  over all 36 bytes
    "reserved" / Bytes(3),           # +33
)


def build_rsdp(xsdt: int) -> bytes:
    fields = dict(checksum=0, oem_id=OEM_ID, revision=2, rsdt_address=0, length=RSDP.sizeof(),
                  xsdt_address=xsdt, extended_checksum=0, reserved=bytes(3))
    fields["checksum"] = checksum(RSDP.build(fields)[:20])
    fields["extended_checksum"] = checksum(RSDP.build(fields))
    return RSDP.build(fields)


def build_xsdt(entries: list[int]) -> bytes:
    """5.2.8 Extended System Description Table: 64-bit addresses of every table but the DSDT and
    FACS (those two are reached through the FADT)."""
    return finish(b"XSDT", 1, b"".join(a.to_bytes(8, "little") for a in entries))


# 5.2.3.2 Generic Address Structure (12 bytes): where a register is and how to access it.
GAS = Struct(
    "space_id" / Int8ul,             # +0   0 system memory, 1 system I/O
    "bit_width" / Int8ul,            # +1
    "bit_offset" / Int8ul,           # +2
    "access_size" / Int8ul,          # +3   0 undefined, 1 byte, 2 word, 3 dword, 4 qword
    "address" / Int64ul,             # +4
)
SPACE_MEMORY, SPACE_IO = 0, 1


def gas_io(port: int, bits: int, access: bool = True, access_bits: int | None = None) -> dict:
    """An I/O-port register `bits` wide, accessed `access_bits` at a time (default: all of it).
    access=False leaves the access size "undefined" (legacy): for the PM1 blocks, which ACPICA
    splits into two registers of half the block's width."""
    if not port:
        return dict(space_id=0, bit_width=0, bit_offset=0, access_size=0, address=0)
    return dict(space_id=SPACE_IO, bit_width=bits, bit_offset=0,
                access_size={8: 1, 16: 2, 32: 3}[access_bits or bits] if access else 0,
                address=port)


# 5.2.10 Firmware ACPI Control Structure (64 bytes, no standard header, 64-byte aligned). Needed
# by a full-hardware OSPM for the global lock and the waking vector; pykvm never sleeps, so all 0.
FACS = Struct(
    "signature" / Const(b"FACS"),    # +0
    "length" / Int32ul,              # +4   64
    "hardware_signature" / Int32ul,  # +8
    "waking_vector" / Int32ul,       # +12
    "global_lock" / Int32ul,         # +16
    "flags" / Int32ul,               # +20
    "x_waking_vector" / Int64ul,     # +24
    "version" / Int8ul,              # +32  2
    "reserved" / Bytes(3),           # +33
    "ospm_flags" / Int32ul,          # +36
    "reserved2" / Bytes(24),         # +40
)


def build_facs() -> bytes:
    return FACS.build(dict(length=64, hardware_signature=0, waking_vector=0, global_lock=0,
                           flags=0, x_waking_vector=0, version=2, reserved=bytes(3),
                           ospm_flags=0, reserved2=bytes(24)))


# 5.2.9 Fixed ACPI Description Table, revision 6 (276 bytes with the header). Offsets below are
# from the start of the table.
FADT_BODY = Struct(
    "firmware_ctrl" / Int32ul,       # 36   FACS address
    "dsdt" / Int32ul,                # 40
    "reserved0" / Int8ul,            # 44   (ACPI 1.0 INT_MODEL)
    "preferred_pm_profile" / Int8ul,  # 45  0 unspecified, 1 desktop, 4 enterprise server
    "sci_int" / Int16ul,             # 46   the ISA IRQ the SCI is wired to
    "smi_cmd" / Int32ul,             # 48   0: no SMI mode switch; the system is always in ACPI mode
    "acpi_enable" / Int8ul,          # 52
    "acpi_disable" / Int8ul,         # 53
    "s4bios_req" / Int8ul,           # 54
    "pstate_cnt" / Int8ul,           # 55
    "pm1a_evt_blk" / Int32ul,        # 56   PM1a status + enable registers (I/O port)
    "pm1b_evt_blk" / Int32ul,        # 60
    "pm1a_cnt_blk" / Int32ul,        # 64   PM1a control: SCI_EN, SLP_TYP, SLP_EN
    "pm1b_cnt_blk" / Int32ul,        # 68
    "pm2_cnt_blk" / Int32ul,         # 72
    "pm_tmr_blk" / Int32ul,          # 76   the 3.579545 MHz power-management timer
    "gpe0_blk" / Int32ul,            # 80
    "gpe1_blk" / Int32ul,            # 84
    "pm1_evt_len" / Int8ul,          # 88   4
    "pm1_cnt_len" / Int8ul,          # 89   2
    "pm2_cnt_len" / Int8ul,          # 90
    "pm_tmr_len" / Int8ul,           # 91   4
    "gpe0_blk_len" / Int8ul,         # 92
    "gpe1_blk_len" / Int8ul,         # 93
    "gpe1_base" / Int8ul,            # 94
    "cst_cnt" / Int8ul,              # 95
    "p_lvl2_lat" / Int16ul,          # 96   > 100: C2 not supported
    "p_lvl3_lat" / Int16ul,          # 98   > 1000: C3 not supported
    "flush_size" / Int16ul,          # 100
    "flush_stride" / Int16ul,        # 102
    "duty_offset" / Int8ul,          # 104
    "duty_width" / Int8ul,           # 105
    "day_alrm" / Int8ul,             # 106
    "mon_alrm" / Int8ul,             # 107
    "century" / Int8ul,              # 108  CMOS index of the century byte (0: none)
    "iapc_boot_arch" / Int16ul,      # 109  5.2.9.3
    "reserved1" / Int8ul,            # 111
    "flags" / Int32ul,               # 112  5.2.9.1
    "reset_reg" / GAS,               # 116
    "reset_value" / Int8ul,          # 128
    "arm_boot_arch" / Int16ul,       # 129
    "minor_version" / Int8ul,        # 131  FADT 6.x: the minor number
    "x_firmware_ctrl" / Int64ul,     # 132
    "x_dsdt" / Int64ul,              # 140
    "x_pm1a_evt_blk" / GAS,          # 148
    "x_pm1b_evt_blk" / GAS,          # 160
    "x_pm1a_cnt_blk" / GAS,          # 172
    "x_pm1b_cnt_blk" / GAS,          # 184
    "x_pm2_cnt_blk" / GAS,           # 196
    "x_pm_tmr_blk" / GAS,            # 208
    "x_gpe0_blk" / GAS,              # 220
    "x_gpe1_blk" / GAS,              # 232
    "sleep_control_reg" / GAS,       # 244  hardware-reduced only
    "sleep_status_reg" / GAS,        # 256
    "hypervisor_vendor_id" / Bytes(8),  # 268
)
FADT_REVISION, FADT_MINOR = 6, 5

# 5.2.9.1 Fixed feature flags
FADT_WBINVD = 1 << 0             # WBINVD works (it does: KVM emulates it)
FADT_PROC_C1 = 1 << 2            # C1 (hlt) on all processors
FADT_PWR_BUTTON = 1 << 4         # set: no fixed-hardware power button
FADT_SLP_BUTTON = 1 << 5         # set: no fixed-hardware sleep button
FADT_TMR_VAL_EXT = 1 << 8        # the PM timer is 32 bits wide, not 24
FADT_RESET_REG_SUP = 1 << 10     # the reset register below works
FADT_HW_REDUCED_ACPI = 1 << 20
# 5.2.9.3 IA-PC boot architecture flags
BOOT_LEGACY_DEVICES = 1 << 0     # ISA devices the OS cannot enumerate exist (UART, RTC, PIT)
BOOT_8042 = 1 << 1               # an i8042 keyboard controller at 0x60/0x64
BOOT_VGA_NOT_PRESENT = 1 << 2


# 5.2.12 Multiple APIC Description Table: two fields, then interrupt-controller structures.
MADT_BODY = Struct(
    "lapic_address" / Int32ul,       # 36   where every CPU finds its local APIC
    "flags" / Int32ul,               # 40   bit 0 PCAT_COMPAT: 8259s present (mask them for APIC mode)
)
MADT_PCAT_COMPAT = 1
# 5.2.12.2 Processor Local APIC Structure (type 0, 8 bytes)
MADT_LAPIC = Struct("type" / Const(0, Int8ul), "length" / Const(8, Int8ul),
                    "processor_uid" / Int8ul, "apic_id" / Int8ul,
                    "flags" / Int32ul)       # bit 0 Enabled, bit 1 Online Capable
# 5.2.12.3 I/O APIC Structure (type 1, 12 bytes)
MADT_IOAPIC = Struct("type" / Const(1, Int8ul), "length" / Const(12, Int8ul),
                     "ioapic_id" / Int8ul, "reserved" / Const(0, Int8ul),
                     "address" / Int32ul, "gsi_base" / Int32ul)
# 5.2.12.5 Interrupt Source Override Structure (type 2, 10 bytes): "ISA IRQ `source` arrives at
# GSI `gsi`, with these polarity/trigger flags" (MPS INTI flags, Table 5.26).
MADT_OVERRIDE = Struct("type" / Const(2, Int8ul), "length" / Const(10, Int8ul),
                       "bus" / Const(0, Int8ul), "source" / Int8ul,
                       "gsi" / Int32ul, "flags" / Int16ul)
# 5.2.12.7 Local APIC NMI Structure (type 4, 6 bytes): which LINT pin carries NMI.
MADT_LAPIC_NMI = Struct("type" / Const(4, Int8ul), "length" / Const(6, Int8ul),
                        "processor_uid" / Int8ul, "flags" / Int16ul, "lint" / Int8ul)
ALL_PROCESSORS = 0xFF
# MPS INTI flags: polarity bits 0-1 (01 active high, 11 active low), trigger bits 2-3 (01 edge,
# 11 level); 0 means "conforms to the bus" (ISA: edge, active high).
INTI_CONFORMS = 0x0
INTI_ACTIVE_HIGH, INTI_ACTIVE_LOW = 0x1, 0x3
INTI_EDGE, INTI_LEVEL = 0x1 << 2, 0x3 << 2

