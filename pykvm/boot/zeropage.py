"""The zero page (struct boot_params) and the PVH start_info: how a loader tells Linux about the machine.

The 64-bit boot protocol enters the kernel with RSI pointing at a 4 KiB `struct boot_params`
(Documentation/arch/x86/zero-page.rst; arch/x86/include/uapi/asm/bootparam.h). A BIOS-booted kernel's
real-mode setup code fills it in; we skip that code, so we fill it in ourselves: the setup header copied
from the bzImage with the loader's fields set (command line, initrd, loader type), and the e820 memory
map, which is the only way the kernel learns where RAM is.

A PVH boot (32-bit entry from the Xen ELF note) gets the same facts in a different shape: a
`struct hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h) pointed to by EBX, with the
memory map as an array of hvm_memmap_table_entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from construct import Array, Bytes, Int8ul, Int32ul, Int64ul, Struct

from pykvm.boot.bzimage import (CAN_USE_HEAP, HDRS_MAGIC, HEADER_OFFSET, KASLR_FLAG, LOADED_HIGH,
                                SETUP_HEADER, BOOT_FLAG, XLF_KERNEL_64)
from pykvm.boot.errors import BootError
from pykvm.x86 import layout

ZERO_PAGE_SIZE = 4096
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_MAX_ENTRIES_ZEROPAGE = 128
LOADER_TYPE_OTHER = 0xff     # boot.rst type_of_loader: 0xff = "undefined", any loader without an ID
# boot.rst's sample loader sets heap_end = 0xe000 for protocol >= 2.02 with LOADED_HIGH, and
# heap_end_ptr = heap_end - 0x200. Only the real-mode setup code uses this heap, and we never run it;
# the value is set anyway so the header reads like any conforming loader's.
HEAP_END_PTR = 0xe000 - 0x200

E820_ENTRY = Struct(
    "addr" / Int64ul,        # +0
    "size" / Int64ul,        # +8
    "type" / Int32ul,        # +16  1 RAM, 2 reserved, 3 ACPI reclaimable, 4 ACPI NVS
)                            # 20 bytes, packed
assert E820_ENTRY.sizeof() == 20

# struct boot_params (bootparam.h; offsets as in zero-page.rst). Blobs we never fill are plain Bytes.
BOOT_PARAMS = Struct(
    "screen_info" / Bytes(0x40),           # 0x000
    "apm_bios_info" / Bytes(0x14),         # 0x040
    "_pad2" / Bytes(4),                    # 0x054
    "tboot_addr" / Int64ul,                # 0x058
    "ist_info" / Bytes(0x10),              # 0x060
    "acpi_rsdp_addr" / Int64ul,            # 0x070  physical address of the ACPI RSDP (0: search)
    "_pad3" / Bytes(8),                    # 0x078
    "hd0_info" / Bytes(16),                # 0x080
    "hd1_info" / Bytes(16),                # 0x090
    "sys_desc_table" / Bytes(16),          # 0x0a0
    "olpc_ofw_header" / Bytes(16),         # 0x0b0
    "ext_ramdisk_image" / Int32ul,         # 0x0c0  ramdisk_image bits 63:32
    "ext_ramdisk_size" / Int32ul,          # 0x0c4  ramdisk_size bits 63:32
    "ext_cmd_line_ptr" / Int32ul,          # 0x0c8  cmd_line_ptr bits 63:32
    "_pad4" / Bytes(112),                  # 0x0cc
    "cc_blob_address" / Int32ul,           # 0x13c
    "edid_info" / Bytes(0x80),             # 0x140
    "efi_info" / Bytes(0x20),              # 0x1c0
    "alt_mem_k" / Int32ul,                 # 0x1e0
    "scratch" / Int32ul,                   # 0x1e4
    "e820_entries" / Int8ul,               # 0x1e8  number of valid entries in e820_table
    "eddbuf_entries" / Int8ul,             # 0x1e9
    "edd_mbr_sig_buf_entries" / Int8ul,    # 0x1ea
    "kbd_status" / Int8ul,                 # 0x1eb
    "secure_boot" / Int8ul,                # 0x1ec
    "_pad5" / Bytes(2),                    # 0x1ed
    "sentinel" / Int8ul,                   # 0x1ef  must stay 0, or the kernel zeroes fields it
                                           #        distrusts (sanitize_boot_params)
    "_pad6" / Bytes(1),                    # 0x1f0
    "hdr" / SETUP_HEADER,                  # 0x1f1  struct setup_header, see bzimage.py
    "_pad7" / Bytes(0x290 - 0x26c),        # 0x26c  room for header growth (copied as is)
    "edd_mbr_sig_buffer" / Bytes(64),      # 0x290
    "e820_table" / Array(E820_MAX_ENTRIES_ZEROPAGE, E820_ENTRY),   # 0x2d0
    "_pad8" / Bytes(48),                   # 0xcd0
    "eddbuf" / Bytes(0xeec - 0xd00),       # 0xd00
    "_pad9" / Bytes(276),                  # 0xeec
)                                          # 0x1000
assert BOOT_PARAMS.sizeof() == ZERO_PAGE_SIZE

# struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h), version 1.
HVM_START_MAGIC = 0x336ec578
HVM_START_INFO = Struct(
    "magic" / Int32ul,            # 0x00  HVM_START_MAGIC
    "version" / Int32ul,          # 0x04  1: the memmap fields are valid
    "flags" / Int32ul,            # 0x08
    "nr_modules" / Int32ul,       # 0x0c  entries at modlist_paddr (the first is the initrd)
    "modlist_paddr" / Int64ul,    # 0x10
    "cmdline_paddr" / Int64ul,    # 0x18  NUL-terminated command line
    "rsdp_paddr" / Int64ul,       # 0x20  ACPI RSDP, 0 if none
    "memmap_paddr" / Int64ul,     # 0x28  array of HVM_MEMMAP_ENTRY
    "memmap_entries" / Int32ul,   # 0x30
    "reserved" / Int32ul,         # 0x34
)                                 # 0x38
HVM_MODLIST_ENTRY = Struct(
    "paddr" / Int64ul,            # 0x00
    "size" / Int64ul,             # 0x08
    "cmdline_paddr" / Int64ul,    # 0x10
    "reserved" / Int64ul,         # 0x18
)
HVM_MEMMAP_ENTRY = Struct(
    "addr" / Int64ul,             # 0x00
    "size" / Int64ul,             # 0x08
    "type" / Int32ul,             # 0x10  same values as e820 (XEN_HVM_MEMMAP_TYPE_RAM = 1, ...)
    "reserved" / Int32ul,         # 0x14
)
assert HVM_START_INFO.sizeof() == 0x38 and HVM_MEMMAP_ENTRY.sizeof() == 24


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def e820_table(ram_size: int) -> list[E820Entry]:
    """The e820 map for `ram_size` bytes of guest RAM laid out by layout.ram_regions.

    Low RAM is cut in two: 0..EBDA_START (640 KiB less the EBDA), then 1 MiB up to the PCI hole. The
    gap holds, on a PC, the EBDA, VGA memory and the BIOS ROM; we put nothing there but the kernel must
    not use it either. RAM above 3 GiB continues at 4 GiB.
    """
    entries = []
    for gpa, size in layout.ram_regions(ram_size):
        if gpa == 0:
            entries.append(E820Entry(0, min(size, layout.EBDA_START), E820_RAM))
            if size > layout.HIMEM_START:
                entries.append(E820Entry(layout.HIMEM_START, size - layout.HIMEM_START, E820_RAM))
        else:
            entries.append(E820Entry(gpa, size, E820_RAM))
    return entries


def build_zero_page(header: bytes | None, *, cmdline_gpa: int, cmdline_size: int,
                    e820: list[E820Entry], initrd: tuple[int, int] | None = None,
                    acpi_rsdp: int = 0, setup_data: int = 0) -> bytes:
    """Build the 4 KiB struct boot_params.

    `header` is the bzImage's raw setup header (BzImage.header_bytes), copied to 0x1f1 as boot.rst
    asks. For an ELF vmlinux there is none and we write the few fields the kernel proper reads
    (Firecracker and cloud-hypervisor do the same): boot_flag, "HdrS", a version, kernel_alignment and
    cmdline_size, besides the loader fields below. `cmdline_size` is only used in that case (for a
    bzImage it is the kernel's own limit, read-only to loaders). `initrd` is (gpa, size).
    """
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise BootError(f"{len(e820)} e820 entries do not fit the zero page's "
                        f"{E820_MAX_ENTRIES_ZEROPAGE}: merge memory regions")
    page = bytearray(ZERO_PAGE_SIZE)
    if header is not None:
        page[HEADER_OFFSET:HEADER_OFFSET + len(header)] = header[:0x290 - HEADER_OFFSET]
    bp = BOOT_PARAMS.parse(bytes(page))
    hdr = bp.hdr
    if header is None:
        hdr.boot_flag = BOOT_FLAG
        hdr.header = HDRS_MAGIC
        hdr.version = 0x020f            # 2.15: every field we fill exists in this version
        hdr.kernel_alignment = 0x1000000   # CONFIG_PHYSICAL_ALIGN's default: 16 MiB
        hdr.xloadflags = XLF_KERNEL_64
        hdr.cmdline_size = cmdline_size

    hdr.type_of_loader = LOADER_TYPE_OTHER
    # LOADED_HIGH: the protected-mode kernel sits at/above 1 MiB. KASLR_FLAG is the decompressor's
    # report that it randomized the kernel; a kernel we load decompressed was not, so clear it.
    hdr.loadflags = (hdr.loadflags | LOADED_HIGH | CAN_USE_HEAP) & ~KASLR_FLAG
    hdr.heap_end_ptr = HEAP_END_PTR
    hdr.cmd_line_ptr = cmdline_gpa & 0xffffffff
    bp.ext_cmd_line_ptr = cmdline_gpa >> 32
    gpa, size = initrd or (0, 0)
    hdr.ramdisk_image, bp.ext_ramdisk_image = gpa & 0xffffffff, gpa >> 32
    hdr.ramdisk_size, bp.ext_ramdisk_size = size & 0xffffffff, size >> 32
    bp.acpi_rsdp_addr = acpi_rsdp
    hdr.setup_data = setup_data      # first struct setup_data node (pykvm/boot/setup_data.py), 0: none

    bp.e820_entries = len(e820)
    bp.e820_table = ([dict(addr=e.addr, size=e.size, type=e.type) for e in e820]
                     + [dict(addr=0, size=0, type=0)] * (E820_MAX_ENTRIES_ZEROPAGE - len(e820)))
    return BOOT_PARAMS.build(bp)


def build_pvh_start_info(*, cmdline_gpa: int, e820: list[E820Entry],
                         initrd: tuple[int, int] | None = None, acpi_rsdp: int = 0
                         ) -> dict[int, bytes]:
    """The PVH boot structures as {gpa: bytes}: hvm_start_info at layout.PVH_START_INFO, the module
    list (the initrd, if any) at layout.PVH_MODLIST, the memory map at layout.PVH_MEMMAP."""
    capacity = (layout.PVH_MEMMAP_END - layout.PVH_MEMMAP) // HVM_MEMMAP_ENTRY.sizeof()
    if len(e820) > capacity:
        raise BootError(f"{len(e820)} memory map entries do not fit the PVH memmap area "
                        f"({capacity}): merge memory regions")
    memmap = b"".join(HVM_MEMMAP_ENTRY.build(dict(addr=e.addr, size=e.size, type=e.type, reserved=0))
                      for e in e820)
    out = {layout.PVH_MEMMAP: memmap}
    if initrd:
        out[layout.PVH_MODLIST] = HVM_MODLIST_ENTRY.build(
            dict(paddr=initrd[0], size=initrd[1], cmdline_paddr=0, reserved=0))
    out[layout.PVH_START_INFO] = HVM_START_INFO.build(dict(
        magic=HVM_START_MAGIC, version=1, flags=0,
        nr_modules=1 if initrd else 0, modlist_paddr=layout.PVH_MODLIST if initrd else 0,
        cmdline_paddr=cmdline_gpa, rsdp_paddr=acpi_rsdp,
        memmap_paddr=layout.PVH_MEMMAP, memmap_entries=len(e820), reserved=0))
    return out
