"""The two ELF headers a loader reads: the file header and the program headers.

An ELF executable (System V ABI, "gABI" chapters 4 and 5; the C structs are Elf64_Ehdr and
Elf64_Phdr in <elf.h>) starts with a 64-byte file header:

    e_ident[16]   "\\x7fELF", class (2 = 64-bit), data (1 = little-endian), version 1, OS ABI...
    e_type        2 = ET_EXEC, a linked executable at fixed addresses
    e_machine     62 = EM_X86_64
    e_version, e_entry (the entry address), e_phoff (where the program headers start),
    e_shoff, e_flags, e_ehsize, e_phentsize (56), e_phnum, e_shentsize, e_shnum, e_shstrndx

and e_phnum program headers of 56 bytes each describe the *segments*: what a loader does with the
file. A PT_LOAD segment says "copy p_filesz bytes from file offset p_offset to address p_paddr (or
p_vaddr), then zero-fill up to p_memsz" - the zeroed tail is .bss. A PT_NOTE segment holds notes
(the Linux PVH entry is one: pykvm/boot/elf.py). Sections (the linker's view: .text, .symtab,
DWARF...) are not needed to load a program, and are not read here.

pyelftools reads all of ELF; importing it costs ~40 ms here, a third of the VMM's start-up budget
(bench/startup.py), to read these two headers for every firmware test guest. So pykvm reads them
itself, and the tests check this reader against pyelftools field by field.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from .record import FrozenRecord

MAGIC = b"\x7fELF"
ELFCLASS32 = 1
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_EXEC = 2
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4

# e_ident[16], e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize,
# e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
# p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
_PHDR = struct.Struct("<IIQQQQQQ")
# The 32-bit forms (Elf32_Ehdr, Elf32_Phdr): the same fields with 4-byte addresses and offsets,
# and p_flags moved after p_memsz.
_EHDR32 = struct.Struct("<16sHHIIIIIHHHHHH")
_PHDR32 = struct.Struct("<IIIIIIII")     # p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz,
                                         # p_flags, p_align

# For error messages: what a file built for another machine was built for (<elf.h>).
MACHINE_NAMES = {3: "EM_386", 8: "EM_MIPS", 20: "EM_PPC", 21: "EM_PPC64", 22: "EM_S390",
                 40: "EM_ARM", 50: "EM_IA_64", 62: "EM_X86_64", 183: "EM_AARCH64",
                 243: "EM_RISCV", 258: "EM_LOONGARCH"}
TYPE_NAMES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}


class ElfFormatError(ValueError):
    """The bytes are not a well-formed 64-bit little-endian ELF file; the message says why."""


class ProgramHeader(FrozenRecord):
    """One Elf64_Phdr (gABI ch. 5, "Program Header"), its fields in file order."""

    __slots__ = ("type", "flags", "offset", "vaddr", "paddr", "filesz", "memsz", "align")

    def __init__(self, type: int, flags: int, offset: int, vaddr: int, paddr: int, filesz: int,
                 memsz: int, align: int) -> None:
        for k, v in zip(self.__slots__, (type, flags, offset, vaddr, paddr, filesz, memsz, align)):
            object.__setattr__(self, k, v)


class Elf64(FrozenRecord):
    """What a loader needs of a 64-bit little-endian ELF file."""

    __slots__ = ("type", "machine", "entry", "segments")

    def __init__(self, type: int, machine: int, entry: int,
                 segments: tuple[ProgramHeader, ...]) -> None:
        for k, v in zip(self.__slots__, (type, machine, entry, segments)):
            object.__setattr__(self, k, v)

    @property
    def machine_name(self) -> str:
        return MACHINE_NAMES.get(self.machine, f"machine {self.machine}")

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, f"type {self.type}")

    def loads(self) -> list[ProgramHeader]:
        return [p for p in self.segments if p.type == PT_LOAD]


def load_segments(mem, image: bytes, segments: Sequence,
                  outside: Callable[[int, object], Exception]) -> None:
    """The one ELF loader: copy each segment's file bytes to its physical address in guest memory
    (`mem`, a pykvm.memory.GuestMemory) and zero the rest up to its memory size (.bss).

    `segments` are PT_LOAD headers (ProgramHeader, or anything with paddr, offset, filesz and
    memsz) whose file bytes read_elf has checked. All are checked to lie in guest RAM before any is
    written; for the first that does not, `outside(index, segment)` makes the caller's one-line
    error (the kernel loader and the firmware loader word it differently)."""
    for i, seg in enumerate(segments):
        if seg.memsz and not mem.contains(seg.paddr, seg.memsz):
            raise outside(i, seg)
    view = memoryview(image)
    for seg in segments:
        if seg.memsz:
            mem.write(seg.paddr, view[seg.offset:seg.offset + seg.filesz])
            if seg.memsz > seg.filesz:
                mem.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz)


def read_elf64(data: bytes) -> Elf64:
    """Parse the file header and program headers of a 64-bit little-endian ELF file. Raises
    ElfFormatError, one line, for anything else, for headers that run past the end of `data`, and
    for a PT_LOAD segment whose file bytes lie past the end or exceed its memory size."""
    return read_elf(data, classes=(ELFCLASS64,))


def read_elf(data: bytes, classes: tuple[int, ...] = (ELFCLASS32, ELFCLASS64)) -> Elf64:
    """read_elf64 for 32-bit (ELFCLASS32) files too: the result has the same shape either way
    (multiboot kernels are usually 32-bit ELF files; pykvm/boot/multiboot.py)."""
    if data[:4] != MAGIC:
        raise ElfFormatError(f"not an ELF file (starts with {bytes(data[:4]).hex()}, "
                             f"wanted {MAGIC.hex()})")
    cls = data[4] if len(data) > 4 else 0
    if len(data) < _EHDR32.size or (cls == ELFCLASS64 and len(data) < _EHDR.size):
        raise ElfFormatError(f"truncated ELF header ({len(data)} bytes of "
                             f"{_EHDR32.size if cls == ELFCLASS32 else _EHDR.size})")
    if cls not in classes:
        raise ElfFormatError(f"ELF class {cls} ({ {1: 32, 2: 64}.get(cls, '?') }-bit), not "
                             + " or ".join(f"{32 * c}-bit" for c in classes))
    ehdr, phdr = (_EHDR, _PHDR) if cls == ELFCLASS64 else (_EHDR32, _PHDR32)
    if len(data) < ehdr.size:
        raise ElfFormatError(f"truncated ELF header ({len(data)} bytes of {ehdr.size})")
    (ident, e_type, machine, version, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum,
     _shentsize, _shnum, _shstrndx) = ehdr.unpack_from(data, 0)
    if ident[5] != ELFDATA2LSB:
        raise ElfFormatError("big-endian ELF file, not little-endian")
    if version != EV_CURRENT:
        raise ElfFormatError(f"ELF version {version}, not {EV_CURRENT}")
    if phnum and phentsize != phdr.size:
        raise ElfFormatError(f"program header entries of {phentsize} bytes, not {phdr.size}")
    if phoff + phnum * phdr.size > len(data):
        raise ElfFormatError(f"truncated: program headers at {phoff:#x} (x{phnum}) run past the "
                             f"end of the {len(data):#x}-byte file")
    if cls == ELFCLASS64:
        segments = tuple(ProgramHeader(*_PHDR.unpack_from(data, phoff + i * _PHDR.size))
                         for i in range(phnum))
    else:
        segments = tuple(ProgramHeader(t, fl, off, va, pa, fs, ms, al) for t, off, va, pa, fs, ms, fl, al
                         in (_PHDR32.unpack_from(data, phoff + i * _PHDR32.size)
                             for i in range(phnum)))
    for i, p in enumerate(segments):
        if p.type != PT_LOAD:
            continue
        if p.filesz > p.memsz:
            raise ElfFormatError(f"PT_LOAD segment {i} at {p.paddr:#x} has filesz {p.filesz:#x} "
                                 f"> memsz {p.memsz:#x}")
        if p.offset + p.filesz > len(data):
            raise ElfFormatError(f"truncated: PT_LOAD segment {i} at {p.paddr:#x} needs file "
                                 f"bytes {p.offset:#x}..{p.offset + p.filesz:#x} of a "
                                 f"{len(data):#x}-byte file")
    return Elf64(e_type, machine, entry, segments)
