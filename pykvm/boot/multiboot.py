"""Multiboot (version 1) kernels: find the header, load the image, write the information block.

The Multiboot Specification 0.6.96 (GNU GRUB; "section N" below) lets a boot loader start any
kernel that carries a small header in its first 8 KiB. QEMU's `-kernel` loads such kernels, and
test suites (kvm-unit-tests, hobby kernels) are built as multiboot ELF files.

1. The header (3.1.1 "The layout of Multiboot header"): 32-bit aligned within the first 8192
   bytes, `magic` 0x1BADB002, `flags`, and `checksum` with magic + flags + checksum = 0 (mod 2^32).
   Flags (3.1.2): bit 0 asks that modules be page aligned (pykvm always aligns them), bit 1 asks
   for memory information (always given), bit 2 for a video mode table (not offered: as QEMU, we
   say so and boot anyway). Any other bit among 0-15 is a requirement we do not know: refuse.
   Bit 16 says the address fields (3.1.3) are valid.
2. The image (3.1.3 "The address fields of Multiboot header"): with bit 16, the "a.out kludge" -
   the file from offset header_offset - (header_addr - load_addr) is copied to load_addr, up to
   load_end_addr (0: the end of the file), then zeroed up to bss_end_addr (0: no bss), and entered
   at entry_addr. Without bit 16 the file must be ELF: its PT_LOAD segments go to their physical
   addresses; 32-bit ELF is the spec's format, 64-bit ELF holding 32-bit entry code is accepted as
   QEMU does. e_entry is translated to a physical address through the segment that holds it.
3. Boot modules (3.3, mods_*): each file is put page aligned after the kernel, with its string -
   "FILE ARGS", the file name first as QEMU passes it.
4. The information block (3.3 "Boot information format") at layout.MULTIBOOT_INFO: flags,
   mem_lower/mem_upper (KiB below 640 KiB / from 1 MiB to the first hole), cmdline (the kernel's
   name first, then the arguments, as QEMU passes it), mods_count/mods_addr, mmap_length/mmap_addr
   (entries {size, base_addr, length, type} with `size` not counting itself), boot_loader_name.
5. The machine state (3.2, pykvm.x86.cpu.setup_protected_mode): 32-bit protected mode, paging off,
   EAX = 0x2BADB002, EBX = the information block.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pykvm.boot.errors import BootError
from pykvm.boot.zeropage import e820_table
from pykvm.elf import EM_386, EM_X86_64, PT_LOAD, ElfFormatError, MAGIC as ELF_MAGIC, read_elf
from pykvm.memory import GuestMemory
from pykvm.x86 import layout

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002       # EAX at entry (3.2)
SEARCH_LIMIT = 8192                 # the header lies within the first 8 KiB (3.1.1)
PAGE = 0x1000

# Header flags (3.1.2)
HF_PAGE_ALIGN = 1 << 0
HF_MEMORY_INFO = 1 << 1
HF_VIDEO_MODE = 1 << 2
HF_AOUT_KLUDGE = 1 << 16
HF_KNOWN_REQUIRED = HF_PAGE_ALIGN | HF_MEMORY_INFO | HF_VIDEO_MODE

# Info flags (3.3)
IF_MEMORY = 1 << 0
IF_CMDLINE = 1 << 2
IF_MODS = 1 << 3
IF_MMAP = 1 << 6
IF_LOADER_NAME = 1 << 9

INFO_SIZE = 120          # struct multiboot_info through the framebuffer fields (3.3)
# Offsets into struct multiboot_info (3.3)
OFF_FLAGS, OFF_MEM_LOWER, OFF_MEM_UPPER, OFF_CMDLINE = 0, 4, 8, 16
OFF_MODS_COUNT, OFF_MODS_ADDR, OFF_MMAP_LENGTH, OFF_MMAP_ADDR = 20, 24, 44, 48
OFF_LOADER_NAME = 64
_MMAP_ENTRY = struct.Struct("<IQQI")     # size (20: not counting itself), base_addr, length, type
_MODULE = struct.Struct("<IIII")         # mod_start, mod_end, string, reserved
LOADER_NAME = b"pykvm\0"


@dataclass(frozen=True)
class MultibootHeader:
    offset: int                  # in the file
    flags: int
    header_addr: int = 0         # the address fields, valid with HF_AOUT_KLUDGE (3.1.3)
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


@dataclass(frozen=True)
class Module:
    data: bytes
    string: str                  # "FILE ARGS": what the kernel sees as the module's command line


@dataclass
class MultibootPlan:
    """Where things went and how to start: EIP = entry, EAX = BOOTLOADER_MAGIC, EBX = info_gpa."""

    entry: int
    info_gpa: int
    kernel_start: int
    kernel_end: int
    modules: list[tuple[int, int, str]] = field(default_factory=list)   # (start, end, string)
    cmdline: str = ""
    notes: list[str] = field(default_factory=list)                      # e.g. the video request
    description: dict = field(default_factory=dict)


def find_header(image: bytes) -> MultibootHeader | None:
    """The multiboot header in the first 8 KiB, or None if there is none. A magic number whose
    checksum does not add up is not a header (3.1.1), but if that is all there is, the file was
    most likely meant as a multiboot kernel and is damaged: BootError says so."""
    bad = None
    limit = min(len(image), SEARCH_LIMIT) - 12
    for off in range(0, limit + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, off)
        if magic != HEADER_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFFFFFF:
            bad = bad if bad is not None else off
            continue
        if flags & HF_AOUT_KLUDGE:
            if off + 32 > len(image):
                raise BootError(f"multiboot header at offset {off:#x}: flag 16 set but the address "
                                "fields run past the end of the file")
            return MultibootHeader(off, flags, *struct.unpack_from("<5I", image, off + 12))
        return MultibootHeader(off, flags)
    if bad is not None:
        raise BootError(f"malformed multiboot header at offset {bad:#x}: magic + flags + checksum "
                        "is not 0 (Multiboot 0.6.96, 3.1.1)")
    return None


def is_multiboot(image: bytes) -> bool:
    """True if `image` has a multiboot header (a damaged one counts: loading then explains)."""
    try:
        return find_header(image) is not None
    except BootError:
        return True


def _segments(image: bytes, hdr: MultibootHeader) -> tuple[list[tuple[int, bytes, int]], int]:
    """[(address, file bytes, memory size)], entry point."""
    if hdr.flags & HF_AOUT_KLUDGE:
        h = hdr
        where = f"multiboot header at offset {h.offset:#x} (address fields, 3.1.3)"
        if h.load_addr > h.header_addr:
            raise BootError(f"{where}: load_addr {h.load_addr:#x} is above header_addr "
                            f"{h.header_addr:#x}")
        start = h.offset - (h.header_addr - h.load_addr)
        if start < 0:
            raise BootError(f"{where}: header_addr - load_addr = {h.header_addr - h.load_addr:#x} "
                            f"reaches before the start of the file")
        if h.load_end_addr:
            if h.load_end_addr < h.load_addr:
                raise BootError(f"{where}: load_end_addr {h.load_end_addr:#x} is below load_addr "
                                f"{h.load_addr:#x}")
            size = h.load_end_addr - h.load_addr
            if start + size > len(image):
                raise BootError(f"{where}: load_addr..load_end_addr needs {size:#x} bytes from file "
                                f"offset {start:#x}, but the file has {len(image):#x}")
        else:
            size = len(image) - start
        end = h.load_addr + size
        memsz = size
        if h.bss_end_addr:
            if h.bss_end_addr < end:
                raise BootError(f"{where}: bss_end_addr {h.bss_end_addr:#x} is below the end of "
                                f"the loaded image {end:#x}")
            memsz = h.bss_end_addr - h.load_addr
        if not h.load_addr <= h.entry_addr < h.load_addr + memsz:
            raise BootError(f"{where}: entry_addr {h.entry_addr:#x} lies outside the image "
                            f"{h.load_addr:#x}..{h.load_addr + memsz:#x}")
        return [(h.load_addr, image[start:start + size], memsz)], h.entry_addr
    if image[:4] != ELF_MAGIC:
        raise BootError("multiboot kernel without the address fields (flag 16) must be an ELF file "
                        "(Multiboot 0.6.96, 3.1.3)")
    try:
        elf = read_elf(image)
    except ElfFormatError as e:
        raise BootError(f"multiboot ELF kernel: {e}") from None
    if elf.machine not in (EM_386, EM_X86_64):
        raise BootError(f"multiboot ELF kernel built for {elf.machine_name}, not x86")
    loads = [p for p in elf.segments if p.type == PT_LOAD and p.memsz]
    if not loads:
        raise BootError("multiboot ELF kernel has no PT_LOAD segments")
    entry = elf.entry
    for p in loads:           # e_entry is virtual: find the segment holding it (as GRUB does)
        if p.vaddr <= entry < p.vaddr + p.memsz:
            entry = p.paddr + (entry - p.vaddr)
            break
    return [(p.paddr, image[p.offset:p.offset + p.filesz], p.memsz) for p in loads], entry


def load_multiboot(mem: GuestMemory, image: bytes, *, name: str, append: str = "",
                   modules: list[Module] = ()) -> MultibootPlan:
    """Load a multiboot kernel, its modules and information block; return how to enter it.

    `name` is the kernel's file name as the user gave it: the command line starts with it.
    Raises BootError (one line) for a malformed header or image, or one that does not fit."""
    image = bytes(image)
    hdr = find_header(image)
    if hdr is None:
        raise BootError("no multiboot header in the first 8 KiB (Multiboot 0.6.96, 3.1.1)")
    unknown = hdr.flags & 0xFFFF & ~HF_KNOWN_REQUIRED
    if unknown:
        raise BootError(f"multiboot header asks for features pykvm does not know (flags "
                        f"{unknown:#x} in bits 0-15; 3.1.2 says a boot loader must then refuse)")
    plan_notes = []
    if hdr.flags & HF_VIDEO_MODE:
        plan_notes.append("the kernel asks for a video mode (flag 2): pykvm has no display, "
                          "booting without one as QEMU does")
    segments, entry = _segments(image, hdr)

    low_top = min(mem.size, layout.MMIO_HOLE_START)
    kernel_start = min(a for a, _, _ in segments)
    kernel_end = max(a + m for a, _, m in segments)
    for addr, _, memsz in segments:
        if addr < layout.HIMEM_START:
            raise BootError(f"multiboot kernel segment at {addr:#x} lies below 1 MiB, where pykvm "
                            "keeps its boot structures (link the kernel at 1 MiB or above)")
        if not mem.contains(addr, memsz):
            raise BootError(f"multiboot kernel segment {addr:#x}..{addr + memsz:#x} is not in guest "
                            f"RAM ({mem.size >> 20} MiB): give the VM more memory (--memory)")

    # Modules, page aligned after the kernel (flag 0 asks for it; we always do it).
    placed = []
    at = _align(kernel_end)
    for m in modules:
        if at + len(m.data) > low_top:
            need = _align(at + len(m.data))
            raise BootError(f"boot modules do not fit: module {m.string.split(' ')[0]!r} "
                            f"({len(m.data)} bytes) would end at {at + len(m.data):#x}, past the "
                            f"end of low RAM at {low_top:#x}; give the VM at least "
                            f"{-(-need // layout.MiB)} MiB (--memory)")
        placed.append((at, at + len(m.data), m.string))
        at = _align(at + len(m.data))

    cmdline = f"{name} {append}".strip() if append else name
    info = _info_block(mem.size, cmdline, placed)
    if len(info) > layout.MULTIBOOT_INFO_END - layout.MULTIBOOT_INFO:
        raise BootError(f"the multiboot command line and module strings take {len(info)} bytes; "
                        f"at most {layout.MULTIBOOT_INFO_END - layout.MULTIBOOT_INFO} fit")

    for addr, data, memsz in segments:
        mem.write(addr, data)
        if memsz > len(data):
            mem.fill(addr + len(data), memsz - len(data))
    for (start, _, _), m in zip(placed, modules):
        mem.write(start, m.data)
    mem.write(layout.MULTIBOOT_INFO, info)
    return MultibootPlan(
        entry=entry, info_gpa=layout.MULTIBOOT_INFO, kernel_start=kernel_start,
        kernel_end=kernel_end, modules=placed, cmdline=cmdline, notes=plan_notes,
        description={"format": "multiboot " + ("a.out kludge" if hdr.flags & HF_AOUT_KLUDGE
                                               else f"ELF{32 if image[4] == 1 else 64}"),
                     "entry": f"{entry:#x}", "kernel": f"{kernel_start:#x}-{kernel_end:#x}",
                     "modules": len(placed)})


def _info_block(ram_size: int, cmdline: str, modules: list[tuple[int, int, str]]) -> bytes:
    """struct multiboot_info and what it points to, laid out from layout.MULTIBOOT_INFO."""
    base = layout.MULTIBOOT_INFO
    e820 = e820_table(ram_size)
    # Type 1 is available RAM and anything else reserved (3.3); e820's numbers agree.
    mmap = b"".join(_MMAP_ENTRY.pack(_MMAP_ENTRY.size - 4, e.addr, e.size, e.type) for e in e820)
    blob = bytearray(INFO_SIZE)
    blob += mmap
    mmap_addr = base + INFO_SIZE
    mods_addr = base + len(blob)
    blob += bytes(_MODULE.size * len(modules))
    strings = {}
    for text in [cmdline] + [s for _, _, s in modules]:
        strings.setdefault(text, base + len(blob))
        if strings[text] == base + len(blob):
            blob += text.encode() + b"\0"
    loader_name = base + len(blob)
    blob += LOADER_NAME
    for i, (start, end, text) in enumerate(modules):
        _MODULE.pack_into(blob, mods_addr - base + i * _MODULE.size, start, end, strings[text], 0)
    low = next(e for e in e820 if e.addr == 0)
    upper = next((e for e in e820 if e.addr == layout.HIMEM_START), None)
    struct.pack_into("<I", blob, OFF_FLAGS, IF_MEMORY | IF_CMDLINE | IF_MODS | IF_MMAP | IF_LOADER_NAME)
    struct.pack_into("<II", blob, OFF_MEM_LOWER, low.size // 1024, upper.size // 1024 if upper else 0)
    struct.pack_into("<I", blob, OFF_CMDLINE, strings[cmdline])
    struct.pack_into("<II", blob, OFF_MODS_COUNT, len(modules), mods_addr)
    struct.pack_into("<II", blob, OFF_MMAP_LENGTH, len(mmap), mmap_addr)
    struct.pack_into("<I", blob, OFF_LOADER_NAME, loader_name)
    return bytes(blob)


def _align(value: int) -> int:
    return (value + PAGE - 1) & ~(PAGE - 1)
