"""Load an x86-64 ELF vmlinux into guest memory, and find its entry points.

An ELF file describes what to load with *program headers*; each PT_LOAD segment says "copy p_filesz
bytes from file offset p_offset to address p_paddr, then zero up to p_memsz" (the zeroed tail is .bss).
For vmlinux the virtual addresses are the kernel's high mapping (0xffffffff81000000...) and the
physical addresses (p_paddr, set by AT() in arch/x86/kernel/vmlinux.lds.S) are where the kernel expects
to sit in RAM: 16 MiB (CONFIG_PHYSICAL_START) upwards. We load by p_paddr, so no relocation is needed.

Entry points:
- e_entry: vmlinux.lds.S says ENTRY(phys_startup_64), the *physical* address of startup_64
  (arch/x86/kernel/head_64.S), entered in 64-bit mode with RSI = the zero page and an identity mapping
  of the kernel, zero page and command line.
- the PVH entry: a Xen ELF note (name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY = 18) holding the physical
  address of pvh_start_xen (arch/x86/platform/pvh/head.S), entered in 32-bit protected mode with paging
  off and EBX = a struct hvm_start_info.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pykvm.boot.errors import BootError
from pykvm.elf import MAGIC as ELF_MAGIC
from pykvm.elf import EM_X86_64, ET_EXEC, PT_LOAD, PT_NOTE, ElfFormatError, load_segments
from pykvm.elf import read_elf64
from pykvm.memory import GuestMemory
from pykvm.x86 import layout

XEN_ELFNOTE_PHYS32_ENTRY = 18     # xen/include/public/elfnote.h


@dataclass(frozen=True)
class Segment:
    """A PT_LOAD segment: file bytes [offset, offset + filesz) go to paddr, zeros up to memsz."""

    paddr: int
    offset: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


@dataclass(frozen=True)
class ElfKernel:
    """A validated x86-64 ELF kernel, ready to load."""

    entry: int                    # physical address of the 64-bit entry (startup_64)
    pvh_entry: int | None         # physical address of the 32-bit PVH entry, if the note is present
    segments: tuple[Segment, ...]  # the non-empty PT_LOAD segments
    image: bytes = field(repr=False)

    @property
    def start(self) -> int:
        return min(s.paddr for s in self.segments)

    @property
    def end(self) -> int:
        return max(s.end for s in self.segments)


def is_elf(data: bytes) -> bool:
    return bytes(data[:4]) == ELF_MAGIC


def parse_elf(image: bytes) -> ElfKernel:
    """Read and validate an x86-64 ELF kernel's headers; nothing is written to guest memory.

    Checks it is a little-endian 64-bit x86-64 file whose PT_LOAD segments lie inside the file and at
    or above 1 MiB. Every problem is a one-line BootError.
    """
    image = bytes(image)
    if not is_elf(image):
        raise BootError(f"not an ELF file (starts with {image[:4].hex()}, wanted 7f454c46): "
                        f"pass an ELF vmlinux or a bzImage")
    try:
        elf = read_elf64(image)
    except ElfFormatError as e:
        raise BootError(f"ELF file is malformed or not x86-64: {e}: pass an x86_64 vmlinux")
    if elf.machine != EM_X86_64:
        raise BootError(f"ELF file is for {elf.machine_name}, not x86-64 (EM_X86_64): "
                        f"pass an x86_64 vmlinux")
    if elf.type != ET_EXEC:
        # A kernel is linked to run at the addresses its program headers give (gABI e_type
        # ET_EXEC); ET_DYN is a program or library for a dynamic loader (`pykvm boot /bin/ls`).
        raise BootError(f"ELF file is {elf.type_name}, not ET_EXEC: a program or library, not a "
                        f"kernel; pass a vmlinux, a bzImage or a multiboot kernel")
    entry = elf.entry
    loads, pvh = [], None
    for seg in elf.segments:
        if seg.type == PT_LOAD:
            loads.append((seg.paddr, seg.vaddr, seg.offset, seg.filesz, seg.memsz))
        elif seg.type == PT_NOTE and pvh is None:
            pvh = _pvh_entry(image, seg.offset, seg.filesz)

    segments = []
    for paddr, _vaddr, off, filesz, memsz in loads:   # read_elf64 checked them against the file
        if memsz == 0:
            continue
        if paddr < layout.HIMEM_START:
            raise BootError(f"ELF segment at {paddr:#x} lies below 1 MiB, where pykvm keeps the zero "
                            f"page and page tables: link the kernel at 1 MiB or higher")
        segments.append(Segment(paddr, off, filesz, memsz))
    if not segments:
        raise BootError("ELF file has no non-empty PT_LOAD segments: nothing to load; pass a vmlinux")
    return ElfKernel(entry=_physical_entry(entry, loads), pvh_entry=pvh, segments=tuple(segments),
                     image=image)


def _pvh_entry(image: bytes, offset: int, size: int) -> int | None:
    """Walk the notes in a PT_NOTE segment for ("Xen", XEN_ELFNOTE_PHYS32_ENTRY).

    A note is: namesz, descsz, type (u32 each), then the name and the descriptor, each padded to
    4 bytes. Linux writes the entry with _ASM_PTR, so the descriptor is 8 bytes on x86-64 (4 on
    32-bit builds); it is a physical address below 4 GiB either way.
    """
    end = min(offset + size, len(image))
    pos = offset
    while pos + 12 <= end:
        namesz, descsz, ntype = (int.from_bytes(image[pos + i:pos + i + 4], "little")
                                 for i in (0, 4, 8))
        name_at = pos + 12
        desc_at = name_at + ((namesz + 3) & ~3)
        nxt = desc_at + ((descsz + 3) & ~3)
        if nxt > end:
            return None
        name = image[name_at:name_at + namesz].rstrip(b"\0")
        if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and descsz in (4, 8):
            return int.from_bytes(image[desc_at:desc_at + descsz], "little")
        pos = nxt
    return None


def _physical_entry(entry: int, loads) -> int:
    """e_entry as a physical address inside a loaded segment.

    vmlinux's e_entry is already physical (ENTRY(phys_startup_64)); an ELF whose entry is virtual is
    translated through the segment that contains it.
    """
    for paddr, _vaddr, _off, _filesz, memsz in loads:
        if paddr <= entry < paddr + memsz:
            return entry
    for paddr, vaddr, _off, _filesz, memsz in loads:
        if vaddr <= entry < vaddr + memsz:
            return paddr + (entry - vaddr)
    raise BootError(f"ELF entry point {entry:#x} is not inside any loaded segment: "
                    f"the vmlinux is corrupt")


def load_elf(mem: GuestMemory, kernel: ElfKernel | bytes) -> ElfKernel:
    """Copy an x86-64 ELF kernel's PT_LOAD segments to their physical addresses; zero each .bss tail."""
    if not isinstance(kernel, ElfKernel):
        kernel = parse_elf(kernel)
    load_segments(mem, kernel.image, kernel.segments, lambda i, seg: BootError(
        f"ELF segment {seg.paddr:#x}..{seg.end:#x} is outside guest RAM ({mem.size >> 20} MiB): "
        f"give the VM at least {-(-seg.end // layout.MiB)} MiB"))
    return kernel
