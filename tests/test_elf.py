"""pykvm.elf, the loader's ELF header reader, checked against pyelftools (no KVM)."""

from __future__ import annotations

import io
import struct

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import given, settings, strategies as st

from pykvm.elf import EM_X86_64, ET_EXEC, PT_LOAD, ElfFormatError, read_elf64
from pykvm.testing import firmware as F


@pytest.fixture(scope="module")
def programs():
    return {name: F.build(name).read_bytes() for name in ("hello", "modes", "virtio_blk")}


def _reference(data: bytes):
    """The same fields as pyelftools reads them."""
    elf = ELFFile(io.BytesIO(data))
    return (elf.header["e_entry"],
            [(s["p_offset"], s["p_vaddr"], s["p_paddr"], s["p_filesz"], s["p_memsz"],
              s["p_flags"], s["p_align"]) for s in elf.iter_segments()],
            [s["p_type"] == "PT_LOAD" for s in elf.iter_segments()])


def _ours(data: bytes):
    elf = read_elf64(data)
    return (elf.entry,
            [(p.offset, p.vaddr, p.paddr, p.filesz, p.memsz, p.flags, p.align)
             for p in elf.segments],
            [p.type == PT_LOAD for p in elf.segments])


def test_firmware_headers_match_pyelftools(programs):
    for name, data in programs.items():
        elf = read_elf64(data)
        assert (elf.machine, elf.type) == (EM_X86_64, ET_EXEC), name
        assert elf.loads(), name
        assert _ours(data) == _reference(data), name


@pytest.mark.parametrize("patch, words", [
    ((0, b"MZ\x90\x00"), ["not an ELF"]),
    ((4, b"\x01"), ["class 1", "32-bit"]),           # ELFCLASS32
    ((5, b"\x02"), ["big-endian"]),                  # ELFDATA2MSB
    ((20, b"\x07\x00\x00\x00"), ["version 7"]),
    ((54, b"\x20\x00"), ["32 bytes", "not 56"]),     # e_phentsize
    ((56, b"\xff\xff"), ["truncated"]),              # e_phnum: far more headers than the file holds
])
def test_malformed_headers_are_one_line_errors(programs, patch, words):
    data = bytearray(programs["hello"])
    at, raw = patch
    data[at:at + len(raw)] = raw
    with pytest.raises(ElfFormatError) as e:
        read_elf64(bytes(data))
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("n", [0, 3, 4, 63])
def test_truncated_files(programs, n):
    with pytest.raises(ElfFormatError):
        read_elf64(programs["hello"][:n])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_headers_parse_like_pyelftools_or_fail_cleanly(programs, data):
    """Corrupt bytes of the file header or the program headers: the reader either raises
    ElfFormatError or reads exactly what pyelftools reads."""
    image = bytearray(programs["hello"])
    phoff, phnum = struct.unpack_from("<Q", image, 32)[0], struct.unpack_from("<H", image, 56)[0]
    end = phoff + phnum * 56
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, end - 1))
        image[at] = data.draw(st.integers(0, 255))
    image = bytes(image)
    try:
        ours = _ours(image)
    except ElfFormatError:
        return
    try:
        reference = _reference(image)
    except Exception:    # pyelftools refuses some files this reader need not look at
        return
    assert ours == reference


def test_load_segments_are_checked_against_the_file(programs):
    data = bytearray(programs["hello"])
    phoff = struct.unpack_from("<Q", data, 32)[0]
    load = next(i for i in range(struct.unpack_from("<H", data, 56)[0])
                if struct.unpack_from("<I", data, phoff + 56 * i)[0] == PT_LOAD)
    at = phoff + 56 * load
    memsz = struct.unpack_from("<Q", data, at + 40)[0]
    bigger = bytearray(data)
    struct.pack_into("<Q", bigger, at + 32, memsz + 1)              # p_filesz > p_memsz
    with pytest.raises(ElfFormatError, match="filesz"):
        read_elf64(bytes(bigger))
    beyond = bytearray(data)
    struct.pack_into("<Q", beyond, at + 8, len(data))              # p_offset at the end of file
    with pytest.raises(ElfFormatError, match="truncated"):
        read_elf64(bytes(beyond))
