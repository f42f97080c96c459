"""Every fixed guest-physical address pykvm uses, in one place.

The PC's first megabyte is full of history: the real-mode interrupt vector table at 0, the BIOS data
area at 0x400, the EBDA just below 640 KiB, the VGA window and option ROMs at 0xa0000-0xfffff. Linux
expects RAM below 640 KiB to be described by the e820 map and leaves the rest alone, so pykvm puts its
boot-time structures (GDT, page tables, zero page, command line) in low RAM and the kernel at 1 MiB.

Below 4 GiB, the top 1 GiB is the "PCI hole": no RAM, only device MMIO (virtio-mmio, PCI BARs,
IOAPIC, local APIC). Guest RAM beyond 3 GiB continues at 4 GiB.
"""

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# --- Low memory: boot structures written by pykvm before the first instruction. ---
BOOT_GDT = 0x500          # GDT for protected/long mode entry (pykvm/x86/cpu.py)
BOOT_IDT = 0x520          # an empty IDT: any exception before the kernel sets its own is a triple fault
SETUP_DATA = 0x3000       # struct setup_data list (boot.rst; pykvm/boot/setup_data.py), to 0x4000
PVH_START_INFO = 0x6000   # struct hvm_start_info for a PVH entry (EBX), pykvm/boot/zeropage.py
PVH_MODLIST = 0x6040      # hvm_modlist_entry array: the initrd
PVH_MEMMAP = 0x6080       # hvm_memmap_table_entry array (24 bytes each), up to PVH_MEMMAP_END
PVH_MEMMAP_END = 0x7000
ZERO_PAGE = 0x7000        # struct boot_params, "the zero page" (Documentation/arch/x86/zero-page.rst)
BOOT_STACK = 0x8ff0       # initial RSP for 64-bit entry
PML4 = 0x9000             # identity-mapping page tables for 64-bit entry: PML4, PDPT, then PDs
PDPT = 0xa000
PD = 0xb000               # 4 page directories (0xb000-0xefff) map the first 4 GiB with 2 MiB pages
MULTIBOOT_INFO = 0x10000   # a multiboot kernel's info block, memory map, module list and strings
MULTIBOOT_INFO_END = 0x20000   # (pykvm/boot/multiboot.py), up to here
CMDLINE = 0x20000         # kernel command line (boot.rst: anywhere below 0xa0000 after the setup)
CMDLINE_MAX = 0x10000
EBDA_START = 0x9fc00      # extended BIOS data area: the e820 map stops low RAM here
HIMEM_START = 0x100000    # 1 MiB: the protected-mode kernel (boot.rst "code32_start")
# ACPI tables (pykvm/acpi/): the RSDP first, where an OS searching for it looks (the BIOS area
# 0xe0000-0xfffff, ACPI 6.5 5.2.5.1), the other tables after it. Not RAM in the e820 map.
ACPI_TABLES = 0xe0000
ACPI_TABLES_END = 0x100000

# --- Firmware test programs (firmware/) are linked to run from here. ---
FIRMWARE_BASE = 0x100000

# --- The MMIO hole below 4 GiB. ---
MMIO_HOLE_START = 0xc0000000
MMIO_HOLE_END = 0x100000000
VIRTIO_MMIO_BASE = 0xd0000000   # virtio-mmio device n lives at base + n * VIRTIO_MMIO_SIZE
VIRTIO_MMIO_SIZE = 0x1000
PCI_MMIO_BASE = 0xe0000000      # PCI BARs are allocated upwards from here
PCI_MMIO_END = 0xfec00000
IOAPIC_BASE = 0xfec00000
LAPIC_BASE = 0xfee00000

# KVM on Intel needs three pages for a real-mode TSS and one for an identity page table
# (KVM_SET_TSS_ADDR, KVM_SET_IDENTITY_MAP_ADDR); they must not overlap RAM or MMIO in use.
KVM_IDENTITY_MAP = 0xfeffc000
KVM_TSS = 0xfeffd000

# Legacy ISA IRQ numbers (the PC/AT wiring of the two 8259s).
IRQ_PIT = 0
IRQ_KEYBOARD = 1
IRQ_CASCADE = 2            # the slave 8259's INT, on the master's IR2
IRQ_COM2 = 3
IRQ_COM1 = 4
IRQ_RTC = 8
IRQ_SCI = 9                # the ACPI System Control Interrupt (the FADT's SCI_INT)
IRQ_MOUSE = 12             # PS/2 auxiliary device
IRQ_FPU = 13               # x87 FERR# on a PC/AT
IRQ_ATA0 = 14
IRQ_ATA1 = 15
# Interrupt lines pykvm hands out to virtio-mmio and PCI devices.
IRQ_VIRTIO_FIRST = 5

# I/O ports: the first of each device's range (the wiring code says how many it claims).
PORT_PIC_MASTER = 0x20     # i8259 master: command, data
PORT_PIT = 0x40            # i8254: counters 0-2, control word
PORT_I8042 = 0x60          # keyboard controller data; status/command at +4
PORT_SYSTEM_CONTROL_B = 0x61   # PC speaker gate and PIT channel 2 (port 61h)
PORT_RTC = 0x70            # CMOS index, data
PORT_POST = 0x80
PORT_PIC_SLAVE = 0xa0      # i8259 slave
PORT_ATA1 = 0x170          # secondary IDE command block; control block at PORT_ATA1_CTRL
PORT_ATA0 = 0x1f0          # primary IDE command block
PORT_ATA1_CTRL = 0x376
PORT_ATA0_CTRL = 0x3f6
PORT_COM1 = 0x3f8
PORT_DEBUG = 0xe9          # Bochs/QEMU debug console: a byte written here is printed
PORT_EXIT = 0xf4           # firmware test programs write their exit status here
PORT_ELCR = 0x4d0          # edge/level control of both 8259s (one byte each)
PORT_PCI_CONFIG = 0xcf8    # PCI configuration mechanism #1: CONFIG_ADDRESS, CONFIG_DATA at +4
PORT_ACPI_PM = 0x600       # the ACPI PM registers: PM1a event/control, PM timer, reset, GPE0 (20 ports)

SECTOR = 512              # a disk sector (virtio-blk and ATA address these), and a bzImage's
                           # setup_sects unit: the PC's 512-byte sector from the BIOS days on

MIN_MEMORY = 32 * MiB      # below this a Linux kernel cannot unpack itself; firmware needs less


def ram_regions(size: int) -> list[tuple[int, int]]:
    """Split `size` bytes of guest RAM around the MMIO hole: [(gpa, length), ...]."""
    low = min(size, MMIO_HOLE_START)
    regions = [(0, low)]
    if size > low:
        regions.append((MMIO_HOLE_END, size - low))
    return regions
