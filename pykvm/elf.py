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
from dataclasses import dataclass

MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4

# e_ident[16], e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags, e_ehsize,
# e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
# p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
_PHDR = struct.Struct("<IIQQQQQQ")

# For error messages: what a file built for another machine was built for (<elf.h>).
MACHINE_NAMES = {3: "EM_386", 8: "EM_MIPS", 20: "EM_PPC", 21: "EM_PPC64", 22: "EM_S390",
                 40: "EM_ARM", 50: "EM_IA_64", 62: "EM_X86_64", 183: "EM_AARCH64",
                 243: "EM_RISCV", 258: "EM_LOONGARCH"}
TYPE_NAMES = {0: "ET_NONE", 1: "ET_REL", 2: "ET_EXEC", 3: "ET_DYN", 4: "ET_CORE"}


class ElfFormatError(ValueError):
    """The bytes are not a well-formed 64-bit little-endian ELF file; the message says why."""


@dataclass(frozen=True)
class ProgramHeader:
    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


@dataclass(frozen=True)
class Elf64:
    """What a loader needs of a 64-bit little-endian ELF file."""

    type: int
    machine: int
    entry: int
    segments: tuple[ProgramHeader, ...]

    @property
    def machine_name(self) -> str:
        return MACHINE_NAMES.get(self.machine, f"machine {self.machine}")

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.type, f"type {self.type}")

    def loads(self) -> list[ProgramHeader]:
        return [p for p in self.segments if p.type == PT_LOAD]


def read_elf64(data: bytes) -> Elf64:
    """Parse the file header and program headers of a 64-bit little-endian ELF file. Raises
    ElfFormatError, one line, for anything else, for headers that run past the end of `data`, and
    for a PT_LOAD segment whose file bytes lie past the end or exceed its memory size."""
    if data[:4] != MAGIC:
        raise ElfFormatError(f"not an ELF file (starts with {bytes(data[:4]).hex()}, "
                             f"wanted {MAGIC.hex()})")
    if len(data) < _EHDR.size:
        raise ElfFormatError(f"truncated ELF header ({len(data)} bytes of {_EHDR.size})")
    (ident, e_type, machine, version, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum,
     _shentsize, _shnum, _shstrndx) = _EHDR.unpack_from(data, 0)
    if ident[4] != ELFCLASS64:
        raise ElfFormatError(f"ELF class {ident[4]} ({32 if ident[4] == 1 else '?'}-bit), "
                             "not 64-bit")
    if ident[5] != ELFDATA2LSB:
        raise ElfFormatError("big-endian ELF file, not little-endian")
    if version != EV_CURRENT:
        raise ElfFormatError(f"ELF version {version}, not {EV_CURRENT}")
    if phnum and phentsize != _PHDR.size:
        raise ElfFormatError(f"program header entries of {phentsize} bytes, not {_PHDR.size}")
    if phoff + phnum * _PHDR.size > len(data):
        raise ElfFormatError(f"truncated: program headers at {phoff:#x} (x{phnum}) run past the "
                             f"end of the {len(data):#x}-byte file")
    segments = tuple(ProgramHeader(*_PHDR.unpack_from(data, phoff + i * _PHDR.size))
                     for i in range(phnum))
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
